use super::*;

#[test]
fn put_get_scan_remove() {
    let s = Store::temporary().unwrap();
    s.put(Collection::Traces, &key(&[b"acme", b"2"]), b"two")
        .unwrap();
    s.put(Collection::Traces, &key(&[b"acme", b"1"]), b"one")
        .unwrap();
    s.put(Collection::Traces, &key(&[b"acmex", b"1"]), b"other")
        .unwrap();
    assert_eq!(
        s.get(Collection::Traces, &key(&[b"acme", b"1"]))
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );
    let prefix = key(&[b"acme", b""]);
    let values: Vec<_> = s
        .scan_prefix(Collection::Traces, &prefix)
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
        s.remove(Collection::Traces, &key(&[b"acme", b"1"]))
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );
    assert!(
        !s.contains(Collection::Traces, &key(&[b"acme", b"1"]))
            .unwrap()
    );
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
