//! Reads of a partitioned collection, run on a local copy or sent to the
//! partition's owner when this replica keeps no copy of the partition
//! (`Partitioned::keep`): the reads themselves, their wire format and
//! their answer's.
//!
//! A request is the read's kind (`u8`), the collection's index (`u8`), the
//! key or prefix, for a prefix an optional lower bound (`from`) and an
//! optional upper one (`before`), and a limit (`u32`, `u32::MAX` for none);
//! lengths and flags as in [`super::forward`]. The answer is `R` and a
//! `u32` count of entries, each a key and a value; `E` and why the owner
//! did not answer, which another sending may (it no longer holds the
//! partition); or `F` and why it failed, which no sending will (the request
//! does not decode, the answer would be larger than a message may be).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::forward::{get_bytes, get_collection, get_optional, put_bytes, put_optional};
use crate::{Collection, Entry, StoreError, io};

/// The subject the owner of `partition` answers reads on.
pub fn subject(partition: u16) -> String {
    format!("switchboard.state.{partition}.read")
}

/// The most entries an owner is asked for at once: a longer read goes in
/// pages, so that an answer stays well within a message.
pub(crate) const PAGE: usize = 256;

/// A read of one collection: what [`crate::Store`]'s reads of a
/// partitioned collection ask, answered the same way wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// The value under a key (an entry with that key, or none).
    Get(Vec<u8>),
    /// Up to `limit` entries whose keys start with `prefix`, sort at or
    /// after `from` and before `before` (when given), the first first or,
    /// `rev`, the last first.
    Prefix {
        prefix: Vec<u8>,
        from: Option<Vec<u8>>,
        before: Option<Vec<u8>>,
        rev: bool,
        limit: usize,
    },
}

impl Read {
    /// The key whose account names the partition the read is of: `None`
    /// for a read that may span accounts (a prefix that does not hold a
    /// whole account, `{account}\0`), which only a local copy answers.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        match self {
            Read::Get(key) => Some(key),
            Read::Prefix { prefix, .. } => prefix.contains(&0).then_some(prefix.as_slice()),
        }
    }

    /// The same read limited to `n` entries (a get is one).
    pub(crate) fn page(&self, n: usize) -> Read {
        let mut page = self.clone();
        if let Read::Prefix { limit, .. } = &mut page {
            *limit = n.min(*limit);
        }
        page
    }

    /// The rest of the read once `got` entries were read, the last of them
    /// `last`: `None` when there is no rest (a get, or the limit reached).
    pub(crate) fn after(&self, got: usize, last: &[u8]) -> Option<Read> {
        let mut rest = self.clone();
        let Read::Prefix {
            from,
            before,
            rev,
            limit,
            ..
        } = &mut rest
        else {
            return None;
        };
        *limit = limit.checked_sub(got).filter(|l| *l > 0)?;
        if *rev {
            *before = Some(last.to_vec());
        } else {
            // Just past `last`.
            let mut next = last.to_vec();
            next.push(0);
            *from = Some(next);
        }
        Some(rest)
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
            Read::Prefix {
                prefix,
                from,
                before,
                rev,
                limit,
            } => {
                let start = match from {
                    Some(f) if f > prefix => f.clone(),
                    _ => prefix.clone(),
                };
                // With no end (a prefix that is empty or all 0xff), every
                // key from `start` on starts with the prefix.
                let entries: Box<dyn DoubleEndedIterator<Item = _>> =
                    match before.clone().or_else(|| past(prefix)) {
                        Some(end) if end > start => Box::new(tree.range(start..end)),
                        Some(_) => Box::new(std::iter::empty()),
                        None => Box::new(tree.range(start..)),
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
        match self {
            Read::Get(key) => {
                out.put_u8(b'g');
                out.put_u8(c.index() as u8);
                put_bytes(&mut out, key);
            }
            Read::Prefix {
                prefix,
                from,
                before,
                rev,
                limit,
            } => {
                out.put_u8(if *rev { b'r' } else { b'p' });
                out.put_u8(c.index() as u8);
                put_bytes(&mut out, prefix);
                put_optional(&mut out, from.as_deref());
                put_optional(&mut out, before.as_deref());
                out.put_u32(u32::try_from(*limit).unwrap_or(u32::MAX));
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
        let collection = get_collection(input)?;
        let key = get_bytes(input)?;
        let read = match kind {
            b'g' => Read::Get(key),
            b'p' | b'r' => {
                let from = get_optional(input)?;
                let before = get_optional(input)?;
                if input.remaining() < 4 {
                    return Err("cut short".into());
                }
                let limit = match input.get_u32() {
                    u32::MAX => usize::MAX,
                    n => n as usize,
                };
                Read::Prefix {
                    prefix: key,
                    from,
                    before,
                    rev: kind == b'r',
                    limit,
                }
            }
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

/// An owner's answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The entries read.
    Entries(Vec<Entry>),
    /// Not answered here (the partition is no longer held): another
    /// sending may find its owner.
    Refused(String),
    /// Failed, as it would again.
    Failed(String),
}

impl Answer {
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Answer::Entries(entries) => {
                out.put_u8(b'R');
                out.put_u32(entries.len() as u32);
                for (k, v) in entries {
                    put_bytes(&mut out, k);
                    put_bytes(&mut out, v);
                }
            }
            Answer::Refused(e) => {
                out.put_u8(b'E');
                out.put_slice(e.as_bytes());
            }
            Answer::Failed(e) => {
                out.put_u8(b'F');
                out.put_slice(e.as_bytes());
            }
        }
        out.freeze()
    }

    /// Reads an answer [`Answer::encode`] wrote; one that does not decode
    /// is a failure.
    pub(crate) fn decode(mut input: &[u8]) -> Answer {
        let input = &mut input;
        if !input.has_remaining() {
            return Answer::Failed("an empty answer".into());
        }
        let text = |input: &mut &[u8]| String::from_utf8_lossy(input).into_owned();
        match input.get_u8() {
            b'E' => Answer::Refused(text(input)),
            b'F' => Answer::Failed(text(input)),
            b'R' => {
                if input.remaining() < 4 {
                    return Answer::Failed("an answer cut short".into());
                }
                let n = input.get_u32() as usize;
                let mut entries = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    match (get_bytes(input), get_bytes(input)) {
                        (Ok(k), Ok(v)) => entries.push((k, v)),
                        _ => return Answer::Failed("an answer cut short".into()),
                    }
                }
                Answer::Entries(entries)
            }
            k => Answer::Failed(format!("an answer of kind {k} does not decode")),
        }
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

    fn keys(entries: &[Entry]) -> Vec<Vec<u8>> {
        entries.iter().map(|(k, _)| k.clone()).collect()
    }

    fn prefix(
        p: &[u8],
        from: Option<&[u8]>,
        before: Option<&[u8]>,
        rev: bool,
        limit: usize,
    ) -> Read {
        Read::Prefix {
            prefix: p.to_vec(),
            from: from.map(<[u8]>::to_vec),
            before: before.map(<[u8]>::to_vec),
            rev,
            limit,
        }
    }

    /// Reads `read` from `tree` a page of `n` at a time, as a replica
    /// without a copy reads at the owner.
    fn in_pages(read: &Read, tree: &sled::Tree, n: usize) -> Vec<Entry> {
        let mut all = Vec::new();
        let mut next = Some(read.clone());
        while let Some(read) = next {
            let page = read.page(n).run(Collection::Contacts, tree).unwrap();
            next = match page.last() {
                Some((last, _)) if page.len() == n => read.after(page.len(), last),
                _ => None,
            };
            all.extend(page);
        }
        all
    }

    /// Each read answers as `Store`'s reads of the sled backend do, the
    /// same run here, sent through the wire format, or read in pages.
    #[test]
    fn a_read_answers_the_same_run_here_sent_or_in_pages() {
        let t = tree();
        let c = Collection::Contacts;
        let (k1, k2, k3) = (
            b"a\0\x01".to_vec(),
            b"a\0\x02".to_vec(),
            b"a\0\x03".to_vec(),
        );
        let cases = [
            (Read::Get(k2.clone()), vec![k2.clone()]),
            (Read::Get(b"a\0\x09".to_vec()), vec![]),
            (
                prefix(b"a\0", None, None, false, usize::MAX),
                vec![k1.clone(), k2.clone(), k3.clone()],
            ),
            (
                prefix(b"a\0", None, None, true, 2),
                vec![k3.clone(), k2.clone()],
            ),
            (
                prefix(b"a\0", None, Some(&k3), true, 5),
                vec![k2.clone(), k1.clone()],
            ),
            (
                prefix(b"a\0", Some(&k2), None, false, 5),
                vec![k2.clone(), k3.clone()],
            ),
            (
                prefix(b"a\0", Some(b"a\0\x02\0"), None, false, 5),
                vec![k3.clone()],
            ),
            (prefix(b"a\0", Some(b"b"), None, false, 5), vec![]),
            (prefix(b"a\0", None, Some(b"a"), true, 5), vec![]),
            (
                prefix(b"", Some(b"ab"), None, false, 5),
                vec![b"ab\0\x01".to_vec(), b"b\0\x01".to_vec()],
            ),
        ];
        for (read, expected) in cases {
            let here = read.run(c, &t).unwrap();
            assert_eq!(keys(&here), expected, "{read:?}");
            let (collection, sent) = Read::decode(&read.encode(c)).unwrap();
            assert_eq!((collection, &sent), (c, &read));
            let answered = Answer::decode(&Answer::Entries(sent.run(c, &t).unwrap()).encode());
            assert_eq!(answered, Answer::Entries(here.clone()));
            for n in [1, 2, 3] {
                assert_eq!(in_pages(&read, &t, n), here, "{read:?} in pages of {n}");
            }
        }
        for refusal in [
            Answer::Refused("not held here".into()),
            Answer::Failed("too large".into()),
        ] {
            assert_eq!(Answer::decode(&refusal.encode()), refusal);
        }
    }

    /// A read names its partition by a whole account only: a prefix that
    /// could match several accounts (`a` matches `ab`'s keys) is answered
    /// by the local copy.
    #[test]
    fn a_read_names_a_partition_only_by_a_whole_account() {
        assert_eq!(
            prefix(b"a\0", None, None, false, 1).key(),
            Some(&b"a\0"[..])
        );
        assert_eq!(prefix(b"a", None, None, false, 1).key(), None);
        assert_eq!(prefix(b"", None, None, false, 1).key(), None);
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
        assert!(matches!(Answer::decode(b"R\0\0\0\x02"), Answer::Failed(_)));
    }
}
