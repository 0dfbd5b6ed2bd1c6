//! Conversations held back behind an event sent back for a retry, kept
//! across a graceful restart: a stop writes what its workers held
//! ([`Collection::HeldConversations`]), the next start reads it back (and
//! empties it), so that a conversation's later events, whether given back
//! at the stop or published since, still wait for that event.
//!
//! A crash loses them, as it loses the order of what the dead process held
//! (see RELIABILITY.md, "Ordering").

use serde::{Deserialize, Serialize};
use switchboard_sdk::{AccountKey, ConversationKey, EventId};
use switchboard_store::{Collection, Store, StoreError, Write, key};

use super::{Conversation, Due, Held};
use crate::journal::now_ms;

/// A held conversation as the store keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    account: AccountKey,
    conversation: ConversationKey,
    /// The bus position of the event it waits for.
    head: u64,
    head_id: EventId,
    /// When that event is due back, in ms since the epoch.
    due_ms: u64,
    /// Later events it waits for that were sent back after they were
    /// handled (retries), with when each is due back: they keep their wait
    /// once the head is done. (Those sent back only to wait come back
    /// behind the head by themselves.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    later: Vec<KeptLater>,
}

/// A later event a held conversation waits for, as the store keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct KeptLater {
    seq: u64,
    id: EventId,
    due_ms: u64,
}

/// Writes the conversations `held` (by its workers) for the next start.
pub(super) fn keep<'a>(
    store: &Store,
    held: impl Iterator<Item = (&'a Conversation, &'a Held)>,
) -> Result<usize, StoreError> {
    let (now, now_ms) = (tokio::time::Instant::now(), now_ms());
    let writes: Vec<Write> = held
        .map(|((account, conversation), held)| {
            // One still with the settler at the stop is due back now.
            let due_ms = |due: Due| match due {
                Due::At(due) => now_ms + due.saturating_duration_since(now).as_millis() as u64,
                Due::Unsettled => now_ms,
            };
            let later = held
                .later
                .iter()
                .filter_map(|(seq, (id, due))| {
                    due.map(|due| KeptLater {
                        seq: *seq,
                        id: *id,
                        due_ms: due_ms(due),
                    })
                })
                .collect();
            let kept = Kept {
                account: account.clone(),
                conversation: conversation.clone(),
                head: held.head,
                head_id: held.head_id,
                due_ms: due_ms(held.due),
                later,
            };
            Write {
                collection: Collection::HeldConversations,
                key: key(&[
                    account.as_str().as_bytes(),
                    conversation.as_str().as_bytes(),
                ]),
                value: Some(serde_json::to_vec(&kept).expect("a hold serialises")),
            }
        })
        .collect();
    store.write_atomically(&writes)?;
    Ok(writes.len())
}

/// Takes the conversations the last graceful stop held out of the store.
pub(super) fn take(store: &Store) -> Result<Vec<(Conversation, Held)>, StoreError> {
    let kept = store.scan_prefix(Collection::HeldConversations, b"")?;
    let (now, now_ms) = (tokio::time::Instant::now(), now_ms());
    let mut held = Vec::with_capacity(kept.len());
    let mut removals = Vec::with_capacity(kept.len());
    for (k, v) in kept {
        match serde_json::from_slice::<Kept>(&v) {
            Ok(kept) => {
                let due = |ms: u64| {
                    Due::At(now + std::time::Duration::from_millis(ms.saturating_sub(now_ms)))
                };
                let later = kept
                    .later
                    .iter()
                    .map(|l| (l.seq, (l.id, Some(due(l.due_ms)))))
                    .collect();
                held.push((
                    (kept.account, kept.conversation),
                    Held {
                        later,
                        ..Held::new(kept.head, kept.head_id, due(kept.due_ms))
                    },
                ));
            }
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e,
                    "an unreadable held conversation was passed over");
            }
        }
        removals.push(Write {
            collection: Collection::HeldConversations,
            key: k,
            value: None,
        });
    }
    store.write_atomically(&removals)?;
    Ok(held)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::consume::holds::tests::id;

    /// A conversation held at a stop is held again at the next start, with
    /// the event it waits for and when that is due, and with the retries
    /// it waits for after it and their own due times (not the events sent
    /// back only to wait, which come back behind the head by themselves);
    /// taking them empties the store.
    #[tokio::test(start_paused = true)]
    async fn held_conversations_and_their_retries_are_held_again_at_the_next_start() {
        let store = Store::temporary().unwrap();
        let c: Conversation = (
            AccountKey::new("acme").unwrap(),
            ConversationKey::new("c").unwrap(),
        );
        let now = Instant::now();
        let s = Duration::from_secs;
        let held = Held {
            later: [
                (20, (id(20), Some(Due::At(now + s(60))))),
                (21, (id(21), None)),
            ]
            .into_iter()
            .collect(),
            ..Held::new(19, id(19), Due::At(now + s(1)))
        };
        assert_eq!(keep(&store, [(&c, &held)].into_iter()).unwrap(), 1);
        let taken = take(&store).unwrap();
        assert_eq!(taken.len(), 1);
        let (conversation, again) = &taken[0];
        assert_eq!(conversation, &c);
        assert_eq!((again.head, again.head_id), (19, id(19)));
        let near = |due: Due, expected: Instant| match due {
            Due::At(at) => at.max(expected) - at.min(expected) < Duration::from_millis(500),
            Due::Unsettled => false,
        };
        assert!(near(again.due, now + s(1)), "{:?}", again.due);
        let later: Vec<_> = again.later.iter().collect();
        assert_eq!(later.len(), 1, "{later:?}");
        let (seq, (later_id, due)) = later[0];
        assert_eq!((*seq, *later_id), (20, id(20)));
        assert!(near(due.expect("its own due time"), now + s(60)), "{due:?}");
        assert!(take(&store).unwrap().is_empty());
    }

    /// A held conversation kept by a build before retries were kept beside
    /// it is read, with none.
    #[tokio::test(start_paused = true)]
    async fn a_held_conversation_kept_without_its_retries_is_read() {
        let store = Store::temporary().unwrap();
        let old = serde_json::json!({
            "account": "acme", "conversation": "c", "head": 7,
            "head_id": id(7), "due_ms": now_ms() + 1_000,
        });
        let value = serde_json::to_vec(&old).unwrap();
        store
            .put(Collection::HeldConversations, b"acme\0c", &value)
            .unwrap();
        let taken = take(&store).unwrap();
        assert_eq!(taken.len(), 1);
        let (conversation, held) = &taken[0];
        assert_eq!(
            (conversation.0.as_str(), conversation.1.as_str()),
            ("acme", "c")
        );
        assert_eq!((held.head, held.head_id), (7, id(7)));
        assert!(matches!(held.due, Due::At(_)));
        assert!(held.later.is_empty());
    }
}
