//! The changelog's packs: many puts of one partition in one message.
//!
//! A pack's subject is `{PREFIX}.{partition}.b.{writer}x{number}`, a subject
//! of its own (see [`pack_subject`]); its payload is a format byte, then for
//! each put its collection's name (a byte of length), its key and its value
//! (four bytes of length each, big-endian). [`outgoing`] splits a batch of
//! writes into the messages that carry it: puts in packs, removals (and the
//! puts of collections that must not be packed, see [`packs`]) alone on
//! their key's subject.

use std::time::Duration;

use bytes::Bytes;

use super::{Change, PREFIX, Queued, write_subject};
use crate::Collection;

/// The token after the partition that marks a pack of puts.
pub(super) const PACK_TOKEN: &str = "b";

/// The first byte of a pack: its format.
const PACK_FORMAT: u8 = 1;

/// Most puts in one pack.
pub(super) const PACK_RECORDS: usize = 128;

/// Most bytes of keys and values in a pack (a single larger put goes
/// alone, as it did before packs).
const PACK_BYTES: usize = 256 * 1024;

/// The subject of a pack: `{PREFIX}.{partition}.b.{writer}x{number}`, with
/// the number of its first write. A subject of its own, so that the
/// stream's one message per subject keeps it, and a pack sent again (the
/// answer lost) replaces itself instead of being stored twice.
fn pack_subject(partition: u16, writer: &str, first: u64) -> String {
    format!("{PREFIX}.{partition}.{PACK_TOKEN}.{writer}x{first}")
}

/// The subjects of a partition's packs, for a purge.
pub(super) fn packs_of(partition: u16) -> String {
    format!("{PREFIX}.{partition}.{PACK_TOKEN}.>")
}

/// Frames puts into a pack's payload: the format byte, then for each put
/// its collection's name (a byte of length), its key and its value (four
/// bytes of length each, big-endian).
fn pack<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Bytes {
    let mut out = vec![PACK_FORMAT];
    for c in changes {
        let name = c.collection.name().as_bytes();
        let value = c.value.as_deref().unwrap_or_default();
        out.reserve(1 + name.len() + 8 + c.key.len() + value.len());
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&(c.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&c.key);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    Bytes::from(out)
}

/// Reads a pack's puts; the values share the payload's memory.
pub(super) fn unpack(payload: &Bytes) -> Result<Vec<Change>, &'static str> {
    let (&format, mut rest) = payload.split_first().ok_or("an empty pack")?;
    if format != PACK_FORMAT {
        return Err("a pack of an unknown format");
    }
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
        if rest.len() < n {
            return Err("a pack cut short");
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head)
    }
    fn length(rest: &mut &[u8]) -> Result<usize, &'static str> {
        let bytes = take(rest, 4)?;
        Ok(u32::from_be_bytes(bytes.try_into().expect("four bytes")) as usize)
    }
    let mut changes = Vec::new();
    while !rest.is_empty() {
        let name_len = usize::from(take(&mut rest, 1)?[0]);
        let name = take(&mut rest, name_len)?;
        let collection = Collection::ALL
            .into_iter()
            .find(|c| c.name().as_bytes() == name)
            .ok_or("a pack naming an unknown collection")?;
        let key_len = length(&mut rest)?;
        let key = take(&mut rest, key_len)?.to_vec();
        let value_len = length(&mut rest)?;
        let start = payload.len() - rest.len();
        take(&mut rest, value_len)?;
        changes.push(Change {
            collection,
            key,
            value: Some(payload.slice(start..start + value_len)),
        });
    }
    Ok(changes)
}

/// A message carrying writes of a batch: a pack of puts, or one write on
/// its key's subject.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) subject: String,
    pub(super) payload: Bytes,
    /// A removal marker.
    pub(super) removal: bool,
    /// The marker's time to live.
    pub(super) ttl: Option<Duration>,
}

/// The messages that carry `batch`, in its order: consecutive puts in
/// packs (up to [`PACK_RECORDS`] puts and [`PACK_BYTES`]); a removal
/// alone on its key's subject, where it replaces the key's earlier marker
/// and no purge of packs reaches it (see [`super::Changelog::purge_packs`]).
pub(super) fn outgoing(partition: u16, writer: &str, batch: &[Queued]) -> Vec<Outgoing> {
    let packable = |w: &Queued| w.2.value.is_some() && w.3.is_none() && packs(w.2.collection);
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(first) = batch.get(i) {
        if !packable(first) {
            let (_, _, change, ttl) = first;
            out.push(Outgoing {
                subject: write_subject(partition, change),
                payload: change.value.clone().unwrap_or_default(),
                removal: change.value.is_none(),
                ttl: *ttl,
            });
            i += 1;
            continue;
        }
        let start = i;
        let mut bytes = 0;
        while let Some(w) = batch.get(i)
            && packable(w)
            && i - start < PACK_RECORDS
        {
            let size = w.2.key.len() + w.2.value.as_ref().map_or(0, Bytes::len);
            if i > start && bytes + size > PACK_BYTES {
                break;
            }
            bytes += size;
            i += 1;
        }
        out.push(Outgoing {
            subject: pack_subject(partition, writer, first.0),
            payload: pack(batch[start..i].iter().map(|w| &w.2)),
            removal: false,
            ttl: None,
        });
    }
    out
}

/// Whether puts of `collection` go in packs. A pack stays until the
/// cleaner purges it, which may be after a removal's marker expired (those
/// of housekeeping collections do after [`crate::MARKER_TTL`]; the others'
/// are purged by the owner only once the packs before them are gone); a
/// replica reading the changelog then gets the put back without its
/// removal. That is harmless for the journal (its records and their
/// listing by time): a journal record is removed only once past its
/// retention, so one read again is expired, hidden from listings, and its
/// owner's sweep removes it again. Not for the other housekeeping
/// collections: an idempotency claim released after a failed step would
/// come back and refuse its key for the rest of its window, a fired timer
/// would fire again. Their puts go on their key's subject, where the
/// removal replaces them.
pub(crate) fn packs(collection: Collection) -> bool {
    !collection.is_housekeeping()
        || matches!(collection, Collection::Journal | Collection::EventTimes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::Term;

    fn change(collection: Collection, key: &str, value: Option<&str>) -> Change {
        Change {
            collection,
            key: key.as_bytes().to_vec(),
            value: value.map(|v| Bytes::from(v.to_string())),
        }
    }

    /// A pack reads back as the puts framed into it, in order, whatever
    /// their keys and values hold (empty ones, separators, any byte); a
    /// payload cut short, of another format or naming no collection is
    /// refused, saying which.
    #[test]
    fn a_pack_reads_back_as_its_puts_and_a_damaged_one_is_refused() {
        let puts = vec![
            change(
                Collection::Contacts,
                "acme\0c1",
                Some("{\"msisdn\":\"+27\"}"),
            ),
            change(Collection::Journal, "acme\0e1\0\u{1}", Some("")),
            change(Collection::Messages, "", Some("x")),
        ];
        let payload = pack(&puts);
        assert_eq!(unpack(&payload), Ok(puts));
        assert_eq!(unpack(&pack(&[])), Ok(vec![]));
        assert_eq!(
            unpack(&payload.slice(..payload.len() - 1)),
            Err("a pack cut short")
        );
        assert_eq!(unpack(&Bytes::new()), Err("an empty pack"));
        assert_eq!(
            unpack(&Bytes::from_static(b"\x02")),
            Err("a pack of an unknown format")
        );
        assert_eq!(
            unpack(&Bytes::from_static(b"\x01\x04nope\0\0\0\0\0\0\0\0")),
            Err("a pack naming an unknown collection")
        );
    }

    /// A batch goes out in its order: runs of puts in packs of up to
    /// [`PACK_RECORDS`], each removal alone on its key's subject (marked,
    /// with its time to live), a pack named by its first write's number;
    /// a put of a collection that is not packed alone on its key's subject.
    #[test]
    fn a_batch_goes_out_as_packs_of_puts_and_removals_on_their_keys() {
        let term = Term {
            partition: 7,
            epoch: 3,
        };
        let mut batch: Vec<Queued> = (1..=200)
            .map(|n| {
                let key = format!("acme\0c{n}");
                (n, term, change(Collection::Contacts, &key, Some("v")), None)
            })
            .collect();
        batch.insert(
            130,
            (
                500,
                term,
                change(Collection::Journal, "acme\0e1", None),
                Some(crate::MARKER_TTL),
            ),
        );
        let out = outgoing(7, "w", &batch);
        let subjects: Vec<&str> = out.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "switchboard.changelog.7.b.wx1",
                "switchboard.changelog.7.b.wx129",
                "switchboard.changelog.7.w.event_journal.YWNtZQBlMQ",
                "switchboard.changelog.7.b.wx131",
            ]
        );
        let sizes: Vec<usize> = out
            .iter()
            .map(|m| unpack(&m.payload).map_or(0, |c| c.len()))
            .collect();
        assert_eq!(sizes, [128, 2, 0, 70]);
        assert!(out[2].removal && out[2].ttl == Some(crate::MARKER_TTL));
        assert!(out.iter().enumerate().all(|(i, m)| m.removal == (i == 2)));
        let read: Vec<Change> = out
            .iter()
            .filter(|m| !m.removal)
            .flat_map(|m| unpack(&m.payload).expect("a pack"))
            .collect();
        let put: Vec<Change> = batch
            .iter()
            .filter(|w| w.2.value.is_some())
            .map(|w| w.2.clone())
            .collect();
        assert_eq!(read, put);

        // A timer's put goes on its key's subject, where its removal (whose
        // marker expires) will replace it; a journal record's goes in a pack.
        let timer = (
            1,
            term,
            change(Collection::Timers, "acme\0t1", Some("t")),
            None,
        );
        let journal = (
            2,
            term,
            change(Collection::Journal, "acme\0e2", Some("j")),
            None,
        );
        let out = outgoing(7, "w", &[timer, journal.clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].subject,
            "switchboard.changelog.7.w.timers.YWNtZQB0MQ"
        );
        assert!(!out[0].removal && out[0].payload == "t");
        assert_eq!(out[1].subject, "switchboard.changelog.7.b.wx2");
        assert_eq!(unpack(&out[1].payload), Ok(vec![journal.2]));
    }

    /// Which puts go in packs: every collection's but the housekeeping ones
    /// whose removal must not be lost when its marker expires (all but the
    /// journal's records and listing, which expire by age anyway).
    #[test]
    fn puts_of_collections_whose_removals_must_hold_are_not_packed() {
        let unpacked: Vec<Collection> =
            Collection::ALL.into_iter().filter(|c| !packs(*c)).collect();
        for c in [
            Collection::Idempotency,
            Collection::Timers,
            Collection::Waiters,
            Collection::Signals,
            Collection::Digests,
            Collection::DigestEvents,
        ] {
            assert!(unpacked.contains(&c), "{c:?} is packed");
        }
        for c in [
            Collection::Journal,
            Collection::EventTimes,
            Collection::Contacts,
            Collection::Messages,
            Collection::Inbox,
        ] {
            assert!(packs(c), "{c:?} is not packed");
        }
        assert!(unpacked.iter().all(|c| c.is_housekeeping()), "{unpacked:?}");
    }
}
