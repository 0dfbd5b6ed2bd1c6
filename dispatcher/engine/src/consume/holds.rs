//! Conversations held behind one of their events: one sent back to the bus
//! for a retry, or one handled whose settling failed (its record did not
//! become durable, so it is handled again). Its conversation's later
//! events are sent back to wait until it is done, and are then handled in
//! bus order. Plain bookkeeping over data: the worker asks it, and says
//! what happened.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use switchboard_sdk::{AccountKey, ConversationKey, EventId};
use tokio::time::Instant;

/// How long past its due time a conversation waits for the event it is held
/// for before deciding that event went elsewhere (another replica took it)
/// when its journal record does not say so.
pub(super) const HEAD_LOST_AFTER: Duration = Duration::from_secs(30);

/// How much later than the event it waits for a held delivery comes back.
pub(super) const HELD_MARGIN: Duration = Duration::from_millis(50);

/// How long a delivery that finds its conversation's event lost (overdue by
/// [`HEAD_LOST_AFTER`], with no record of it finished elsewhere) is sent
/// back before the conversation goes on without it. The event may be on
/// its way here after all: due while this worker was busy for longer than
/// [`HEAD_LOST_AFTER`] (a long pass, a process paused), it was taken from
/// the bus after this delivery and waits behind it. Sent back once, this
/// delivery comes back after it.
pub(super) const LOST_RECHECK: Duration = Duration::from_secs(1);

/// How long a delivery held behind an event whose settling is under way
/// (when it is due back is not known yet) waits before it is looked at
/// again.
pub(super) const UNSETTLED_WAIT: Duration = Duration::from_secs(1);

/// When the event a conversation waits for is due back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// At this moment.
    At(Instant),
    /// Not known yet: the event is with the settler, which says when it
    /// sends it back ([`Holds::sent_back`]). It is not overdue meanwhile,
    /// however long the flush before it takes.
    Unsettled,
}

/// A conversation: the account and its conversation key.
pub(crate) type Conversation = (AccountKey, ConversationKey);

/// A conversation whose event `head` went back to the bus: its later
/// events are held (nakked) until `head` is done, and then handled in bus
/// order.
#[derive(Debug)]
pub(crate) struct Held {
    /// The bus position of the event the conversation waits for.
    pub(super) head: u64,
    /// Its id.
    pub(super) head_id: EventId,
    /// When that event is due back.
    pub(super) due: Due,
    /// Later events of the conversation sent back to the bus, by bus
    /// position: each with when it is due back if it was sent back after
    /// it was handled (a retry whose conversation came to wait for an
    /// earlier event), or `None` (sent back to wait, so due back soon
    /// after the event before it).
    pub(super) later: BTreeMap<u64, (EventId, Option<Due>)>,
    /// When a later delivery first found the event lost (see
    /// [`LOST_RECHECK`]); none while it is not.
    pub(super) lost_since: Option<Instant>,
}

impl Held {
    pub(super) fn new(head: u64, head_id: EventId, due: Due) -> Self {
        Self {
            head,
            head_id,
            due,
            later: BTreeMap::new(),
            lost_since: None,
        }
    }
}

/// One worker's held conversations.
#[derive(Debug, Default)]
pub(crate) struct Holds(HashMap<Conversation, Held>);

impl Holds {
    /// Holds `held` as they were (at a start, those a stop kept).
    pub(super) fn from_held(held: HashMap<Conversation, Held>) -> Self {
        Self(held)
    }

    /// The conversations held, for a stop to keep.
    pub(super) fn into_held(self) -> HashMap<Conversation, Held> {
        self.0
    }

    /// Whether the delivery at `seq` (event `id`) must wait for an earlier
    /// event of its conversation, and for how long, at `now`.
    ///
    /// The event waited for may never come back here: another replica took
    /// the partition while it was away (this one paused, say) and finished
    /// it. Once it is overdue, its journal record says so
    /// (`finished_elsewhere`: this replica holds the partition again to be
    /// handed `seq`, so its copy has everything the other replica made
    /// durable), and the conversation goes on at once; without a record
    /// that says so, after [`HEAD_LOST_AFTER`] and one more round trip of
    /// the delivery that found it so ([`LOST_RECHECK`]).
    pub(super) fn hold(
        &mut self,
        conversation: &Conversation,
        (seq, id): (u64, EventId),
        now: Instant,
        finished_elsewhere: impl FnOnce(&EventId) -> bool,
    ) -> Option<Duration> {
        let held = self.0.get_mut(conversation)?;
        if seq < held.head {
            return None;
        }
        if seq == held.head {
            // Back before it is due: a retry the embedded bus gives back at
            // once at the next start (NATS keeps a nak's delay across a
            // restart; the stop kept when it is due) still waits it out.
            return match held.due {
                Due::At(due) if due > now + HELD_MARGIN => Some(due - now),
                _ => None,
            };
        }
        // Sent back to wait, or handled now as the next (below).
        held.later.insert(seq, (id, None));
        let due = match held.due {
            Due::At(due) => due,
            Due::Unsettled => return Some(UNSETTLED_WAIT),
        };
        if now <= due {
            return Some(due.saturating_duration_since(now) + HELD_MARGIN);
        }
        if finished_elsewhere(&held.head_id) {
            tracing::info!(account = %conversation.0, conversation = %conversation.1, seq = held.head,
                "the event this conversation waits for was finished elsewhere; going on");
        } else if now > due + HEAD_LOST_AFTER {
            let since = *held.lost_since.get_or_insert(now);
            if now < since + LOST_RECHECK {
                return Some(since + LOST_RECHECK - now);
            }
            tracing::warn!(account = %conversation.0, conversation = %conversation.1, seq = held.head,
                "the event this conversation waits for has not come back; going on without it");
        } else {
            return Some(HELD_MARGIN);
        }
        held.next(now);
        (held.head != seq).then_some(HELD_MARGIN)
    }

    /// The event at `seq` (`id`) of `conversation` is to go back to the bus
    /// for a retry: the conversation waits for it, due back once the
    /// settler says ([`Holds::sent_back`]).
    pub(super) fn retry(&mut self, conversation: Conversation, event: (u64, EventId)) {
        self.wait_for(conversation, event, Due::Unsettled);
    }

    /// The event at `seq` (`id`) of `conversation`, handled, was sent back
    /// to the bus, due back at `due`: for a retry (its hold, made when the
    /// worker handled it, is due from now), or because its settling failed.
    pub(super) fn sent_back(
        &mut self,
        conversation: Conversation,
        event: (u64, EventId),
        due: Instant,
    ) {
        self.wait_for(conversation, event, Due::At(due));
    }

    /// `conversation` waits for its event at `seq` (`id`), due back as
    /// `due` says: before its later events, and after an earlier one it
    /// waits for already (which keeps its own due time).
    fn wait_for(&mut self, conversation: Conversation, (seq, id): (u64, EventId), due: Due) {
        let Some(held) = self.0.get_mut(&conversation) else {
            self.0.insert(conversation, Held::new(seq, id, due));
            return;
        };
        if seq < held.head {
            held.later.insert(held.head, (held.head_id, Some(held.due)));
            (held.head, held.head_id, held.due) = (seq, id, due);
            held.lost_since = None;
        } else if seq == held.head {
            held.due = due;
            held.lost_since = None;
        } else {
            held.later.insert(seq, (id, Some(due)));
        }
    }

    /// The event at `seq` is done: its conversation moves on to the next
    /// held event, if any, at `now`.
    pub(super) fn done(&mut self, conversation: &Conversation, seq: u64, now: Instant) {
        let Some(held) = self.0.get_mut(conversation) else {
            return;
        };
        held.later.remove(&seq);
        if seq != held.head {
            return;
        }
        if held.later.is_empty() {
            self.0.remove(conversation);
        } else {
            held.next(now);
        }
    }
}

impl Held {
    /// Moves on to the first later event, at `now`: due back as it was
    /// sent back, or now.
    fn next(&mut self, now: Instant) {
        let (head, (head_id, due)) = self.later.pop_first().expect("a later event");
        let due = match due {
            Some(Due::At(due)) => Due::At(due.max(now)),
            Some(Due::Unsettled) => Due::Unsettled,
            None => Due::At(now),
        };
        (self.head, self.head_id, self.due) = (head, head_id, due);
        self.lost_since = None;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn conversation(key: &str) -> Conversation {
        (
            AccountKey::new("acme").unwrap(),
            ConversationKey::new(key).unwrap(),
        )
    }

    /// The `n`th event id of the consume loop's tests.
    pub(in crate::consume) fn id(n: u8) -> EventId {
        EventId::derived(
            EventId::parse("0190b6a8-3b9a-7cc1-8d2e-1f2a3b4c5d6e").unwrap(),
            "c",
            "s",
            n as usize,
        )
    }

    /// An event sent back for a retry holds its conversation's later
    /// events until it is done, then they go in bus order; earlier ones
    /// and other conversations pass.
    #[tokio::test(start_paused = true)]
    async fn a_retry_holds_the_later_events_of_its_conversation() {
        let (c, other, now) = (conversation("c"), conversation("d"), Instant::now());
        let second = Duration::from_secs(1);
        let mut holds = Holds::default();
        holds.retry(c.clone(), (10, id(10)));
        holds.sent_back(c.clone(), (10, id(10)), now + second);
        let never = |_: &EventId| panic!("not overdue: the record is not read");
        assert_eq!(holds.hold(&c, (9, id(9)), now, never), None);
        assert_eq!(holds.hold(&other, (11, id(11)), now, never), None);
        assert_eq!(
            holds.hold(&c, (12, id(12)), now, never),
            Some(second + HELD_MARGIN)
        );
        assert_eq!(
            holds.hold(&c, (11, id(11)), now, never),
            Some(second + HELD_MARGIN)
        );
        // The retried event comes back and is done: 11 is next, then 12.
        assert_eq!(holds.hold(&c, (10, id(10)), now + second, never), None);
        holds.done(&c, 10, now + second);
        assert_eq!(holds.hold(&c, (11, id(11)), now + second, never), None);
        assert_eq!(
            holds.hold(&c, (12, id(12)), now + second, never),
            Some(HELD_MARGIN)
        );
        holds.done(&c, 11, now + second);
        assert_eq!(holds.hold(&c, (12, id(12)), now + second, never), None);
        holds.done(&c, 12, now + second);
        assert!(holds.into_held().is_empty());
    }

    /// An overdue event the journal says was finished elsewhere (another
    /// replica took it) no longer holds its conversation; one with no such
    /// record holds it until [`HEAD_LOST_AFTER`] past its due time, and
    /// one more round trip of the delivery that finds it so.
    #[tokio::test(start_paused = true)]
    async fn an_overdue_event_finished_elsewhere_or_lost_lets_its_conversation_go_on() {
        let (c, now) = (conversation("c"), Instant::now());
        let mut holds = Holds::default();
        holds.retry(c.clone(), (10, id(10)));
        holds.sent_back(c.clone(), (10, id(10)), now);
        let later = now + Duration::from_secs(1);
        assert!(
            holds
                .hold(&c, (11, id(11)), later, |head| *head != id(10))
                .is_some()
        );
        assert_eq!(
            holds.hold(&c, (11, id(11)), later, |head| *head == id(10)),
            None
        );

        let mut holds = Holds::default();
        holds.retry(c.clone(), (10, id(10)));
        holds.sent_back(c.clone(), (10, id(10)), now);
        let lost = now + HEAD_LOST_AFTER + Duration::from_millis(1);
        assert_eq!(
            holds.hold(&c, (11, id(11)), lost, |_| false),
            Some(LOST_RECHECK)
        );
        // Another later event meanwhile waits out the same round trip.
        let half = LOST_RECHECK / 2;
        assert_eq!(
            holds.hold(&c, (12, id(12)), lost + half, |_| false),
            Some(LOST_RECHECK - half)
        );
        assert_eq!(
            holds.hold(&c, (11, id(11)), lost + LOST_RECHECK, |_| false),
            None
        );
        holds.done(&c, 11, lost + LOST_RECHECK);
        assert_eq!(
            holds.hold(&c, (12, id(12)), lost + LOST_RECHECK, |_| false),
            None
        );
    }

    /// The event waited for, back before it is due (the embedded bus gives
    /// back what it held at a stop at once at the next start, and the stop
    /// kept its conversation's hold with when it is due), waits out its
    /// time; back when due, or a little early, it goes on.
    #[tokio::test(start_paused = true)]
    async fn an_event_back_before_it_is_due_waits_its_time() {
        let (c, now) = (conversation("c"), Instant::now());
        let never = |_: &EventId| panic!("not overdue");
        let mut holds = Holds::default();
        holds.retry(c.clone(), (10, id(10)));
        holds.sent_back(c.clone(), (10, id(10)), now + Duration::from_secs(60));
        assert_eq!(
            holds.hold(&c, (10, id(10)), now, never),
            Some(Duration::from_secs(60))
        );
        let nearly = now + Duration::from_secs(60) - HELD_MARGIN / 2;
        assert_eq!(holds.hold(&c, (10, id(10)), nearly, never), None);
        // A retry handed to the settler, not yet sent back: it came back
        // some other way (the bus's ack wait), and goes on.
        holds.done(&c, 10, nearly);
        holds.retry(c.clone(), (20, id(20)));
        assert_eq!(holds.hold(&c, (20, id(20)), nearly, never), None);
    }

    /// A worker busy for longer than [`HEAD_LOST_AFTER`] past the due time
    /// of the event a conversation waits for (a long pass before it) may
    /// have taken that event off the bus after a later one of its
    /// conversation: the later one, looked at first, finds the event
    /// overdue and is sent back once, so that the event, next in the
    /// worker's queue, goes first and the conversation keeps bus order.
    #[tokio::test(start_paused = true)]
    async fn a_late_event_queued_behind_a_later_one_still_goes_first() {
        let (c, now) = (conversation("c"), Instant::now());
        let mut holds = Holds::default();
        holds.retry(c.clone(), (10, id(10)));
        holds.sent_back(c.clone(), (10, id(10)), now);
        // The worker comes to its queue a minute late: 11, then 10.
        let late = now + HEAD_LOST_AFTER + Duration::from_secs(30);
        assert_eq!(
            holds.hold(&c, (11, id(11)), late, |_| false),
            Some(LOST_RECHECK)
        );
        assert_eq!(holds.hold(&c, (10, id(10)), late, |_| false), None);
        holds.done(&c, 10, late);
        // 11 back from its round trip: next, and last.
        let back = late + LOST_RECHECK;
        assert_eq!(holds.hold(&c, (11, id(11)), back, |_| false), None);
        holds.done(&c, 11, back);
        assert!(holds.into_held().is_empty());
    }

    /// A handled event whose settling failed holds its conversation as a
    /// retry does: a later event handled meanwhile and sent back with it
    /// waits after it, as does a retry of the conversation already waited
    /// for that comes later in the bus. A retry's hold is due from when it
    /// was sent back, not from when it was handled.
    #[tokio::test(start_paused = true)]
    async fn a_failed_settle_holds_its_conversation_like_a_retry() {
        let (c, now) = (conversation("c"), Instant::now());
        let due = now + Duration::from_secs(1);
        let never = |_: &EventId| panic!("not overdue");
        let mut holds = Holds::default();
        holds.sent_back(c.clone(), (10, id(10)), due);
        holds.sent_back(c.clone(), (11, id(11)), due);
        assert!(holds.hold(&c, (11, id(11)), now, never).is_some());
        assert!(holds.hold(&c, (12, id(12)), now, never).is_some());
        assert_eq!(holds.hold(&c, (10, id(10)), due, never), None);
        holds.done(&c, 10, due);
        assert_eq!(holds.hold(&c, (11, id(11)), due, never), None);
        holds.done(&c, 11, due);
        assert_eq!(holds.hold(&c, (12, id(12)), due, never), None);
        holds.done(&c, 12, due);
        assert!(holds.into_held().is_empty());

        // A retry of a later event waits behind the failed earlier one,
        // and keeps its own due time (a long backoff) when that is done,
        // whichever the settler sends back first; so does a retry held
        // before an earlier event's retry (one kept at a stop, and an
        // earlier one delivered again after the start).
        let backoff = now + HEAD_LOST_AFTER * 4;
        let orders: [&dyn Fn(&mut Holds); 3] = [
            &|holds| {
                holds.retry(c.clone(), (20, id(20)));
                holds.sent_back(c.clone(), (20, id(20)), backoff);
                holds.sent_back(c.clone(), (19, id(19)), due);
            },
            &|holds| {
                holds.retry(c.clone(), (20, id(20)));
                holds.sent_back(c.clone(), (19, id(19)), due);
                holds.sent_back(c.clone(), (20, id(20)), backoff);
            },
            &|holds| {
                holds.sent_back(c.clone(), (20, id(20)), backoff);
                holds.retry(c.clone(), (19, id(19)));
                holds.sent_back(c.clone(), (19, id(19)), due);
            },
        ];
        for (n, order) in orders.iter().enumerate() {
            let mut holds = Holds::default();
            order(&mut holds);
            assert!(holds.hold(&c, (21, id(21)), now, never).is_some());
            assert_eq!(holds.hold(&c, (19, id(19)), due, never), None);
            holds.done(&c, 19, due);
            let before_backoff = backoff - Duration::from_secs(1);
            assert_eq!(
                holds.hold(&c, (21, id(21)), before_backoff, never),
                Some(Duration::from_secs(1) + HELD_MARGIN),
                "order {n}: the retry is still awaited"
            );
            assert_eq!(holds.hold(&c, (20, id(20)), backoff, never), None);
            holds.done(&c, 20, backoff);
            assert_eq!(holds.hold(&c, (21, id(21)), backoff, never), None);
            holds.done(&c, 21, backoff);
            assert!(holds.into_held().is_empty(), "order {n}");
        }

        // A retry whose settling is under way is not overdue however long
        // the flush before it takes; once sent back, it is due from then.
        let mut holds = Holds::default();
        holds.retry(c.clone(), (30, id(30)));
        let sent = now + HEAD_LOST_AFTER * 2;
        let overdue = |_: &EventId| false;
        assert_eq!(
            holds.hold(&c, (31, id(31)), sent, overdue),
            Some(UNSETTLED_WAIT)
        );
        holds.sent_back(c.clone(), (30, id(30)), sent + Duration::from_secs(1));
        assert!(holds.hold(&c, (31, id(31)), sent, overdue).is_some());
    }
}
