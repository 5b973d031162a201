//! Confirmed sends and resume (issue #14), as a property: any interleaving
//! of sends, cuts (TCP resets), clean closes, resumes and reads on the two
//! sides of a pair, against the in-memory broker, ends with each side
//! having received every message of the other's exactly once, in order,
//! and no `resync`.
//!
//! A side that is down keeps what it sends (as `switchboard.js` queues it)
//! and resends it, with whatever had no `ack`, when it comes back. At the
//! end every side that is down comes back, and each reads until it has all
//! of its peer's messages and all of its own are confirmed.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use switchboard::broker::history::HISTORY_LEN;
use switchboard_tests::resuming::{self, assert_exactly_once_in_order, resume_on, Driven, Side};
use switchboard_tests::Instance;

/// Schedules tried per run: each takes a fraction of a second.
const CASES: u32 = 48;

/// How long a `Read` step waits for the next event before it stops: what
/// it reads depends on it, what the test asserts does not.
const QUIET: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Alice,
    Bob,
}

/// One step of a schedule; a step that does not apply (a cut of a side that
/// is down, a resume of one that is up) does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The side sends its next `n` messages (queues them, while down).
    Send(Who, usize),
    /// Its connection is reset (RST); it stays down.
    Cut(Who),
    /// Its connection is closed normally; it stays down.
    Close(Who),
    /// It comes back, resending what has no `ack`.
    Resume(Who),
    /// It handles the events that arrive until none has for [`QUIET`].
    Read(Who),
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![Just(Who::Alice), Just(Who::Bob)]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (who(), 1..8usize).prop_map(|(w, n)| Step::Send(w, n)),
        2 => who().prop_map(Step::Cut),
        1 => who().prop_map(Step::Close),
        2 => who().prop_map(Step::Resume),
        2 => who().prop_map(Step::Read),
    ]
}

/// Up to 32 steps, with the sends cut down to what the pair's history holds
/// at once, so that `resync` is never legitimate: both sides' messages and
/// every session's join go into the one history of the pair (the last
/// [`HISTORY_LEN`] entries). Beside the messages it takes the two first
/// joins, one join per resume (at most one per cut or close: a side comes
/// back only from down), and two spare for connections the server might end
/// on its own (none is expected). With no more than that appended in all,
/// nothing a side may resume from is ever trimmed. (The replay never nears
/// half the outbound queue, 128 frames, either.)
fn schedule() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 1..=32).prop_map(|steps| {
        let downs = steps.iter().filter(|s| matches!(s, Step::Cut(_) | Step::Close(_))).count();
        let mut room = HISTORY_LEN - 2 - downs - 2;
        steps
            .into_iter()
            .filter_map(|step| match step {
                Step::Send(who, n) => {
                    let n = n.min(room);
                    room -= n;
                    (n > 0).then_some(Step::Send(who, n))
                }
                other => Some(other),
            })
            .collect()
    })
}

/// Plays `steps` on a fresh pair (users `alice-<case>` and `bob-<case>`) of
/// `server`, then brings both sides back and checks what each received.
async fn play(server: &Instance, case: usize, steps: &[Step]) -> Tally {
    let (a, b) = (format!("alice-{case}"), format!("bob-{case}"));
    let url = || resuming::urls(vec![format!("ws://{}/ws", server.addr)]);
    // Bob first: Alice's first messages find his session joined.
    let bob = Side::connect(&b, &a, url()).await;
    let alice = Side::connect(&a, &b, url()).await;
    let mut sides = [Driven::new(alice), Driven::new(bob)];
    for &step in steps {
        match step {
            Step::Send(who, n) => sides[who as usize].send(n).await,
            Step::Cut(who) => sides[who as usize].cut(),
            Step::Close(who) => sides[who as usize].close().await,
            Step::Resume(who) => sides[who as usize].resume().await,
            Step::Read(who) => sides[who as usize].read(QUIET).await,
        }
    }
    let [alice, bob] = &mut sides;
    for side in [&mut *alice, &mut *bob] {
        side.resume().await;
    }
    alice.settle(bob.sent).await;
    bob.settle(alice.sent).await;
    for (side, peer) in [(&*alice, &*bob), (&*bob, &*alice)] {
        assert_exactly_once_in_order(&side.side, peer.sent);
        assert_eq!(side.side.resyncs, 0, "no resync (connections the server ended: {})", side.dropped);
        assert!(side.side.errors.is_empty(), "{:?}", side.side.errors);
    }
    Tally {
        messages: alice.sent + bob.sent,
        resumes: alice.side.resumed + bob.side.resumed,
        resent: alice.side.resent + bob.side.resent,
        dropped: alice.dropped + bob.dropped,
    }
}

/// What the cases did, in all.
#[derive(Debug, Default)]
struct Tally {
    /// Messages sent.
    messages: usize,
    /// Connections resumed.
    resumes: usize,
    /// Messages resent at a resume.
    resent: usize,
    /// Connections the server ended on its own.
    dropped: usize,
}

#[test]
fn any_interleaving_of_cuts_and_resumes_delivers_every_message_once_in_order() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let server = runtime.block_on(async {
        let mut s = switchboard_tests::settings(None);
        resume_on(&mut s);
        Instance::start(s).await
    });
    // PROPTEST_CASES=<n> tries more (or fewer). A failing schedule is told
    // in full below, so no seed file is kept.
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { Config::default().cases } else { CASES };
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let (case, tally) = (Cell::new(0), RefCell::new(Tally::default()));
    let result = TestRunner::new(config).run(&schedule(), |steps| {
        case.set(case.get() + 1);
        let played = runtime.block_on(play(&server, case.get(), &steps));
        let mut tally = tally.borrow_mut();
        tally.messages += played.messages;
        tally.resumes += played.resumes;
        tally.resent += played.resent;
        tally.dropped += played.dropped;
        Ok(())
    });
    match result {
        Ok(()) => eprintln!("{} schedules: {:?}", case.get(), tally.borrow()),
        Err(TestError::Fail(why, steps)) => {
            let steps: Vec<String> = steps.iter().map(|step| format!("{step:?}")).collect();
            panic!("{why}\nsmallest failing schedule:\n    {}", steps.join("\n    "))
        }
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
    }
}
