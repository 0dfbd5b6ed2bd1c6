use std::time::Duration;

use serde_json::json;
use switchboard_api::events::EventListQuery;
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};

use super::*;
use crate::trace::StepOutcome;

pub(crate) fn event(n: u8) -> VumiApiEvent {
    let mut e = VumiApiEvent::new(
        AccountKey::new("acme").expect("a key"),
        ConversationKey::new("c1").expect("a key"),
        ConversationType::new("survey").expect("a type"),
        EventType::new("poll_complete").expect("a type"),
        json!({ "n": n }).as_object().expect("an object").clone(),
    );
    e.id = EventId::derived(
        EventId::parse("0190b6a8-3b9a-7cc1-8d2e-1f2a3b4c5d6e").expect("an id"),
        "c",
        "s",
        n as usize,
    );
    e
}

fn trace(name: &str, outcome: StepOutcome) -> StepTrace {
    StepTrace {
        name: name.into(),
        handler: "log".into(),
        outcome,
        attempts: 1,
        duration_ms: 0.1,
        output: Some(
            json!({ "step": name })
                .as_object()
                .expect("an object")
                .clone(),
        ),
        error: None,
        logs: Vec::new(),
    }
}

pub(crate) fn step(chain: &str, name: &str) -> Entry {
    Entry::Step {
        chain: chain.into(),
        version: 1,
        record: Box::new(StepRecord {
            trace: trace(name, StepOutcome::Ok),
            children: Vec::new(),
            published: true,
        }),
    }
}

fn passed(chain: &str, control: Control) -> Entry {
    Entry::Flow {
        chain: chain.into(),
        version: 1,
        record: FlowRecord {
            control,
            result: FlowResult::Passed,
            key: "k".into(),
            at_ms: 1,
            by: None,
        },
    }
}

fn dead(chain: &str, letter: &str) -> Entry {
    Entry::End {
        chain: chain.into(),
        version: 1,
        end: Box::new(ChainEnd::Dead {
            letter: letter.into(),
            step: "s".into(),
            trace: trace("s", StepOutcome::Failed),
        }),
        unrun: vec![StepName {
            name: "after".into(),
            handler: "log".into(),
        }],
    }
}

/// Appends `entries` to the record of `e` as one write, from what the store holds.
fn append(journal: &Journal, e: &VumiApiEvent, started_ms: Option<u64>, entries: Vec<Entry>) {
    let at = RecordKey::new(&e.account_key, &e.id);
    let mut folded = journal
        .load(&at)
        .expect("load")
        .unwrap_or_else(|| EventJournal {
            started_ms: started_ms.unwrap_or_else(now_ms),
            ..EventJournal::default()
        });
    let mut pending = Pending::default();
    for entry in entries {
        pending.push(&entry);
        folded.apply(entry);
    }
    let write = journal
        .append(&at, &mut folded, &mut pending)
        .expect("append")
        .expect("a write");
    journal.store.write_in_order(&[write]).expect("the write");
}

fn load(journal: &Journal, e: &VumiApiEvent) -> Option<EventJournal> {
    journal
        .load(&RecordKey::new(&e.account_key, &e.id))
        .expect("load")
}

#[test]
fn a_record_folds_its_entries_in_the_order_they_were_written() {
    let journal = Journal::new(Store::temporary().expect("a store"));
    let e = event(1);
    append(
        &journal,
        &e,
        None,
        vec![
            Entry::Begin {
                event: Box::new(e.clone()),
                traceparent: None,
            },
            step("a", "one"),
            Entry::Retry {
                chain: "a".into(),
                version: 1,
                pending: Box::new(PendingRetry {
                    step: "two".into(),
                    trace: trace("two", StepOutcome::Retrying),
                    claimed: None,
                }),
            },
            Entry::Finish {
                status: TraceStatus::Running,
                finished_ms: None,
            },
        ],
    );
    let first = load(&journal, &e).expect("a record");
    assert_eq!(first.event.as_ref(), Some(&e));
    assert_eq!(first.chains.len(), 1);
    assert_eq!(first.chains[0].steps.len(), 1);
    assert_eq!(
        first.chains[0].retry.as_ref().map(|r| r.step.as_str()),
        Some("two")
    );
    assert_eq!(first.finish.map(|f| f.status), Some(TraceStatus::Running));

    // The next pass: the retried step finishes and clears the retry, the
    // chain ends, the pass finishes.
    append(
        &journal,
        &e,
        None,
        vec![
            step("a", "two"),
            Entry::End {
                chain: "a".into(),
                version: 1,
                end: Box::new(ChainEnd::Done),
                unrun: Vec::new(),
            },
        ],
    );
    let mid = load(&journal, &e).expect("a record");
    assert_eq!(mid.chains[0].steps.len(), 2);
    assert_eq!(mid.chains[0].retry, None);
    // Entries after the last finish: a pass is under way.
    assert_eq!(mid.finish, None);
    append(
        &journal,
        &e,
        None,
        vec![Entry::Finish {
            status: TraceStatus::Done,
            finished_ms: Some(7),
        }],
    );
    let done = load(&journal, &e).expect("a record");
    assert_eq!(done.chains[0].end, Some(ChainEnd::Done));
    assert_eq!(
        done.finish,
        Some(Finish {
            status: TraceStatus::Done,
            finished_ms: Some(7),
        })
    );
    assert_eq!(done.started_ms, first.started_ms);
}

#[test]
fn replaying_reopens_a_dead_chain_and_discarding_closes_it_for_good() {
    let journal = Journal::new(Store::temporary().expect("a store"));
    let e = event(2);
    append(
        &journal,
        &e,
        None,
        vec![
            Entry::Begin {
                event: Box::new(e.clone()),
                traceparent: None,
            },
            passed("a", Control::RateLimit),
            passed("a", Control::Concurrency),
            step("a", "one"),
            dead("a", "L1"),
            Entry::Announced { chain: "a".into() },
        ],
    );
    let j = load(&journal, &e).expect("a record");
    assert!(j.holds_dead_letter());
    assert!(j.chains[0].passed(Control::Concurrency));
    assert!(j.chains[0].announced);
    assert!(j.chains[0].refers_to("L1"));
    assert_eq!(j.chains[0].unrun.len(), 1);

    append(
        &journal,
        &e,
        None,
        vec![Entry::Replaying {
            chain: "a".into(),
            letter: "L1".into(),
        }],
    );
    let j = load(&journal, &e).expect("a record");
    assert!(!j.holds_dead_letter());
    assert_eq!(j.chains[0].end, None);
    assert!(j.chains[0].unrun.is_empty());
    assert_eq!(j.chains[0].replaying.as_deref(), Some("L1"));
    assert!(j.chains[0].refers_to("L1"));
    // Its slot went with its end: the replay decides `concurrency` again;
    // the other controls let it go once, and still do.
    assert_eq!(j.chains[0].flow_of(Control::Concurrency), None);
    assert!(j.chains[0].passed(Control::RateLimit));
    // Replayed again while the replay holds (or waits for) a slot: it
    // keeps it.
    append(
        &journal,
        &e,
        None,
        vec![
            passed("a", Control::Concurrency),
            Entry::Replaying {
                chain: "a".into(),
                letter: "L1".into(),
            },
        ],
    );
    let j = load(&journal, &e).expect("a record");
    assert!(j.chains[0].passed(Control::Concurrency));

    // Failing again files the letter again; discarding it ends the chain.
    append(&journal, &e, None, vec![dead("a", "L1")]);
    let j = load(&journal, &e).expect("a record");
    assert_eq!(j.chains[0].replaying, None);
    assert!(!j.chains[0].announced);
    append(
        &journal,
        &e,
        None,
        vec![
            // Another letter's discard changes nothing.
            Entry::Discarded {
                chain: "a".into(),
                letter: "L2".into(),
            },
        ],
    );
    assert!(load(&journal, &e).expect("a record").holds_dead_letter());
    append(
        &journal,
        &e,
        None,
        vec![Entry::Discarded {
            chain: "a".into(),
            letter: "L1".into(),
        }],
    );
    let j = load(&journal, &e).expect("a record");
    assert_eq!(j.chains[0].end, Some(ChainEnd::Discarded));
    assert!(!j.holds_dead_letter());
}

#[test]
fn a_failed_condition_shows_until_the_chain_runs() {
    let mut j = EventJournal::starting_now();
    j.apply(Entry::Condition {
        chain: "a".into(),
        version: 3,
        error: "boom".into(),
    });
    assert_eq!(j.chains[0].condition_failed.as_deref(), Some("boom"));
    assert_eq!(j.chains[0].version, 3);
    assert!(!j.chains[0].ran());
    j.apply(step("a", "one"));
    assert_eq!(j.chains[0].condition_failed, None);
    // Once it ran, a later failed condition does not hide what it did.
    j.apply(Entry::Condition {
        chain: "a".into(),
        version: 3,
        error: "boom".into(),
    });
    assert_eq!(j.chains[0].condition_failed, None);
}

#[test]
fn records_are_per_account_and_sequence_numbers_only_grow() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let e = event(3);
    let mut other = e.clone();
    other.account_key = AccountKey::new("acme2").expect("a key");
    append(&journal, &e, None, vec![step("a", "mine")]);
    append(&journal, &other, None, vec![step("a", "theirs")]);
    assert_eq!(
        load(&journal, &e).expect("a record").chains[0].steps[0]
            .trace
            .name,
        "mine"
    );
    assert_eq!(
        load(&journal, &other).expect("a record").chains[0].steps[0]
            .trace
            .name,
        "theirs"
    );
    // A writer that read the record before another wrote to it still
    // writes after it (sequence numbers come from the store's counter).
    let at = RecordKey::new(&e.account_key, &e.id);
    let mut stale = journal.load(&at).expect("load").expect("a record");
    append(&journal, &e, None, vec![step("a", "second")]);
    let mut pending = Pending::default();
    let entry = step("a", "third");
    pending.push(&entry);
    stale.apply(entry);
    let write = journal
        .append(&at, &mut stale, &mut pending)
        .expect("append")
        .expect("a write");
    store.write_in_order(&[write]).expect("the write");
    let names: Vec<String> = load(&journal, &e).expect("a record").chains[0]
        .steps
        .iter()
        .map(|s| s.trace.name.clone())
        .collect();
    assert_eq!(names, ["mine", "second", "third"]);
    // Nothing to append, nothing to write.
    assert!(
        journal
            .append(&at, &mut stale, &mut Pending::default())
            .expect("append")
            .is_none()
    );
}

#[test]
fn records_expire_after_the_retention_unless_they_hold_a_dead_letter() {
    let journal = Journal::new(Store::temporary().expect("a store"));
    let hour_ago = now_ms() - 3_600_000;
    let (old, held, fresh) = (event(10), event(11), event(12));
    append(&journal, &old, Some(hour_ago), vec![step("a", "one")]);
    // Written in two writes: both go.
    append(&journal, &old, Some(hour_ago), vec![step("a", "two")]);
    append(
        &journal,
        &held,
        Some(hour_ago),
        vec![step("a", "one"), dead("a", "L")],
    );
    append(&journal, &fresh, None, vec![step("a", "one")]);

    assert_eq!(
        journal.expire(Duration::from_secs(7200)).expect("expire"),
        0
    );
    assert_eq!(journal.expire(Duration::from_secs(60)).expect("expire"), 1);
    assert!(load(&journal, &old).is_none());
    assert!(load(&journal, &held).is_some());
    assert!(load(&journal, &fresh).is_some());

    // Discarded: the record may go now.
    append(
        &journal,
        &held,
        None,
        vec![Entry::Discarded {
            chain: "a".into(),
            letter: "L".into(),
        }],
    );
    assert_eq!(journal.expire(Duration::from_secs(60)).expect("expire"), 1);
    assert!(load(&journal, &held).is_none());
    assert!(load(&journal, &fresh).is_some());
}

#[test]
fn expiry_walks_records_larger_than_one_batch() {
    let journal = Journal::new(Store::temporary().expect("a store"));
    let hour_ago = now_ms() - 3_600_000;
    // 700 entries per record, three records: groups span batch boundaries.
    for n in 20..23 {
        let e = event(n);
        let at = RecordKey::new(&e.account_key, &e.id);
        let mut folded = EventJournal {
            started_ms: hour_ago,
            ..EventJournal::default()
        };
        for i in 0..700 {
            let mut pending = Pending::default();
            pending.push(&step("a", &format!("s{i}")));
            let write = journal
                .append(&at, &mut folded, &mut pending)
                .expect("append")
                .expect("a write");
            journal.store.write_in_order(&[write]).expect("the write");
        }
    }
    assert_eq!(journal.expire(Duration::from_secs(60)).expect("expire"), 3);
    assert_eq!(journal.store.len(Collection::Journal), 0);
}

/// A crash between a record's listing entry (written first) and its head
/// leaves an entry with no record; the event taken up again gets another
/// entry, at its new start. The listing shows the event once, at the start
/// its record holds, and nothing for an entry with no record.
#[test]
fn the_listing_takes_an_entry_without_its_record_for_none() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let traces = crate::trace::Traces::new(journal.clone(), Duration::from_secs(3_600));
    let (handled, lost) = (event(30), event(31));
    let started = now_ms() - 5_000;
    for (e, at) in [(&handled, started - 2_000), (&lost, started - 1_000)] {
        let entry = RecordKey::new(&e.account_key, &e.id).time_entry(at);
        store.write_in_order(&[entry]).expect("the listing entry");
    }
    let begin = Entry::Begin {
        event: Box::new(handled.clone()),
        traceparent: None,
    };
    let entry = RecordKey::new(&handled.account_key, &handled.id).time_entry(started);
    store.write_in_order(&[entry]).expect("the listing entry");
    append(&journal, &handled, Some(started), vec![begin]);

    let list = traces
        .list(&handled.account_key, &Default::default())
        .expect("the listing")
        .expect("a valid query");
    let ids: Vec<String> = list.events.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(ids, [handled.id.to_string()]);
}

#[test]
fn listing_entries_expire_with_the_retention() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let (old, fresh) = (event(20), event(21));
    let hour_ago = now_ms() - 3_600_000;
    for (e, at) in [(&old, hour_ago), (&fresh, now_ms())] {
        let entry = RecordKey::new(&e.account_key, &e.id).time_entry(at);
        store.write_in_order(&[entry]).expect("the write");
    }
    assert_eq!(store.len(Collection::EventTimes), 2);
    journal.expire(Duration::from_secs(60)).expect("expire");
    let left = store
        .scan_prefix(Collection::EventTimes, &[])
        .expect("a scan");
    assert_eq!(left.len(), 1);
    assert!(left[0].0.ends_with(fresh.id.to_string().as_bytes()));
}

#[test]
fn a_paused_chain_keeps_its_record_until_it_goes_on() {
    let journal = Journal::new(Store::temporary().expect("a store"));
    let hour_ago = now_ms() - 3_600_000;
    let paused = event(20);
    append(
        &journal,
        &paused,
        Some(hour_ago),
        vec![
            step("a", "pause"),
            Entry::Wait {
                chain: "a".into(),
                until_ms: now_ms() + 86_400_000,
                for_event: None,
                again: false,
                digest: None,
                flow: None,
                reached_by: Vec::new(),
            },
        ],
    );
    let loaded = load(&journal, &paused).expect("the record");
    assert!(loaded.chain("a").is_some_and(|c| c.waiting.is_some()));
    assert_eq!(journal.expire(Duration::from_secs(60)).expect("expire"), 0);
    assert!(load(&journal, &paused).is_some());

    // It went on (and its next step cleared nothing else): the record may go.
    append(
        &journal,
        &paused,
        None,
        vec![
            Entry::Woke {
                chain: "a".into(),
                at_ms: now_ms(),
                output: None,
            },
            step("a", "after"),
        ],
    );
    let loaded = load(&journal, &paused).expect("the record");
    let chain = loaded.chain("a").expect("the chain");
    assert_eq!(chain.waiting, None);
    assert_eq!(chain.steps.len(), 2);
    assert_eq!(journal.expire(Duration::from_secs(60)).expect("expire"), 1);
    assert!(load(&journal, &paused).is_none());
}

/// An event whose id is a UUIDv7 made at `ms` (as the SDK makes them).
fn event_made_at(ms: u64, n: u8) -> VumiApiEvent {
    let mut e = event(n);
    let ts =
        uuid::Timestamp::from_unix(uuid::NoContext, ms / 1_000, (ms % 1_000) as u32 * 1_000_000);
    e.id = EventId::from(uuid::Uuid::new_v7(ts));
    e
}

/// Writes `e`'s record as a pass would: its first write, with the listing
/// entry when the record needs one.
fn take_up(journal: &Journal, e: &VumiApiEvent, started_ms: u64) {
    let at = RecordKey::new(&e.account_key, &e.id);
    if at.needs_time_entry(started_ms) {
        let entry = at.time_entry(started_ms);
        journal.store.write_in_order(&[entry]).expect("the entry");
    }
    let begin = Entry::Begin {
        event: Box::new(e.clone()),
        traceparent: None,
    };
    append(journal, e, Some(started_ms), vec![begin, step("c", "s")]);
}

/// Writes `e`'s record in seven writes ([`take_up`], then six steps), so
/// that its later writes sort among the keys a listing page reads.
fn take_up_in_seven_writes(journal: &Journal, e: &VumiApiEvent, started_ms: u64) {
    take_up(journal, e, started_ms);
    for n in 0..6 {
        append(journal, e, None, vec![step("c", &format!("t{n}"))]);
    }
}

/// Every page of `account`'s listing, `limit` at a time: the ids in order.
fn listed(traces: &crate::trace::Traces, account: &AccountKey, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut before = None;
    for _ in 0..1_000 {
        let query = EventListQuery {
            before: before.clone(),
            limit: Some(limit),
            ..Default::default()
        };
        let page = traces
            .list(account, &query)
            .expect("the listing")
            .expect("a valid query");
        assert!(page.events.len() <= limit);
        ids.extend(page.events.iter().map(|r| r.id.to_string()));
        match page.next {
            Some(next) => before = Some(next),
            None => return ids,
        }
    }
    panic!("the listing did not end within 1,000 pages (it stalled at {before:?})");
}

#[test]
fn only_records_not_listed_by_their_ids_get_a_listing_entry() {
    let made = now_ms() - 1_000;
    let sdk = RecordKey::new(&event(1).account_key, &event_made_at(made, 1).id);
    assert!(
        !sdk.needs_time_entry(made + 20),
        "a UUIDv7 id taken up soon orders the record itself"
    );
    assert!(
        !sdk.needs_time_entry(made + LISTED_BY_ID_WITHIN),
        "at the limit"
    );
    assert!(
        sdk.needs_time_entry(made + LISTED_BY_ID_WITHIN + 1),
        "an event that waited longer is listed by when it was taken up"
    );
    assert!(
        sdk.needs_time_entry(made - LISTED_BY_ID_WITHIN - 1),
        "and so is one whose maker's clock runs ahead"
    );
    let derived = RecordKey::new(&event(1).account_key, &event(1).id);
    assert!(
        derived.needs_time_entry(made),
        "a derived (v5) id says nothing of time"
    );
    assert_eq!(id_time_ms(&event_made_at(made, 1).id), Some(made));
    assert_eq!(id_time_ms(&event(1).id), None);
}

/// The listing merges records found by their ids' time with those found
/// by their listing entries, newest first, each once, across pages; an
/// entry an earlier version wrote for a UUIDv7 id lists nothing twice.
#[test]
fn the_listing_merges_ids_that_tell_their_time_with_listing_entries() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let traces = crate::trace::Traces::new(journal.clone(), Duration::from_secs(3_600));
    let base = now_ms() - 60_000;
    // Newest first: v7 at base+50, derived taken up at base+40, v7 at +30
    // and +30 (the same ms), derived at +20 and +10, v7 at +0.
    let v7 = [
        event_made_at(base + 50, 1),
        event_made_at(base + 30, 2),
        event_made_at(base + 30, 3),
        event_made_at(base, 4),
    ];
    let derived = [
        (event(5), base + 40),
        (event(6), base + 20),
        (event(7), base + 10),
    ];
    for e in &v7 {
        take_up(&journal, e, base + 100);
    }
    for (e, at) in &derived {
        take_up(&journal, e, *at);
    }
    // An entry an earlier version wrote for a v7 id.
    let old = RecordKey::new(&v7[0].account_key, &v7[0].id).time_entry(base + 100);
    store.write_in_order(&[old]).expect("the entry");
    assert_eq!(store.len(Collection::EventTimes), 4);

    let (same_ms_high, same_ms_low) = if v7[1].id.to_string() > v7[2].id.to_string() {
        (&v7[1], &v7[2])
    } else {
        (&v7[2], &v7[1])
    };
    let expected: Vec<String> = [
        &v7[0],
        &derived[0].0,
        same_ms_high,
        same_ms_low,
        &derived[1].0,
        &derived[2].0,
        &v7[3],
    ]
    .iter()
    .map(|e| e.id.to_string())
    .collect();
    let account = &v7[0].account_key;
    for limit in [1, 2, 3, 7, 50] {
        assert_eq!(
            listed(&traces, account, limit),
            expected,
            "pages of {limit}"
        );
    }
}

/// A source that has more keys than a page reads stops the page at its
/// frontier; the next pages go on from there and miss nothing, even when a
/// page's last key read is a record's later write (its head unread).
#[test]
fn the_listing_goes_on_past_what_one_page_reads() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let traces = crate::trace::Traces::new(journal.clone(), Duration::from_secs(3_600));
    let base = now_ms() - 600_000;
    let mut expected = Vec::new();
    // 400 records of seven writes each, and 5 derived ones among them
    // (2,835 journal keys: a page reads 2,000, which end part-way through
    // a record and hold fewer heads than a page of 500 lists).
    for i in 0..400u64 {
        let e = event_made_at(base + i * 10, 0);
        take_up_in_seven_writes(&journal, &e, base + i * 10);
        expected.push((base + i * 10, e.id.to_string()));
    }
    for i in 0..5u8 {
        let e = event(100 + i);
        let at = base + 5 + u64::from(i) * 700;
        // Seven writes too: wherever these ids sort among the others, a
        // page's 2,000th key is a record's later write.
        take_up_in_seven_writes(&journal, &e, at);
        expected.push((at, e.id.to_string()));
    }
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    let account = event(1).account_key;
    assert_eq!(listed(&traces, &account, 500), expected);
    assert_eq!(listed(&traces, &account, 120), expected);
}

/// Thousands of keys in one ms (a burst of ids made together) do not stall
/// the listing: each page goes on exactly below the last id it listed.
#[test]
fn the_listing_goes_on_through_a_burst_of_ids_of_one_ms() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let traces = crate::trace::Traces::new(journal.clone(), Duration::from_secs(3_600));
    let made = now_ms() - 5_000;
    let mut expected = Vec::new();
    for _ in 0..300 {
        let e = event_made_at(made, 0);
        take_up_in_seven_writes(&journal, &e, made + 1);
        expected.push(e.id.to_string());
    }
    expected.sort_by(|a, b| b.cmp(a));
    let account = event(1).account_key;
    assert_eq!(listed(&traces, &account, 500), expected);
    assert_eq!(listed(&traces, &account, 7), expected);
}

/// Records of ids that sort anywhere (derived ids) outnumbering what a
/// page reads do not hide the events listed by their ids: the first page
/// holds the newest.
#[test]
fn many_derived_records_do_not_empty_the_first_page() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let traces = crate::trace::Traces::new(journal.clone(), Duration::from_secs(3_600));
    let base = now_ms() - 100_000;
    let parent = EventId::parse("0190b6a8-3b9a-7cc1-8d2e-1f2a3b4c5d6e").expect("an id");
    let mut derived = Vec::new();
    for n in 0..2_100usize {
        let mut e = event(0);
        e.id = EventId::derived(parent, "c", "s", n);
        take_up(&journal, &e, base + n as u64);
        derived.push((base + n as u64, e.id.to_string()));
    }
    let newest = event_made_at(base + 50_000, 1);
    take_up(&journal, &newest, base + 50_000);
    let first = traces
        .list(&newest.account_key, &Default::default())
        .expect("the listing")
        .expect("a valid query");
    assert_eq!(first.events[0].id, newest.id);
    assert_eq!(first.events.len(), EventListQuery::DEFAULT_LIMIT);
    derived.sort_by(|a, b| b.cmp(a));
    let mut expected = vec![newest.id.to_string()];
    expected.extend(derived.into_iter().map(|(_, id)| id));
    assert_eq!(listed(&traces, &newest.account_key, 500), expected);
}

/// An event taken up long after its id was made (it waited on the bus) is
/// listed by when it was taken up, once, among the others.
#[test]
fn an_event_that_waited_long_is_listed_by_when_it_was_taken_up() {
    let store = Store::temporary().expect("a store");
    let journal = Journal::new(store.clone());
    let traces = crate::trace::Traces::new(journal.clone(), Duration::from_secs(86_400));
    let now = now_ms();
    let waited = event_made_at(now - 3_600_000, 1);
    take_up(&journal, &waited, now - 10_000);
    let (earlier, later) = (
        event_made_at(now - 20_000, 2),
        event_made_at(now - 5_000, 3),
    );
    take_up(&journal, &earlier, now - 20_000);
    take_up(&journal, &later, now - 5_000);
    assert_eq!(
        store.len(Collection::EventTimes),
        1,
        "only the one that waited"
    );
    let ids: Vec<String> = [&later, &waited, &earlier]
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(listed(&traces, &waited.account_key, 1), ids);
    assert_eq!(listed(&traces, &waited.account_key, 50), ids);
}

#[test]
fn cursors_past_what_an_id_can_hold_are_refused() {
    let store = Store::temporary().expect("a store");
    let traces = crate::trace::Traces::new(Journal::new(store), Duration::from_secs(60));
    let id = event(1).id.to_string();
    for cursor in [
        format!("{}-{id}", u64::MAX),
        format!("{}-{id}", (1u64 << 48) - 1),
        "12-not-an-id".to_string(),
    ] {
        let query = EventListQuery {
            before: Some(cursor.clone()),
            ..Default::default()
        };
        let refused = traces
            .list(&event(1).account_key, &query)
            .expect("the store answers");
        assert!(refused.is_err(), "{cursor} was taken for a cursor");
    }
}
