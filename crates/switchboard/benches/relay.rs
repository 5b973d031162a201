//! Regression guard for the per-message path: `cargo bench -p switchboard`.
//!
//! Each relayed message is checked (`protocol::check_client_frame`), wrapped in an
//! envelope (`broker::envelope::encode`), and on the receiving replica decoded and fanned
//! out to the local sessions of the pair (`registry::Registry::dispatch`, which also decodes).
//! Payloads are realistic: a ~300 B ICE candidate and a ~4 KB SDP offer with `\r\n` escapes.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::broker::envelope::{self, Kind};
use switchboard::pair::{PairId, UserId};
use switchboard::protocol::{check_client_frame, ServerEvent};
use switchboard::session::handle::SessionHandle;
use switchboard::session::registry::Registry;

fn candidate() -> Vec<u8> {
    br#"{"type":"candidate","candidate":{"candidate":"candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 0.0.0.0 rport 0 generation 0 ufrag sXyZ network-cost 999","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"sXyZ"}}"#
        .to_vec()
}

fn offer(target: usize) -> Vec<u8> {
    let mut sdp = String::from(
        "v=0\\r\\no=- 4611731400430051336 2 IN IP4 127.0.0.1\\r\\ns=-\\r\\nt=0 0\\r\\n\
         a=group:BUNDLE 0 1\\r\\na=extmap-allow-mixed\\r\\na=msid-semantic: WMS\\r\\n",
    );
    let lines = [
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\\r\\n",
        "c=IN IP4 0.0.0.0\\r\\na=rtcp:9 IN IP4 0.0.0.0\\r\\n",
        "a=ice-ufrag:sXyZ\\r\\na=ice-pwd:4ZcD8bVyMmkbwWxNqJ3e7TnR\\r\\na=ice-options:trickle\\r\\n",
        "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\\r\\n",
        "a=setup:actpass\\r\\na=mid:0\\r\\na=sendrecv\\r\\na=rtcp-mux\\r\\n",
        "a=rtpmap:111 opus/48000/2\\r\\na=rtcp-fb:111 transport-cc\\r\\na=fmtp:111 minptime=10;useinbandfec=1\\r\\n",
    ];
    let mut i = 0;
    while sdp.len() + 40 < target {
        sdp.push_str(lines[i % lines.len()]);
        i += 1;
    }
    format!(r#"{{"type":"offer","sdp":"{sdp}"}}"#).into_bytes()
}

fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    vec![("candidate_300B", candidate()), ("offer_4KB", offer(4096))]
}

fn frame_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("check_client_frame");
    for (name, p) in payloads() {
        g.throughput(Throughput::Bytes(p.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &p, |b, p| {
            b.iter(|| check_client_frame(black_box(p)).is_ok())
        });
    }
    g.finish();
}

fn envelope_codec(c: &mut Criterion) {
    let user = UserId::parse("alice-1234").expect("valid id");
    let mut g = c.benchmark_group("envelope");
    for (name, p) in payloads() {
        g.throughput(Throughput::Bytes(p.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", name), &p, |b, p| {
            b.iter(|| envelope::encode(Kind::Message, &user, 0x1234_5678_9abc_def0, black_box(p)))
        });
        let raw = envelope::encode(Kind::Message, &user, 0x1234_5678_9abc_def0, &p);
        g.bench_with_input(BenchmarkId::new("decode", name), &raw, |b, raw| {
            b.iter(|| envelope::decode(black_box(raw)).map(|e| e.body.len()))
        });
    }
    g.finish();
}

/// One pair on this replica: the sender's session and the receiver's. Dispatch decodes the
/// envelope and queues the body for the receiver; the bench drains that queue as the
/// receiver's session would.
fn dispatch(c: &mut Criterion) {
    let alice = UserId::parse("alice-1234").expect("valid id");
    let bob = UserId::parse("bob-5678").expect("valid id");
    let channel = "switchboard:pair:alice-1234:bob-5678";
    let registry = Registry::new();
    let pair = PairId::new(&alice, &bob).expect("two users");
    let sender = SessionHandle::new(1, alice.clone(), pair.clone(), 256, 1 << 20);
    let receiver = Arc::new(SessionHandle::new(2, bob, pair, 256, 1 << 20));
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let key: Arc<str> = channel.into();
    registry.insert(&key, Arc::new(sender));
    registry.insert(&key, receiver.clone());
    let mut g = c.benchmark_group("registry_dispatch");
    for (name, p) in payloads() {
        let raw: Bytes = envelope::encode(Kind::Message, &alice, 1, &p);
        g.throughput(Throughput::Bytes(p.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &raw, |b, raw| {
            b.iter(|| {
                let n = registry.dispatch(channel, black_box(raw));
                let work = runtime.block_on(receiver.next_work()).expect("work");
                let frame = work.frames.front().expect("delivered to the other user");
                receiver.outbox.sent(frame.len());
                n
            })
        });
    }
    g.finish();
}

fn server_events(c: &mut Criterion) {
    let ice = serde_json::value::RawValue::from_string(r#"[{"urls":"stun:stun.example.org:3478"}]"#.to_string())
        .expect("valid JSON");
    c.bench_function("server_event/welcome", |b| {
        b.iter(|| {
            ServerEvent::Welcome {
                user_id: "alice-1234",
                peer_id: "bob-5678",
                polite: false,
                peer_online: true,
                ice_servers: black_box(&*ice),
                resume: None,
            }
            .to_bytes()
        })
    });
}

/// Encoding what a session writes in one go: a batch of queued frames.
fn write_batch(c: &mut Criterion) {
    use switchboard::session::outbox::Work;
    use switchboard::session::writer;
    let mut g = c.benchmark_group("write_batch");
    for (name, p) in payloads() {
        let work =
            Work { pong: None, ping: false, frames: std::iter::repeat_n(Bytes::from(p.clone()), 8).collect(), ack: 0 };
        g.throughput(Throughput::Bytes(8 * p.len() as u64));
        g.bench_with_input(BenchmarkId::new("8_frames", name), &work, |b, work| {
            b.iter(|| writer::batch(black_box(work)).bytes.len())
        });
    }
    g.finish();
}

criterion_group!(benches, frame_check, envelope_codec, dispatch, server_events, write_batch);
criterion_main!(benches);
