//! Reads of a partitioned collection, run on a local copy or sent to the
//! partition's owner when this replica keeps no copy of the partition
//! (`Partitioned::keep`): the reads themselves, their wire format and
//! their answer's.
//!
//! A request is the read's kind (`u8`), the collection's index (`u8`), the
//! key or prefix, an optional second key (the `before` bound), and a limit
//! (`u32`); lengths and flags as in [`super::forward`]. The answer is `R`
//! and a `u32` count of entries, each a key and a value, or `E` and why the
//! owner could not answer (it no longer holds the partition, say): sent
//! again, it may find the partition's next owner.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::forward::{get_bytes, get_optional, put_bytes, put_optional};
use crate::{Collection, Entry, StoreError, io};

/// The subject the owner of `partition` answers reads on.
pub fn subject(partition: u16) -> String {
    format!("switchboard.state.{partition}.read")
}

/// A read of one collection: what [`crate::Store`]'s reads of a
/// partitioned collection ask, answered the same way wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// The value under a key (an entry with that key, or none).
    Get(Vec<u8>),
    /// Up to `limit` entries whose keys start with `prefix` and sort before
    /// `before` (all of them when `None`), the first first or, `rev`, the
    /// last first.
    Prefix {
        prefix: Vec<u8>,
        before: Option<Vec<u8>>,
        rev: bool,
        limit: usize,
    },
    /// Up to `limit` entries with keys at or after `from`, in key order.
    From { from: Vec<u8>, limit: usize },
}

impl Read {
    /// The key whose account names the partition the read is of: `None`
    /// for a read that may span accounts (a prefix that does not hold a
    /// whole account, `{account}\0`), which only a local copy answers.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        match self {
            Read::Get(key) | Read::From { from: key, .. } => Some(key),
            Read::Prefix { prefix, .. } => prefix.contains(&0).then_some(prefix.as_slice()),
        }
    }

    /// Runs the read on `tree`, a copy of collection `c`.
    pub(crate) fn run(&self, c: Collection, tree: &sled::Tree) -> Result<Vec<Entry>, StoreError> {
        let owned =
            |r: sled::Result<(sled::IVec, sled::IVec)>| r.map(|(k, v)| (k.to_vec(), v.to_vec()));
        match self {
            Read::Get(key) => Ok(tree
                .get(key)
                .map_err(io(c))?
                .map(|v| (key.clone(), v.to_vec()))
                .into_iter()
                .collect()),
            Read::From { from, limit } => tree
                .range(from.clone()..)
                .take(*limit)
                .map(owned)
                .collect::<Result<_, _>>()
                .map_err(io(c)),
            Read::Prefix {
                prefix,
                before,
                rev,
                limit,
            } => {
                let entries: Box<dyn DoubleEndedIterator<Item = _>> =
                    match before.clone().or_else(|| past(prefix)) {
                        Some(end) => Box::new(tree.range(prefix.clone()..end)),
                        None => Box::new(tree.scan_prefix(prefix)),
                    };
                let entries: Box<dyn Iterator<Item = _>> = if *rev {
                    Box::new(entries.rev())
                } else {
                    entries
                };
                entries
                    .take(*limit)
                    .map(owned)
                    .collect::<Result<_, _>>()
                    .map_err(io(c))
            }
        }
    }

    /// The request for reading `c`.
    pub(crate) fn encode(&self, c: Collection) -> Bytes {
        let mut out = BytesMut::new();
        let limit =
            |out: &mut BytesMut, limit: usize| out.put_u32(limit.min(u32::MAX as usize) as u32);
        match self {
            Read::Get(key) => {
                out.put_u8(b'g');
                out.put_u8(c.index() as u8);
                put_bytes(&mut out, key);
            }
            Read::Prefix {
                prefix,
                before,
                rev,
                limit: n,
            } => {
                out.put_u8(if *rev { b'r' } else { b'p' });
                out.put_u8(c.index() as u8);
                put_bytes(&mut out, prefix);
                put_optional(&mut out, before.as_deref());
                limit(&mut out, *n);
            }
            Read::From { from, limit: n } => {
                out.put_u8(b'f');
                out.put_u8(c.index() as u8);
                put_bytes(&mut out, from);
                limit(&mut out, *n);
            }
        }
        out.freeze()
    }

    /// Reads a request [`Read::encode`] wrote.
    pub(crate) fn decode(mut input: &[u8]) -> Result<(Collection, Read), String> {
        let input = &mut input;
        if input.remaining() < 2 {
            return Err("cut short".into());
        }
        let kind = input.get_u8();
        let c = input.get_u8() as usize;
        let collection = *Collection::ALL
            .get(c)
            .ok_or_else(|| format!("no collection {c}"))?;
        if !collection.is_partitioned() {
            return Err(format!("{} is not partitioned", collection.name()));
        }
        let key = get_bytes(input)?;
        let limit = |input: &mut &[u8]| {
            if input.remaining() < 4 {
                return Err("cut short".to_string());
            }
            // `u32::MAX` stands for no limit.
            Ok(match input.get_u32() {
                u32::MAX => usize::MAX,
                n => n as usize,
            })
        };
        let read = match kind {
            b'g' => Read::Get(key),
            b'p' | b'r' => Read::Prefix {
                prefix: key,
                before: get_optional(input)?,
                rev: kind == b'r',
                limit: limit(input)?,
            },
            b'f' => Read::From {
                from: key,
                limit: limit(input)?,
            },
            k => return Err(format!("no read of kind {k}")),
        };
        if input.has_remaining() {
            return Err(format!("{} bytes past the request", input.remaining()));
        }
        Ok((collection, read))
    }
}

/// Just past every key starting with `prefix`: `None` when no key is (the
/// prefix is empty or all `0xff`).
fn past(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The answer to a read: its entries, or why it was not answered.
pub(crate) fn encode_answer(answer: &Result<Vec<Entry>, String>) -> Bytes {
    let mut out = BytesMut::new();
    match answer {
        Ok(entries) => {
            out.put_u8(b'R');
            out.put_u32(entries.len() as u32);
            for (k, v) in entries {
                put_bytes(&mut out, k);
                put_bytes(&mut out, v);
            }
        }
        Err(e) => {
            out.put_u8(b'E');
            out.put_slice(e.as_bytes());
        }
    }
    out.freeze()
}

/// Reads an answer [`encode_answer`] wrote: `Err` is the owner's refusal.
pub(crate) fn decode_answer(mut input: &[u8]) -> Result<Vec<Entry>, String> {
    let input = &mut input;
    if !input.has_remaining() {
        return Err("an empty answer".into());
    }
    match input.get_u8() {
        b'E' => Err(String::from_utf8_lossy(input).into_owned()),
        b'R' => {
            if input.remaining() < 4 {
                return Err("an answer cut short".into());
            }
            let n = input.get_u32() as usize;
            let mut entries = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let k = get_bytes(input).map_err(|e| format!("an answer {e}"))?;
                let v = get_bytes(input).map_err(|e| format!("an answer {e}"))?;
                entries.push((k, v));
            }
            Ok(entries)
        }
        k => Err(format!("an answer of kind {k} does not decode")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        for k in [
            &b"a\0\x01"[..],
            b"a\0\x02",
            b"a\0\x03",
            b"ab\0\x01",
            b"b\0\x01",
        ] {
            tree.insert(k, k).unwrap();
        }
        tree
    }

    fn keys(entries: Vec<Entry>) -> Vec<Vec<u8>> {
        entries.into_iter().map(|(k, _)| k).collect()
    }

    /// Each read answers as `Store`'s reads of the sled backend do, and
    /// comes back the same through the wire format, request and answer.
    #[test]
    fn a_read_answers_the_same_run_here_or_sent() {
        let t = tree();
        let c = Collection::Contacts;
        let cases = [
            (Read::Get(b"a\0\x02".to_vec()), vec![b"a\0\x02".to_vec()]),
            (Read::Get(b"a\0\x09".to_vec()), vec![]),
            (
                Read::Prefix {
                    prefix: b"a\0".to_vec(),
                    before: None,
                    rev: false,
                    limit: usize::MAX,
                },
                vec![
                    b"a\0\x01".to_vec(),
                    b"a\0\x02".to_vec(),
                    b"a\0\x03".to_vec(),
                ],
            ),
            (
                Read::Prefix {
                    prefix: b"a\0".to_vec(),
                    before: None,
                    rev: true,
                    limit: 2,
                },
                vec![b"a\0\x03".to_vec(), b"a\0\x02".to_vec()],
            ),
            (
                Read::Prefix {
                    prefix: b"a\0".to_vec(),
                    before: Some(b"a\0\x03".to_vec()),
                    rev: true,
                    limit: 5,
                },
                vec![b"a\0\x02".to_vec(), b"a\0\x01".to_vec()],
            ),
            (
                Read::From {
                    from: b"a\0\x03".to_vec(),
                    limit: 2,
                },
                vec![b"a\0\x03".to_vec(), b"ab\0\x01".to_vec()],
            ),
        ];
        for (read, expected) in cases {
            let here = read.run(c, &t).unwrap();
            assert_eq!(keys(here.clone()), expected, "{read:?}");
            let (collection, sent) = Read::decode(&read.encode(c)).unwrap();
            assert_eq!((collection, &sent), (c, &read));
            let answered =
                decode_answer(&encode_answer(&sent.run(c, &t).map_err(|e| e.to_string())));
            assert_eq!(answered.unwrap(), here);
        }
        let refused = decode_answer(&encode_answer(&Err("not held here".into())));
        assert_eq!(refused, Err("not held here".to_string()));
    }

    /// A read names its partition by a whole account only: a prefix that
    /// could match several accounts (`a` matches `ab`'s keys) is answered
    /// by the local copy.
    #[test]
    fn a_read_names_a_partition_only_by_a_whole_account() {
        let prefix = |p: &[u8]| Read::Prefix {
            prefix: p.to_vec(),
            before: None,
            rev: false,
            limit: 1,
        };
        assert_eq!(prefix(b"a\0").key(), Some(&b"a\0"[..]));
        assert_eq!(prefix(b"a").key(), None);
        assert_eq!(prefix(b"").key(), None);
        assert_eq!(Read::Get(b"a".to_vec()).key(), Some(&b"a"[..]));
    }

    #[test]
    fn a_request_that_does_not_decode_says_why() {
        assert!(Read::decode(b"").is_err());
        assert!(Read::decode(&[b'x', Collection::Contacts.index() as u8, 0, 0, 0, 0]).is_err());
        let shared = Read::Get(b"k".to_vec()).encode(Collection::Chains);
        assert!(
            Read::decode(&shared)
                .unwrap_err()
                .contains("not partitioned")
        );
        let mut long = Read::Get(b"k".to_vec())
            .encode(Collection::Contacts)
            .to_vec();
        long.push(0);
        assert!(Read::decode(&long).is_err());
    }
}
