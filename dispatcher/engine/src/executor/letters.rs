//! What an operator does with dead letters: list them, replay them (the
//! event back on the bus, resuming at the failed step) and discard them.

use std::sync::Arc;

use switchboard_sdk::VumiApiEvent;
use switchboard_store::{Collection, Store, StoreError};

use crate::bus::{Bus, BusError};
use crate::dead_letters::{DeadLetter, DeadLetters, LetterStatus, letter_key};
use crate::journal::{ChainEnd, Entry, Journal, Pending, RecordKey};

/// Why a dead letter cannot be replayed or discarded.
#[derive(Debug, thiserror::Error)]
pub enum LetterError {
    /// The account has no such dead letter.
    #[error("account {account} has no dead letter {id}")]
    NotFound {
        /// The account.
        account: String,
        /// The letter.
        id: String,
    },
    /// The letter holds no event (poison): there is nothing to replay.
    #[error(
        "dead letter {0} holds no event (the payload was not a valid event), so it cannot be \
         replayed: fix the publisher and publish the event again, then discard the letter"
    )]
    NoEvent(String),
    /// The letter's replay is under way: discarding it would not stop it.
    #[error(
        "dead letter {0} is being replayed and its run is under way (running, paused, or \
         waiting for its turn), which discarding the letter would not stop; the letter goes \
         when the run ends, or is filed again if the run fails again, and can be discarded then"
    )]
    Replaying(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The bus would not take the event.
    #[error(
        "putting the event of dead letter {id} back on the bus failed (the letter stays; replay it again): {source}"
    )]
    Bus {
        /// The letter.
        id: String,
        /// What the bus said.
        source: BusError,
    },
}

/// Dead letters, as the API and CLI see them.
#[derive(Debug, Clone)]
pub struct Letters {
    letters: DeadLetters,
    journal: Journal,
    store: Store,
    bus: Arc<dyn Bus>,
}

/// How many letters [`Letters::each`] reads at a time.
const EACH_PAGE: usize = 256;

impl Letters {
    /// The dead letters in `store`; replays go on `bus`.
    pub fn new(store: Store, bus: Arc<dyn Bus>) -> Self {
        Self {
            letters: DeadLetters::new(store.clone()),
            journal: Journal::new(store.clone()),
            store,
            bus,
        }
    }

    /// The newest `limit` dead letters of `account`, newest first.
    pub fn list(&self, account: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.letters.list(account, limit)
    }

    /// Hands each dead letter of `account` to `visit`, oldest first, a
    /// page at a time: never all of them in memory at once. A letter filed
    /// during the walk may or may not be visited.
    pub fn each(&self, account: &str, mut visit: impl FnMut(DeadLetter)) -> Result<(), StoreError> {
        let mut after: Option<String> = None;
        loop {
            let page = self.letters.page(account, after.as_deref(), EACH_PAGE)?;
            let Some(last) = page.last else {
                return Ok(());
            };
            after = Some(last);
            page.letters.into_iter().for_each(&mut visit);
        }
    }

    /// One dead letter of `account`.
    pub fn get(&self, account: &str, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.letters.get(account, id)
    }

    fn found(&self, account: &str, id: &str) -> Result<DeadLetter, LetterError> {
        self.letters
            .get(account, id)?
            .ok_or_else(|| LetterError::NotFound {
                account: account.to_string(),
                id: id.to_string(),
            })
    }

    /// Puts the event of dead letter `id` back on the bus. A step failure
    /// resumes at the failed step (the steps before it are not run again);
    /// the letter is marked `replaying` until the chain ends, and is removed
    /// then, or filed again if the step fails again.
    pub async fn replay(&self, account: &str, id: &str) -> Result<DeadLetter, LetterError> {
        let mut letter = self.found(account, id)?;
        let Some(event) = letter.event.clone() else {
            return Err(LetterError::NoEvent(id.to_string()));
        };
        let at = RecordKey::new(&event.account_key, &event.id);
        let journaled = self
            .journal
            .load(&at)?
            .filter(|j| j.chains.iter().any(|c| c.refers_to(id)));
        match journaled {
            Some(mut journal) => {
                let mut pending = Pending::default();
                let chains: Vec<String> = journal
                    .chains
                    .iter()
                    .filter(|c| c.refers_to(id))
                    .map(|c| c.name.clone())
                    .collect();
                for chain in chains {
                    let entry = Entry::Replaying {
                        chain,
                        letter: id.to_string(),
                    };
                    pending.push(&entry);
                    journal.apply(entry);
                }
                letter.status = LetterStatus::Replaying;
                let mut writes: Vec<_> = self
                    .journal
                    .append(&at, &mut journal, &mut pending)?
                    .into_iter()
                    .collect();
                writes.push(DeadLetters::write(&letter));
                let span = self.store.span();
                self.store.write_atomically(&writes)?;
                self.store.flush_span(span).await?;
                self.put_back(&event, id).await?;
            }
            None => {
                // Poison of the depth limit or a failed condition (or a letter
                // whose journal is gone): the event is handled afresh and, if
                // it fails again, filed again under the same id. The letter
                // goes only as it was: filed again meanwhile (the event's
                // pass may come before this removal), it stays.
                let filed = letter_key(account, id);
                let as_read = self.store.get(Collection::DeadLetters, &filed)?;
                self.put_back(&event, id).await?;
                if let Some(as_read) = as_read {
                    self.store.compare_and_swap(
                        Collection::DeadLetters,
                        &filed,
                        Some(&as_read),
                        None,
                    )?;
                }
                letter.status = LetterStatus::Replaying;
            }
        }
        tracing::info!(account, letter = id, event_id = %event.id, "dead letter replayed");
        Ok(letter)
    }

    async fn put_back(&self, event: &VumiApiEvent, id: &str) -> Result<(), LetterError> {
        // A dedup id of its own, so the bus does not drop the event as a
        // duplicate of its first publish, nor of an earlier replay.
        let dedup_id = format!("{}:replay:{}", event.id, uuid::Uuid::now_v7());
        self.bus
            .publish_as(event, &dedup_id)
            .await
            .map(|_| ())
            .map_err(|source| LetterError::Bus {
                id: id.to_string(),
                source,
            })
    }

    /// Removes dead letter `id` for good; the event's journal may then expire.
    pub async fn discard(&self, account: &str, id: &str) -> Result<DeadLetter, LetterError> {
        let letter = self.found(account, id)?;
        let mut writes = vec![DeadLetters::removal(account, id)];
        if let Some(event) = &letter.event {
            let at = RecordKey::new(&event.account_key, &event.id);
            if let Some(mut journal) = self.journal.load(&at)? {
                if journal
                    .chains
                    .iter()
                    .any(|c| c.end.is_none() && c.replaying.as_deref() == Some(id))
                {
                    return Err(LetterError::Replaying(id.to_string()));
                }
                let mut pending = Pending::default();
                let chains: Vec<String> = journal
                    .chains
                    .iter()
                    .filter(
                        |c| matches!(&c.end, Some(ChainEnd::Dead { letter, .. }) if letter == id),
                    )
                    .map(|c| c.name.clone())
                    .collect();
                for chain in chains {
                    let entry = Entry::Discarded {
                        chain,
                        letter: id.to_string(),
                    };
                    pending.push(&entry);
                    journal.apply(entry);
                }
                writes.extend(self.journal.append(&at, &mut journal, &mut pending)?);
            }
        }
        let span = self.store.span();
        self.store.write_atomically(&writes)?;
        self.store.flush_span(span).await?;
        tracing::info!(account, letter = id, "dead letter discarded");
        Ok(letter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Delivery, Published};
    use crate::dead_letters::DeadReason;
    use tokio::sync::{mpsc, watch};

    /// A bus on which a replayed event's pass files its letter again before
    /// `publish_as` returns: the quickest a worker can be.
    #[derive(Debug)]
    struct FilesAgain(Store);

    #[async_trait::async_trait]
    impl Bus for FilesAgain {
        async fn publish_as(&self, event: &VumiApiEvent, _: &str) -> Result<Published, BusError> {
            let letter = DeadLetter::for_event(event, DeadReason::DepthLimit, None, None, "again");
            DeadLetters::new(self.0.clone()).put(&letter).unwrap();
            Ok(Published { duplicate: false })
        }

        async fn consume(
            &self,
            _: usize,
            _: watch::Receiver<bool>,
        ) -> Result<mpsc::Receiver<Delivery>, BusError> {
            unreachable!("the test does not consume")
        }

        async fn lag(&self) -> Option<u64> {
            None
        }

        fn is_ready(&self) -> bool {
            true
        }

        fn kind(&self) -> &'static str {
            "embedded"
        }
    }

    /// A replayed letter without a journal record (the depth limit) that
    /// the event's pass files again is kept, however soon that pass runs.
    #[tokio::test]
    async fn a_letter_filed_again_during_its_replay_stays() {
        let store = Store::temporary().unwrap();
        let event = VumiApiEvent::new(
            switchboard_sdk::AccountKey::new("acme").unwrap(),
            switchboard_sdk::ConversationKey::new("c-1").unwrap(),
            switchboard_sdk::ConversationType::new("survey").unwrap(),
            switchboard_sdk::EventType::new("deep").unwrap(),
            serde_json::Map::new(),
        );
        let letter = DeadLetter::for_event(&event, DeadReason::DepthLimit, None, None, "first");
        DeadLetters::new(store.clone()).put(&letter).unwrap();
        let letters = Letters::new(store.clone(), Arc::new(FilesAgain(store.clone())));
        letters.replay("acme", &letter.id).await.unwrap();
        let kept = letters
            .get("acme", &letter.id)
            .unwrap()
            .expect("filed again");
        assert_eq!(kept.error, "again");
    }
}
