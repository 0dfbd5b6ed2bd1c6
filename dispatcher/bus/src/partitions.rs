//! Which replica handles which events, when several share the bus.
//!
//! In the replicated mode the events stream numbers each event's subject with
//! one of [`PARTITIONS`] partitions, from a hash of its account (a subject
//! transform on the stream). Each partition has its own consumer, which the
//! server delivers to one pinned client at a time. The replicas divide the
//! partitions among themselves by rendezvous hashing over the live members,
//! which each replica learns from the heartbeats all of them write into the
//! shared [`Collection::Replicas`]. So one replica at a time handles an
//! account's events, and a conversation's events stay in bus order across
//! replicas.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use switchboard_api::health::{ReplicaShare, ReplicaView};
use switchboard_store::{Collection, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How many partitions the events stream is divided into: the most replicas
/// that share the work. Fixed, because moving an account to another
/// partition while its events are on the bus would break their order.
pub const PARTITIONS: u16 = 16;

/// How often a replica writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A replica whose heartbeat has not changed for this long is taken for gone.
const GONE_AFTER: Duration = Duration::from_secs(10);

/// A gone replica's entry is removed after this long.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The partitions `me` owns among `members`. Every replica computes the
/// same answer from the same members (see [`owners`]).
pub fn owned_by(me: &str, members: &[&str]) -> Vec<u16> {
    let owners = owners(members);
    (0..PARTITIONS)
        .filter(|p| owners[*p as usize] == Some(me))
        .collect()
}

/// The owner of each partition among `members`: the member whose rendezvous
/// score for it is the highest. Rendezvous alone leaves a member with no
/// partition for about one set of 3 members in 200 (and for most sets of 8),
/// so then each member left with none, in id order, takes the partition it
/// scores highest on among those of members owning more than one: up to
/// [`PARTITIONS`] members, every one owns a partition.
fn owners<'a>(members: &[&'a str]) -> Vec<Option<&'a str>> {
    let mut owners: Vec<Option<&'a str>> = (0..PARTITIONS)
        .map(|p| members.iter().copied().max_by_key(|m| (score(m, p), *m)))
        .collect();
    let mut ids = members.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for m in ids {
        let owns = |o: &Option<&str>, who: &str| *o == Some(who);
        if owners.iter().any(|o| owns(o, m)) {
            continue;
        }
        let spare = (0..PARTITIONS)
            .filter(|p| {
                owners[*p as usize]
                    .is_some_and(|o| owners.iter().filter(|x| owns(x, o)).count() > 1)
            })
            .max_by_key(|p| (score(m, *p), *p));
        if let Some(p) = spare {
            owners[p as usize] = Some(m);
        }
    }
    owners
}

/// The partitions `me` keeps a copy of among `members` when each partition
/// has `standbys` copies besides its owner's: those it owns, and those it
/// is among the `standbys` members other than the owner that score highest
/// on (rendezvous again, so a member joining or leaving moves few copies).
/// Every replica computes the same answer from the same members.
pub fn copied_by(me: &str, members: &[&str], standbys: u16) -> Vec<u16> {
    let owners = owners(members);
    (0..PARTITIONS)
        .filter(|p| {
            let owner = owners[*p as usize];
            if owner == Some(me) {
                return true;
            }
            let mut others: Vec<&str> = members
                .iter()
                .copied()
                .filter(|m| Some(*m) != owner)
                .collect();
            others.sort_unstable_by_key(|m| std::cmp::Reverse((score(m, *p), *m)));
            others.dedup();
            others.iter().take(usize::from(standbys)).any(|m| *m == me)
        })
        .collect()
}

fn score(member: &str, partition: u16) -> u64 {
    let digest = Sha256::new()
        .chain_update(member.as_bytes())
        .chain_update(partition.to_be_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// How `me` sees the replicas: each live member with its partitions.
fn view(me: &str, members: &[&str]) -> ReplicaView {
    ReplicaView {
        me: me.to_string(),
        members: members
            .iter()
            .map(|m| ReplicaShare {
                id: m.to_string(),
                partitions: owned_by(m, members),
            })
            .collect(),
    }
}

/// This replica's membership: it writes a heartbeat every [`HEARTBEAT`],
/// follows the others' and publishes the partitions this replica owns.
#[derive(Debug)]
pub struct Membership {
    id: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Membership {
    /// Joins: writes the first heartbeat and starts following, sending the
    /// partitions this replica owns into `owned` whenever they change, and
    /// the members with theirs into `viewed`. Members found in the
    /// (caught-up) store count as live until their heartbeat stops
    /// changing for [`GONE_AFTER`].
    ///
    /// With `standbys` set, it also tells `store` which partitions to keep
    /// a copy of ([`copied_by`], [`Store::keep_copies`]) as the members
    /// change; without, every replica keeps a copy of every partition.
    pub fn join(
        store: Store,
        standbys: Option<u16>,
        owned_tx: watch::Sender<Vec<u16>>,
        viewed: watch::Sender<ReplicaView>,
    ) -> Result<Self, switchboard_store::StoreError> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let mut follower = Follower {
            id: id.clone(),
            store,
            beat: 0,
            seen: HashMap::new(),
        };
        let members = follower.tick()?;
        let keep = move |store: &Store, id: &str, members: &BTreeSet<String>| {
            if let Some(n) = standbys {
                store.keep_copies(Some(&copied_by(id, &members_of(members), n)));
            }
        };
        keep(&follower.store, &id, &members);
        let owned = owned_by(&id, &members_of(&members));
        tracing::info!(replica = %id, partitions = ?owned, members = members.len(),
            "joined the replicas sharing the bus");
        owned_tx.send_replace(owned);
        viewed.send_replace(view(&id, &members_of(&members)));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = every.tick() => {}
                }
                match follower.tick() {
                    Ok(members) => {
                        keep(&follower.store, &follower.id, &members);
                        let seen = view(&follower.id, &members_of(&members));
                        viewed.send_if_modified(|was| {
                            let changed = *was != seen;
                            *was = seen;
                            changed
                        });
                        let owned = owned_by(&follower.id, &members_of(&members));
                        owned_tx.send_if_modified(|was| {
                            if *was == owned {
                                return false;
                            }
                            tracing::info!(partitions = ?owned, members = members.len(),
                                "the replicas changed: this one now owns these partitions");
                            *was = owned;
                            true
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "writing this replica's heartbeat failed"),
                }
            }
            // Leaving: the others take over this replica's partitions at
            // their next heartbeat instead of waiting for it to go stale.
            if let Err(e) = follower
                .store
                .remove(Collection::Replicas, follower.id.as_bytes())
            {
                tracing::warn!(error = %e, "removing this replica from the members failed; the others notice it is gone in a few seconds");
            }
        });
        Ok(Self { id, stop, task })
    }

    /// This replica's id among the members.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops the heartbeat and removes this replica from the members.
    pub async fn leave(mut self) {
        let _ = self.stop.send(true);
        if let Err(e) = (&mut self.task).await {
            tracing::error!(error = %e, "the heartbeat task failed");
        }
    }
}

impl Drop for Membership {
    /// A replica that fails to start stops its heartbeat too (the task
    /// removes it from the members as it ends).
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn members_of(members: &BTreeSet<String>) -> Vec<&str> {
    members.iter().map(String::as_str).collect()
}

/// Writes the heartbeat and follows the other replicas'.
struct Follower {
    id: String,
    store: Store,
    beat: u64,
    /// Each member's last heartbeat and when it was first seen.
    seen: HashMap<Vec<u8>, (Vec<u8>, Instant)>,
}

impl Follower {
    /// Writes one heartbeat; returns the live members, this one included.
    fn tick(&mut self) -> Result<BTreeSet<String>, switchboard_store::StoreError> {
        self.beat += 1;
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let heartbeat = serde_json::json!({"beat": self.beat, "at_ms": at});
        self.store.put(
            Collection::Replicas,
            self.id.as_bytes(),
            heartbeat.to_string().as_bytes(),
        )?;
        let now = Instant::now();
        let mut live = BTreeSet::new();
        let entries = self.store.scan_prefix(Collection::Replicas, &[])?;
        self.seen
            .retain(|key, _| entries.iter().any(|(k, _)| k == key));
        for (key, value) in entries {
            let changed = match self.seen.get_mut(&key) {
                Some((last, at)) if *last == value => *at,
                Some(slot) => {
                    *slot = (value, now);
                    now
                }
                None => {
                    self.seen.insert(key.clone(), (value, now));
                    now
                }
            };
            let Ok(id) = String::from_utf8(key) else {
                continue;
            };
            let quiet = now.duration_since(changed);
            if id == self.id || quiet < GONE_AFTER {
                live.insert(id);
            } else if quiet > FORGET_AFTER {
                // Any replica may forget a long-gone one; a replica that was
                // only cut off writes its heartbeat again.
                let _ = self.store.remove(Collection::Replicas, id.as_bytes());
            }
        }
        Ok(live)
    }
}

/// The partition nats-server's `{{partition(16,1)}}` gives an account: FNV-1a
/// (32 bits) of the account token, modulo [`PARTITIONS`].
pub fn partition_of(account: &str) -> u16 {
    let hash = account.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    (hash % u32::from(PARTITIONS)) as u16
}

/// The subject an event was published on, from the subject the partitioned
/// stream stored it under (`{prefix}.events.{account}.{type}.{event}.{partition}`).
/// A fourth token that is not the account's partition is left in place, so
/// that the event is refused for its subject (and filed in dead letters).
pub fn strip_partition<'a>(prefix: &str, subject: &'a str) -> &'a str {
    let Some(rest) = subject
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix(".events."))
    else {
        return subject;
    };
    let tokens: Vec<&str> = rest.split('.').collect();
    let [account, _, _, partition] = tokens[..] else {
        return subject;
    };
    if partition.parse::<u16>().ok() != Some(partition_of(account)) {
        return subject;
    }
    &subject[..subject.len() - partition.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each partition is copied by its owner and `n` others (all the others
    /// when fewer), every member computing the same; a member leaving
    /// moves only the copies it kept, and its partitions go to a replica
    /// that already copied them when there was a standby.
    #[test]
    fn each_partition_has_its_owners_copy_and_n_standbys() {
        let members = ["a1", "b2", "c3", "d4"];
        for n in 0..5u16 {
            let mut copies = vec![0usize; PARTITIONS as usize];
            for m in members {
                let copied = copied_by(m, &members, n);
                for p in owned_by(m, &members) {
                    assert!(copied.contains(&p), "{m} copies the partition {p} it owns");
                }
                for p in copied {
                    copies[p as usize] += 1;
                }
            }
            let expected = (1 + usize::from(n)).min(members.len());
            assert!(
                copies.iter().all(|c| *c == expected),
                "{n} standbys: {copies:?}"
            );
        }
        let left = ["a1", "b2", "c3"];
        let mut moved = 0;
        for m in left {
            let before = copied_by(m, &members, 1);
            let after = copied_by(m, &left, 1);
            for p in owned_by(m, &left) {
                let owner_before = members.iter().find(|o| owned_by(o, &members).contains(&p));
                if owner_before != Some(&"d4") {
                    continue;
                }
                // d4's partitions: the standby (if one of those left) takes them.
                let standby = left.iter().find(|o| copied_by(o, &members, 1).contains(&p));
                assert_eq!(standby, Some(&m), "partition {p} goes to its standby");
                moved += 1;
            }
            for p in before.iter().filter(|p| !after.contains(p)) {
                let owner = members.iter().find(|o| owned_by(o, &members).contains(p));
                assert!(
                    owner == Some(&"d4") || copied_by("d4", &members, 1).contains(p),
                    "{m} dropped its copy of {p}, which d4's leaving did not move"
                );
            }
        }
        assert_eq!(moved, owned_by("d4", &members).len());
    }

    #[test]
    fn every_partition_has_one_owner_and_moves_only_from_a_leaver() {
        let members = ["a1", "b2", "c3"];
        let mut owners = vec![0; PARTITIONS as usize];
        for m in members {
            for p in owned_by(m, &members) {
                owners[p as usize] += 1;
            }
        }
        assert!(owners.iter().all(|n| *n == 1), "{owners:?}");
        // Without c3, a1 and b2 keep what they had and share c3's.
        let pairs = ["a1", "b2"];
        for m in pairs {
            let before = owned_by(m, &members);
            let after = owned_by(m, &pairs);
            assert!(
                before.iter().all(|p| after.contains(p)),
                "{m}: {before:?} → {after:?}"
            );
        }
        assert_eq!(owned_by("a1", &["a1"]).len(), PARTITIONS as usize);
        assert!(owned_by("z", &["a1"]).is_empty());
    }

    #[test]
    fn every_member_owns_a_partition_up_to_one_each() {
        for n in 2..=PARTITIONS as usize {
            for set in 0..200 {
                let members: Vec<String> = (0..n).map(|i| format!("{set}-{i}")).collect();
                let members: Vec<&str> = members.iter().map(String::as_str).collect();
                let mut owners = vec![0; PARTITIONS as usize];
                for m in &members {
                    let owned = owned_by(m, &members);
                    assert!(!owned.is_empty(), "{m} of {n} owns none");
                    for p in owned {
                        owners[p as usize] += 1;
                    }
                }
                assert!(owners.iter().all(|n| *n == 1), "{owners:?}");
            }
        }
        // Past one each, the extra members own none.
        let members: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        let owning = members
            .iter()
            .filter(|m| !owned_by(m, &members).is_empty())
            .count();
        assert_eq!(owning, PARTITIONS as usize);
    }

    #[test]
    fn partitions_spread_over_replicas() {
        let members: Vec<String> = (0..4).map(|i| format!("replica-{i}")).collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        for m in &members {
            let n = owned_by(m, &members).len();
            assert!((1..=8).contains(&n), "{m} owns {n} of {PARTITIONS}");
        }
    }

    #[test]
    fn the_partition_token_is_taken_off_the_subject() {
        // As nats-server numbers them (the replicas tests check the real
        // server agrees: every event there would be refused otherwise).
        assert_eq!(partition_of("acct-000"), 7);
        assert_eq!(partition_of("acct-001"), 4);
        assert_eq!(
            strip_partition("vumi", "vumi.events.acct-000.survey.poll_complete.7"),
            "vumi.events.acct-000.survey.poll_complete"
        );
        // Not the account's partition, or not a partition: left as it is
        // (and refused as poison later).
        for subject in [
            "vumi.events.acct-000.survey.poll_complete.3",
            "vumi.events.acct-000.survey.poll_complete.x",
            "vumi.events.acct-000.survey.poll_complete.16",
            "vumi.events.acct-000.survey.poll_complete",
            "vumi.events.a.b",
        ] {
            assert_eq!(strip_partition("vumi", subject), subject);
        }
    }
}
