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
            let due_in = match held.due {
                Due::At(due) => due.saturating_duration_since(now),
                Due::Unsettled => std::time::Duration::ZERO,
            };
            let kept = Kept {
                account: account.clone(),
                conversation: conversation.clone(),
                head: held.head,
                head_id: held.head_id,
                due_ms: now_ms + due_in.as_millis() as u64,
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
                let due_in = std::time::Duration::from_millis(kept.due_ms.saturating_sub(now_ms));
                held.push((
                    (kept.account, kept.conversation),
                    Held {
                        head: kept.head,
                        head_id: kept.head_id,
                        due: Due::At(now + due_in),
                        later: Default::default(),
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
