//! Writes forwarded to a partition's owner: the wire format, and the
//! owner's memory of what it answered.
//!
//! A request is the batch and its expectations: a `u32` count of writes,
//! each a collection index (`u8`), the key and an optional value; then a
//! `u32` count of expectations, each a write index (`u32`) and an optional
//! old value. Lengths are `u32` big-endian; an optional is a `u8` flag
//! first. The answer ([`Answer`]): `1` written, `0` an expectation failed,
//! `E` and why it was refused without being applied, or `U` and why its
//! outcome is unknown (applied, its commit failed).
//!
//! A request carries an id of the sender's in its [`ID_HEADER`]; a sender
//! that had no answer in time sends it again with the same id. The owner
//! answers a write it already has (in flight or answered within
//! [`REMEMBERED`]) with that write's answer instead of applying it again:
//! applied twice, a compare-and-swap would answer "expectation failed" for
//! a write that went in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Collection, Write};

/// The header naming a forwarded write: the same id on every sending of
/// one write.
pub const ID_HEADER: &str = "Switchboard-Write-Id";

/// How long an owner remembers the answer of a forwarded write, for the
/// sender's sending it again: longer than a sender keeps sending
/// (`FORWARD_DEADLINE` in `partitioned.rs`).
pub const REMEMBERED: Duration = Duration::from_secs(120);

/// The subject the owner of `partition` takes forwarded writes on.
pub fn subject(partition: u16) -> String {
    format!("switchboard.state.{partition}.write")
}

pub(super) fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

pub(super) fn put_optional(out: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            out.put_u8(1);
            put_bytes(out, b);
        }
        None => out.put_u8(0),
    }
}

/// A request: `batch`, applied if each `(i, old)` of `expect` holds.
pub fn encode(batch: &[Write], expect: &[(usize, Option<Vec<u8>>)]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32(batch.len() as u32);
    for w in batch {
        out.put_u8(w.collection.index() as u8);
        put_bytes(&mut out, &w.key);
        put_optional(&mut out, w.value.as_deref());
    }
    out.put_u32(expect.len() as u32);
    for (i, old) in expect {
        out.put_u32(*i as u32);
        put_optional(&mut out, old.as_deref());
    }
    out.freeze()
}

pub(super) fn get_bytes(input: &mut &[u8]) -> Result<Vec<u8>, String> {
    if input.remaining() < 4 {
        return Err("cut short".into());
    }
    let n = input.get_u32() as usize;
    if input.remaining() < n {
        return Err("cut short".into());
    }
    let b = input[..n].to_vec();
    input.advance(n);
    Ok(b)
}

pub(super) fn get_optional(input: &mut &[u8]) -> Result<Option<Vec<u8>>, String> {
    if !input.has_remaining() {
        return Err("cut short".into());
    }
    match input.get_u8() {
        0 => Ok(None),
        1 => get_bytes(input).map(Some),
        f => Err(format!("flag {f}")),
    }
}

/// A partitioned collection, by its index (`u8`); the caller has seen
/// that a byte remains.
pub(super) fn get_collection(input: &mut &[u8]) -> Result<Collection, String> {
    let c = input.get_u8() as usize;
    let collection = *Collection::ALL
        .get(c)
        .ok_or_else(|| format!("no collection {c}"))?;
    if !collection.is_partitioned() {
        return Err(format!("{} is not partitioned", collection.name()));
    }
    Ok(collection)
}

/// A batch and its expectations, as `encode` wrote them.
pub(super) type Decoded = (Vec<Write>, Vec<(usize, Option<Vec<u8>>)>);

pub(super) fn decode(mut input: &[u8]) -> Result<Decoded, String> {
    let input = &mut input;
    if input.remaining() < 4 {
        return Err("cut short".into());
    }
    let n = input.get_u32() as usize;
    let mut batch = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        if !input.has_remaining() {
            return Err("cut short".into());
        }
        let collection = get_collection(input)?;
        let key = get_bytes(input)?;
        let value = get_optional(input)?;
        batch.push(Write {
            collection,
            key,
            value,
        });
    }
    if input.remaining() < 4 {
        return Err("cut short".into());
    }
    let m = input.get_u32() as usize;
    let mut expect = Vec::with_capacity(m.min(1024));
    for _ in 0..m {
        if input.remaining() < 4 {
            return Err("cut short".into());
        }
        let i = input.get_u32() as usize;
        if i >= batch.len() {
            return Err(format!("expectation on write {i} of {}", batch.len()));
        }
        expect.push((i, get_optional(input)?));
    }
    if batch.is_empty() {
        return Err("no writes".into());
    }
    Ok((batch, expect))
}

/// An owner's answer to a forwarded write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Applied and committed: whether it was written (`false`: an
    /// expectation failed, nothing was written).
    Written(bool),
    /// Not applied (the owner no longer holds the partition, or the request
    /// does not decode): sent again, it may find an owner that takes it.
    Refused(String),
    /// Applied, but its commit failed: the changelog may or may not hold
    /// it. Sending it again would not tell.
    Unknown(String),
}

impl Answer {
    /// The answer on the wire: `1`, `0`, `E` and the refusal, or `U` and
    /// why the outcome is unknown.
    pub fn encode(&self) -> Bytes {
        match self {
            Answer::Written(true) => Bytes::from_static(b"1"),
            Answer::Written(false) => Bytes::from_static(b"0"),
            Answer::Refused(e) => Bytes::from(format!("E{e}")),
            Answer::Unknown(e) => Bytes::from(format!("U{e}")),
        }
    }

    /// Reads an answer [`Answer::encode`] wrote.
    pub fn decode(answer: &[u8]) -> Self {
        let text = |m: &[u8]| String::from_utf8_lossy(m).into_owned();
        match answer {
            b"1" => Answer::Written(true),
            b"0" => Answer::Written(false),
            [b'E', message @ ..] => Answer::Refused(text(message)),
            [b'U', message @ ..] => Answer::Unknown(text(message)),
            _ => Answer::Refused(format!(
                "an answer that does not decode: {:?}",
                text(answer)
            )),
        }
    }
}

/// What an owner knows of a forwarded write by its id.
#[derive(Debug, PartialEq)]
pub(super) enum Seen {
    /// A write not seen before (or forgotten): apply it, then
    /// [`Answers::settle`] its answer.
    New,
    /// Being applied: the reply goes with its answer.
    Pending,
    /// Answered already: this is the answer.
    Answered(Bytes),
}

/// An owner's forwarded writes by id: those in flight, with where to send
/// their answer, and those answered within [`REMEMBERED`].
#[derive(Debug, Default)]
pub(super) struct Answers {
    by_id: HashMap<String, Slot>,
    /// Answered ids with when they were answered, oldest first.
    answered: VecDeque<(Instant, String)>,
}

#[derive(Debug)]
enum Slot {
    Pending(Vec<Subject>),
    Given(Bytes),
}

impl Answers {
    /// A request for write `id` arrived at `now`, to be answered at `reply`.
    pub(super) fn receive(&mut self, id: &str, reply: Subject, now: Instant) -> Seen {
        self.forget(now);
        match self.by_id.get_mut(id) {
            Some(Slot::Pending(replies)) => {
                replies.push(reply);
                Seen::Pending
            }
            Some(Slot::Given(answer)) => Seen::Answered(answer.clone()),
            None => {
                self.by_id
                    .insert(id.to_string(), Slot::Pending(vec![reply]));
                Seen::New
            }
        }
    }

    /// Write `id` was answered with `answer` at `now`: where to send it
    /// (every request for it that is waiting). The answer is remembered,
    /// unless it is a refusal: a write refused without being applied, sent
    /// again, may find an owner.
    pub(super) fn settle(&mut self, id: &str, answer: &Answer, now: Instant) -> Vec<Subject> {
        self.forget(now);
        let waiting = if let Answer::Refused(_) = answer {
            self.by_id.remove(id)
        } else {
            self.answered.push_back((now, id.to_string()));
            self.by_id
                .insert(id.to_string(), Slot::Given(answer.encode()))
        };
        match waiting {
            Some(Slot::Pending(replies)) => replies,
            _ => Vec::new(),
        }
    }

    /// Forgets the answers older than [`REMEMBERED`].
    fn forget(&mut self, now: Instant) {
        while let Some((at, _)) = self.answered.front()
            && now.duration_since(*at) >= REMEMBERED
        {
            let (_, id) = self.answered.pop_front().expect("a front");
            self.by_id.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_write_reads_back_as_written() {
        let batch = vec![
            Write {
                collection: Collection::Contacts,
                key: b"acme\0c1".to_vec(),
                value: Some(b"{}".to_vec()),
            },
            Write {
                collection: Collection::ContactIndex,
                key: b"acme\0msisdn:+27".to_vec(),
                value: None,
            },
        ];
        let expect = vec![(0, None), (1, Some(b"c0".to_vec()))];
        let (b, e) = decode(&encode(&batch, &expect)).expect("decodes");
        assert_eq!(e, expect);
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[1].collection, b[1].value.clone()),
            (Collection::ContactIndex, None)
        );
        assert_eq!(b[0].key, b"acme\0c1");
    }

    #[test]
    fn a_bad_forwarded_write_is_refused_with_a_reason() {
        let check = |input: &[u8], expected: &str| {
            let e = decode(input).expect_err("refused");
            assert!(e.contains(expected), "{e}");
        };
        check(b"", "cut short");
        check(&[0, 0, 0, 1, 99], "no collection 99");
        let chains = Collection::ALL
            .iter()
            .position(|c| *c == Collection::Chains)
            .expect("listed") as u8;
        check(&[0, 0, 0, 1, chains, 0, 0, 0, 0, 0], "not partitioned");
        check(&[0, 0, 0, 0, 0, 0, 0, 0], "no writes");
        for answer in [
            Answer::Written(true),
            Answer::Written(false),
            Answer::Refused("partition 3 is no longer held here".into()),
            Answer::Unknown("the changelog's commit failed".into()),
        ] {
            assert_eq!(Answer::decode(&answer.encode()), answer);
        }
        assert_eq!(
            Answer::decode(b"?"),
            Answer::Refused("an answer that does not decode: \"?\"".into())
        );
    }

    /// A write sent again while in flight waits for the first one's
    /// answer; sent again once answered, it gets that answer; forgotten
    /// after [`REMEMBERED`], it is a new write.
    #[test]
    fn a_write_sent_again_gets_the_first_sendings_answer() {
        let mut answers = Answers::default();
        let start = Instant::now();
        let reply = |n: u32| Subject::from(format!("_INBOX.{n}"));
        assert_eq!(answers.receive("w1", reply(1), start), Seen::New);
        assert_eq!(answers.receive("w1", reply(2), start), Seen::Pending);
        assert_eq!(answers.receive("w2", reply(3), start), Seen::New);
        assert_eq!(
            answers.settle("w1", &Answer::Written(true), start),
            vec![reply(1), reply(2)],
            "every waiting request is answered"
        );
        let later = start + REMEMBERED - Duration::from_secs(1);
        assert_eq!(
            answers.receive("w1", reply(4), later),
            Seen::Answered(Answer::Written(true).encode())
        );
        assert_eq!(answers.receive("w2", reply(5), later), Seen::Pending);
        assert_eq!(
            answers.settle("w2", &Answer::Written(false), later),
            vec![reply(3), reply(5)]
        );

        let forgotten = start + REMEMBERED;
        assert_eq!(answers.receive("w1", reply(6), forgotten), Seen::New);
        assert_eq!(
            answers.receive("w2", reply(7), forgotten),
            Seen::Answered(Answer::Written(false).encode()),
            "answered later, remembered longer"
        );
        assert_eq!(answers.by_id.len(), 2);
        assert_eq!(answers.answered.len(), 1, "w1's old answer is gone");

        // A refused write is not remembered: sent again, it is new.
        assert_eq!(answers.receive("w3", reply(8), forgotten), Seen::New);
        assert_eq!(answers.receive("w3", reply(9), forgotten), Seen::Pending);
        assert_eq!(
            answers.settle("w3", &Answer::Refused("not held here".into()), forgotten),
            vec![reply(8), reply(9)]
        );
        assert_eq!(answers.receive("w3", reply(10), forgotten), Seen::New);
    }
}
