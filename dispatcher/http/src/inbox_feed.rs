//! The inbox streams' feed: one task reads every change to the inboxes
//! ([`Store::watch`]) and hands each to the streams of its receiver only,
//! so a change wakes the streams it concerns and no others, however many
//! are open.
//!
//! A stream that falls behind its receiver's channel is told it lagged and
//! ends (its client reconnects and resumes). If the feed itself falls
//! behind the store, it cannot know whose changes it missed: every stream
//! ends, and reconnects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use switchboard_state::inbox::receiver_of_key;
use switchboard_store::{Collection, Store, Watched};
use tokio::sync::broadcast::{self, error::RecvError};

/// How many changes a stream may fall behind its receiver's channel.
const PER_RECEIVER: usize = 64;

/// Changes to inboxes, by receiver.
#[derive(Debug)]
pub struct InboxFeed {
    store: Store,
    receivers: Mutex<Receivers>,
    started: OnceLock<()>,
    /// The most streams one receiver may have open.
    max_per_receiver: usize,
}

/// A receiver already has as many streams open as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this receiver already has {0} live streams open here, the most it may")]
pub struct TooManyStreams(pub usize);

/// The receivers' channels, some of which may have no stream left.
#[derive(Debug, Default)]
struct Receivers {
    channels: HashMap<Vec<u8>, broadcast::Sender<Watched>>,
    /// How many channels there may be before those without a stream go:
    /// twice as many as were left at the last tidying, so that tidying
    /// costs a subscription no more than a few looks on average, however
    /// many streams open at once.
    tidy_at: usize,
}

impl Receivers {
    /// The least [`Receivers::tidy_at`].
    const TIDY_AT_LEAST: usize = 64;

    /// Lets the channels whose streams all ended go, once they may be
    /// half of all.
    fn tidy(&mut self) {
        if self.channels.len() < self.tidy_at {
            return;
        }
        self.channels.retain(|_, tx| tx.receiver_count() > 0);
        self.tidy_at = (self.channels.len() * 2).max(Self::TIDY_AT_LEAST);
    }
}

impl InboxFeed {
    /// The feed of the inboxes in `store`, `max_per_receiver` streams at
    /// most for each receiver; it starts reading with its first subscriber.
    pub fn new(store: Store, max_per_receiver: usize) -> Arc<Self> {
        Arc::new(Self {
            store,
            receivers: Mutex::default(),
            started: OnceLock::new(),
            max_per_receiver,
        })
    }

    /// Every change to the inbox whose keys begin with `prefix`
    /// (`{account}\0{receiver}\0`) from now on; refused when the receiver
    /// has its most streams open. Must be called in a tokio runtime.
    pub fn subscribe(
        self: &Arc<Self>,
        prefix: Vec<u8>,
    ) -> Result<broadcast::Receiver<Watched>, TooManyStreams> {
        self.started.get_or_init(|| self.start());
        let mut receivers = self.receivers.lock().expect("feed lock");
        receivers.tidy();
        let tx = receivers
            .channels
            .entry(prefix)
            .or_insert_with(|| broadcast::channel(PER_RECEIVER).0);
        if tx.receiver_count() >= self.max_per_receiver {
            return Err(TooManyStreams(self.max_per_receiver));
        }
        Ok(tx.subscribe())
    }

    /// How many receivers have a stream open.
    pub fn receivers(&self) -> usize {
        self.receivers
            .lock()
            .expect("feed lock")
            .channels
            .values()
            .filter(|tx| tx.receiver_count() > 0)
            .count()
    }

    fn start(self: &Arc<Self>) {
        let mut changes = self.store.watch(Collection::Inbox);
        let feed = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let received = changes.recv().await;
                let Some(feed) = feed.upgrade() else { return };
                match received {
                    Ok(watched) => {
                        let receivers = feed.receivers.lock().expect("feed lock");
                        if let Some(tx) = receivers.channels.get(receiver_of_key(&watched.key)) {
                            // No stream open: nothing to tell.
                            let _ = tx.send(watched);
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            "the inbox streams' feed fell behind the store: every stream ends \
                             and resumes when its client reconnects"
                        );
                        // Dropping the senders ends every stream.
                        feed.receivers.lock().expect("feed lock").channels.clear();
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_stream_hears_its_own_receiver_only() {
        let store = Store::temporary().unwrap();
        let feed = InboxFeed::new(store.clone(), 2);
        let mut ann = feed.subscribe(b"acme\0ann\0".to_vec()).unwrap();
        let mut ann_too = feed.subscribe(b"acme\0ann\0".to_vec()).unwrap();
        // Two is ann's most.
        assert_eq!(
            feed.subscribe(b"acme\0ann\0".to_vec()).unwrap_err(),
            TooManyStreams(2)
        );
        let mut annie = feed.subscribe(b"acme\0annie\0".to_vec()).unwrap();
        assert_eq!(feed.receivers(), 2);
        store
            .put(Collection::Inbox, b"acme\0annie\0\x01\0n-1", b"{}")
            .unwrap();
        store
            .put(Collection::Inbox, b"acme\0ann\0\x02\0n-2", b"{}")
            .unwrap();
        let within = std::time::Duration::from_secs(5);
        for stream in [&mut ann, &mut ann_too] {
            let got = tokio::time::timeout(within, stream.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&got.key[..], b"acme\0ann\0\x02\0n-2");
        }
        let got = tokio::time::timeout(within, annie.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got.key[..], b"acme\0annie\0\x01\0n-1");
        assert!(ann.try_recv().is_err(), "annie's change is not ann's");
        drop((ann, ann_too));
        let _bob = feed.subscribe(b"acme\0bob\0".to_vec()).unwrap();
        assert_eq!(feed.receivers(), 2);
    }

    /// Channels whose streams all ended go once they may be half of all:
    /// however many receivers come and go, the channels kept stay within
    /// twice those with a stream open (and a subscription does not look at
    /// every channel each time).
    #[tokio::test]
    async fn channels_without_streams_go() {
        let store = Store::temporary().unwrap();
        let feed = InboxFeed::new(store, 2);
        let kept: Vec<_> = (0..10)
            .map(|n| {
                feed.subscribe(format!("acme\0kept{n}\0").into_bytes())
                    .unwrap()
            })
            .collect();
        for n in 0..10_000 {
            let gone = feed
                .subscribe(format!("acme\0r{n}\0").into_bytes())
                .unwrap();
            drop(gone);
            let channels = feed.receivers.lock().unwrap().channels.len();
            assert!(
                channels <= Receivers::TIDY_AT_LEAST,
                "{channels} channels kept"
            );
        }
        assert_eq!(feed.receivers(), 10);
        drop(kept);
    }
}
