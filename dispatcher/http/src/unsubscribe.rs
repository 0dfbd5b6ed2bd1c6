//! One-click unsubscribe (RFC 8058): the signed links `send_email` puts in
//! `List-Unsubscribe`, and what following one does.
//!
//! A link is `{public_url}/v1/unsubscribe/{account}/{token}`, the token
//! being `{payload}.{mac}`: the payload is base64url JSON of the channel,
//! the address, the topic (the template's category, else the template,
//! else all) and the message; the mac is the first 16 bytes of
//! HMAC-SHA256 over `{account}.{payload}`, keyed by the account's
//! unsubscribe key ([`SigningKeys`]). So a link unsubscribes only its own
//! recipient from its own topic, and nothing else can be made of it.
//!
//! A mail client POSTs `List-Unsubscribe=One-Click` to the link: that opts
//! the address out (its preferences, with the message as the source) and
//! moves the message to `unsubscribed`. A GET, which link scanners make
//! too, changes nothing: it answers a page with a button that POSTs.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use switchboard_handlers::ports::{Unsubscribe, UnsubscribeLinks};
use switchboard_handlers::records::{
    Channel, Choice, DeliveryReport, MessageStatus, Messages, Preferences, RecordError, Topic,
};
use switchboard_sdk::AccountKey;
use switchboard_state::{Purpose, SigningKeys};
use switchboard_store::{Store, StoreError};

/// Paths under this prefix carry their own signature and need no token.
pub const UNSUBSCRIBE_PREFIX: &str = "/v1/unsubscribe/";

/// Bytes of the HMAC kept in a link.
const MAC_BYTES: usize = 16;

/// The signed part of a link.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    /// `email` or `sms`.
    c: Channel,
    /// The address.
    to: String,
    /// The topic (`all`, `template:SLUG`, `category:NAME`).
    t: String,
    /// The message id.
    m: String,
}

/// Why a link did nothing.
#[derive(Debug, thiserror::Error)]
pub enum UnsubscribeError {
    /// Not a link of ours: malformed, altered, or signed with a key the
    /// account no longer has.
    #[error("this unsubscribe link is not valid (it may have been cut short or altered)")]
    Invalid,
    /// The records could not be read or written; following it again may work.
    #[error(transparent)]
    Records(#[from] RecordError),
    /// The store could not make the change durable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The dispatcher's unsubscribe links: made for `send_email`, followed here.
#[derive(Debug, Clone)]
pub struct OneClick {
    public_url: String,
    keys: SigningKeys,
    preferences: Arc<dyn Preferences>,
    messages: Arc<dyn Messages>,
    store: Store,
}

impl OneClick {
    /// Links under `public_url`, signed with keys kept in `store`, opting
    /// out in `preferences` and moving `messages`.
    pub fn new(
        public_url: &str,
        store: Store,
        preferences: Arc<dyn Preferences>,
        messages: Arc<dyn Messages>,
    ) -> Self {
        Self {
            public_url: public_url.trim_end_matches('/').to_string(),
            keys: SigningKeys::new(store.clone()),
            preferences,
            messages,
            store,
        }
    }

    /// What the link `token` of `account` unsubscribes, if it is ours.
    pub fn verify(&self, account: &str, token: &str) -> Result<Unsubscribe, UnsubscribeError> {
        let account = AccountKey::new(account).map_err(|_| UnsubscribeError::Invalid)?;
        let (payload, mac) = token.split_once('.').ok_or(UnsubscribeError::Invalid)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| UnsubscribeError::Invalid)?;
        if mac.len() != MAC_BYTES {
            return Err(UnsubscribeError::Invalid);
        }
        // Only read: a link of an account that never had one made no key.
        let key = self
            .keys
            .find(&account, Purpose::Unsubscribe)?
            .ok_or(UnsubscribeError::Invalid)?;
        let mut expected = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        expected.update(format!("{account}.{payload}").as_bytes());
        expected
            .verify_truncated_left(&mac)
            .map_err(|_| UnsubscribeError::Invalid)?;
        let payload: Payload = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(UnsubscribeError::Invalid)?;
        Ok(Unsubscribe {
            account,
            channel: payload.c,
            address: payload.to,
            topic: Topic::parse(&payload.t).map_err(|_| UnsubscribeError::Invalid)?,
            message_id: payload.m,
        })
    }

    /// Follows the link `token` of `account`: opts its address out of its
    /// topic and moves its message to `unsubscribed`, durably. Following it
    /// again changes nothing more.
    pub async fn unsubscribe(
        &self,
        account: &str,
        token: &str,
    ) -> Result<Unsubscribe, UnsubscribeError> {
        let link = self.verify(account, token)?;
        let cause = "one-click unsubscribe (List-Unsubscribe)";
        let source = format!("unsubscribe:{}", link.message_id);
        self.preferences.choose(
            &link.account,
            (link.channel, &link.address),
            &link.topic,
            Choice {
                subscribed: false,
                at: switchboard_sdk::now(),
                cause: cause.to_string(),
                source: Some(source.clone()),
            },
        )?;
        self.messages.report(
            &link.account,
            &link.message_id,
            (MessageStatus::Unsubscribed, cause),
            DeliveryReport::new(&source),
        )?;
        self.store.flush().await?;
        tracing::info!(account = %link.account, channel = link.channel.as_str(), topic = %link.topic,
            message = %link.message_id, "one-click unsubscribe");
        Ok(link)
    }

    fn sign(&self, key: &[u8; 32], unsubscribe: &Unsubscribe) -> String {
        let payload = serde_json::to_vec(&Payload {
            c: unsubscribe.channel,
            to: unsubscribe.address.clone(),
            t: unsubscribe.topic.to_string(),
            m: unsubscribe.message_id.clone(),
        })
        .expect("a payload serialises");
        let payload = URL_SAFE_NO_PAD.encode(payload);
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
        mac.update(format!("{}.{payload}", unsubscribe.account).as_bytes());
        let mac = mac.finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(&mac[..MAC_BYTES]))
    }
}

impl UnsubscribeLinks for OneClick {
    fn url(&self, unsubscribe: &Unsubscribe) -> Option<String> {
        let key = match self.keys.get(&unsubscribe.account, Purpose::Unsubscribe) {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!(account = %unsubscribe.account, error = %e,
                    "reading the account's unsubscribe key failed: the e-mail goes without List-Unsubscribe");
                return None;
            }
        };
        Some(format!(
            "{}{UNSUBSCRIBE_PREFIX}{}/{}",
            self.public_url,
            unsubscribe.account,
            self.sign(&key, unsubscribe)
        ))
    }
}

/// The page a link shows: `body` (already HTML) under `title`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title></head>\
         <body style=\"font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto; \
         padding: 0 1rem\"><h1>{title}</h1>{body}</body></html>\n"
    )
}

/// `text` with `&`, `<`, `>` and quotes escaped for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What a topic is called on the pages.
pub fn topic_words(unsubscribe: &Unsubscribe) -> String {
    let channel = match unsubscribe.channel {
        Channel::Email => "e-mail",
        Channel::Sms => "text messages",
    };
    match &unsubscribe.topic {
        Topic::All => format!("all {channel}"),
        Topic::Template(slug) => format!("{channel} of the kind “{slug}”"),
        Topic::Category(name) => format!("{channel} in the category “{name}”"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(dir: &std::path::Path) -> OneClick {
        let store = Store::open(dir).unwrap();
        let records = switchboard_state::RecordPorts::over(&store);
        OneClick::new(
            "https://hooks.example.org/",
            store,
            records.preferences,
            records.messages,
        )
    }

    fn unsubscribe(account: &str) -> Unsubscribe {
        Unsubscribe {
            account: AccountKey::new(account).unwrap(),
            channel: Channel::Email,
            address: "ann@example.org".into(),
            topic: Topic::Category("news".into()),
            message_id: "m-1".into(),
        }
    }

    #[test]
    fn a_link_unsubscribes_only_what_it_was_made_for() {
        let dir = tempfile::tempdir().unwrap();
        let links = links(dir.path());
        let url = links.url(&unsubscribe("acme")).unwrap();
        let token = url
            .strip_prefix("https://hooks.example.org/v1/unsubscribe/acme/")
            .unwrap_or_else(|| panic!("{url}"));
        assert_eq!(links.verify("acme", token).unwrap(), unsubscribe("acme"));
        // Another account's path (one that never had a link: no key is
        // made for it), an altered payload or mac, a cut token.
        assert!(matches!(
            links.verify("nobody", token),
            Err(UnsubscribeError::Invalid)
        ));
        assert_eq!(
            links
                .keys
                .find(&AccountKey::new("nobody").unwrap(), Purpose::Unsubscribe)
                .unwrap(),
            None
        );
        // An account with a key of its own: acme's link is not its.
        links.url(&unsubscribe("other")).unwrap();
        assert!(matches!(
            links.verify("other", token),
            Err(UnsubscribeError::Invalid)
        ));
        let (payload, mac) = token.split_once('.').unwrap();
        let bob = Unsubscribe {
            address: "bob@example.org".into(),
            ..unsubscribe("acme")
        };
        let bob = links.url(&bob).unwrap();
        let bob_payload = bob.rsplit('/').next().unwrap().split_once('.').unwrap().0;
        for bad in [
            format!("{bob_payload}.{mac}"),
            format!("{payload}.{}", &mac[..mac.len() - 2]),
            format!("{payload}x.{mac}"),
            payload.to_string(),
            String::new(),
        ] {
            assert!(
                matches!(links.verify("acme", &bad), Err(UnsubscribeError::Invalid)),
                "{bad}"
            );
        }
    }

    #[test]
    fn page_text_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
