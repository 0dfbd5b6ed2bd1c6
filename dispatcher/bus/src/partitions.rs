//! Which replica handles which events, when several share the bus.
//!
//! In the replicated mode the events stream numbers each event's subject with
//! one of [`PARTITIONS`] partitions, from a hash of its account (a subject
//! transform on the stream). Each partition has its own consumer, which the
//! server delivers to one pinned client at a time. The replicas divide the
//! partitions among themselves evenly, by rendezvous hashing with bounded
//! loads over the live members, which each replica learns from the
//! heartbeats all of them write into the shared [`Collection::Replicas`]
//! (see [`Division`]). So one replica at a time handles an account's events,
//! and a conversation's events stay in bus order across replicas.

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

/// How the replicas divide the partitions among themselves. Each replica's
/// heartbeat names the newest division its build knows, and every replica
/// uses the oldest named among the live members: so while replicas of
/// different builds run side by side (a rolling upgrade), they still agree
/// on every partition's owner, and none is left unpulled because each
/// build thought it another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Division {
    /// Plain rendezvous hashing, as builds before [`Division::Even`] divide
    /// (their heartbeats name no division): see `rendezvous_owners`.
    Rendezvous,
    /// Rendezvous hashing with bounded loads: see `even_owners`.
    Even,
}

impl Division {
    /// What this build's heartbeats name.
    pub const NEWEST: Self = Self::Even;

    /// The division a heartbeat names: none, [`Division::Rendezvous`]; one
    /// newer than this build knows, the newest it does (that build steps
    /// down to it, since this one's heartbeat names it).
    fn of_heartbeat(heartbeat: &[u8]) -> Self {
        let named = serde_json::from_slice::<serde_json::Value>(heartbeat)
            .ok()
            .and_then(|h| h.get("division")?.as_u64());
        match named {
            None | Some(0 | 1) => Self::Rendezvous,
            Some(_) => Self::Even,
        }
    }

    /// The number a heartbeat names it by.
    fn number(self) -> u64 {
        match self {
            Self::Rendezvous => 1,
            Self::Even => 2,
        }
    }
}

/// The partitions `me` owns among `members`. Every replica computes the
/// same answer from the same members (see [`owners`]).
pub fn owned_by(me: &str, members: &[&str], division: Division) -> Vec<u16> {
    let owners = owners(members, division);
    (0..PARTITIONS)
        .filter(|p| owners[*p as usize] == Some(me))
        .collect()
}

/// The owner of each partition among `members`, divided by `division`.
fn owners<'a>(members: &[&'a str], division: Division) -> Vec<Option<&'a str>> {
    match division {
        Division::Rendezvous => rendezvous_owners(members),
        Division::Even => even_owners(members),
    }
}

/// The owner of each partition among `members` by plain rendezvous hashing:
/// the member whose score for it is the highest. That alone leaves a member
/// with no partition for about one set of 3 members in 200 (and for most
/// sets of 8), so then each member left with none, in id order, takes the
/// partition it scores highest on among those of members owning more than
/// one.
fn rendezvous_owners<'a>(members: &[&'a str]) -> Vec<Option<&'a str>> {
    let mut owners: Vec<Option<&'a str>> = (0..PARTITIONS)
        .map(|p| members.iter().copied().max_by_key(|m| (score(m, p), *m)))
        .collect();
    for m in distinct(members) {
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

/// The owner of each partition among `members`: rendezvous hashing with
/// bounded loads. The (member, partition) pairs are taken by descending
/// rendezvous score, and each partition goes to the first member that still
/// has room, so every member owns ⌊16/n⌋ or ⌈16/n⌉ of the [`PARTITIONS`]
/// (members past the sixteenth own none). Rendezvous alone gave three
/// members anything from 6 to 12 partitions for the busiest, and so a
/// third of the work or twice that. A member leaving moves its partitions
/// to the members next in their order (see [`copied_by`]) and, as the
/// others' shares grow, one or two between them on average (half of one
/// for three members); a member joining takes its share, and moves about
/// as many between the others.
fn even_owners<'a>(members: &[&'a str]) -> Vec<Option<&'a str>> {
    let ids = distinct(members);
    let mut owners = vec![None; PARTITIONS as usize];
    if ids.is_empty() {
        return owners;
    }
    let partitions = usize::from(PARTITIONS);
    // Each member owns `base` partitions, and `extra` of them one more.
    let (base, extra) = (partitions / ids.len(), partitions % ids.len());
    let mut pairs: Vec<(u64, &str, u16)> = ids
        .iter()
        .flat_map(|m| (0..PARTITIONS).map(move |p| (score(m, p), *m, p)))
        .collect();
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let mut owned: HashMap<&str, usize> = HashMap::new();
    let (mut with_extra, mut left) = (0, partitions);
    for (_, m, p) in pairs {
        let owner = &mut owners[usize::from(p)];
        if owner.is_some() {
            continue;
        }
        let n = owned.entry(m).or_default();
        if *n < base || (*n == base && with_extra < extra) {
            *owner = Some(m);
            *n += 1;
            if *n > base {
                with_extra += 1;
            }
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    owners
}

/// `members` sorted, each once.
fn distinct<'a>(members: &[&'a str]) -> Vec<&'a str> {
    let mut ids = members.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The partitions `me` keeps a copy of among `members` when each partition
/// has `standbys` copies besides its owner's: those it owns, and those it
/// would own were their owner gone, or that one too, and so on
/// (`standbys` deep). So a partition's first standby is the replica that
/// takes it over when its owner goes, and finds it copied. Every replica
/// computes the same answer from the same members.
pub fn copied_by(me: &str, members: &[&str], standbys: u16, division: Division) -> Vec<u16> {
    let ids = distinct(members);
    // The owners among the members but those gone, by who is gone.
    let mut owners_without: HashMap<Vec<&str>, Vec<Option<&str>>> = HashMap::new();
    (0..PARTITIONS)
        .filter(|p| {
            let mut gone: Vec<&str> = Vec::new();
            for _ in 0..=standbys {
                let owner = owners_without.entry(gone.clone()).or_insert_with(|| {
                    let left: Vec<&str> =
                        ids.iter().copied().filter(|m| !gone.contains(m)).collect();
                    owners(&left, division)
                })[usize::from(*p)];
                match owner {
                    Some(o) if o == me => return true,
                    Some(o) => {
                        gone.push(o);
                        gone.sort_unstable();
                    }
                    None => break,
                }
            }
            false
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
fn view(me: &str, live: &Live) -> ReplicaView {
    let members = live.members();
    ReplicaView {
        me: me.to_string(),
        members: members
            .iter()
            .map(|m| ReplicaShare {
                id: m.to_string(),
                partitions: owned_by(m, &members, live.division),
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
        let live = follower.tick()?;
        let keep = move |store: &Store, id: &str, live: &Live| {
            if let Some(n) = standbys {
                store.keep_copies(Some(&copied_by(id, &live.members(), n, live.division)));
            }
        };
        keep(&follower.store, &id, &live);
        let owned = owned_by(&id, &live.members(), live.division);
        tracing::info!(replica = %id, partitions = ?owned, members = live.ids.len(),
            division = ?live.division, "joined the replicas sharing the bus");
        owned_tx.send_replace(owned);
        viewed.send_replace(view(&id, &live));
        let mut division = live.division;
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
                    Ok(live) => {
                        if live.division != division {
                            tracing::info!(division = ?live.division, was = ?division,
                                "the replicas divide the partitions another way now (the oldest build among them decides)");
                            division = live.division;
                        }
                        keep(&follower.store, &follower.id, &live);
                        let seen = view(&follower.id, &live);
                        viewed.send_if_modified(|was| {
                            let changed = *was != seen;
                            *was = seen;
                            changed
                        });
                        let owned = owned_by(&follower.id, &live.members(), live.division);
                        owned_tx.send_if_modified(|was| {
                            if *was == owned {
                                return false;
                            }
                            tracing::info!(partitions = ?owned, members = live.ids.len(),
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

/// The live members as a replica last saw them, and the division they all
/// know.
struct Live {
    ids: BTreeSet<String>,
    division: Division,
}

impl Live {
    fn members(&self) -> Vec<&str> {
        self.ids.iter().map(String::as_str).collect()
    }
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
    /// Writes one heartbeat; returns the live members, this one included,
    /// and the oldest division their heartbeats name.
    fn tick(&mut self) -> Result<Live, switchboard_store::StoreError> {
        self.beat += 1;
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let heartbeat = serde_json::json!({
            "beat": self.beat,
            "at_ms": at,
            "division": Division::NEWEST.number(),
        });
        self.store.put(
            Collection::Replicas,
            self.id.as_bytes(),
            heartbeat.to_string().as_bytes(),
        )?;
        let now = Instant::now();
        let mut live = BTreeSet::new();
        let mut division = Division::NEWEST;
        let entries = self.store.scan_prefix(Collection::Replicas, &[])?;
        self.seen
            .retain(|key, _| entries.iter().any(|(k, _)| k == key));
        for (key, value) in entries {
            let named = Division::of_heartbeat(&value);
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
                division = division.min(named);
                live.insert(id);
            } else if quiet > FORGET_AFTER {
                // Any replica may forget a long-gone one; a replica that was
                // only cut off writes its heartbeat again.
                let _ = self.store.remove(Collection::Replicas, id.as_bytes());
            }
        }
        Ok(Live {
            ids: live,
            division,
        })
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

    /// Member sets of `n` replicas, each named as a replica names itself
    /// (32 hex digits, here made up from `set`).
    fn member_sets(n: usize, sets: usize) -> Vec<Vec<String>> {
        (0..sets)
            .map(|set| {
                (0..n)
                    .map(|i| format!("{:016x}{:016x}", 0x0190_0000_0000 + set, i * 7919))
                    .collect()
            })
            .collect()
    }

    fn strs(members: &[String]) -> Vec<&str> {
        members.iter().map(String::as_str).collect()
    }

    /// Each partition's owner among `members`.
    fn owner_of(members: &[&str]) -> Vec<Option<String>> {
        even_owners(members)
            .into_iter()
            .map(|o| o.map(str::to_string))
            .collect()
    }

    /// Each partition is copied by its owner and `n` others (all the others
    /// when fewer), every member computing the same; a member leaving
    /// hands each of its partitions to the replica that kept its first
    /// standby copy.
    #[test]
    fn each_partition_has_its_owners_copy_and_n_standbys() {
        for members in member_sets(4, 50) {
            let members = strs(&members);
            for n in 0..5u16 {
                let mut copies = vec![0usize; PARTITIONS as usize];
                for m in &members {
                    let copied = copied_by(m, &members, n, Division::Even);
                    for p in owned_by(m, &members, Division::Even) {
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
            let leaver = members[3];
            let left = &members[..3];
            let after = owner_of(left);
            for p in owned_by(leaver, &members, Division::Even) {
                let standby = left
                    .iter()
                    .find(|m| copied_by(m, &members, 1, Division::Even).contains(&p))
                    .expect("a standby among those left");
                assert_eq!(
                    after[p as usize].as_deref(),
                    Some(*standby),
                    "partition {p} goes to its standby"
                );
            }
        }
    }

    /// Every partition has one owner, every member owns ⌊16/n⌋ or ⌈16/n⌉,
    /// and a member leaving moves its own partitions and few others: over
    /// these sets at most six of the others' in a leave, and two and a half
    /// on average (about half of one for three members).
    #[test]
    fn partitions_divide_evenly_and_a_leave_moves_few_others() {
        for n in 1..=PARTITIONS as usize {
            let (mut moved, mut most) = (0, 0);
            let sets = member_sets(n, 100);
            for (i, members) in sets.iter().enumerate() {
                let members = strs(members);
                let owners = owner_of(&members);
                assert!(owners.iter().all(Option::is_some), "{owners:?}");
                let even = usize::from(PARTITIONS) / n;
                for m in &members {
                    let owns = owners.iter().filter(|o| o.as_deref() == Some(*m)).count();
                    if i == 0 {
                        assert_eq!(owned_by(m, &members, Division::Even).len(), owns);
                    }
                    assert!(
                        owns == even || owns == even + 1,
                        "{m} of {n} owns {owns} partitions"
                    );
                }
                if n == 1 {
                    continue;
                }
                let leaver = members[n / 2];
                let left: Vec<&str> = members.iter().copied().filter(|m| *m != leaver).collect();
                let after = owner_of(&left);
                let others_moved = (0..PARTITIONS as usize)
                    .filter(|p| owners[*p].as_deref() != Some(leaver) && after[*p] != owners[*p])
                    .count();
                moved += others_moved;
                most = most.max(others_moved);
            }
            assert!(
                most <= 6,
                "{n} members: a leave moved {most} of the others' partitions"
            );
            assert!(
                moved <= sets.len() * 5 / 2,
                "{n} members: {moved} of the others' partitions moved over {} leaves",
                sets.len()
            );
        }
        // Past one each, the extra members own none.
        let members: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        let members = strs(&members);
        let owning = members
            .iter()
            .filter(|m| !owned_by(m, &members, Division::Even).is_empty())
            .count();
        assert_eq!(owning, PARTITIONS as usize);
        assert_eq!(
            owned_by("a1", &["a1"], Division::Even).len(),
            PARTITIONS as usize
        );
        assert!(owned_by("z", &["a1"], Division::Even).is_empty());
    }

    /// A member joining takes its share, and little else moves: at most
    /// two and a half partitions a join on average between the members
    /// already there.
    #[test]
    fn a_joining_member_takes_its_share() {
        for n in 1..PARTITIONS as usize {
            let mut others = 0;
            let sets = member_sets(n + 1, 100);
            for members in &sets {
                let all = strs(members);
                let (joiner, before) = (all[n], &all[..n]);
                let (was, now) = (owner_of(before), owner_of(&all));
                others += (0..PARTITIONS as usize)
                    .filter(|p| now[*p] != was[*p] && now[*p].as_deref() != Some(joiner))
                    .count();
            }
            assert!(
                others <= sets.len() * 5 / 2,
                "{n} + 1 members: {others} partitions moved between the others over {} joins",
                sets.len()
            );
        }
    }

    /// Plain rendezvous, the division of builds whose heartbeats name
    /// none: each partition to its highest scorer, but for one partition
    /// given to each member that would own none; its standbys are the next
    /// owners under it, as under the even division.
    #[test]
    fn the_older_division_is_plain_rendezvous() {
        let mut fixed_up = 0;
        for members in member_sets(6, 100) {
            let members = strs(&members);
            let owners = rendezvous_owners(&members);
            let top: Vec<&str> = (0..PARTITIONS)
                .map(|p| {
                    *members
                        .iter()
                        .max_by_key(|m| (score(m, p), **m))
                        .expect("members")
                })
                .collect();
            let without = members.iter().filter(|m| !top.contains(m)).count();
            let moved = (0..PARTITIONS as usize)
                .filter(|p| owners[*p] != Some(top[*p]))
                .count();
            assert_eq!(moved, without, "{owners:?} against {top:?}");
            fixed_up += without;
            for m in &members {
                let owned = owned_by(m, &members, Division::Rendezvous);
                assert!(!owned.is_empty(), "{m} owns none");
                assert!(owned.iter().all(|p| owners[*p as usize] == Some(*m)));
                let copied = copied_by(m, &members, 1, Division::Rendezvous);
                assert!(owned.iter().all(|p| copied.contains(p)));
            }
        }
        assert!(fixed_up > 0, "some set of six needs a member given one");
    }

    /// A heartbeat's division: none named (an older build) is plain
    /// rendezvous; one newer than this build knows is the newest it knows.
    #[test]
    fn a_heartbeat_names_its_division() {
        let of = |h: &str| Division::of_heartbeat(h.as_bytes());
        assert_eq!(of(r#"{"beat":3,"at_ms":1}"#), Division::Rendezvous);
        assert_eq!(
            of(r#"{"beat":3,"at_ms":1,"division":1}"#),
            Division::Rendezvous
        );
        assert_eq!(of(r#"{"beat":3,"at_ms":1,"division":2}"#), Division::Even);
        assert_eq!(of(r#"{"beat":3,"at_ms":1,"division":9}"#), Division::Even);
        assert_eq!(of("not json"), Division::Rendezvous);
        assert_eq!(Division::NEWEST.number(), 2);
    }

    /// Replicas of two builds side by side agree: while one member's
    /// heartbeat names no division, every member divides by plain
    /// rendezvous; once it is gone, evenly.
    #[test]
    fn members_of_two_builds_divide_the_older_way() {
        let store = Store::temporary().expect("a store");
        let old = "0190000000000000aaaa";
        store
            .put(
                Collection::Replicas,
                old.as_bytes(),
                br#"{"beat":1,"at_ms":1}"#,
            )
            .expect("an older build's heartbeat");
        let mut new = Follower {
            id: "0190000000000000bbbb".into(),
            store: store.clone(),
            beat: 0,
            seen: HashMap::new(),
        };
        let live = new.tick().expect("a heartbeat");
        assert_eq!(live.members(), [old, "0190000000000000bbbb"]);
        assert_eq!(live.division, Division::Rendezvous);
        store
            .remove(Collection::Replicas, old.as_bytes())
            .expect("the older build gone");
        let live = new.tick().expect("a heartbeat");
        assert_eq!(live.members(), ["0190000000000000bbbb"]);
        assert_eq!(live.division, Division::Even);
    }

    /// A leave moves the copies the leaver kept and a few more: a survivor
    /// whose share or standby duty changes reads a partition whole.
    /// Over these sets, at most three and a half more a leave on average
    /// (about three for eight members, under one for four, none for three,
    /// where the two left copy everything) and eight in one.
    #[test]
    fn a_leave_moves_few_copies_beyond_the_leavers() {
        for (n, standbys) in [(3usize, 1u16), (4, 1), (5, 1), (5, 2), (8, 1)] {
            let (mut extra, mut most) = (0, 0);
            let sets = member_sets(n, 50);
            for members in &sets {
                let all = strs(members);
                let leaver = all[n / 2];
                let left: Vec<&str> = all.iter().copied().filter(|m| *m != leaver).collect();
                let mut gained = 0;
                for m in &left {
                    let before = copied_by(m, &all, standbys, Division::Even);
                    let after = copied_by(m, &left, standbys, Division::Even);
                    gained += after.iter().filter(|p| !before.contains(p)).count();
                }
                let leavers = copied_by(leaver, &all, standbys, Division::Even).len();
                let more = gained.saturating_sub(leavers);
                extra += more;
                most = most.max(more);
            }
            assert!(
                extra <= sets.len() * 7 / 2 && most <= 8,
                "{n} members, {standbys} standbys: {extra} copies more than the leavers' over {} leaves, {most} in one",
                sets.len()
            );
        }
    }

    /// What each division gives three fixed members: replicas of different
    /// builds that name the same division must agree on every owner, so a
    /// change here is a change of division (a new [`Division`]), never a
    /// silent one.
    #[test]
    fn the_divisions_are_as_they_were() {
        let members = ["0190a1", "0190b2", "0190c3"];
        let rendezvous: [(&[u16], &[u16]); 3] = [
            (&[7, 8, 10], &[0, 1, 2, 5, 7, 8, 9, 10, 11, 12]),
            (&[2, 5, 13], &[2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15]),
            (
                &[0, 1, 3, 4, 6, 9, 11, 12, 14, 15],
                &[0, 1, 3, 4, 6, 9, 11, 12, 13, 14, 15],
            ),
        ];
        let even: [(&[u16], &[u16]); 3] = [
            (&[7, 8, 9, 10, 12], &[0, 1, 2, 5, 7, 8, 9, 10, 11, 12]),
            (
                &[1, 2, 3, 5, 13],
                &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15],
            ),
            (&[0, 4, 6, 11, 14, 15], &[0, 3, 4, 6, 11, 13, 14, 15]),
        ];
        for (division, expected) in [(Division::Rendezvous, rendezvous), (Division::Even, even)] {
            for (m, (owns, copies)) in members.iter().zip(expected) {
                assert_eq!(owned_by(m, &members, division), owns, "{division:?} {m}");
                assert_eq!(
                    copied_by(m, &members, 1, division),
                    copies,
                    "{division:?} {m}"
                );
            }
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
