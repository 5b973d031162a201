//! `/metrics` counts what happened. Alone in its test binary: the metrics
//! recorder is per process.

use serde_json::json;
use switchboard_tests::{eventually, http_get, metric, Cluster, Instance, Process};

async fn scrape(node: &Instance) -> String {
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sessions_messages_rejects_and_broker_events() {
    let c = Cluster::redis(1).await;
    let node = c.node(0);
    let redis = c.redis.as_ref().unwrap();

    let (mut alice, _) = node.join("alice", "bob").await;
    let (mut bob, _) = node.join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    let offer = r#"{"type":"offer","sdp":"v=0"}"#;
    alice.send(offer).await;
    assert_eq!(bob.recv_text().await, offer);
    let answer = r#"{"type":"answer","sdp":"v=0"}"#;
    bob.send(answer).await;
    assert_eq!(alice.recv_text().await, answer);

    assert_eq!(node.get("/ws?userID=alice").await.0, 400);
    bob.send("not json").await;
    assert_eq!(bob.recv_json().await["code"], "invalid_json");

    let (_alice2, _) = node.join("alice", "bob").await;
    assert_eq!(alice.expect_closed().await.code, Some(4001));
    assert_eq!(bob.recv_json().await["type"], "peer-joined");

    let _: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut redis.conn().await).await.unwrap();
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));

    eventually("the replaced session is counted closed", || async {
        metric(&scrape(node).await, r#"switchboard_sessions_closed_total{reason="replaced"}"#) == Some(1.0)
    })
    .await;
    let m = scrape(node).await;
    let value = |series: &str| metric(&m, series).unwrap_or_else(|| panic!("{series} missing from:\n{m}"));
    assert_eq!(value("switchboard_open_sockets"), 2.0);
    assert_eq!(value("switchboard_sessions_opened_total"), 3.0);
    assert_eq!(value("switchboard_sessions_replaced_total"), 1.0);
    assert_eq!(value("switchboard_messages_in_total"), 3.0, "offer, answer, and the refused frame");
    assert_eq!(value("switchboard_bytes_in_total"), (offer.len() + answer.len() + "not json".len()) as f64);
    // Out: 3 welcomes, 2 peer-joined, the offer, the answer, the error event, resync.
    assert!(value("switchboard_messages_out_total") >= 8.0);
    assert!(value("switchboard_bytes_out_total") > (offer.len() + answer.len()) as f64);
    assert_eq!(value(r#"switchboard_rejects_total{reason="bad_param"}"#), 1.0);
    assert_eq!(value(r#"switchboard_rejects_total{reason="invalid_json"}"#), 1.0);
    assert_eq!(value("switchboard_broker_publish_seconds_count"), 2.0);
    assert_eq!(value("switchboard_broker_reconnects_total"), 1.0);
    assert_eq!(value("switchboard_pair_subscriptions"), 1.0);
    assert_eq!(value("switchboard_call_setup_seconds_count"), 1.0);
    // Every step of each of the three sessions' setups was timed.
    for step in ["upgrade", "subscribe", "claim", "welcome", "handoff"] {
        let count = value(&format!(r#"switchboard_session_setup_seconds_count{{step="{step}"}}"#));
        assert_eq!(count, 3.0, "setup step {step}");
    }
    assert!(m.contains("switchboard_broker_publish_seconds_bucket{le=\"0.001\"}"), "a histogram, not a summary");
}

/// The series named in docs/operations.md's metrics table, with their types.
fn documented_series() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    let table = doc.split_once("## Metrics").expect("a Metrics section").1;
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), cells.get(2)?.to_string()))
        })
        .collect()
}

/// The `reason` values the doc lists for `series`: the backticked words of its paragraph.
fn documented_reasons(series: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    let start = format!("`reason` values of `{series}`:");
    let paragraph = doc.split_once(&start).unwrap_or_else(|| panic!("no {start}")).1.split("\n\n").next().unwrap();
    paragraph.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_series_is_there_at_zero_from_the_first_scrape() {
    let series = documented_series();
    assert!(series.len() >= 13, "{series:?}");
    let server = Process::spawn(&[]);
    let (status, m) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    for (name, kind) in &series {
        let lines: Vec<&str> = m.lines().filter(|l| !l.starts_with('#')).collect();
        match kind.as_str() {
            "histogram" => {
                // Unlabelled, or one series per label value: all at zero.
                for suffix in ["_count", "_sum"] {
                    let series = format!("{name}{suffix}");
                    let values: Vec<&str> = lines
                        .iter()
                        .filter(|l| l.starts_with(&format!("{series} ")) || l.starts_with(&format!("{series}{{")))
                        .filter_map(|l| l.rsplit(' ').next())
                        .collect();
                    assert!(!values.is_empty(), "{series} missing from:\n{m}");
                    assert!(values.iter().all(|v| *v == "0"), "{series} not at zero: {values:?}");
                }
                assert!(lines.iter().any(|l| l.starts_with(&format!("{name}_bucket{{"))), "{name} buckets in:\n{m}");
            }
            "counter" | "gauge" => {
                let found: Vec<&&str> = lines
                    .iter()
                    .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
                    .collect();
                assert!(!found.is_empty(), "{name} missing from the first scrape:\n{m}");
                // The scrape's own connection is an open HTTP connection.
                let zero = if name == "switchboard_http_connections" { " 1" } else { " 0" };
                assert!(found.iter().all(|l| l.ends_with(zero)), "{name} not at{zero}: {found:?}");
            }
            other => panic!("{name}: unknown type {other}"),
        }
    }
    for labelled in ["switchboard_sessions_closed_total", "switchboard_rejects_total"] {
        let reasons = documented_reasons(labelled);
        assert!(reasons.len() >= 10, "{labelled}: {reasons:?}");
        for reason in reasons {
            let series = format!(r#"{labelled}{{reason="{reason}"}}"#);
            assert_eq!(metric(&m, &series), Some(0.0), "{series} in:\n{m}");
        }
    }
}
