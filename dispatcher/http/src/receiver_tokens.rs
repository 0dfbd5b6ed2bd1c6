//! Receiver tokens: what a person's browser holds to read and change its
//! own in-app inbox, and nothing else.
//!
//! A token is `sbr_{claims}.{mac}`: the claims are base64url JSON of the
//! account, the receiver and when the token expires; the mac is
//! HMAC-SHA256 over `sbr_{claims}`, keyed by the account's receiver-token
//! key ([`SigningKeys`], made on first use). The account mints them (its
//! own server hands one to each signed-in person); nothing is stored per
//! token, so they cannot be revoked one by one: rotating the account's key
//! ends every token it signed.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use switchboard_handlers::records::RecordError;
use switchboard_handlers::records::inbox::check_receiver;
use switchboard_sdk::AccountKey;
use switchboard_state::{Purpose, SigningKeys};
use switchboard_store::Store;
use time::OffsetDateTime;

/// The start of every receiver token.
pub const RECEIVER_TOKEN_PREFIX: &str = "sbr_";

/// How long a token lasts unless its minter says.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The longest a token may last.
pub const MAX_TTL: Duration = Duration::from_secs(90 * 86400);

/// What a token says.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The account.
    a: String,
    /// The receiver.
    r: String,
    /// When it expires, in seconds since 1970.
    exp: i64,
}

/// Whose inbox a valid token opens, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receiver {
    /// The account.
    pub account: AccountKey,
    /// The receiver.
    pub receiver: String,
    /// When the token stops being valid.
    pub expires_at: OffsetDateTime,
}

/// A token just minted.
pub struct Minted {
    /// The token.
    pub token: String,
    /// When it stops being valid.
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Not a receiver.
    #[error("receiver {0}")]
    Receiver(String),
    /// A lifetime of nothing, or over [`MAX_TTL`].
    #[error("ttl: {0}")]
    Ttl(String),
    /// The key could not be read or made.
    #[error(transparent)]
    Records(#[from] RecordError),
}

/// Mints and checks receiver tokens.
#[derive(Debug, Clone)]
pub struct ReceiverTokens {
    keys: SigningKeys,
}

impl ReceiverTokens {
    /// Tokens signed with keys kept in `store`.
    pub fn new(store: Store) -> Self {
        Self {
            keys: SigningKeys::new(store),
        }
    }

    /// A token for `receiver` of `account`, valid for `ttl`.
    pub fn mint(
        &self,
        account: &AccountKey,
        receiver: &str,
        ttl: Duration,
    ) -> Result<Minted, MintError> {
        check_receiver(receiver).map_err(MintError::Receiver)?;
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(MintError::Ttl(format!(
                "a token lasts from 1s to {} (this one {})",
                switchboard_rules::duration::format(MAX_TTL),
                switchboard_rules::duration::format(ttl)
            )));
        }
        let expires_at = switchboard_sdk::now() + ttl;
        let claims = Claims {
            a: account.to_string(),
            r: receiver.to_string(),
            exp: expires_at.unix_timestamp(),
        };
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialise"));
        let signed = format!("{RECEIVER_TOKEN_PREFIX}{payload}");
        let key = self.keys.get(account, Purpose::ReceiverTokens)?;
        let mac = URL_SAFE_NO_PAD.encode(mac(&key, &signed).finalize().into_bytes());
        Ok(Minted {
            token: format!("{signed}.{mac}"),
            // Whole seconds, as the token keeps it.
            expires_at: OffsetDateTime::from_unix_timestamp(claims.exp)
                .expect("a time within range"),
        })
    }

    /// Whose inbox `token` opens: `None` when it is not a receiver token
    /// of ours, was altered, was signed with a key since rotated, or has
    /// expired.
    pub fn verify(&self, token: &str) -> Result<Option<Receiver>, RecordError> {
        let Some((signed, mac_text)) = token.rsplit_once('.') else {
            return Ok(None);
        };
        let Some(payload) = signed.strip_prefix(RECEIVER_TOKEN_PREFIX) else {
            return Ok(None);
        };
        // The claims name the account whose key checks them; nothing in
        // them counts until the mac does.
        let Some(claims) = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Claims>(&bytes).ok())
        else {
            return Ok(None);
        };
        let Ok(account) = AccountKey::new(&claims.a) else {
            return Ok(None);
        };
        let Ok(presented) = URL_SAFE_NO_PAD.decode(mac_text) else {
            return Ok(None);
        };
        // Only read, from this replica's copy (never past it: a made-up
        // token must not cost a round trip to the bucket). An account that
        // never minted a token has no key; a key another replica made a
        // moment ago reaches this one within the copy's lag, and a token
        // refused meanwhile is refused with a 401 the widget retries. The
        // mac is checked all the same, under a key no token has, so that
        // the time taken does not tell which accounts have minted tokens.
        let key = self.keys.find(&account, Purpose::ReceiverTokens)?;
        let valid = mac(&key.unwrap_or([0; 32]), signed)
            .verify_slice(&presented)
            .is_ok();
        let Ok(expires_at) = OffsetDateTime::from_unix_timestamp(claims.exp) else {
            return Ok(None);
        };
        if key.is_none()
            || !valid
            || expires_at <= switchboard_sdk::now()
            || check_receiver(&claims.r).is_err()
        {
            return Ok(None);
        }
        Ok(Some(Receiver {
            account,
            receiver: claims.r,
            expires_at,
        }))
    }

    /// Ends every token of `account` by replacing the key they were signed
    /// with; durable when this returns.
    pub async fn rotate(&self, account: &AccountKey) -> Result<(), RecordError> {
        self.keys
            .rotate(account, Purpose::ReceiverTokens)
            .await
            .map(|_| ())
    }
}

fn mac(key: &[u8; 32], signed: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(signed.as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_opens_its_own_inbox_until_it_expires_or_the_key_turns() {
        let store = Store::temporary().unwrap();
        let tokens = ReceiverTokens::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        let hour = Duration::from_secs(3600);
        // Nothing minted yet: nothing verifies, and no key is made.
        let claims = URL_SAFE_NO_PAD.encode(r#"{"a":"acme","r":"ann","exp":4102444800}"#);
        assert_eq!(
            tokens
                .verify(&format!("{RECEIVER_TOKEN_PREFIX}{claims}.AAAA"))
                .unwrap(),
            None
        );
        let keys = SigningKeys::new(store.clone());
        assert_eq!(keys.find(&acme, Purpose::ReceiverTokens).unwrap(), None);
        let minted = tokens.mint(&acme, "ann", hour).unwrap();
        assert!(minted.token.starts_with(RECEIVER_TOKEN_PREFIX));
        let left = minted.expires_at - switchboard_sdk::now();
        assert!(left > time::Duration::minutes(59), "{left}");
        let ann = Receiver {
            account: acme.clone(),
            receiver: "ann".into(),
            expires_at: minted.expires_at,
        };
        assert_eq!(tokens.verify(&minted.token).unwrap(), Some(ann.clone()));
        // Beta has a key of its own: acme's claims under beta's name fail
        // its mac, not only for want of a key.
        tokens
            .mint(&AccountKey::new("beta").unwrap(), "ann", hour)
            .unwrap();
        // Another store's key (another deployment) does not know it.
        assert_eq!(
            ReceiverTokens::new(Store::temporary().unwrap())
                .verify(&minted.token)
                .unwrap(),
            None
        );

        // Altered claims (another receiver, a later expiry), a cut mac,
        // another account's token made to look like this one's: refused.
        let (payload, mac_text) = minted
            .token
            .strip_prefix(RECEIVER_TOKEN_PREFIX)
            .unwrap()
            .rsplit_once('.')
            .unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        for (field, value) in [
            ("r", serde_json::json!("bob")),
            (
                "exp",
                serde_json::json!(claims["exp"].as_i64().unwrap() + 86400),
            ),
            ("a", serde_json::json!("beta")),
        ] {
            let mut forged = claims.clone();
            forged[field] = value;
            let forged = format!(
                "{RECEIVER_TOKEN_PREFIX}{}.{mac_text}",
                URL_SAFE_NO_PAD.encode(forged.to_string())
            );
            assert_eq!(tokens.verify(&forged).unwrap(), None, "{field}");
        }
        let cut = &minted.token[..minted.token.len() - 2];
        assert_eq!(tokens.verify(cut).unwrap(), None);
        assert_eq!(tokens.verify("sbt_whatever").unwrap(), None);

        // Expired.
        let short = tokens.mint(&acme, "ann", Duration::from_secs(1)).unwrap();
        assert_eq!(
            tokens.verify(&short.token).unwrap().map(|r| r.receiver),
            Some("ann".to_string())
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(tokens.verify(&short.token).unwrap(), None);

        // Rotating the key ends every token it signed.
        let bob = tokens.mint(&acme, "bob", hour).unwrap();
        tokens.rotate(&acme).await.unwrap();
        assert_eq!(tokens.verify(&minted.token).unwrap(), None);
        assert_eq!(tokens.verify(&bob.token).unwrap(), None);
        let after = tokens.mint(&acme, "bob", hour).unwrap();
        assert!(tokens.verify(&after.token).unwrap().is_some());
    }

    #[test]
    fn what_cannot_be_minted() {
        let tokens = ReceiverTokens::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let hour = Duration::from_secs(3600);
        assert!(matches!(
            tokens.mint(&acme, "a b", hour),
            Err(MintError::Receiver(_))
        ));
        assert!(matches!(
            tokens.mint(&acme, "ann", Duration::ZERO),
            Err(MintError::Ttl(_))
        ));
        assert!(matches!(
            tokens.mint(&acme, "ann", MAX_TTL + Duration::from_secs(1)),
            Err(MintError::Ttl(_))
        ));
    }
}
