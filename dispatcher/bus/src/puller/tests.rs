//! The ledger's decisions, as sequences of replies.

use super::*;

const BATCH: usize = 32;
const SECOND: Duration = Duration::from_secs(1);

fn ledger() -> Ledger {
    Ledger::new(&PullSettings {
        batch: BATCH,
        expires: 2 * SECOND,
        heartbeat: SECOND,
        pinned_group: None,
    })
}

fn messages(l: &mut Ledger, count: usize, pin: Option<&str>, now: Instant) {
    for _ in 0..count {
        l.message(pin.map(str::to_string), now);
    }
}

/// The replies that stalled async-nats's stream: the next request's whole
/// batch arrives before anything else is known of it. It was counted when
/// it was asked for, so the pull asks again once both are filled.
#[test]
fn a_batch_that_arrives_at_once_was_counted_before_it_was_asked_for() {
    let t = Instant::now();
    let mut l = ledger();
    assert_eq!(l.ask(t), Some((0, None)));
    assert_eq!(l.ask(t), None, "a batch is due");
    messages(&mut l, 16, None, t);
    assert_eq!(l.ask(t), Some((1, None)), "half a batch is due: ask on");
    messages(&mut l, 16 + BATCH, None, t);
    assert_eq!(l.due, 0);
    assert_eq!(l.ask(t), Some((2, None)));
}

#[test]
fn a_timeout_takes_off_what_its_request_did_not_deliver() {
    let t = Instant::now();
    let mut l = ledger();
    l.ask(t);
    messages(&mut l, 20, None, t);
    l.ask(t);
    assert_eq!(l.due, 12 + BATCH);
    l.end(Some(0), Some(12));
    assert_eq!(l.due, BATCH);
    // A refusal without the header: nothing of the batch was delivered.
    l.end(Some(1), None);
    assert_eq!(l.due, 0);
    assert!(l.live.is_empty());
}

#[test]
fn heartbeats_and_messages_keep_requests_alive_and_silence_ends_them() {
    let t = Instant::now();
    let mut l = ledger();
    l.ask(t);
    assert_eq!(l.next_check(), Some(t + 2 * SECOND));
    l.alive(Some(0), t + SECOND);
    l.check(t + 2 * SECOND);
    assert_eq!(l.live.len(), 1, "heard from a second ago");
    let ms = Duration::from_millis(1);
    messages(&mut l, 1, None, t + 1_500 * ms);
    l.check(t + 3_499 * ms);
    assert_eq!(l.live.len(), 1, "it may be the one sending");
    // Past its expiry and the time its 408 takes, it is over anyway.
    l.alive(Some(0), t + 3_000 * ms);
    l.check(t + 4 * SECOND);
    assert!(l.live.is_empty());
    assert_eq!(l.next_check(), None);
}

#[test]
fn silence_is_looked_for_at_most_every_check_interval_and_a_pause_ends_on_time() {
    let t = Instant::now();
    let ms = Duration::from_millis(1);
    let mut l = ledger();
    // Requests asked for a millisecond apart, none heard from.
    for i in 0..10 {
        l.ask(t + i * ms);
        messages(&mut l, BATCH, None, t + i * ms);
    }
    l.last_message = None;
    assert_eq!(l.next_check(), Some(t + 2 * SECOND));
    l.check(t + 2 * SECOND);
    assert_eq!(l.live.len(), 9, "the first is over");
    assert_eq!(
        l.next_check(),
        Some(t + 2 * SECOND + CHECK_EVERY),
        "the second is over a millisecond later, looked for with the rest"
    );
    l.check(t + 2 * SECOND + CHECK_EVERY);
    assert!(l.live.is_empty());
    assert_eq!(l.next_check(), None);
    // A pause after a request turned away ends when it ends, however
    // recent the last look.
    let t = t + 10 * SECOND;
    assert_eq!(l.ask(t + ms), Some((10, None)));
    messages(&mut l, BATCH / 2, None, t + ms);
    assert_eq!(l.ask(t + 2 * SECOND - RETRY_AFTER + ms), Some((11, None)));
    l.turned_away(Some(11), None, t + 2 * SECOND - RETRY_AFTER + ms);
    l.check(t + 2 * SECOND);
    assert_eq!(l.live.len(), 1, "request 10 is over a millisecond later");
    assert_eq!(l.next_check(), Some(t + 2 * SECOND + ms), "the pause's end");
    l.paused_until = None;
    assert_eq!(l.next_check(), Some(t + 2 * SECOND + CHECK_EVERY));
}

#[test]
fn requests_lost_without_a_word_are_written_off_once_none_is_alive() {
    let t = Instant::now();
    let mut l = ledger();
    l.ask(t);
    messages(&mut l, 20, None, t);
    l.ask(t);
    assert_eq!(l.write_off(), None, "requests are alive");
    // The connection dropped: neither says anything more.
    l.check(t + 2 * SECOND);
    assert!(l.live.is_empty());
    assert_eq!(l.write_off(), Some(12 + BATCH));
    assert_eq!(l.ask(t + 2 * SECOND), Some((2, None)));
    // A late timeout of a request written off counts for nothing.
    l.end(Some(1), Some(BATCH));
    assert_eq!(l.due, BATCH);
}

#[test]
fn a_request_left_alone_with_a_phantom_due_is_not_waited_for_after_it_ends() {
    let t = Instant::now();
    let mut l = ledger();
    l.ask(t);
    messages(&mut l, 16, None, t);
    l.ask(t);
    // Request 0 is lost silently; 1 times out having sent nothing.
    l.check(t + 2 * SECOND);
    l.live.remove(&0);
    l.end(Some(1), Some(BATCH));
    assert_eq!(l.due, 16);
    assert_eq!(l.write_off(), Some(16));
    assert_eq!(l.ask(t), Some((2, None)));
}

#[test]
fn the_pin_of_the_last_message_is_named_until_the_server_says_it_is_wrong() {
    let t = Instant::now();
    let mut l = ledger();
    assert_eq!(l.ask(t), Some((0, None)));
    messages(&mut l, BATCH, Some("P"), t);
    assert_eq!(l.ask(t), Some((1, Some("P".into()))));
    l.wrong_pin(Some(1), None);
    assert_eq!(l.pin, None);
    assert_eq!(l.ask(t), Some((2, None)));
    // Pinned again as Q; a late 423 for a request under P keeps Q.
    messages(&mut l, BATCH, Some("Q"), t);
    l.live.insert(
        9,
        Request {
            pin: Some("P".into()),
            heard: t,
            expires_at: t,
        },
    );
    l.wrong_pin(Some(9), Some(BATCH));
    assert_eq!(l.pin.as_deref(), Some("Q"));
}

#[test]
fn a_request_turned_away_pauses_the_next() {
    let t = Instant::now();
    let mut l = ledger();
    l.ask(t);
    assert!(l.turned_away(Some(0), None, t), "the first in a row");
    assert_eq!(l.due, 0);
    assert_eq!(l.ask(t), None);
    assert_eq!(l.next_check(), Some(t + RETRY_AFTER));
    assert_eq!(l.ask(t + RETRY_AFTER), Some((1, None)));
    assert!(!l.turned_away(Some(1), None, t + RETRY_AFTER));
    l.alive(None, t);
    assert!(l.turned_away(None, None, t), "a heartbeat ends the row");
}

#[test]
fn a_stopped_pull_asks_no_more_and_waits_for_nothing() {
    let t = Instant::now();
    let mut l = ledger();
    l.ask(t);
    l.turned_away(Some(0), None, t);
    l.asking = false;
    assert_eq!(l.ask(t + RETRY_AFTER), None);
    assert_eq!(l.next_check(), None);
}
