use super::*;

/// A batch with nothing in it writes nothing, and is no error (callers
/// whose batches are made from what they found need not check).
#[test]
fn an_empty_batch_writes_nothing() {
    let s = Store::temporary().unwrap();
    s.write_atomically(&[]).unwrap();
    assert_eq!(s.len(Collection::Contacts), 0);
}

#[test]
fn put_get_scan_remove() {
    let s = Store::temporary().unwrap();
    s.put(Collection::Contacts, &key(&[b"acme", b"2"]), b"two")
        .unwrap();
    s.put(Collection::Contacts, &key(&[b"acme", b"1"]), b"one")
        .unwrap();
    s.put(Collection::Contacts, &key(&[b"acmex", b"1"]), b"other")
        .unwrap();
    assert_eq!(
        s.get(Collection::Contacts, &key(&[b"acme", b"1"]))
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );
    let prefix = key(&[b"acme", b""]);
    let values: Vec<_> = s
        .scan_prefix(Collection::Contacts, &prefix)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(values, vec![b"one".to_vec(), b"two".to_vec()]);
    // Collections are separate.
    assert_eq!(
        s.get(Collection::DeadLetters, &key(&[b"acme", b"1"]))
            .unwrap(),
        None
    );
    assert_eq!(
        s.remove(Collection::Contacts, &key(&[b"acme", b"1"]))
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );
    assert!(
        !s.contains(Collection::Contacts, &key(&[b"acme", b"1"]))
            .unwrap()
    );
}

/// Removing a prefix's entries before a key takes every one below it, a
/// page after another, but those kept; not the key itself, those after
/// it, nor another prefix's; and no more at once than asked, the first
/// first.
#[test]
fn remove_prefix_before_takes_all_below_but_those_kept() {
    let s = Store::temporary().unwrap();
    let at = |p: &[u8], n: u64| key(&[p, &n.to_be_bytes()]);
    for n in 0..200 {
        s.put(Collection::ChainVersions, &at(b"acme", n), b"v")
            .unwrap();
        s.put(Collection::ChainVersions, &at(b"acm", n), b"v")
            .unwrap();
    }
    let kept = at(b"acme", 7);
    let remove = || {
        s.remove_prefix_before(
            Collection::ChainVersions,
            &key(&[b"acme", b""]),
            &at(b"acme", 150),
            |k| k == kept.as_slice(),
            100,
        )
        .unwrap()
    };
    let left_after = |first_kept: u64| {
        let left: Vec<Vec<u8>> = s
            .scan_prefix(Collection::ChainVersions, &key(&[b"acme", b""]))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let expected: Vec<Vec<u8>> = std::iter::once(7)
            .chain(first_kept..200)
            .map(|n| at(b"acme", n))
            .collect();
        assert_eq!(left, expected, "left from {first_kept} on");
    };
    assert_eq!(remove(), 100);
    left_after(101);
    assert_eq!(remove(), 49, "the rest at the next call");
    left_after(150);
    let other = s.scan_prefix(Collection::ChainVersions, &key(&[b"acm", b""]));
    assert_eq!(other.unwrap().len(), 200);
}

#[test]
fn put_if_absent_keeps_the_first() {
    let s = Store::temporary().unwrap();
    assert!(s.put_if_absent(Collection::BusDedup, b"id", b"1").unwrap());
    assert!(!s.put_if_absent(Collection::BusDedup, b"id", b"2").unwrap());
    assert_eq!(
        s.get(Collection::BusDedup, b"id").unwrap().as_deref(),
        Some(&b"1"[..])
    );
}

#[test]
fn atomic_batch_spans_collections() {
    let s = Store::temporary().unwrap();
    s.put(Collection::Chains, b"gone", b"x").unwrap();
    s.write_atomically(&[
        Write {
            collection: Collection::Chains,
            key: b"acme".to_vec(),
            value: Some(b"doc".to_vec()),
        },
        Write {
            collection: Collection::ChainVersions,
            key: b"acme\x001".to_vec(),
            value: Some(b"doc".to_vec()),
        },
        Write {
            collection: Collection::Chains,
            key: b"gone".to_vec(),
            value: None,
        },
    ])
    .unwrap();
    assert_eq!(
        s.get(Collection::Chains, b"acme").unwrap().as_deref(),
        Some(&b"doc"[..])
    );
    assert_eq!(
        s.get(Collection::ChainVersions, b"acme\x001")
            .unwrap()
            .as_deref(),
        Some(&b"doc"[..])
    );
    assert_eq!(s.get(Collection::Chains, b"gone").unwrap(), None);
}

#[test]
fn data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.put(Collection::BusQueue, &1u64.to_be_bytes(), b"event")
            .unwrap();
        s.flush_blocking().unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(
        s.last(Collection::BusQueue).unwrap(),
        Some((1u64.to_be_bytes().to_vec(), b"event".to_vec()))
    );
    assert!(s.next_id().unwrap() < s.next_id().unwrap());
}

/// A store another open handle holds is refused with an error naming its
/// directory, after the short wait for a handle just dropped.
#[test]
fn a_store_held_open_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let _held = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("could not acquire lock"), "{err}");
}

#[test]
fn writes_in_order_apply_puts_and_removals_one_after_another() {
    let s = Store::temporary().unwrap();
    s.put(Collection::ContactIndex, b"stale", b"").unwrap();
    s.write_in_order(&[
        Write {
            collection: Collection::ContactIndex,
            key: b"index".to_vec(),
            value: Some(Vec::new()),
        },
        Write {
            collection: Collection::Contacts,
            key: b"record".to_vec(),
            value: Some(b"first".to_vec()),
        },
        // A later write of the same key wins.
        Write {
            collection: Collection::Contacts,
            key: b"record".to_vec(),
            value: Some(b"second".to_vec()),
        },
        Write {
            collection: Collection::ContactIndex,
            key: b"stale".to_vec(),
            value: None,
        },
    ])
    .unwrap();
    assert!(s.contains(Collection::ContactIndex, b"index").unwrap());
    assert!(!s.contains(Collection::ContactIndex, b"stale").unwrap());
    assert_eq!(
        s.get(Collection::Contacts, b"record").unwrap().as_deref(),
        Some(&b"second"[..])
    );
}

#[test]
fn compare_and_swap_replaces_only_what_it_expects() {
    let s = Store::temporary().unwrap();
    let c = Collection::Messages;
    // Absent expected: creates.
    assert!(s.compare_and_swap(c, b"m", None, Some(b"v1")).unwrap());
    // A stale expectation changes nothing.
    assert!(!s.compare_and_swap(c, b"m", None, Some(b"v2")).unwrap());
    assert!(
        !s.compare_and_swap(c, b"m", Some(b"v0"), Some(b"v2"))
            .unwrap()
    );
    assert_eq!(s.get(c, b"m").unwrap().as_deref(), Some(&b"v1"[..]));
    assert!(
        s.compare_and_swap(c, b"m", Some(b"v1"), Some(b"v2"))
            .unwrap()
    );
    assert_eq!(s.get(c, b"m").unwrap().as_deref(), Some(&b"v2"[..]));
    // `None` as the new value removes.
    assert!(s.compare_and_swap(c, b"m", Some(b"v2"), None).unwrap());
    assert_eq!(s.get(c, b"m").unwrap(), None);
}

#[test]
fn an_atomic_batch_of_one_write_puts_and_removes() {
    let s = Store::temporary().unwrap();
    s.write_atomically(&[Write {
        collection: Collection::DeadLetters,
        key: b"letter".to_vec(),
        value: Some(b"x".to_vec()),
    }])
    .unwrap();
    assert!(s.contains(Collection::DeadLetters, b"letter").unwrap());
    s.write_atomically(&[Write {
        collection: Collection::DeadLetters,
        key: b"letter".to_vec(),
        value: None,
    }])
    .unwrap();
    assert!(!s.contains(Collection::DeadLetters, b"letter").unwrap());
}

#[tokio::test]
async fn a_write_is_durable_once_a_flush_begun_after_its_mark_has_finished() {
    let s = Store::temporary().unwrap();
    s.put(Collection::Journal, b"first", b"1").unwrap();
    let first = s.mark();
    assert!(!s.is_durable(first), "no flush has run since the write");
    s.flush().await.unwrap();
    assert!(s.is_durable(first));
    s.put(Collection::Journal, b"second", b"2").unwrap();
    let second = s.mark();
    assert!(
        !s.is_durable(second),
        "the earlier flush began before this write"
    );
    assert!(s.is_durable(first));
    s.flush().await.unwrap();
    assert!(s.is_durable(second));
}

#[tokio::test]
async fn a_watch_sees_every_change_and_a_slow_watcher_slows_no_writer() {
    use tokio::sync::broadcast::error::RecvError;
    let store = Store::temporary().unwrap();
    let mut watch = store.watch(Collection::Inbox);
    let mut slow = store.watch(Collection::Inbox);
    store.put(Collection::Inbox, b"a", b"1").unwrap();
    store.remove(Collection::Inbox, b"a").unwrap();
    // Other collections are not watched.
    store.put(Collection::Contacts, b"c", b"1").unwrap();
    store.put(Collection::Inbox, b"b", b"2").unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let w = tokio::time::timeout(std::time::Duration::from_secs(5), watch.recv())
            .await
            .expect("a change in time")
            .unwrap();
        seen.push((w.key.to_vec(), w.value.map(|v| v.to_vec())));
    }
    assert_eq!(
        seen,
        [
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"a".to_vec(), None),
            (b"b".to_vec(), Some(b"2".to_vec())),
        ]
    );
    // Far more changes than a watcher may fall behind: every write lands
    // while `slow` reads nothing, and `slow` is told it lagged.
    for i in 0..(2 * WATCH_BUFFER) {
        store
            .put(Collection::Inbox, format!("k{i}").as_bytes(), b"v")
            .unwrap();
    }
    assert_eq!(store.len(Collection::Inbox), 2 * WATCH_BUFFER + 1);
    let lagged = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match slow.recv().await {
                Err(RecvError::Lagged(n)) => return n,
                Ok(_) => {}
                Err(RecvError::Closed) => panic!("the feed closed"),
            }
        }
    })
    .await
    .expect("told it lagged");
    assert!(lagged > 0);
}
