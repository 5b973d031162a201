//! Redis Cluster faults, with traffic on pairs spread over every shard: a
//! killed master, a manual failover, a frozen master, a migrated slot. The
//! affected pairs hear `resync` and flow again; no other pair notices; no
//! socket closes; `/readyz` tells the truth meanwhile.

use std::time::Instant;

use serde_json::{json, Value};
use switchboard::broker::cluster::slot;
use switchboard::pair::{Names, PairId, UserId};
use switchboard_tests::{eventually, Client, Cluster};

/// Two clients of one pair, on different instances, and the slot of their channel.
struct Pair {
    a: Client,
    b: Client,
    slot: u16,
    name: String,
}

fn channel_slot(a: &str, b: &str) -> u16 {
    let pair = PairId::new(&UserId::parse(a).unwrap(), &UserId::parse(b).unwrap()).unwrap();
    slot(&Names::new("switchboard", true).channel(&pair))
}

/// Opens pairs until every master serves at least two of them.
async fn pairs_over_every_shard(c: &Cluster) -> Vec<Pair> {
    let cluster = c.redis_cluster.as_ref().unwrap();
    let masters = cluster.masters().await;
    let mut per_master = std::collections::HashMap::<u16, usize>::new();
    let mut pairs = Vec::new();
    for i in 0.. {
        if masters.iter().all(|m| per_master.get(m).copied().unwrap_or(0) >= 2) {
            break;
        }
        let (a, b) = (format!("u{i}a"), format!("u{i}b"));
        let slot = channel_slot(&a, &b);
        let master = cluster.master_of(slot).await;
        if per_master.get(&master).copied().unwrap_or(0) >= 3 {
            continue;
        }
        *per_master.entry(master).or_default() += 1;
        let (mut ca, _) = c.node(0).join(&a, &b).await;
        let (cb, _) = c.node(1).join(&b, &a).await;
        assert_eq!(ca.recv_json().await["type"], "peer-joined");
        pairs.push(Pair { a: ca, b: cb, slot, name: a });
    }
    for pair in &mut pairs {
        relays(pair, "before").await;
    }
    pairs
}

/// One message each way; the next thing each side hears is the other's
/// message (after any late copies of [`flows`]' retries).
async fn relays(pair: &mut Pair, tag: &str) {
    pair.a.send(json!({"type": "offer", "tag": tag, "pair": pair.name}).to_string()).await;
    assert_eq!(next(&mut pair.b).await, json!({"type": "offer", "tag": tag, "pair": pair.name}), "{}", pair.name);
    pair.b.send(json!({"type": "answer", "tag": tag}).to_string()).await;
    assert_eq!(next(&mut pair.a).await, json!({"type": "answer", "tag": tag}), "{}", pair.name);
}

/// The next event, skipping what [`flows`] may leave behind: a retry's late
/// copy, or a late refusal of one.
async fn next(client: &mut Client) -> Value {
    loop {
        let event = client.recv_json().await;
        let retry = event["tag"] == "after" || event["code"] == "broker_unavailable";
        if !retry {
            return event;
        }
    }
}

/// Sends from `from` until `to` receives it: a send while the pair's master
/// is being replaced may be refused (`broker_unavailable`), never lost
/// unreported. A refused send may still arrive late: its command reached the
/// old master before it froze, and redis-rs retried it on the new one.
async fn flows(from: &mut Client, to: &mut Client, tag: &str) {
    for attempt in 0..20 {
        let message = json!({"type": "candidate", "tag": tag, "attempt": attempt});
        from.send(message.to_string()).await;
        loop {
            tokio::select! {
                got = to.recv_json() => {
                    if got["type"] == "resync" {
                        // A second resubscription during the same fault (the
                        // slot map may change twice): told again, not lost.
                        continue;
                    }
                    assert_eq!((&got["type"], &got["tag"]), (&message["type"], &message["tag"]), "{got}");
                    return;
                }
                told = from.recv_json() => {
                    if told["tag"] == tag {
                        // A late copy of the other direction's retry: not an answer to this send.
                        continue;
                    }
                    // Not delivered: the sender is told so, and sends again.
                    assert_eq!(told["type"], "error", "{told}");
                    assert_eq!(told["code"], "broker_unavailable", "{told}");
                    break;
                }
            }
        }
    }
    panic!("no flow after the fault");
}

/// Expects `resync` as the next event of both sides of every pair in `pairs`.
async fn all_resync(pairs: &mut [&mut Pair]) {
    for pair in pairs.iter_mut() {
        assert_eq!(pair.a.recv_json().await, json!({"type": "resync"}), "{}", pair.name);
        assert_eq!(pair.b.recv_json().await, json!({"type": "resync"}), "{}", pair.name);
    }
}

enum Fault {
    KillMaster,
    ManualFailover,
    FreezeMaster,
    MigrateSlot,
}

/// Runs `fault` against the master of the first pair's slot (or that slot
/// alone, for a migration) and checks what each pair sees.
async fn survives(fault: Fault, label: &str) {
    let mut c = Cluster::redis_cluster(2).await;
    let mut pairs = pairs_over_every_shard(&c).await;
    let cluster = c.redis_cluster.as_ref().unwrap();
    let victim_slot = pairs[0].slot;
    let victim = cluster.master_of(victim_slot).await;
    let affected = |p: &Pair, master_of: &dyn Fn(u16) -> bool| master_of(p.slot);
    let slots_of_victim: Vec<u16> = {
        let mut v = Vec::new();
        for p in &pairs {
            if cluster.master_of(p.slot).await == victim {
                v.push(p.slot);
            }
        }
        v
    };
    let hit: Box<dyn Fn(u16) -> bool> = match fault {
        Fault::MigrateSlot => Box::new(move |s| s == victim_slot),
        _ => Box::new(move |s| slots_of_victim.contains(&s)),
    };

    // A new pair on another master, to open during the failover.
    let mut elsewhere = None;
    for i in 0.. {
        let (a, b) = (format!("n{i}a"), format!("n{i}b"));
        if cluster.master_of(channel_slot(&a, &b)).await != victim {
            elsewhere = Some((a, b));
            break;
        }
    }
    let elsewhere = elsewhere.unwrap();

    let started = Instant::now();
    let mut sleeper = None;
    match fault {
        Fault::KillMaster => c.redis_cluster.as_mut().unwrap().kill(victim),
        Fault::ManualFailover => {
            let replica = cluster.replica_of(victim).await;
            let () =
                redis::cmd("CLUSTER").arg("FAILOVER").query_async(&mut cluster.node_conn(replica).await).await.unwrap();
        }
        Fault::FreezeMaster => {
            // Frozen past the node timeout: its replica takes over meanwhile.
            let mut conn = cluster.node_conn(victim).await;
            sleeper = Some(tokio::spawn(async move {
                let _: redis::RedisResult<()> = redis::cmd("DEBUG").arg("SLEEP").arg(12).query_async(&mut conn).await;
            }));
        }
        Fault::MigrateSlot => {
            let to = *cluster.masters().await.iter().find(|m| **m != victim).unwrap();
            cluster.migrate_slot(victim_slot, victim, to).await;
        }
    }

    // Pairs elsewhere never notice: they relay at once, and the next thing they hear is each other.
    for pair in pairs.iter_mut().filter(|p| !affected(p, &*hit)) {
        relays(pair, "during").await;
    }
    // While a shard is lost, /readyz says so but stays 200 (every replica is
    // in the same state), and new sessions of other shards are taken.
    if matches!(fault, Fault::KillMaster | Fault::FreezeMaster) {
        eventually("readyz degraded while a shard is lost", || async {
            c.node(0).get("/readyz").await == (200, "degraded: a Redis shard is failing over\n".into())
        })
        .await;
        let (a, b) = elsewhere.clone();
        let (mut ca, _) = c.node(0).join(&a, &b).await;
        let (mut cb, _) = c.node(1).join(&b, &a).await;
        assert_eq!(ca.recv_json().await["type"], "peer-joined");
        flows(&mut ca, &mut cb, "new").await;
    }
    let mut hit_pairs: Vec<&mut Pair> = pairs.iter_mut().filter(|p| affected(p, &*hit)).collect();
    assert!(!hit_pairs.is_empty());
    all_resync(&mut hit_pairs).await;
    let resynced = started.elapsed();
    for pair in hit_pairs.iter_mut() {
        flows(&mut pair.a, &mut pair.b, "after").await;
        flows(&mut pair.b, &mut pair.a, "after").await;
    }
    let flowing = started.elapsed();
    eprintln!("cluster fault {label}: resync after {resynced:?}, flowing after {flowing:?}");
    for node in &c.instances {
        node.wait_ready().await;
    }
    // Everyone is still connected, and no one else heard anything but their peer.
    for pair in pairs.iter_mut() {
        relays(pair, "end").await;
    }
    if let Some(sleeper) = sleeper {
        let _ = sleeper.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master() {
    survives(Fault::KillMaster, "master SIGKILLed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover() {
    survives(Fault::ManualFailover, "CLUSTER FAILOVER").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_master() {
    survives(Fault::FreezeMaster, "master frozen (DEBUG SLEEP 12)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_slot() {
    survives(Fault::MigrateSlot, "slot migrated").await;
}

/// Sharded pub/sub: each pair's channel is subscribed on its own shard's
/// master only, and both instances' subscriptions go away with the sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_channel_lives_on_its_shard_only() {
    let c = Cluster::redis_cluster(2).await;
    let cluster = c.redis_cluster.as_ref().unwrap();
    let mut pairs = pairs_over_every_shard(&c).await;
    let pair =
        PairId::new(&UserId::parse(&pairs[0].name).unwrap(), &UserId::parse(&pairs[0].name.replace('a', "b")).unwrap());
    let channel = Names::new("switchboard", true).channel(&pair.unwrap());
    let home = cluster.master_of(slot(&channel)).await;
    assert_eq!(cluster.shard_numsub(home, &channel).await, 2, "both instances, on the slot's master");
    relays(&mut pairs[0], "again").await;
    drop(pairs);
    eventually("subscriptions dropped with the sessions", || async { cluster.shard_numsub(home, &channel).await == 0 })
        .await;
    let _: Value = json!(null);
}

/// An ACL user (the default user off): the seeds are
/// `redis://user:password@…`, every node is reached with those credentials,
/// and pairs on every shard relay and see each other join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_on_a_cluster() {
    let cluster = switchboard_tests::RedisCluster::start_with(switchboard_tests::ClusterSetup {
        login: Some(("switchboard".into(), "s3cret-cluster".into())),
        tls: None,
    })
    .await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut s = switchboard_tests::settings(Some(&cluster.urls()));
        s.redis_mode = switchboard::config::RedisMode::Cluster;
        instances.push(switchboard_tests::Instance::start(s).await);
    }
    let c = Cluster { redis: None, redis_cluster: Some(cluster), instances };
    let mut pairs = pairs_over_every_shard(&c).await;
    for pair in &mut pairs {
        relays(pair, "tls").await;
    }
    let cluster = c.redis_cluster.as_ref().unwrap();
    let home = cluster.master_of(pairs[0].slot).await;
    let pair =
        PairId::new(&UserId::parse(&pairs[0].name).unwrap(), &UserId::parse(&pairs[0].name.replace('a', "b")).unwrap());
    let channel = Names::new("switchboard", true).channel(&pair.unwrap());
    assert_eq!(cluster.shard_numsub(home, &channel).await, 2, "both instances, as the ACL user");
}

/// TLS (client connections, the cluster bus and replication) with an ACL
/// user: the seeds are `rediss://user:password@…` and the CA is
/// `SWITCHBOARD_REDIS_CA_FILE`; the subscriber's own connections and
/// redis-rs's cluster connection both reach every node that way, and pairs on
/// every shard relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_an_acl_user_on_a_cluster() {
    let certs = switchboard_tests::tls::Certificates::new();
    let cluster = switchboard_tests::RedisCluster::start_with(switchboard_tests::ClusterSetup {
        login: Some(("switchboard".into(), "s3cret-cluster".into())),
        tls: Some(certs.server_files()),
    })
    .await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut s = switchboard_tests::settings(Some(&cluster.urls()));
        s.redis_mode = switchboard::config::RedisMode::Cluster;
        s.redis_ca_file = Some(certs.ca());
        instances.push(switchboard_tests::Instance::start(s).await);
    }
    let c = Cluster { redis: None, redis_cluster: Some(cluster), instances };
    let mut pairs = pairs_over_every_shard(&c).await;
    for pair in &mut pairs {
        relays(pair, "tls").await;
    }
}
