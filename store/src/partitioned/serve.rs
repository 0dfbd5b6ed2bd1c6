//! The owner's side of a partition's wire: writes forwarded to it and
//! reads asked of it, served while its term lasts; and the sender's side of
//! a forwarded write.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;

use super::forward::{self, Answer, Seen};
use super::{FORWARD_DEADLINE, FORWARD_TRIES, FORWARD_WAIT, Partitioned, not_held, reads, remote};
use crate::changelog::Term;
use crate::replicated::block_on;
use crate::{Collection, StoreError};

impl Partitioned {
    /// Sends a write to the owner of `partition` and waits for its answer.
    /// Every sending carries the same id, so that the owner applies the
    /// write once however often it is sent.
    pub(super) async fn forward(&self, partition: u16, request: Bytes) -> Result<bool, StoreError> {
        use async_nats::RequestErrorKind;

        let subject = forward::subject(partition);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            forward::ID_HEADER,
            uuid::Uuid::new_v4().simple().to_string().as_str(),
        );
        let started = tokio::time::Instant::now();
        let mut sendings = 0;
        let mut refused = 0;
        // Whether an owner may have taken the write without answering.
        let mut unanswered = false;
        let mut last;
        loop {
            sendings += 1;
            let sent =
                self.client
                    .request_with_headers(subject.clone(), headers.clone(), request.clone());
            match tokio::time::timeout(FORWARD_WAIT, sent).await {
                Ok(Ok(reply)) => match Answer::decode(&reply.payload) {
                    Answer::Written(done) => return Ok(done),
                    Answer::Unknown(e) => {
                        return Err(StoreError::OutcomeUnknown {
                            message: format!(
                                "writing to partition {partition} through its owner: {e}; the \
                                 write may or may not be stored"
                            ),
                        });
                    }
                    Answer::Refused(e) => {
                        last = e;
                        refused += 1;
                    }
                },
                Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
                    last = "no replica takes the partition's writes (a take-over in progress?)"
                        .to_string();
                    refused += 1;
                }
                Ok(Err(e)) => {
                    last = e.to_string();
                    unanswered = true;
                }
                Err(_) => {
                    last = format!("no answer in {FORWARD_WAIT:?}");
                    unanswered = true;
                }
            }
            if refused >= FORWARD_TRIES || started.elapsed() >= FORWARD_DEADLINE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let message = format!(
            "writing to partition {partition} through its owner: {last} (the last of {sendings} \
             sendings in {:.0?})",
            started.elapsed()
        );
        if unanswered {
            // A sending that got no answer may have reached an owner that
            // stored the write.
            Err(StoreError::OutcomeUnknown {
                message: format!("{message}; an owner may have stored it without answering"),
            })
        } else {
            Err(remote(message))
        }
    }

    /// Answers the writes other replicas forward for `partition` while
    /// this replica holds it.
    /// The subscription is made before this returns, so that a write
    /// forwarded once the partition is taken finds this owner.
    pub(super) async fn serve(self: &Arc<Self>, partition: u16, term: Term) {
        let subject = forward::subject(partition);
        let subscribed = futures::future::try_join(
            self.client.queue_subscribe(subject, "owner".into()),
            self.client
                .queue_subscribe(reads::subject(partition), "owner".into()),
        )
        .await;
        let (mut requests, mut reads) = match subscribed {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(partition, error = %e, "serving the partition's forwarded writes and reads failed");
                return;
            }
        };
        if let Err(e) = self.client.flush().await {
            tracing::warn!(partition, error = %e, "sending the subscription to forwarded writes failed");
        }
        let (stop, mut stopped) = oneshot::channel();
        if let Some(old) = self
            .serving
            .lock()
            .expect("serving lock")
            .insert(partition, stop)
        {
            let _ = old.send(());
        }
        let this = Arc::downgrade(self);
        let client = self.client.clone();
        self.handle.spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = &mut stopped => return,
                    r = requests.next() => match r {
                        Some(r) => r,
                        None => return,
                    },
                    r = reads.next() => {
                        let (Some(read), Some(this)) = (r, this.upgrade()) else { return };
                        // A page's scan runs on the blocking pool, a few at
                        // once, so that neither the partition's forwarded
                        // writes nor the rest of this runtime (a single
                        // thread) wait for it.
                        if let Some(reply) = read.reply {
                            let client = client.clone();
                            tokio::spawn(async move {
                                let Ok(_permit) = this.reading.clone().acquire_owned().await else {
                                    return;
                                };
                                let scan = this.clone();
                                let answer = tokio::task::spawn_blocking(move || {
                                    scan.answer_read(partition, term, &read.payload)
                                })
                                .await;
                                if let Ok(answer) = answer {
                                    let _ = client.publish(reply, answer).await;
                                }
                            });
                        }
                        continue;
                    }
                };
                let Some(this) = this.upgrade() else { return };
                let Some(reply) = request.reply else { continue };
                let id = request
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(forward::ID_HEADER))
                    .map(|id| id.as_str().to_string());
                if let Some(id) = &id {
                    let seen = this.answers.lock().expect("answers lock").receive(
                        id,
                        reply.clone(),
                        std::time::Instant::now(),
                    );
                    match seen {
                        Seen::New => {}
                        Seen::Pending => continue,
                        Seen::Answered(answer) => {
                            let _ = client.publish(reply, answer).await;
                            continue;
                        }
                    }
                }
                let refusal = match forward::decode(&request.payload) {
                    Err(e) => format!("a forwarded write that does not decode: {e}"),
                    Ok((batch, expect)) => match this.write_owned(
                        &batch,
                        &expect,
                        Some(crate::HeldTerm {
                            partition,
                            term: Some(term),
                        }),
                    ) {
                        // Applied: answered once its commit returns, by a
                        // task of its own, so that the next forwarded write
                        // does not wait for this one's commit (which waits
                        // through a leader election, up to a minute).
                        Ok(Some(done)) => {
                            let client = client.clone();
                            tokio::spawn(async move {
                                let answer = this.committed(partition, term, done).await;
                                this.send_answer(&client, id.as_deref(), reply, answer)
                                    .await;
                            });
                            continue;
                        }
                        Ok(None) => not_held(partition, term),
                        Err(e) => e.to_string(),
                    },
                };
                this.send_answer(&client, id.as_deref(), reply, Answer::Refused(refusal))
                    .await;
            }
        });
    }

    /// The answer to a read another replica sent the owner of `partition`
    /// (this replica, under `term`): the entries from the local copy, or
    /// why not.
    fn answer_read(&self, partition: u16, term: Term, request: &[u8]) -> Bytes {
        use reads::Answer;
        let answer = match reads::Read::decode(request) {
            Err(e) => Answer::Failed(format!("a read that does not decode: {e}")),
            Ok((c, read)) if read.key().map(|k| self.partition_of(k)) != Some(partition) => {
                Answer::Failed(format!(
                    "a read of {} that is not of partition {partition}",
                    c.name()
                ))
            }
            Ok((c, read)) => match read.run(c, &self.trees[c.index()]) {
                Ok(entries) => Answer::Entries(entries),
                Err(e) => Answer::Failed(e.to_string()),
            },
        };
        // Held still once read: a copy given up meanwhile may have been
        // emptied under the scan, and a short page would read as the end.
        let answer = if self.term(partition) == Some(term) {
            answer
        } else {
            Answer::Refused(not_held(partition, term))
        };
        let encoded = answer.encode();
        let most = self.client.server_info().max_payload;
        if encoded.len() > most {
            return Answer::Failed(format!(
                "the answer ({} bytes) is larger than a message may be ({most} bytes)",
                encoded.len()
            ))
            .encode();
        }
        encoded
    }

    /// Runs `read` of collection `c` on the owner of `partition`, which
    /// this replica keeps no copy of, and waits for its answer: a page of
    /// [`reads::PAGE`] entries at a time. A page is sent again while no
    /// owner answers or the one asked no longer holds the partition (a
    /// take-over in progress), half a second apart, [`FORWARD_TRIES`]
    /// times. The pages are each as the owner had them when it read them.
    pub(crate) fn read_at_owner(
        self: &Arc<Self>,
        partition: u16,
        c: Collection,
        read: &reads::Read,
    ) -> Result<Vec<crate::Entry>, StoreError> {
        let this = self.clone();
        let read = read.clone();
        block_on(&self.handle, async move {
            let mut entries = Vec::new();
            let mut next = Some(read);
            while let Some(read) = next {
                let page = this
                    .read_page(partition, c, &read.page(reads::PAGE))
                    .await?;
                next = match page.last() {
                    Some((last, _)) if page.len() == reads::PAGE => read.after(page.len(), last),
                    _ => None,
                };
                entries.extend(page);
            }
            Ok(entries)
        })?
    }

    async fn read_page(
        &self,
        partition: u16,
        c: Collection,
        read: &reads::Read,
    ) -> Result<Vec<crate::Entry>, StoreError> {
        use reads::Answer;
        let request = read.encode(c);
        let subject = reads::subject(partition);
        let started = tokio::time::Instant::now();
        let mut last;
        let mut sendings = 0;
        loop {
            sendings += 1;
            let sent = self.client.request(subject.clone(), request.clone());
            match tokio::time::timeout(FORWARD_WAIT, sent).await {
                Ok(Ok(reply)) => match Answer::decode(&reply.payload) {
                    Answer::Entries(entries) => return Ok(entries),
                    Answer::Refused(e) => last = e,
                    Answer::Failed(e) => {
                        last = e;
                        break;
                    }
                },
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    last = "no replica holds the partition (a take-over in progress?)".into();
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no answer in {FORWARD_WAIT:?}"),
            }
            if sendings >= FORWARD_TRIES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(remote(format!(
            "reading {} of partition {partition} at its owner (this replica keeps no copy \
             of it): {last} (the last of {sendings} sendings in {:.0?})",
            c.name(),
            started.elapsed()
        )))
    }

    /// Sends `answer` to `reply`, and to every sending of write `id`
    /// waiting for it ([`forward::Answers::settle`]).
    async fn send_answer(
        &self,
        client: &async_nats::Client,
        id: Option<&str>,
        reply: async_nats::Subject,
        answer: Answer,
    ) {
        let replies = match id {
            Some(id) => self.answers.lock().expect("answers lock").settle(
                id,
                &answer,
                std::time::Instant::now(),
            ),
            None => vec![reply],
        };
        let answer = answer.encode();
        for reply in replies {
            let _ = client.publish(reply, answer.clone()).await;
        }
    }

    /// The answer to a forwarded write applied under `term` (whose
    /// expectations held if `done`), once a commit after it returned.
    async fn committed(&self, partition: u16, term: Term, done: bool) -> Answer {
        // A commit answers for every write before it, but a failure is told
        // to whichever commit waited: the term's own mark says whether this
        // write is stored.
        match self.appender.commit().await {
            Ok(()) if self.still_holds(partition, Some(term)) => Answer::Written(done),
            Ok(()) => Answer::Unknown(format!(
                "partition {partition}: the term's writes failed (epoch {}); \
                 the partition is read again from the changelog",
                term.epoch
            )),
            Err(e) => {
                if self.appender.is_broken(term) {
                    self.end_term(term);
                }
                Answer::Unknown(e.to_string())
            }
        }
    }
}
