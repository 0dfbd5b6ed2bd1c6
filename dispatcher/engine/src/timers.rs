//! Durable timers: what brings a paused chain's event back when its pause
//! ends.
//!
//! A chain paused by a `delay` step is kept in the event's journal record
//! (`Entry::Wait`), and a timer is written beside it, in the same batch:
//! `{account}\0{due:BE u64 ms}\0{event id}\0{chain}` in
//! [`Collection::Timers`], partition-owned state like the journal. The
//! event is acked; the worker and the conversation are free meanwhile.
//!
//! [`Timers::run`] keeps every timer of the store in memory by due time (a
//! scan at start, then the executor's notes of the timers it writes; with
//! replicas, a rescan every few seconds picks up the timers other replicas
//! wrote, which reach this one's copy through the changelog). When one is
//! due and this replica holds its partition, it puts the event back on the
//! bus and removes the timer. Each setting of a timer writes a value of its
//! own: a firing publishes under a duplicate-detection id made of it (so a
//! timer set again fires again, not as a duplicate of the first firing)
//! and removes the timer only if it is still that setting (so one set again
//! meanwhile, its event back before its pause's end by a clock stepped
//! back, stays). The executor goes on with the chain only once the
//! journal's pause has passed by its own clock: a timer never makes a chain
//! go on early, and firing twice (a crash between the publish and the
//! removal) finds the chain already gone on.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use switchboard_sdk::{AccountKey, EventId};
use switchboard_store::{Collection, Store, StoreError, Write, key};
use tokio::sync::{Notify, watch};

use crate::bus::Bus;
use crate::journal::{Journal, RecordKey, now_ms};
use crate::metrics::Metrics;

/// How long a due timer that could not fire (its partition is another
/// replica's, or the bus or store failed) waits before it is looked at
/// again.
const AGAIN_AFTER: Duration = Duration::from_secs(1);

/// How often a replica reads every timer again, to learn of those other
/// replicas wrote.
const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// How many due timers fire at once: each puts its event back on the bus
/// and waits for the bus's answer, so many falling due together fire in
/// the time of a few round trips, not one after another.
const FIRING_AT_ONCE: usize = 64;

/// One pending timer, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTimer {
    /// The account.
    pub account: AccountKey,
    /// The paused event.
    pub event_id: EventId,
    /// Its paused chain.
    pub chain: String,
    /// When the chain goes on, in ms since the epoch.
    pub due_ms: u64,
}

impl PendingTimer {
    /// The timer's key.
    fn key(&self) -> Vec<u8> {
        let mut k = key(&[self.account.as_str().as_bytes(), b""]);
        k.extend_from_slice(&self.due_ms.to_be_bytes());
        k.push(0);
        k.extend_from_slice(self.event_id.to_string().as_bytes());
        k.push(0);
        k.extend_from_slice(self.chain.as_bytes());
        k
    }

    /// The timer a key names; `None` for a key not made by
    /// [`PendingTimer::key`].
    fn parse(k: &[u8]) -> Option<Self> {
        let split = k.iter().position(|b| *b == 0)?;
        let account = AccountKey::new(std::str::from_utf8(&k[..split]).ok()?).ok()?;
        let rest = k.get(split + 1..)?;
        let (due, rest) = rest.split_at_checked(8)?;
        let due_ms = u64::from_be_bytes(due.try_into().ok()?);
        let rest = std::str::from_utf8(rest.strip_prefix(&[0])?).ok()?;
        let (id, chain) = rest.split_once('\0')?;
        Some(Self {
            account,
            event_id: EventId::parse(id).ok()?,
            chain: chain.to_string(),
            due_ms,
        })
    }

    /// The write that sets the timer: its value is this setting's own, so
    /// that a firing removes only the setting it read.
    pub fn put(&self) -> Write {
        Write {
            collection: Collection::Timers,
            key: self.key(),
            value: Some(uuid::Uuid::now_v7().as_bytes().to_vec()),
        }
    }

    /// The write that removes it.
    pub fn removal(&self) -> Write {
        Write {
            collection: Collection::Timers,
            key: self.key(),
            value: None,
        }
    }
}

/// The `limit` soonest pending timers of `account`, the soonest first.
pub fn list(
    store: &Store,
    account: &AccountKey,
    limit: usize,
) -> Result<Vec<PendingTimer>, StoreError> {
    let prefix = key(&[account.as_str().as_bytes(), b""]);
    Ok(store
        .scan_prefix_from(Collection::Timers, &prefix, &prefix, limit)?
        .iter()
        .filter_map(|(k, _)| PendingTimer::parse(k))
        .collect())
}

/// The process's timers: the executor notes those it writes, and
/// [`Timers::run`] fires them.
#[derive(Debug, Clone)]
pub struct Timers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    journal: Journal,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    /// Every known timer by when to look at it next, and its key.
    index: Mutex<BTreeSet<(u64, Vec<u8>)>>,
    /// Told when a timer is noted.
    noted: Notify,
}

impl Timers {
    /// The timers of `store`, fired onto `bus`.
    pub fn new(store: Store, bus: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                journal: Journal::new(store.clone()),
                store,
                bus,
                metrics,
                index: Mutex::default(),
                noted: Notify::new(),
            }),
        }
    }

    /// `timer` was written: fire it when due.
    pub fn noted(&self, timer: &PendingTimer) {
        self.index().insert((timer.due_ms, timer.key()));
        self.inner.noted.notify_one();
    }

    /// How many timers this process knows of.
    pub fn pending(&self) -> u64 {
        self.index().len() as u64
    }

    fn index(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, Vec<u8>)>> {
        self.inner.index.lock().expect("timer index lock")
    }

    /// Reads every timer of the store into memory.
    fn scan(&self) {
        let entries = match self.inner.store.scan_prefix(Collection::Timers, b"") {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "reading the timers failed; trying again shortly");
                return;
            }
        };
        let mut index = self.index();
        index.clear();
        for (k, _) in entries {
            if let Some(timer) = PendingTimer::parse(&k) {
                index.insert((timer.due_ms, k));
            }
        }
    }

    /// Fires due timers until `stopped` turns true.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let rescan = self.inner.store.is_replicated().then_some(RESCAN_EVERY);
        self.scan();
        let mut scanned = tokio::time::Instant::now();
        loop {
            if rescan.is_some_and(|every| scanned.elapsed() >= every) {
                self.scan();
                scanned = tokio::time::Instant::now();
            }
            let now = now_ms();
            let due: Vec<Vec<u8>> = {
                let mut index = self.index();
                let mut due = Vec::new();
                while index.first().is_some_and(|(at, _)| *at <= now) {
                    due.extend(index.pop_first().map(|(_, k)| k));
                }
                due
            };
            let this = &self;
            let mut firing = futures::stream::iter(due)
                .map(|k| async move { (this.fire(&k).await, k) })
                .buffer_unordered(FIRING_AT_ONCE);
            while let Some((again, k)) = firing.next().await {
                if let Some(again) = again {
                    self.index().insert((again, k));
                }
            }
            let next = self.index().first().map(|(at, _)| *at);
            let mut wait = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(at.saturating_sub(now_ms()))
            });
            if let Some(every) = rescan {
                wait = wait.min(every.saturating_sub(scanned.elapsed()));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.noted.notified() => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
    }

    /// Fires the due timer at `k`: puts its event back on the bus and
    /// removes it (unless it was set again meanwhile). Returns when to
    /// look at it again if it could not fire.
    async fn fire(&self, k: &[u8]) -> Option<u64> {
        let again = now_ms() + AGAIN_AFTER.as_millis() as u64;
        let inner = &self.inner;
        let set = match inner.store.get(Collection::Timers, k) {
            Ok(Some(set)) => set,
            // Fired or removed already (by this replica or another).
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "reading a timer failed; trying again");
                return Some(again);
            }
        };
        // Another replica's partition: its owner fires it.
        if !inner.store.writes_locally(Collection::Timers, k) {
            return Some(again);
        }
        let Some(timer) = PendingTimer::parse(k) else {
            tracing::warn!(key = %String::from_utf8_lossy(k), "removing a timer whose key is not one");
            self.remove(k, &set);
            return None;
        };
        let record = match inner
            .journal
            .load(&RecordKey::new(&timer.account, &timer.event_id))
        {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(account = %timer.account, event_id = %timer.event_id, error = %e,
                    "reading a paused event's journal failed; trying again");
                return Some(again);
            }
        };
        let paused = record.as_ref().and_then(|j| {
            let event = j.event.as_ref()?;
            let chain = j.chain(&timer.chain)?;
            // Its pause's own timer; or, for a digest window that filled
            // before its time, the earlier one its last event set
            // (or a run held back by `concurrency`, whose slot came free).
            let fires = chain.waiting == Some(timer.due_ms)
                || ((chain.waiting_digest.is_some() || chain.waiting_flow.is_some())
                    && chain.waiting.is_some_and(|until| timer.due_ms < until));
            fires.then_some(event)
        });
        let Some(event) = paused else {
            // The chain went on already (its event came back another way)
            // or its record is gone: nothing to bring back.
            self.remove(k, &set);
            return None;
        };
        // An id per setting of the timer: one set again after its event
        // came back early (a replica whose clock is ahead fired it) fires
        // again, not as a duplicate the bus would drop. Firing twice is
        // harmless: the chain goes on once. (A setting written before
        // settings had their own value fires under its firing's time.)
        let setting = uuid::Uuid::from_slice(&set)
            .map_or_else(|_| now_ms().to_string(), |u| u.simple().to_string());
        let dedup_id = format!(
            "{}:wake:{}:{}:{setting}",
            event.id, timer.chain, timer.due_ms
        );
        if let Err(e) = inner.bus.publish_as(event, &dedup_id).await {
            tracing::warn!(account = %timer.account, event_id = %timer.event_id, chain = timer.chain,
                error = %e, "putting a paused event back on the bus failed; trying again");
            return Some(again);
        }
        tracing::debug!(account = %timer.account, event_id = %timer.event_id, chain = timer.chain,
            late_ms = now_ms().saturating_sub(timer.due_ms), "timer fired");
        inner.metrics.timer_fired();
        self.remove(k, &set);
        None
    }

    /// Removes the timer at `k` if it is still the setting `set`: one set
    /// again since it was read is a pause of its own, left to fire.
    fn remove(&self, k: &[u8], set: &[u8]) {
        let removed = self
            .inner
            .store
            .compare_and_swap(Collection::Timers, k, Some(set), None);
        if let Err(e) = removed {
            // It fires again later, and the chain has gone on by then.
            tracing::warn!(key = %String::from_utf8_lossy(k), error = %e,
                "removing a fired timer failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timers_key_reads_back_as_the_timer() {
        let timer = PendingTimer {
            account: AccountKey::new("acme").unwrap(),
            event_id: EventId::new_v7(),
            chain: "remind later".into(),
            due_ms: 1_790_000_000_123,
        };
        assert_eq!(PendingTimer::parse(&timer.key()), Some(timer.clone()));
        assert_eq!(PendingTimer::parse(b"acme\0short"), None);
    }

    #[test]
    fn a_listing_gives_an_accounts_soonest_timers_up_to_its_limit() {
        let store = Store::temporary().unwrap();
        let timer = |account: &str, due_ms: u64| PendingTimer {
            account: AccountKey::new(account).unwrap(),
            event_id: EventId::new_v7(),
            chain: "remind".into(),
            due_ms,
        };
        let writes: Vec<Write> = [
            timer("acme", 30),
            timer("acme", 10),
            timer("acme2", 5),
            timer("acme", 20),
        ]
        .iter()
        .map(PendingTimer::put)
        .collect();
        store.write_in_order(&writes).unwrap();
        let acme = AccountKey::new("acme").unwrap();
        let due = |limit| -> Vec<u64> {
            list(&store, &acme, limit)
                .unwrap()
                .into_iter()
                .map(|t| t.due_ms)
                .collect()
        };
        assert_eq!(due(2), [10, 20]);
        assert_eq!(due(100), [10, 20, 30]);
    }

    /// A bus that drops a publish whose id it has seen, as NATS does
    /// within its duplicate window, and keeps the ids it took; and writes
    /// `then` to its store as it takes the next one (what the event's pass
    /// writes when it comes back).
    #[derive(Debug, Default)]
    struct Dedups(Mutex<Vec<String>>, Mutex<Option<(Store, Write)>>);

    #[async_trait::async_trait]
    impl Bus for Dedups {
        async fn publish_as(
            &self,
            _: &switchboard_sdk::VumiApiEvent,
            dedup_id: &str,
        ) -> Result<crate::bus::Published, crate::bus::BusError> {
            if let Some((store, write)) = self.1.lock().unwrap().take() {
                store.write_in_order(&[write]).unwrap();
            }
            let mut taken = self.0.lock().unwrap();
            let duplicate = taken.iter().any(|id| id == dedup_id);
            if !duplicate {
                taken.push(dedup_id.to_string());
            }
            Ok(crate::bus::Published { duplicate })
        }

        async fn consume(
            &self,
            _: usize,
            _: watch::Receiver<bool>,
        ) -> Result<tokio::sync::mpsc::Receiver<crate::bus::Delivery>, crate::bus::BusError>
        {
            unreachable!("the test does not consume")
        }

        async fn lag(&self) -> Option<u64> {
            None
        }

        fn is_ready(&self) -> bool {
            true
        }

        fn kind(&self) -> &'static str {
            "embedded"
        }
    }

    /// A timer set again after its event came back early (fired by a
    /// replica whose clock is ahead) fires again: its event goes back on
    /// the bus, not dropped as a duplicate of the first firing, which left
    /// the chain paused for good; nor removed by a firing under way as it
    /// was set.
    #[tokio::test]
    async fn a_timer_set_again_fires_again() {
        use crate::journal::{Entry, EventJournal, Pending};

        let store = Store::temporary().unwrap();
        let journal = Journal::new(store.clone());
        let event = crate::journal::tests::event(1);
        let due_ms = now_ms() - 1_000;
        let at = RecordKey::new(&event.account_key, &event.id);
        let mut record = EventJournal::default();
        record.started_ms = due_ms - 60_000;
        record.event = Some(event.clone());
        let mut pending = Pending::default();
        pending.push_begin(&mut record, &event, None);
        for entry in [
            crate::journal::tests::step("a", "pause"),
            Entry::Wait {
                chain: "a".into(),
                until_ms: due_ms,
                for_event: None,
                again: false,
                digest: None,
                flow: None,
                reached_by: Vec::new(),
            },
        ] {
            pending.push(&entry);
            record.apply(entry);
        }
        let write = journal
            .append(&at, &mut record, &mut pending)
            .unwrap()
            .expect("a write");
        let timer = PendingTimer {
            account: event.account_key.clone(),
            event_id: event.id,
            chain: "a".into(),
            due_ms,
        };
        store.write_in_order(&[write, timer.put()]).unwrap();
        let bus = Arc::new(Dedups::default());
        let timers = Timers::new(store.clone(), bus.clone(), Arc::new(Metrics::default()));

        assert_eq!(timers.fire(&timer.key()).await, None);
        assert_eq!(bus.0.lock().unwrap().len(), 1);
        assert!(!store.contains(Collection::Timers, &timer.key()).unwrap());

        // Its event came back before the pause's end by that pass's clock:
        // the pass set the same timer again.
        store.write_in_order(&[timer.put()]).unwrap();
        assert_eq!(timers.fire(&timer.key()).await, None);
        let taken = bus.0.lock().unwrap().clone();
        assert_eq!(taken.len(), 2, "{taken:?}");

        // Set again while its firing was under way (the event came back at
        // once, before its pause's end by a clock stepped back): the
        // firing's removal leaves the new setting, which fires in turn.
        store.write_in_order(&[timer.put()]).unwrap();
        *bus.1.lock().unwrap() = Some((store.clone(), timer.put()));
        assert_eq!(timers.fire(&timer.key()).await, None);
        assert!(store.contains(Collection::Timers, &timer.key()).unwrap());
        assert_eq!(timers.fire(&timer.key()).await, None);
        assert!(!store.contains(Collection::Timers, &timer.key()).unwrap());
        let taken = bus.0.lock().unwrap().clone();
        assert_eq!(taken.len(), 4, "{taken:?}");
    }

    #[test]
    fn timers_of_an_account_sort_by_due_time() {
        let at = |due_ms| PendingTimer {
            account: AccountKey::new("acme").unwrap(),
            event_id: EventId::new_v7(),
            chain: "c".into(),
            due_ms,
        };
        let (soon, late) = (at(1_000), at(1_000_000));
        assert!(soon.key() < late.key());
    }
}
