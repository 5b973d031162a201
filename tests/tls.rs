//! rediss://: instances reach a TLS-only Redis whose certificate a private
//! CA signed (SWITCHBOARD_REDIS_CA_FILE), and refuse to pretend without it.

use switchboard_tests::redis_server::Setup;
use switchboard_tests::tls::Certificates;
use switchboard_tests::{http_get, relays_both_ways, settings, Client, Instance, Process, RedisServer};

async fn tls_redis(certs: &Certificates) -> RedisServer {
    RedisServer::start_with(Setup { tls: Some(certs.server_files()), ..Setup::default() }).await
}

async fn relay_over(url: &str, certs: &Certificates, redis: &RedisServer) {
    let instance = || async {
        let mut s = settings(Some(url));
        s.redis_ca_file = Some(certs.ca());
        Instance::start(s).await
    };
    let nodes = [instance().await, instance().await];
    let (mut alice, _) = nodes[0].join("alice", "bob").await;
    let (mut bob, _) = nodes[1].join("bob", "alice").await;
    // Presence went through Redis: node 0 heard of Bob from node 1.
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "tls").await;
    let clients: String =
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").query_async(&mut redis.conn().await).await.unwrap();
    assert_eq!(clients.lines().count(), 2, "one TLS subscriber per instance: {clients}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_over_tls_to_an_ip_address() {
    let certs = Certificates::new();
    let redis = tls_redis(&certs).await;
    relay_over(&format!("rediss://127.0.0.1:{}", redis.port()), &certs, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_over_tls_to_a_host_name() {
    let certs = Certificates::new();
    let redis = tls_redis(&certs).await;
    relay_over(&format!("rediss://localhost:{}", redis.port()), &certs, &redis).await;
}

/// Without the CA, the server's certificate is not trusted: the instance
/// says why and stays unready, its sockets refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_the_instance_is_not_ready_and_says_why() {
    let certs = Certificates::new();
    let redis = tls_redis(&certs).await;
    let url = format!("rediss://127.0.0.1:{}", redis.port());
    let process = Process::spawn(&[("SWITCHBOARD_REDIS_URL", &url)]);
    let line = process.output().wait_for("a certificate error", |l| l.contains("\"level\":\"WARN\""));
    assert!(line.contains("certificate") && line.contains(&format!("127.0.0.1:{}", redis.port())), "{line}");
    assert_eq!(http_get(process.addr, "/readyz").await.0, 503);
    let refused = Client::connect(&process.ws_url("alice", "bob")).await.err().expect("no session without a broker");
    assert!(refused.to_string().contains("503"), "{refused}");
    assert_eq!(redis.pubsub_clients().await, 0);
}
