//! The replicated backend: the shared collections live in one JetStream
//! key-value bucket, replicated by the NATS cluster; each dispatcher replica
//! keeps a local copy in sled, fed by a watch of the bucket, for reads and
//! ordered scans.
//!
//! - A write is a publish to the bucket's stream, acknowledged once the
//!   stream's replicas have it: that ack is the write's durability point.
//!   It is then applied to the local copy at once (a replica reads its own
//!   writes), and comes back through the watch, where it changes nothing.
//! - The local copy keeps each key's bucket revision and applies an entry
//!   only when it is newer, so a write and the watch can race harmlessly.
//! - Compare-and-swap sends the revision the local copy holds as
//!   `Nats-Expected-Last-Subject-Sequence`: the stream refuses the write if
//!   another replica wrote the key since. The caller then reads again.
//! - A batch of writes that must be atomic is one atomic batch publish
//!   (ADR-50; nats-server 2.12 or later): the stream stores all of it or
//!   none, checking the expected revisions of its writes at the commit.
//!   Other replicas' copies apply its entries one by one, in order.
//! - The local copy is rebuilt from the bucket at every start; the replica is
//!   caught up once it has applied every entry the bucket held at start (or
//!   nothing more is pending).
//!
//! Keys: `{collection}.{key as unpadded base64url}` (`=` for the empty key),
//! which are valid subject tokens whatever bytes the key holds.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, kv};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use tokio::sync::{broadcast, watch};

use crate::partitioned::Partitioned;
use crate::{Collection, StoreError, Write};

/// The bucket holding every shared collection.
pub const BUCKET: &str = "switchboard";

/// How long the bucket keeps the delete marker of a housekeeping removal
/// ([`crate::Collection::is_housekeeping`]): long enough for every live
/// replica's watch to apply it; a replica started later finds no key, which
/// is the same.
pub const MARKER_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A change the watch applied to the local copy, written by another replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The collection changed.
    pub collection: Collection,
    /// The key changed.
    pub key: Vec<u8>,
    /// How long after it was written the change reached this replica.
    pub delay: Duration,
}

/// The outcome of a conditional write.
enum Conditional {
    Written,
    Conflict,
}

/// A replica's link to the bucket.
pub(crate) struct Replica {
    js: jetstream::Context,
    kv: kv::Store,
    subject_prefix: String,
    handle: tokio::runtime::Handle,
    /// The local copy's trees, by collection index, and each key's revision.
    trees: Vec<sled::Tree>,
    revisions: sled::Tree,
    /// Serialises applying entries to the local copy.
    apply: Mutex<()>,
    /// The highest bucket revision applied by the watch.
    applied: AtomicU64,
    caught_up: watch::Sender<bool>,
    changes: broadcast::Sender<Change>,
    /// Ends the replica's runtime thread.
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

fn remote(message: impl std::fmt::Display) -> StoreError {
    StoreError::Remote {
        message: message.to_string(),
    }
}

/// The error of a publish sent to the bucket's stream that failed: one
/// whose acknowledgement did not come in time may have been stored
/// ([`StoreError::OutcomeUnknown`]); one the server refused, or that never
/// left, was not.
fn unanswered(e: &async_nats::jetstream::context::PublishError, message: String) -> StoreError {
    if e.kind() == PublishErrorKind::TimedOut {
        StoreError::OutcomeUnknown {
            message: format!("{message}; the write may or may not be stored"),
        }
    } else {
        StoreError::Remote { message }
    }
}

/// Whether the stream refused a write because the key changed since the
/// revision it was given (alone, or in an atomic batch), or cannot check
/// that yet: read the key again and retry.
fn is_conflict(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::{Error, ErrorCode};
    e.kind() == PublishErrorKind::WrongLastSequence
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<Error>())
            .is_some_and(|s| {
                [
                    ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT,
                    ErrorCode::STREAM_EXPECTED_LAST_SEQ_PER_SUBJECT_NOT_READY,
                ]
                .contains(&s.error_code())
            })
}

/// Runs `f` on `handle`'s runtime (the replica's own thread) and waits for
/// it, from synchronous code on a runtime thread or not: the store's
/// synchronous methods wait for the NATS server this way.
pub(crate) fn block_on<F>(handle: &tokio::runtime::Handle, f: F) -> Result<F::Output, StoreError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(f.await);
    });
    let wait = || rx.recv();
    let done = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    done.map_err(|_| remote("the replica's runtime stopped before a shared-state call finished"))
}

/// The bucket key of a collection's key.
pub(crate) fn bucket_key(c: Collection, key: &[u8]) -> String {
    if key.is_empty() {
        format!("{}.=", c.name())
    } else {
        format!("{}.{}", c.name(), URL_SAFE_NO_PAD.encode(key))
    }
}

/// The collection and key of a bucket key.
pub(crate) fn parse_key(k: &str) -> Option<(Collection, Vec<u8>)> {
    let (name, encoded) = k.split_once('.')?;
    let c = Collection::ALL.into_iter().find(|c| c.name() == name)?;
    let key = if encoded == "=" {
        Vec::new()
    } else {
        URL_SAFE_NO_PAD.decode(encoded).ok()?
    };
    Some((c, key))
}

fn revision_key(c: Collection, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(c.index() as u8);
    k.extend_from_slice(key);
    k
}

/// Binds to the bucket, creating it (or allowing atomic batches on it) if
/// needed, and returns it with the last revision it holds. Retried for a
/// while: replicas starting together race to create it, and a cluster that
/// has just started may not have elected its leaders yet.
async fn bind_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(kv::Store, u64), StoreError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match try_bind_bucket(js, replicas).await {
            Ok(bound) => return Ok(bound),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "binding the shared-state bucket failed; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_bind_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(kv::Store, u64), StoreError> {
    let kv = match js.get_key_value(BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: BUCKET.into(),
                description: "Switchboard's shared state (chains, scripts, secrets, tokens, \
                              contacts, messages, journal, traces, dead letters)"
                    .into(),
                history: 1,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| remote(format!("creating the key-value bucket {BUCKET}: {e}")))?,
    };
    let stream_name = format!("KV_{BUCKET}");
    let mut stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| remote(format!("reading stream {stream_name}: {e}")))?;
    let info = stream
        .info()
        .await
        .map_err(|e| remote(format!("reading stream {stream_name}: {e}")))?
        .clone();
    if !info.config.allow_atomic_publish || !info.config.allow_message_ttl {
        let mut config = info.config.clone();
        config.allow_atomic_publish = true;
        config.allow_message_ttl = true;
        js.update_stream(config).await.map_err(|e| {
            remote(format!(
                "allowing atomic batches and message TTLs on stream {stream_name} (nats-server \
                 2.12 or later is needed): {e}"
            ))
        })?;
    }
    if info.config.num_replicas != replicas {
        tracing::warn!(
            stream = stream_name,
            existing = info.config.num_replicas,
            configured = replicas,
            "the shared-state bucket exists with another replica count; using it as it is"
        );
    }
    Ok((kv, info.state.last_sequence))
}

impl Replica {
    /// Connects to NATS and binds to (or creates) the bucket with `replicas`
    /// copies, on a runtime of its own: the replica's NATS traffic and its
    /// watch run on that thread, so a synchronous store call waiting for the
    /// server never waits for the caller's runtime, whatever its threads are
    /// blocked on. The watch feeds `trees` (emptied first).
    ///
    /// The partitioned collections are left to [`Partitioned`], started on
    /// the same runtime and connection.
    pub(crate) async fn start(
        options: async_nats::ConnectOptions,
        servers: Vec<String>,
        replication: crate::Replication,
        trees: Vec<sled::Tree>,
        revisions: sled::Tree,
    ) -> Result<(Arc<Self>, Arc<Partitioned>), StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| remote(format!("starting the replica's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("switchboard-replica".into())
            .spawn(move || {
                let _ = runtime.block_on(stop);
            })
            .map_err(|e| remote(format!("starting the replica's thread: {e}")))?;
        let setup = handle.clone();
        handle
            .spawn(async move {
                let client = options.connect(&servers).await.map_err(|e| {
                    remote(format!("connecting to NATS at {}: {e}", servers.join(",")))
                })?;
                let js = jetstream::new(client.clone());
                let (kv, target) = bind_bucket(&js, replication.replicas).await?;
                for (c, tree) in Collection::ALL.into_iter().zip(&trees) {
                    if c.is_shared() {
                        tree.clear().map_err(|source| StoreError::Io {
                            collection: "(replica copy)",
                            source,
                        })?;
                    }
                }
                revisions.clear().map_err(|source| StoreError::Io {
                    collection: "(replica copy)",
                    source,
                })?;
                let partitioned =
                    Partitioned::start(client, setup.clone(), trees.clone(), replication).await?;
                let (caught_up, _) = watch::channel(target == 0);
                let replica = Arc::new(Self {
                    subject_prefix: format!("$KV.{BUCKET}."),
                    js,
                    kv,
                    handle: setup,
                    trees,
                    revisions,
                    apply: Mutex::new(()),
                    applied: AtomicU64::new(0),
                    caught_up,
                    changes: broadcast::channel(1024).0,
                    shutdown: Mutex::new(Some(shutdown)),
                });
                tokio::spawn(Self::follow(Arc::downgrade(&replica), target));
                Ok((replica, partitioned))
            })
            .await
            .map_err(|e| remote(format!("starting the replica: {e}")))?
    }

    /// Applies the bucket's entries to the local copy, from the first on;
    /// after an error, resumes after the last one applied.
    async fn follow(replica: std::sync::Weak<Self>, target: u64) {
        loop {
            let Some(r) = replica.upgrade() else { return };
            let from = r.applied.load(Ordering::SeqCst) + 1;
            let mut entries = match r.kv.watch_all_from_revision(from).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "watching the shared-state bucket failed; trying again");
                    drop(r);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            drop(r);
            loop {
                let next = tokio::time::timeout(Duration::from_secs(1), entries.next()).await;
                let Some(r) = replica.upgrade() else { return };
                let entry = match next {
                    Err(_) => continue,
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "the shared-state watch failed; resuming");
                        break;
                    }
                    Ok(Some(Ok(entry))) => entry,
                };
                let revision = entry.revision;
                // Partitioned collections follow their changelog, not the
                // bucket (which may hold them from an earlier release).
                if let Some((c, key)) = parse_key(&entry.key).filter(|(c, _)| c.is_shared()) {
                    let value = match entry.operation {
                        kv::Operation::Put => Some(entry.value.as_ref()),
                        kv::Operation::Delete | kv::Operation::Purge => None,
                    };
                    match r.apply_local(c, &key, value, revision) {
                        // Only chains, scripts and templates are also kept
                        // in memory (compiled): the others are read from
                        // the copy.
                        Ok(true)
                            if matches!(
                                c,
                                Collection::Chains | Collection::Scripts | Collection::Templates
                            ) =>
                        {
                            let written = std::time::UNIX_EPOCH
                                + Duration::from_nanos(
                                    entry.created.unix_timestamp_nanos().max(0) as u64
                                );
                            let delay = std::time::SystemTime::now()
                                .duration_since(written)
                                .unwrap_or_default();
                            let _ = r.changes.send(Change {
                                collection: c,
                                key,
                                delay,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(error = %e, key = entry.key, "applying a shared-state entry to the local copy failed");
                        }
                    }
                }
                r.applied.fetch_max(revision, Ordering::SeqCst);
                // Caught up: at the revision the bucket had at start, or
                // nothing more pending (should that message be gone).
                if revision >= target || entry.delta == 0 {
                    r.caught_up
                        .send_if_modified(|c| !std::mem::replace(c, true));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes `value` (`None`: removes) under `key` in the local copy if
    /// `revision` is newer than the one there; returns whether it was.
    fn apply_local(
        &self,
        c: Collection,
        key: &[u8],
        value: Option<&[u8]>,
        revision: u64,
    ) -> Result<bool, StoreError> {
        let io = |source| StoreError::Io {
            collection: c.name(),
            source,
        };
        let _guard = self.apply.lock().expect("replica apply lock");
        let rk = revision_key(c, key);
        if let Some(known) = self.revisions.get(&rk).map_err(io)?
            && u64::from_be_bytes(known.as_ref().try_into().unwrap_or([0; 8])) >= revision
        {
            return Ok(false);
        }
        let tree = &self.trees[c.index()];
        match value {
            Some(v) => tree.insert(key, v).map(|_| ()),
            None => tree.remove(key).map(|_| ()),
        }
        .map_err(io)?;
        self.revisions
            .insert(rk, &revision.to_be_bytes())
            .map_err(io)?;
        Ok(true)
    }

    /// The revision the local copy holds for `key` (0: never written).
    fn revision(&self, c: Collection, key: &[u8]) -> Result<u64, StoreError> {
        let found = self
            .revisions
            .get(revision_key(c, key))
            .map_err(|source| StoreError::Io {
                collection: c.name(),
                source,
            })?;
        Ok(found.map_or(0, |v| {
            u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))
        }))
    }

    /// Runs `f` on the replica's runtime and waits for it.
    fn block<F>(&self, f: F) -> Result<F::Output, StoreError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        block_on(&self.handle, f)
    }

    fn headers(w: &Write) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if w.value.is_none() {
            headers.insert("KV-Operation", "DEL");
            if w.collection.is_housekeeping() {
                headers.insert(
                    async_nats::header::NATS_MESSAGE_TTL,
                    MARKER_TTL.as_secs().to_string().as_str(),
                );
            }
        }
        headers
    }

    fn subject(&self, w: &Write) -> String {
        format!(
            "{}{}",
            self.subject_prefix,
            bucket_key(w.collection, &w.key)
        )
    }

    /// Publishes one write, with an expected revision if given.
    async fn publish_one(
        &self,
        w: &Write,
        expected: Option<u64>,
    ) -> Result<Conditional, StoreError> {
        let mut headers = Self::headers(w);
        if let Some(rev) = expected {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                rev.to_string().as_str(),
            );
        }
        let payload: bytes::Bytes = w.value.clone().unwrap_or_default().into();
        // A bucket another replica has just made, or is updating, may not
        // answer for a moment ("no stream found": nothing was stored).
        let since = tokio::time::Instant::now();
        let ack = loop {
            let ack = match self
                .js
                .publish_with_headers(self.subject(w), headers.clone(), payload.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match ack {
                Err(e) if crate::changelog::stream_may_answer_soon(&e, since).await => {}
                ack => break ack,
            }
        };
        match ack {
            Ok(ack) => {
                self.apply_local(w.collection, &w.key, w.value.as_deref(), ack.sequence)?;
                Ok(Conditional::Written)
            }
            Err(e) if is_conflict(&e) => Ok(Conditional::Conflict),
            Err(e) => Err(unanswered(
                &e,
                format!(
                    "writing {} to the shared-state bucket: {e}",
                    w.collection.name()
                ),
            )),
        }
    }

    /// Publishes `batch` as one atomic batch.
    async fn publish_batch(
        &self,
        batch: &[Write],
        expect: &[(usize, u64)],
    ) -> Result<Conditional, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let client = self.js.client();
        let what = |e: &dyn std::fmt::Display| {
            format!(
                "writing a batch of {} to the shared-state bucket: {e}",
                batch.len()
            )
        };
        let failed = |e: &dyn std::fmt::Display| remote(what(e));
        let last = batch.len() - 1;
        let mut ack = None;
        for (i, w) in batch.iter().enumerate() {
            let mut headers = Self::headers(w);
            headers.insert(async_nats::header::NATS_BATCH_ID, id.as_str());
            headers.insert(
                async_nats::header::NATS_BATCH_SEQUENCE,
                (i + 1).to_string().as_str(),
            );
            if let Some((_, revision)) = expect.iter().find(|(at, _)| *at == i) {
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    revision.to_string().as_str(),
                );
            }
            let payload: bytes::Bytes = w.value.clone().unwrap_or_default().into();
            if i == last {
                headers.insert(async_nats::header::NATS_BATCH_COMMIT, "1");
                let published = self
                    .js
                    .publish_with_headers(self.subject(w), headers, payload)
                    .await
                    .map_err(|e| failed(&e))?;
                match published.await {
                    Ok(a) => ack = Some(a),
                    Err(e) if is_conflict(&e) => return Ok(Conditional::Conflict),
                    Err(e) => return Err(unanswered(&e, what(&e))),
                }
            } else {
                client
                    .publish_with_headers(self.subject(w), headers, payload)
                    .await
                    .map_err(|e| failed(&e))?;
            }
        }
        let ack = ack.expect("the commit is acked");
        let first = ack.sequence + 1 - batch.len() as u64;
        for (i, w) in batch.iter().enumerate() {
            self.apply_local(w.collection, &w.key, w.value.as_deref(), first + i as u64)?;
        }
        Ok(Conditional::Written)
    }

    /// Re-reads `key` from the bucket's stream leader into the local copy
    /// (after a compare-and-swap lost to another replica's write, or to see
    /// a record the watch has not brought yet).
    async fn refresh(&self, c: Collection, key: &[u8]) -> Result<(), StoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{}", self.subject_prefix, bucket_key(c, key));
        match self
            .kv
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => {
                let deleted = m
                    .headers
                    .get("KV-Operation")
                    .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                let value = (!deleted).then_some(m.payload.as_ref());
                self.apply_local(c, key, value, m.sequence)?;
                Ok(())
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                self.forget_local(c, key)
            }
            Err(e) => Err(remote(format!(
                "reading {subject} from the shared-state bucket: {e}"
            ))),
        }
    }

    /// The bucket holds nothing under `key`: neither does the local copy.
    fn forget_local(&self, c: Collection, key: &[u8]) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            collection: c.name(),
            source,
        };
        let _guard = self.apply.lock().expect("replica apply lock");
        self.trees[c.index()].remove(key).map_err(io)?;
        self.revisions.remove(revision_key(c, key)).map_err(io)?;
        Ok(())
    }

    /// Brings `key` up to date from the bucket.
    pub(crate) fn read_through(
        self: &Arc<Self>,
        c: Collection,
        key: &[u8],
    ) -> Result<(), StoreError> {
        let (this, key) = (self.clone(), key.to_vec());
        self.block(async move { this.refresh(c, &key).await })?
    }

    pub(crate) fn write(self: &Arc<Self>, w: &Write) -> Result<(), StoreError> {
        let (this, w) = (self.clone(), w.clone());
        self.block(async move { this.publish_one(&w, None).await.map(|_| ()) })?
    }

    pub(crate) fn write_all(self: &Arc<Self>, batch: &[Write]) -> Result<(), StoreError> {
        match batch {
            [] => Ok(()),
            [only] => self.write(only),
            _ => {
                let (this, batch) = (self.clone(), batch.to_vec());
                self.block(async move { this.publish_batch(&batch, &[]).await.map(|_| ()) })?
            }
        }
    }

    /// Writes `batch` atomically if, for each `(i, old)` of `expect`, the
    /// key of write `i` holds `old` (as the local copy has it, and as the
    /// stream checks at the commit: no other replica wrote it since);
    /// returns whether it was written. After a refusal the local copy holds
    /// what the bucket holds under those keys.
    pub(crate) fn write_all_expecting(
        self: &Arc<Self>,
        batch: &[Write],
        expect: &[(usize, Option<&[u8]>)],
    ) -> Result<bool, StoreError> {
        let mut revisions = Vec::with_capacity(expect.len());
        {
            let _guard = self.apply.lock().expect("replica apply lock");
            for (i, old) in expect {
                let w = &batch[*i];
                let current = self.trees[w.collection.index()]
                    .get(&w.key)
                    .map_err(|source| StoreError::Io {
                        collection: w.collection.name(),
                        source,
                    })?;
                if current.as_deref() != *old {
                    return Ok(false);
                }
                revisions.push((*i, self.revision(w.collection, &w.key)?));
            }
        }
        let (this, batch) = (self.clone(), batch.to_vec());
        self.block(async move {
            let written = match (batch.as_slice(), revisions.as_slice()) {
                ([only], [(_, revision)]) => this.publish_one(only, Some(*revision)).await?,
                ([only], []) => this.publish_one(only, None).await?,
                _ => this.publish_batch(&batch, &revisions).await?,
            };
            match written {
                Conditional::Written => Ok(true),
                Conditional::Conflict => {
                    for (i, _) in &revisions {
                        this.refresh(batch[*i].collection, &batch[*i].key).await?;
                    }
                    Ok(false)
                }
            }
        })?
    }

    /// Writes `new` under `key` if the local copy holds `old` there and no
    /// other replica wrote the key since.
    pub(crate) fn compare_and_swap(
        self: &Arc<Self>,
        c: Collection,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let w = Write {
            collection: c,
            key: key.to_vec(),
            value: new.map(<[u8]>::to_vec),
        };
        self.write_all_expecting(&[w], &[(0, old)])
    }

    /// Whether the local copy holds everything the bucket held at start.
    pub(crate) fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Waits until the local copy is caught up.
    pub(crate) async fn caught_up(&self) {
        let mut rx = self.caught_up.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.lock().expect("replica shutdown lock").take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    use super::unanswered;
    use crate::StoreError;

    /// A bucket write whose acknowledgement timed out may have been
    /// stored; one refused, or whose stream was not found, was not.
    #[test]
    fn a_write_unacknowledged_in_time_has_an_unknown_outcome() {
        let timed_out = unanswered(
            &PublishError::new(PublishErrorKind::TimedOut),
            "writing tokens".into(),
        );
        assert!(
            matches!(&timed_out, StoreError::OutcomeUnknown { message } if message.contains("may or may not be stored")),
            "{timed_out:?}"
        );
        assert!(!timed_out.is_transient());
        for kind in [PublishErrorKind::StreamNotFound, PublishErrorKind::Other] {
            let refused = unanswered(&PublishError::new(kind), "writing tokens".into());
            assert!(refused.is_transient(), "{refused:?}");
        }
    }
}
