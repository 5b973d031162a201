//! A connect storm must not hurt live calls (issue #12): while a few thousand
//! sessions open at once on two instances, a live pair's messages keep
//! arriving in order, every new session is welcomed, and nobody hears
//! `resync` or an error. The tight figures live in `bench/run`
//! (latency-under-storm). The bound here, 150 ms at p99, only guards a test
//! build on a shared 2-core machine against a live pair stalled behind the
//! storm: 50 ms turned out too tight for it (p99 17–62 ms over eleven runs of
//! this build and the one before it on a quiet machine, once 100 ms; 23–34 ms
//! on another day; 63–196 ms before sessions were set up on a front thread
//! of their own).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_tests::{Client, Cluster};
use tokio::sync::Semaphore;

/// Sockets opened during the storm (half on each instance, in pairs).
const STORM_SOCKETS: usize = 2000;
/// Handshakes in flight at once.
const CONCURRENCY: usize = 200;
/// The live pair's pace.
const EVERY: Duration = Duration::from_millis(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_does_not_hold_up_a_live_pair() {
    let c = Cluster::redis(2).await;
    let (alice, mut bob) = c.alice_and_bob().await;
    let (mut alice_tx, mut alice_rx) = alice.split();
    let epoch = Instant::now();

    // The live pair: alice sends a numbered message every 10 ms; bob measures
    // how long each took, until the storm is over.
    let storm_done = Arc::new(tokio::sync::Notify::new());
    let sender = {
        let storm_done = storm_done.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(EVERY);
            let done = storm_done.notified();
            tokio::pin!(done);
            loop {
                tokio::select! {
                    _ = &mut done => break,
                    _ = tick.tick() => {
                        let at = epoch.elapsed().as_micros() as u64;
                        alice_tx.send(json!({"type": "candidate", "n": sent, "at": at}).to_string()).await;
                        sent += 1;
                    }
                }
            }
            alice_tx.send(json!({"type": "bye", "n": sent}).to_string()).await;
            sent
        })
    };
    // Bob measures each message's delay as it arrives.
    let receiver = tokio::spawn(async move {
        let mut delays = Vec::new();
        loop {
            let message = bob.recv_json().await;
            match message["type"].as_str() {
                Some("candidate") => {
                    assert_eq!(message["n"].as_u64(), Some(delays.len() as u64), "in order, none lost");
                    let sent_at = Duration::from_micros(message["at"].as_u64().unwrap());
                    delays.push(epoch.elapsed().saturating_sub(sent_at));
                }
                Some("bye") => return (delays, bob),
                _ => panic!("the live pair heard {message}"),
            }
        }
    });
    // Nothing may come back to alice meanwhile (no resync, no error).
    let alice_watch = tokio::spawn(async move { alice_rx.recv_text().await });

    // The storm: pairs of new sessions, each side on another instance, from
    // a runtime of their own (so that the clients' handshakes don't take the
    // live pair's turns on the instances' runtime).
    let urls: Vec<String> = (0..STORM_SOCKETS)
        .map(|i| {
            let (a, b) = (format!("s{}a", i / 2), format!("s{}b", i / 2));
            let (user, peer) = if i % 2 == 0 { (a, b) } else { (b, a) };
            c.node(i).ws_url(&user, &peer)
        })
        .collect();
    let storm = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async move {
            let permits = Arc::new(Semaphore::new(CONCURRENCY));
            let mut opening = Vec::new();
            for url in urls {
                let permits = permits.clone();
                opening.push(tokio::spawn(async move {
                    let _permit = permits.acquire_owned().await.unwrap();
                    let mut client = Client::connect(&url).await.expect("upgrade during the storm");
                    let welcome = client.recv_json().await;
                    assert_eq!(welcome["type"], "welcome", "{welcome}");
                    client
                }));
            }
            let mut storm = Vec::with_capacity(STORM_SOCKETS);
            for task in opening {
                storm.push(task.await.expect("every session is welcomed"));
            }
            // Every new session heard only its welcome and its peer's join: no resync, no error.
            for client in &mut storm {
                if let Ok(event) = tokio::time::timeout(std::time::Duration::ZERO, client.recv_json()).await {
                    assert_eq!(event["type"], "peer-joined", "{event}");
                }
            }
            storm.len()
        })
    });
    let opened = storm.await.expect("the storm's runtime");
    assert_eq!(opened, STORM_SOCKETS);
    storm_done.notify_one();

    let sent = sender.await.unwrap();
    let (mut delays, _bob) = receiver.await.unwrap();
    assert_eq!(delays.len() as u64, sent, "every live message arrived");
    assert!(!alice_watch.is_finished(), "alice heard something: {:?}", alice_watch.await);
    alice_watch.abort();
    delays.sort_unstable();
    let p99 = delays[delays.len() * 99 / 100];
    let max = *delays.last().unwrap();
    eprintln!("live pair during a {STORM_SOCKETS}-socket storm: {} messages, p99 {p99:?}, max {max:?}", delays.len());
    assert!(p99 < Duration::from_millis(150), "p99 {p99:?} during the storm");
}
