//! The partition changelog (`store/src/changelog.rs`) against a real
//! nats-server: group commit, fencing of a deposed owner, compaction,
//! undecodable records, and the partition count.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use switchboard_store::Collection;
use switchboard_store::changelog::{Change, Changelog, ChangelogError, Record, STREAM};

use crate::util::NatsServer;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn jetstream(nats: &NatsServer) -> async_nats::jetstream::Context {
    let client = async_nats::connect(nats.url())
        .await
        .expect("connecting to nats-server");
    async_nats::jetstream::new(client)
}

/// The changelog of 16 partitions on the one server `nats`, bound on a
/// connection of its own.
async fn bind(nats: &NatsServer) -> Changelog {
    Changelog::bind(jetstream(nats).await, 16, 1)
        .await
        .expect("binding the changelog")
}

fn put(collection: Collection, key: &str, value: &str) -> Change {
    Change {
        collection,
        key: key.as_bytes().to_vec(),
        value: Some(Bytes::from(value.to_string())),
    }
}

/// Reads the changelog from the start until `n` records have come.
async fn read(log: &Changelog, n: usize) -> Vec<Record> {
    let records = log.records(1).await.expect("following the changelog");
    tokio::time::timeout(TIMEOUT, records.take(n).collect::<Vec<_>>())
        .await
        .expect("the records come")
        .into_iter()
        .map(|r| r.expect("a record"))
        .collect()
}

/// Reads the changelog from the start up to its end as it is now (a sync
/// mark published for the purpose: the stream's last message may be one
/// that expires before the read reaches it). Sync marks are left out.
async fn read_all(log: &Changelog) -> Vec<Record> {
    try_read_all(log).await.expect("the changelog read")
}

/// [`read_all`], failing instead of panicking (a cluster losing a node may
/// not answer for a moment).
async fn try_read_all(log: &Changelog) -> Result<Vec<Record>, String> {
    let sync = || async { log.sync().await.map_err(|e| format!("a sync mark: {e}")) };
    let mut end = sync().await?;
    let mut records = Box::pin(
        log.records(1)
            .await
            .map_err(|e| format!("following the changelog: {e}"))?,
    );
    let mut out = Vec::new();
    let mut reached = 0;
    loop {
        while reached < end {
            let next = tokio::time::timeout(TIMEOUT, records.next())
                .await
                .map_err(|_| "the records did not come".to_string())?
                .ok_or("the reader stopped")?
                .map_err(|e| format!("a record: {e}"))?;
            reached = next.seq();
            if !matches!(next, Record::Sync { .. }) {
                out.push(next);
            }
        }
        // A compaction may have copied records forward meanwhile, and
        // purged their originals before this read reached them: on to the
        // end as it is now.
        let last = log
            .last_seq()
            .await
            .map_err(|e| format!("the stream's state: {e}"))?;
        if last == reached {
            return Ok(out);
        }
        end = sync().await?;
    }
}

/// A replicated store of 16 partitions in `dir`, on the one server
/// `nats`, keeping a copy of every partition.
async fn replica(nats: &NatsServer, dir: std::path::PathBuf) -> switchboard_store::Store {
    replica_with(nats, dir, switchboard_store::MARKER_TTL).await
}

/// [`replica`], whose cleaner purges removal markers `markers_kept` after
/// a round made them unneeded.
async fn replica_with(
    nats: &NatsServer,
    dir: std::path::PathBuf,
    markers_kept: Duration,
) -> switchboard_store::Store {
    switchboard_store::Store::replicated(
        &dir,
        async_nats::ConnectOptions::new(),
        vec![nats.url().to_string()],
        switchboard_store::Replication {
            markers_kept,
            ..switchboard_store::Replication::new(1, 16, switchboard_store::Copies::Every)
        },
    )
    .await
    .expect("a replicated store")
}

/// Every write the records carry, in order: (partition, key, value).
fn writes(records: &[Record]) -> Vec<(u16, String, Option<String>)> {
    records
        .iter()
        .flat_map(|r| match r {
            Record::Write {
                partition, changes, ..
            } => changes
                .iter()
                .map(|change| {
                    (
                        *partition,
                        String::from_utf8_lossy(&change.key).into_owned(),
                        change
                            .value
                            .as_ref()
                            .map(|v| String::from_utf8_lossy(v).into_owned()),
                    )
                })
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// The latest value of every written key, as a follower applying the
/// records ends with it, in the order of each key's latest write.
fn latest(records: &[Record]) -> Vec<(u16, String, Option<String>)> {
    let mut seen = std::collections::HashSet::new();
    let mut latest: Vec<_> = writes(records)
        .into_iter()
        .rev()
        .filter(|w| seen.insert((w.0, w.1.clone())))
        .collect();
    latest.reverse();
    latest
}

/// A commit returns once the stream holds every write appended before it,
/// in order, under the right partition; a removal reads back as one.
#[tokio::test]
async fn a_commit_makes_every_appended_write_readable_in_order() {
    let nats = NatsServer::start();
    let log = bind(&nats).await;
    let term = log.begin_term(3, "replica-a").await.expect("a term");
    let appender = log.appender();
    for i in 0..500 {
        appender.append(
            term,
            put(Collection::Contacts, &format!("acme\0c{i}"), &i.to_string()),
        );
    }
    appender.append(
        term,
        Change {
            collection: Collection::Contacts,
            key: b"acme\0c7".to_vec(),
            value: None,
        },
    );
    appender.commit().await.expect("the writes are stored");
    let records = read_all(&log).await;
    assert_eq!(records[0], Record::Term(term));
    // The puts go in packs of up to 128 (how many in each depends on how
    // many were queued when a batch left), the removal alone on its key's
    // subject, last.
    let sizes: Vec<usize> = records[1..]
        .iter()
        .map(|r| match r {
            Record::Write { changes, .. } => changes.len(),
            other => panic!("a write, not {other:?}"),
        })
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 501);
    assert_eq!(sizes.last(), Some(&1));
    assert!(
        sizes.iter().all(|n| *n <= 128) && sizes.len() <= 10,
        "{sizes:?}"
    );
    let writes = latest(&records);
    // c7 was written, then removed: the removal is its latest write.
    assert_eq!(writes.len(), 500);
    assert_eq!(writes[0], (3, "acme\0c0".into(), Some("0".into())));
    assert_eq!(writes[498], (3, "acme\0c499".into(), Some("499".into())));
    assert_eq!(writes[499], (3, "acme\0c7".into(), None));
    assert!(
        records.windows(2).all(|w| w[0].seq() < w[1].seq()),
        "records come in stream order"
    );
}

/// A commit answers for the writes appended before it was asked for, not
/// for those appended while it waits: a write refused after the call
/// (under a term another replica has taken over) fails the next commit,
/// not the one already asked for, whose write is stored.
#[tokio::test]
async fn a_commit_is_not_failed_by_a_write_appended_after_it() {
    let nats = NatsServer::start();
    let old = bind(&nats).await;
    let new = bind(&nats).await;
    let fenced = old.begin_term(5, "replica-a").await.expect("a term");
    let kept = old.begin_term(6, "replica-a").await.expect("a term");
    new.begin_term(5, "replica-b").await.expect("the take-over");
    let writer = old.appender();
    for round in 0..3 {
        writer.append(
            kept,
            put(Collection::Contacts, &format!("zeta\0k{round}"), "fine"),
        );
        let mut commit = Box::pin(writer.commit());
        assert!(
            futures::poll!(&mut commit).is_pending(),
            "the commit is asked for and waits"
        );
        writer.append(fenced, put(Collection::Contacts, "acme\0k", "stale"));
        commit
            .await
            .unwrap_or_else(|e| panic!("round {round}: the write before the commit: {e}"));
        let refused = writer.commit().await.expect_err("the later write");
        assert_eq!(
            refused,
            ChangelogError::Fenced {
                partition: 5,
                epoch: fenced.epoch
            },
            "round {round}"
        );
    }
    let writes = latest(&read_all(&new).await);
    assert_eq!(
        writes,
        (0..3)
            .map(|round| (6, format!("zeta\0k{round}"), Some("fine".to_string())))
            .collect::<Vec<_>>()
    );
}

/// A deposed owner's writes are refused once another replica has begun a
/// term on the partition, however long the deposed one was away, and the
/// new owner's value stands; other partitions of the deposed owner go on.
#[tokio::test]
async fn a_deposed_owner_cannot_overwrite_the_new_owners_state() {
    let nats = NatsServer::start();
    let old = bind(&nats).await;
    let new = bind(&nats).await;
    let old_term = old.begin_term(5, "replica-a").await.expect("a term");
    let old_other = old.begin_term(6, "replica-a").await.expect("a term");
    let old_writer = old.appender();
    old_writer.append(
        old_term,
        put(Collection::Contacts, "acme\0k", "from the old owner"),
    );
    old_writer
        .commit()
        .await
        .expect("stored while its term is current");

    let new_term = new.begin_term(5, "replica-b").await.expect("the take-over");
    assert!(new_term.epoch > old_term.epoch);
    let new_writer = new.appender();
    new_writer.append(
        new_term,
        put(Collection::Contacts, "acme\0k", "from the new owner"),
    );
    new_writer.commit().await.expect("the new owner's write");

    // The old owner wakes up and writes under its old term.
    old_writer.append(old_term, put(Collection::Contacts, "acme\0k", "stale"));
    old_writer.append(old_term, put(Collection::Journal, "acme\0e1", "stale too"));
    let refused = old_writer.commit().await.expect_err("refused");
    assert_eq!(
        refused,
        ChangelogError::Fenced {
            partition: 5,
            epoch: old_term.epoch
        }
    );
    assert!(refused.to_string().contains("partition 5"), "{refused}");
    // The term is known broken, so that a writer told nothing by the
    // commit it waited for does not take its writes as durable.
    assert!(old_writer.is_broken(old_term));
    assert!(!old_writer.is_broken(old_other));
    // Its other partition is still its own.
    old_writer.append(old_other, put(Collection::Contacts, "zeta\0k", "fine"));
    old_writer
        .commit()
        .await
        .expect("partition 6 is still the old owner's");

    let records = read_all(&new).await;
    let writes = latest(&records);
    assert_eq!(
        writes,
        vec![
            (5, "acme\0k".into(), Some("from the new owner".into())),
            (6, "zeta\0k".into(), Some("fine".into())),
        ]
    );
    assert!(records.contains(&Record::Term(new_term)));
}

/// Two replicas beginning a term at once both get one, one after the
/// other; the earlier is fenced by the later.
#[tokio::test]
async fn terms_begun_at_once_are_ordered() {
    let nats = NatsServer::start();
    let a = bind(&nats).await;
    let b = bind(&nats).await;
    let (ta, tb) = tokio::join!(a.begin_term(0, "a"), b.begin_term(0, "b"));
    let (ta, tb) = (ta.expect("a's term"), tb.expect("b's term"));
    assert_ne!(ta.epoch, tb.epoch);
    let (earlier, later, earlier_log, later_log) = if ta.epoch < tb.epoch {
        (ta, tb, &a, &b)
    } else {
        (tb, ta, &b, &a)
    };
    let w = earlier_log.appender();
    w.append(earlier, put(Collection::Messages, "acme\0m", "x"));
    assert!(matches!(
        w.commit().await,
        Err(ChangelogError::Fenced { partition: 0, .. })
    ));
    let w = later_log.appender();
    w.append(later, put(Collection::Messages, "acme\0m", "y"));
    w.commit().await.expect("the later term writes");
}

/// A purge of a partition's packs below a sync mark takes the packs
/// stored before it and nothing else: not the partition's removal markers,
/// its later packs, or another partition's. It is what the cleaner does
/// once it has written the live records again (tested with the store in
/// `a_partitions_changelog_stays_about_the_size_of_its_live_state`).
#[tokio::test]
async fn purging_a_partitions_packs_leaves_its_removals_and_later_writes() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let log = Changelog::bind(js.clone(), 16, 1).await.expect("binding");
    let (t1, t2) = (
        log.begin_term(1, "a").await.expect("a term"),
        log.begin_term(2, "a").await.expect("a term"),
    );
    let appender = log.appender();
    for round in 0..20 {
        for contact in 0..100 {
            appender.append(
                t1,
                put(
                    Collection::Contacts,
                    &format!("acme\0c{contact}"),
                    &format!("v{round}"),
                ),
            );
        }
    }
    appender.append(
        t1,
        Change {
            collection: Collection::Contacts,
            key: b"acme\0c0".to_vec(),
            value: None,
        },
    );
    appender.append(t2, put(Collection::Contacts, "zeta\0k", "other"));
    appender.commit().await.expect("stored");
    let below = log.sync().await.expect("a mark");
    // The live records written again, as the cleaner does.
    for contact in 1..100 {
        appender.append(
            t1,
            put(Collection::Contacts, &format!("acme\0c{contact}"), "v19"),
        );
    }
    appender.commit().await.expect("stored");
    let before = writes(&read_all(&log).await).len();
    assert_eq!(before, 20 * 100 + 1 + 1 + 99);

    let purged = log.purge_packs(1, below).await.expect("purged");
    assert!(purged >= 16, "2,000 puts in packs of up to 128: {purged}");
    let records = read_all(&log).await;
    assert_eq!(writes(&records).len(), 1 + 1 + 99);
    let mut expected: Vec<_> = vec![
        (1, "acme\0c0".to_string(), None),
        (2, "zeta\0k".to_string(), Some("other".to_string())),
    ];
    expected.extend((1..100).map(|c| (1, format!("acme\0c{c}"), Some("v19".to_string()))));
    // The two partitions' batches are published side by side: no order
    // between them.
    let mut latest = latest(&records);
    latest.sort();
    expected.sort();
    assert_eq!(latest, expected);
}

/// A message in the changelog that is not a record (written by hand) is
/// read as undecodable, with its sequence and partition, and what follows
/// it is read as usual.
#[tokio::test]
async fn an_undecodable_record_is_reported_and_passed_over() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let log = Changelog::bind(js.clone(), 16, 1).await.expect("binding");
    let term = log.begin_term(2, "a").await.expect("a term");
    js.publish(
        "switchboard.changelog.2.w.no_such_collection.AAAA",
        "junk".into(),
    )
    .await
    .expect("published")
    .await
    .expect("stored");
    js.publish("switchboard.changelog.x.epoch", "junk".into())
        .await
        .expect("published")
        .await
        .expect("stored");
    js.publish(
        "switchboard.changelog.2.b.handmade",
        "\x01\x08contacts".into(),
    )
    .await
    .expect("published")
    .await
    .expect("stored");
    let appender = log.appender();
    appender.append(term, put(Collection::Contacts, "acme\0k", "after"));
    appender.commit().await.expect("stored");

    let records = read(&log, 5).await;
    match &records[1] {
        Record::Undecodable {
            seq,
            partition,
            subject,
            reason,
        } => {
            assert_eq!((*seq, *partition), (2, Some(2)));
            assert_eq!(subject, "switchboard.changelog.2.w.no_such_collection.AAAA");
            assert!(reason.contains("collection"), "{reason}");
        }
        other => panic!("expected an undecodable record, got {other:?}"),
    }
    assert!(matches!(
        &records[2],
        Record::Undecodable {
            seq: 3,
            partition: None,
            ..
        }
    ));
    match &records[3] {
        Record::Undecodable {
            seq: 4,
            partition: Some(2),
            reason,
            ..
        } => assert!(reason.contains("pack cut short"), "{reason}"),
        other => panic!("expected an undecodable pack, got {other:?}"),
    }
    assert_eq!(
        latest(&records),
        vec![(2, "acme\0k".into(), Some("after".into()))]
    );
}

/// A replica configured with another partition count than the stream's is
/// refused, naming both; a term on a partition the changelog does not
/// have is refused too.
#[tokio::test]
async fn a_partition_count_other_than_the_streams_is_refused() {
    let nats = NatsServer::start();
    let log = bind(&nats).await;
    let refused = Changelog::bind(jetstream(&nats).await, 8, 1)
        .await
        .expect_err("another partition count");
    assert_eq!(
        refused,
        ChangelogError::PartitionCount {
            stream: 16,
            configured: 8
        }
    );
    let message = refused.to_string();
    assert!(message.contains("16") && message.contains("8"), "{message}");
    assert!(matches!(
        log.begin_term(16, "a").await,
        Err(ChangelogError::Partition(16, _))
    ));
}

/// On a three-node cluster (the changelog kept on all three), many writes
/// of two partitions appended at once are all stored: each partition's
/// writes go as one fenced batch, which the leader checks once (it refuses
/// a second conditional publish on a subject while one is in flight). A
/// deposed owner is refused there too.
#[tokio::test]
async fn on_a_cluster_appended_writes_are_stored_and_a_deposed_owner_refused() {
    let cluster = crate::util::NatsCluster::start(3).await;
    let connect = || async {
        let client = async_nats::connect(cluster.url(0))
            .await
            .expect("connecting to the cluster");
        async_nats::jetstream::new(client)
    };
    let log = Changelog::bind(connect().await, 16, 3)
        .await
        .expect("binding the changelog on three servers");
    let (t1, t2) = (
        log.begin_term(1, "a").await.expect("a term"),
        log.begin_term(2, "a").await.expect("a term"),
    );
    let appender = log.appender();
    for i in 0..300 {
        let term = if i % 2 == 0 { t1 } else { t2 };
        appender.append(term, put(Collection::Journal, &format!("acme\0e{i}"), "x"));
    }
    appender.commit().await.expect("every write is stored");
    let writes = latest(&read_all(&log).await);
    assert_eq!(writes.len(), 300);

    let other = Changelog::bind(connect().await, 16, 3)
        .await
        .expect("binding");
    other.begin_term(1, "b").await.expect("the take-over");
    appender.append(t1, put(Collection::Journal, "acme\0late", "stale"));
    assert!(matches!(
        appender.commit().await,
        Err(ChangelogError::Fenced { partition: 1, .. })
    ));
    appender.append(t2, put(Collection::Journal, "acme\0fine", "y"));
    appender
        .commit()
        .await
        .expect("partition 2 is still this owner's");
}

/// Losing the node that leads the changelog stream while writes are
/// appended does not lose any or fail the commits that cover them: a batch
/// refused or unanswered while the cluster elects a new leader is sent
/// again, and each commit returns once its writes are stored. (A commit
/// that failed here would leave the owner's local copy with writes the
/// changelog lacks; one that returned early would ack events whose state
/// no other replica can read.)
#[tokio::test]
async fn a_commit_waits_through_the_loss_of_the_streams_leader() {
    let mut cluster = crate::util::NatsCluster::start(3).await;
    let node = |i: usize| {
        let url = cluster.url(i);
        async move {
            let client = async_nats::connect(url)
                .await
                .expect("connecting to the cluster");
            async_nats::jetstream::new(client)
        }
    };
    Changelog::bind(node(0).await, 16, 3)
        .await
        .expect("making the changelog on three servers");
    let mut stream = node(0).await.get_stream(STREAM).await.expect("the stream");
    let leader = stream
        .info()
        .await
        .expect("its info")
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .and_then(|name| name.strip_prefix('n')?.parse::<usize>().ok())
        .expect("a leader, named n{i}");
    // The writer talks to a node that survives, once that node knows the
    // stream: a stream just made on a cluster reaches the other servers a
    // moment later, and a publish there before it does finds no stream.
    let writer = node((leader + 1) % 3).await;
    crate::util::wait_until(
        "the stream's info from the writer's server",
        Duration::from_secs(30),
        || async {
            let mut stream = writer.get_stream(STREAM).await.ok()?;
            stream.info().await.ok().map(|_| ())
        },
    )
    .await;
    let log = Changelog::bind(writer, 16, 3)
        .await
        .expect("binding the changelog");
    let terms = [
        log.begin_term(3, "a").await.expect("a term"),
        log.begin_term(4, "a").await.expect("a term"),
    ];
    let appender = log.appender();
    let rounds = 30;
    let per_round = 20;
    let mut slowest = Duration::ZERO;
    for round in 0..rounds {
        for i in 0..per_round {
            let term = terms[i % 2];
            appender.append(
                term,
                put(Collection::Journal, &format!("acme\0r{round}-{i}"), "x"),
            );
        }
        if round == rounds / 3 {
            cluster.kill(leader);
        }
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(90), appender.commit())
            .await
            .expect("the commit returns once a new leader stores the writes")
            .unwrap_or_else(|e| panic!("round {round}: the commit failed: {e}"));
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("changelog: the slowest commit, across the leader's loss, took {slowest:?}");
    // Two term markers, then every write (none lost, none twice: a pack
    // sent again replaces itself, an atomic batch sent again is refused).
    // The two nodes left may still be settling their consumers' leaders: a
    // reader is asked for again until one is made.
    let last = crate::util::wait_until(
        "the stream's state on the nodes left",
        Duration::from_secs(60),
        || async { log.last_seq().await.ok() },
    )
    .await;
    let records = crate::util::wait_until(
        "a reader of the changelog on the nodes left",
        Duration::from_secs(60),
        || async { log.records(1).await.ok() },
    )
    .await;
    let records: Vec<Record> = tokio::time::timeout(Duration::from_secs(60), async {
        let mut records = Box::pin(records);
        let mut out: Vec<Record> = Vec::new();
        while out.last().is_none_or(|r| r.seq() < last) {
            out.push(records.next().await.expect("more").expect("a record"));
        }
        out
    })
    .await
    .expect("the records come");
    let writes = writes(&records);
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<&String> = writes
        .iter()
        .map(|w| &w.1)
        .filter(|k| !seen.insert(*k))
        .collect();
    assert!(twice.is_empty(), "writes stored twice: {twice:?}");
    assert_eq!(writes.len(), rounds * per_round);
}

/// What a batch sent again relies on: the stream refuses an atomic batch
/// whose first write carries the message id of one it stored, storing
/// nothing of it (so the appender counts it as stored, never twice).
#[tokio::test]
async fn the_stream_refuses_a_stored_batch_sent_again_whole() {
    use async_nats::header::{
        NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_MESSAGE_ID,
    };
    use async_nats::jetstream::ErrorCode;
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BATCHES".into(),
        subjects: vec!["batches.>".into()],
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .expect("making a stream");
    let mut answers = Vec::new();
    for _ in 0..2 {
        let batch = uuid::Uuid::new_v4().simple().to_string();
        for i in 1..=3 {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(NATS_BATCH_ID, batch.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, i.to_string().as_str());
            if i == 1 {
                headers.insert(NATS_MESSAGE_ID, "writer-17");
            }
            let subject = format!("batches.{i}");
            if i < 3 {
                js.client()
                    .publish_with_headers(subject, headers, "v".into())
                    .await
                    .expect("publishing");
            } else {
                headers.insert(NATS_BATCH_COMMIT, "1");
                let ack = js
                    .publish_with_headers(subject, headers, "v".into())
                    .await
                    .expect("publishing");
                answers.push(ack.await);
            }
        }
    }
    assert!(answers[0].is_ok(), "the first send: {:?}", answers[0]);
    let code = answers[1]
        .as_ref()
        .err()
        .and_then(std::error::Error::source)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .map(|e| e.error_code());
    assert_eq!(
        code,
        Some(ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE),
        "the second send: {:?}",
        answers[1]
    );
    let mut stream = js.get_stream("BATCHES").await.expect("the stream");
    assert_eq!(stream.info().await.expect("its info").state.messages, 3);
}

/// A partition's reader sees that partition's records only; a sync mark is
/// a point every reader from before it reaches, whatever was replaced since.
#[tokio::test]
async fn a_partitions_reader_sees_its_records_and_reaches_a_sync_mark() {
    let nats = NatsServer::start();
    let log = bind(&nats).await;
    let (t3, t4) = (
        log.begin_term(3, "a").await.expect("a term"),
        log.begin_term(4, "a").await.expect("a term"),
    );
    let appender = log.appender();
    appender.append(t3, put(Collection::Contacts, "acme\0k", "3"));
    appender.append(t4, put(Collection::Contacts, "zeta\0k", "4"));
    appender.commit().await.expect("stored");
    let first = log.sync().await.expect("a mark");
    let second = log.sync().await.expect("another mark, replacing the first");
    assert!(second > first);

    // A partition's reading up to its end ends there by itself.
    let end = log.partition_end(4).await.expect("partition 4's end");
    let of_four = read_partition(&log, 4, 1, end).await;
    assert_eq!(of_four.len(), 2, "{of_four:?}");
    assert_eq!(of_four[0], Record::Term(t4));
    assert_eq!(of_four[1].seq(), end);
    assert_eq!(
        latest(&of_four),
        vec![(4, "zeta\0k".into(), Some("4".into()))]
    );

    // It also ends where the records up to its end have gone since the
    // end was found (expired, or purged), instead of waiting for them.
    appender.append(t4, put(Collection::Contacts, "zeta\0l", "5"));
    appender.commit().await.expect("stored");
    let gone = log.partition_end(4).await.expect("partition 4's end");
    assert!(gone > end);
    jetstream(&nats)
        .await
        .get_stream(STREAM)
        .await
        .expect("the stream")
        .delete_message(gone)
        .await
        .expect("deleting partition 4's last record");
    assert_eq!(read_partition(&log, 4, 1, gone).await, of_four);
    assert_eq!(read_partition(&log, 4, gone, gone + 10).await, vec![]);
    assert_eq!(read_partition(&log, 4, end + 1, end).await, vec![]);
    // A record stored since, past its end, is not read.
    appender.append(t4, put(Collection::Contacts, "zeta\0m", "6"));
    appender.commit().await.expect("stored");
    assert!(log.partition_end(4).await.expect("partition 4's end") > gone);
    assert_eq!(read_partition(&log, 4, 1, gone).await, of_four);

    // From the start, a reader passes the mark (only the second is left).
    let everything = read(&log, 5).await;
    assert_eq!(everything.last(), Some(&Record::Sync { seq: second }));
    assert!(everything.iter().all(|r| r.seq() != first));
}

/// Partition `p`'s records from `from` up to `until`, read until the
/// reading ends by itself.
async fn read_partition(log: &Changelog, p: u16, from: u64, until: u64) -> Vec<Record> {
    let records = log
        .records_of(p, from, until)
        .await
        .expect("reading a partition");
    tokio::time::timeout(TIMEOUT, records.collect::<Vec<_>>())
        .await
        .expect("the reading ends by itself")
        .into_iter()
        .map(|r| r.expect("a record"))
        .collect()
}

/// Sixteen partitions' full batches at once (a one-copy stream: each pack
/// published on its own, many in flight): all stored, none waiting on
/// another's.
#[tokio::test]
async fn every_partitions_full_batch_at_once_is_stored() {
    let nats = NatsServer::start();
    let log = bind(&nats).await;
    let appender = log.appender();
    for p in 0..16 {
        let term = log.begin_term(p, "replica-a").await.expect("a term");
        for i in 0..500 {
            appender.append(
                term,
                put(Collection::Journal, &format!("acme\0p{p}e{i}"), "x"),
            );
        }
    }
    tokio::time::timeout(std::time::Duration::from_secs(60), appender.commit())
        .await
        .expect("the commit returns")
        .expect("every write is stored");
    let records = read_all(&log).await;
    assert_eq!(writes(&records).len(), 8_000);
    assert_eq!(latest(&records).len(), 8_000);
}

/// The cleaner keeps a partition's changelog about the size of its live
/// state: after 2,000 contacts of `acme` and 100 each of `ab-0` and `zeta`
/// (the same partition, apart in key order) are each written 5 times by
/// the partition's owner, the changelog soon holds fewer than two records
/// per contact of it (a round is due once the superseded puts reach the
/// live records, and leaves only the live ones; whenever the cleaner
/// looked, fewer than 2,200 superseded ones can follow the last round). A
/// round passes over the keys of the accounts of other partitions (`ab`,
/// a prefix of `ab-0`, and `acme-b`, which `acme` is a prefix of), whose
/// records stay as they were (too few superseded for a round of their
/// own). A replica started afterwards reads every contact's latest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitions_changelog_stays_about_the_size_of_its_live_state() {
    use switchboard_store::partition_of_account;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let open = |name: &str| replica(&nats, dir.path().join(name));
    let compacted = partition_of_account(b"acme", 16);
    let accounts = [
        ("ab", 100),
        ("ab-0", 100),
        ("acme", 2_000),
        ("acme-b", 100),
        ("zeta", 100),
    ];
    let in_compacted = ["ab-0", "acme", "zeta"];
    let mut held = std::collections::BTreeSet::new();
    for (account, _) in accounts {
        let p = partition_of_account(account.as_bytes(), 16);
        assert_eq!(
            p == compacted,
            in_compacted.contains(&account),
            "{account}'s partition"
        );
        held.insert(p);
    }
    let owner = open("owner").await;
    for p in held {
        owner
            .take_partition(p)
            .await
            .unwrap_or_else(|e| panic!("the owner takes partition {p}: {e}"));
    }
    for round in 0..5 {
        for (account, contacts) in accounts {
            for contact in 0..contacts {
                owner
                    .put(
                        Collection::Contacts,
                        format!("{account}\0c{contact}").as_bytes(),
                        format!("v{round}").as_bytes(),
                    )
                    .expect("a contact written");
            }
        }
        owner.flush().await.expect("durable");
    }
    let log = bind(&nats).await;
    let records = crate::util::wait_until(
        "the partition's changelog compacted",
        Duration::from_secs(30),
        || async {
            let records = read_all(&log).await;
            let of_compacted = writes(&records)
                .iter()
                .filter(|(p, ..)| *p == compacted)
                .count();
            (of_compacted < 4_400).then_some(records)
        },
    )
    .await;
    let others = writes(&records)
        .iter()
        .filter(|(p, ..)| *p != compacted)
        .count();
    assert_eq!(others, 1_000, "the other partitions' puts, untouched");
    let latest = latest(&records);
    assert_eq!(latest.len(), 2_400);
    assert!(
        latest.iter().all(|(_, _, v)| v.as_deref() == Some("v4")),
        "{latest:?}"
    );

    let fresh = open("fresh").await;
    for (account, contacts) in accounts {
        for contact in 0..contacts {
            let key = format!("{account}\0c{contact}");
            assert_eq!(
                fresh
                    .get(Collection::Contacts, key.as_bytes())
                    .expect("read"),
                Some(b"v4".to_vec()),
                "{key}"
            );
        }
    }
}

/// Waits until partition `p`'s changelog holds nothing, put or marker, of
/// `account`'s removed contacts (`{account}\0c100` and up), looking a second apart
/// (each read is a consumer of its own; one that fails, a cluster losing a
/// node, is tried again), and fails at once if one of them is readable
/// again (a put without its marker). Returns the changelog then.
async fn removed_contacts_gone(log: &Changelog, account: &str, p: u16) -> Vec<Record> {
    let prefix = format!("{account}\0c");
    let removed = |k: &str| {
        k.strip_prefix(prefix.as_str())
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= 100)
    };
    crate::util::wait_until(
        "the removed contacts gone from the changelog",
        Duration::from_secs(60),
        || async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let records = try_read_all(log).await.ok()?;
            let back: Vec<_> = latest(&records)
                .into_iter()
                .filter(|(partition, k, v)| *partition == p && removed(k) && v.is_some())
                .collect();
            assert!(back.is_empty(), "removed contacts readable again: {back:?}");
            let removed_left = writes(&records)
                .iter()
                .filter(|(partition, k, _)| *partition == p && removed(k))
                .count();
            (removed_left == 0).then_some(records)
        },
    )
    .await
}

/// `stored_within` finds where the messages of the last stretch of time
/// begin, by the server's clock: removals (one message each) made in two
/// bursts 3 s apart, then asked for the last 1.5 s, give the first of the
/// second burst (and every message before it is older); for the last
/// minute, the stream's first message; for none, the second burst's end.
#[tokio::test]
async fn stored_within_finds_where_the_last_stretch_of_time_begins() {
    let nats = NatsServer::start();
    let log = bind(&nats).await;
    let term = log.begin_term(3, "replica-a").await.expect("a term");
    let appender = log.appender();
    let remove = |n: usize| Change {
        collection: Collection::Contacts,
        key: format!("acme\0c{n}").into_bytes(),
        value: None,
    };
    for n in 0..40 {
        appender.append(term, remove(n));
    }
    appender.commit().await.expect("the first burst is stored");
    let first_burst_end = log.last_seq().await.expect("the stream's state");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in 40..80 {
        appender.append(term, remove(n));
    }
    appender.commit().await.expect("the second burst is stored");
    let last = log.last_seq().await.expect("the stream's state");
    assert_eq!(last, first_burst_end + 40, "one message a removal");

    let second = log
        .stored_within(Duration::from_millis(1_500))
        .await
        .expect("the search");
    assert_eq!(second, first_burst_end + 1);
    let all = log
        .stored_within(Duration::from_secs(60))
        .await
        .expect("the search");
    assert_eq!(all, 1, "the term marker, first");
    // The last message (and any stored in the same instant) is as new as
    // itself.
    let none = log.stored_within(Duration::ZERO).await.expect("the search");
    assert!(none > first_burst_end && none <= last, "{none}");
}

/// Removed records leave the changelog for good, and never come back for
/// a replica that reads it: the partition's owner writes its live records
/// again and purges the packs that held the removed puts (a round by age:
/// here 4 s after its oldest pack), then their markers once they are old
/// enough (here 16 s instead of a day). Here 200 of 300
/// contacts are removed (too few superseded puts for a round by count) and
/// the partition is taken over by another replica at once: the new owner
/// cannot know what the last one removed, so the age of the partition's
/// oldest pack decides. At every look, no removed contact's put is
/// readable without its marker; in the end the changelog holds the 100
/// live contacts and nothing of the others, and a replica started then
/// reads just those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_records_leave_the_changelog_for_good() {
    use switchboard_store::partition_of_account;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kept = Duration::from_secs(16);
    let open = |name: &str| replica_with(&nats, dir.path().join(name), kept);
    let p = partition_of_account(b"acme", 16);
    let key = |c: usize| format!("acme\0c{c}");
    let (first, second) = (open("first").await, open("second").await);
    first.take_partition(p).await.expect("the first takes it");
    for c in 0..300 {
        first
            .put(Collection::Contacts, key(c).as_bytes(), b"v")
            .expect("a contact written");
    }
    for c in 100..300 {
        first
            .remove(Collection::Contacts, key(c).as_bytes())
            .expect("a contact removed");
    }
    first.flush().await.expect("durable");
    second.take_partition(p).await.expect("the second takes it");
    drop(first);

    let log = bind(&nats).await;
    let records = removed_contacts_gone(&log, "acme", p).await;
    let live: Vec<_> = latest(&records)
        .into_iter()
        .filter(|(partition, ..)| *partition == p)
        .collect();
    assert_eq!(live.len(), 100, "{live:?}");
    assert!(live.iter().all(|(_, _, v)| v.as_deref() == Some("v")));

    let third = open("third").await;
    for c in 0..300 {
        let held = third
            .get(Collection::Contacts, key(c).as_bytes())
            .expect("read");
        assert_eq!(held.is_some(), c < 100, "{}", key(c));
    }
}

/// A replica out of touch with the changelog for over half the time
/// removal markers are kept reads its copies anew once back: here the
/// follower's only server (it ignores the others the cluster names) is down
/// while the owner removes 200 of 300 contacts, and its cleaner purges
/// their puts and then (once 16 s old) their markers. Back in touch, the
/// follower's own copy holds the 100 live contacts and none of the removed
/// ones, which it would otherwise keep for good.
///
/// The same holds for a partition the follower held when it lost touch:
/// the owner takes it over meanwhile (the follower learns it only once
/// back) and removes 200 of its 300 contacts likewise. The follower's term
/// ends when it reads the owner's, and its copy, which it wrote itself and
/// which lacks the removals, is read anew whole instead of followed from
/// that term on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_out_of_touch_past_half_a_markers_life_reads_its_copies_anew() {
    use switchboard_store::{Copies, Replication, Store, partition_of_account};
    let mut cluster = crate::util::NatsCluster::start(3).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let replication = Replication {
        markers_kept: Duration::from_secs(16),
        ..Replication::new(3, 16, Copies::Every)
    };
    let owner = Store::replicated(
        &dir.path().join("owner"),
        async_nats::ConnectOptions::new(),
        vec![cluster.url(0)],
        replication,
    )
    .await
    .expect("the owner's store");
    let follower = Store::replicated(
        &dir.path().join("follower"),
        async_nats::ConnectOptions::new().ignore_discovered_servers(),
        vec![cluster.url(2)],
        replication,
    )
    .await
    .expect("the follower's store");
    let p = partition_of_account(b"acme", 16);
    // The partition the follower holds: another account's.
    let held = ["zeta", "omega", "delta"]
        .into_iter()
        .find(|a| partition_of_account(a.as_bytes(), 16) != p)
        .expect("an account of another partition");
    let q = partition_of_account(held.as_bytes(), 16);
    let key = |account: &str, c: usize| format!("{account}\0c{c}");
    owner.take_partition(p).await.expect("the owner takes it");
    follower
        .take_partition(q)
        .await
        .expect("the follower takes the other");
    for c in 0..300 {
        owner
            .put(Collection::Contacts, key("acme", c).as_bytes(), b"v")
            .expect("a contact written");
        follower
            .put(Collection::Contacts, key(held, c).as_bytes(), b"v")
            .expect("a contact written");
    }
    owner.flush().await.expect("durable");
    follower.flush().await.expect("durable");
    let holds = |store: &Store, account: &str, c: usize| {
        store
            .get(Collection::Contacts, key(account, c).as_bytes())
            .ok()
            .map(|v| v.is_some())
    };
    crate::util::wait_until("each has the other's contacts", TIMEOUT, || async {
        (0..300)
            .all(|c| {
                holds(&follower, "acme", c) == Some(true) && holds(&owner, held, c) == Some(true)
            })
            .then_some(())
    })
    .await;

    cluster.kill(2);
    // A take right after the kill may time out while the changelog's
    // stream elects a leader in place of the node lost: tried again, as
    // a dispatcher's partition pin does.
    crate::util::wait_until(
        "the owner takes the follower's partition over",
        Duration::from_secs(60),
        || async { owner.take_partition(q).await.ok() },
    )
    .await;
    for c in 100..300 {
        for account in ["acme", held] {
            owner
                .remove(Collection::Contacts, key(account, c).as_bytes())
                .expect("a contact removed");
        }
    }
    owner.flush().await.expect("durable");
    let client = async_nats::connect(cluster.url(0))
        .await
        .expect("connecting to the cluster");
    let log = Changelog::bind(async_nats::jetstream::new(client), 16, 3)
        .await
        .expect("binding the changelog");
    removed_contacts_gone(&log, "acme", p).await;
    removed_contacts_gone(&log, held, q).await;
    assert!(
        follower.holds_partition(q),
        "cut off, the follower cannot know its partition was taken over"
    );

    cluster.restart(2);
    crate::util::wait_until(
        "the follower reads the live contacts and none of the removed ones",
        Duration::from_secs(60),
        || async {
            // Read from its own copies again, not from the owner's.
            if follower.holds_partition(q) || ![p, q].iter().all(|p| follower.copies_partition(*p))
            {
                return None;
            }
            let live = |account: &str| {
                (0..300)
                    .map(|c| holds(&follower, account, c))
                    .collect::<Option<Vec<bool>>>()
                    .is_some_and(|held| held.iter().enumerate().all(|(c, h)| *h == (c < 100)))
            };
            (live("acme") && live(held)).then_some(())
        },
    )
    .await;
}

/// Two replicas taking one partition at once: the one whose term began
/// first (here while it read its copy again whole, a long take) does not
/// count its term once the other's later one began, so at most one of
/// them holds the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_takes_at_once_only_the_later_term_holds() {
    use switchboard_store::partition_of_account;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let open = |name: &str| replica(&nats, dir.path().join(name));
    let p = partition_of_account(b"acme", 16);
    let (a, c) = (open("a").await, open("c").await);
    a.take_partition(p).await.expect("a takes the partition");
    for contact in 0..20_000 {
        a.put(
            Collection::Contacts,
            format!("acme\0c{contact}").as_bytes(),
            b"v",
        )
        .expect("a contact written");
    }
    a.flush().await.expect("durable");
    // c takes it over: a, deposed, reads it again whole at its next take.
    c.take_partition(p).await.expect("c takes the partition");
    crate::util::wait_until("a deposed", TIMEOUT, || async {
        (!a.holds_partition(p)).then_some(())
    })
    .await;
    c.release_partition(p);
    let log = bind(&nats).await;
    let before = log.last_seq().await.expect("the stream's state");
    let a_takes = tokio::spawn({
        let a = a.clone();
        async move { a.take_partition(p).await }
    });
    // c begins its term as soon as a's marker is stored, while a reads the
    // partition's 20,000 records again.
    let mut after = Box::pin(
        log.records(before + 1)
            .await
            .expect("following the changelog"),
    );
    tokio::time::timeout(TIMEOUT, async {
        while let Some(record) = after.next().await {
            if let Ok(Record::Term(t)) = record
                && t.partition == p
            {
                return;
            }
        }
    })
    .await
    .expect("a's term begins");
    c.take_partition(p).await.expect("c's later term begins");
    let a_took = a_takes.await.expect("a's take ran");
    assert!(
        !(a.holds_partition(p) && c.holds_partition(p)),
        "both replicas hold the partition (a's take: {a_took:?})"
    );
    assert!(c.holds_partition(p));
    let refused = a_took.expect_err("a's earlier term does not count");
    assert!(
        refused
            .to_string()
            .contains("another replica began a later term"),
        "{refused}"
    );
}
