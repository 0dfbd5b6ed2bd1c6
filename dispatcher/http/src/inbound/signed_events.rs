//! SendGrid's Signed Event Webhook: each POST of the Event Webhook signed
//! with ECDSA (P-256, SHA-256) over the `X-Twilio-Email-Event-Webhook-Timestamp`
//! header's text followed by the body, the DER signature base64-encoded in
//! `X-Twilio-Email-Event-Webhook-Signature`. SendGrid shows the verification
//! key as base64 of its DER (a SubjectPublicKeyInfo).
//!
//! This is the proof of the deployment's SendGrid events route
//! (`/v1/inbound/sendgrid-events`), which takes no URL secret: any account's
//! records may come in one POST, each routed by the `switchboard_account`
//! argument `send_email` sets.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use serde_json::Value;
use switchboard_engine::metrics::InboundResult;
use switchboard_sdk::AccountKey;

use super::{Inbound, InboundError, Provider, Receipt, RecordResult, sendgrid};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
/// The header whose text is signed before the body.
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";

/// What every P-256 SubjectPublicKeyInfo holds before its point: the
/// algorithm (id-ecPublicKey), the curve (prime256v1) and the bit string's
/// head.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A Signed Event Webhook's verification key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerificationKey {
    /// Where it was configured (`providers.email.NAME.event_webhook_key`).
    pub origin: String,
    /// The public point, uncompressed (65 bytes).
    point: Vec<u8>,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// Reads the key as SendGrid shows it (base64 of its DER; a PEM's
    /// framing and line breaks are allowed), configured at `origin`.
    pub fn parse(origin: &str, text: &str) -> Result<Self, String> {
        let body: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = BASE64.decode(body.as_bytes()).map_err(|e| {
            format!(
                "{origin}: not base64 ({e}): paste the verification key SendGrid shows under \
                 Mail Settings → Event Webhook → Signature Verification"
            )
        })?;
        match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            Some(point) if point.len() == 65 && point[0] == 0x04 => Ok(Self {
                origin: origin.to_string(),
                point: point.to_vec(),
            }),
            _ => Err(format!(
                "{origin}: not a P-256 public key ({} bytes of DER; SendGrid's verification key \
                 is the 91 bytes of an ECDSA P-256 SubjectPublicKeyInfo, base64 `MFkw…`)",
                der.len()
            )),
        }
    }

    /// The key of an uncompressed P-256 `point` (65 bytes): for tests, which
    /// sign with a key pair of their own.
    pub fn from_point(origin: &str, point: &[u8]) -> Self {
        Self {
            origin: origin.to_string(),
            point: point.to_vec(),
        }
    }

    /// The key as SendGrid shows it: base64 of its DER.
    pub fn to_base64(&self) -> String {
        BASE64.encode([&P256_SPKI_PREFIX[..], &self.point].concat())
    }
}

/// Whether `signature` (the header's text) is one of `keys`' over
/// `timestamp` (the other header's text) followed by `body`.
pub fn verify(keys: &[VerificationKey], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Ok(signature) = BASE64.decode(signature.trim().as_bytes()) else {
        return false;
    };
    let signed = [timestamp.as_bytes(), body].concat();
    keys.iter().any(|key| {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key.point)
            .verify(&signed, &signature)
            .is_ok()
    })
}

impl Inbound {
    /// The deployment's SendGrid events URL.
    pub(super) fn sendgrid_events_url(&self) -> String {
        format!(
            "{}{}",
            self.public_url,
            switchboard_api::paths::sendgrid_events()
        )
    }

    /// Handles a POST of SendGrid's Signed Event Webhook to
    /// `/v1/inbound/sendgrid-events`: the deployment's route for a SendGrid
    /// account that several accounts send through. The signature is its
    /// proof. Each record goes to the account its `switchboard_account`
    /// names, as if posted to that account's URL; a record that names none
    /// is logged and counted, not kept (it is no account's).
    pub async fn receive_sendgrid_events(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Receipt, InboundError> {
        const PROVIDER: &str = "sendgrid";
        if self.sendgrid_keys.is_empty() {
            return Err(InboundError::NotConfigured(
                "no SendGrid verification key is configured: turn on Signed Event Webhook \
                 Requests in SendGrid and set `event_webhook_key` of the `[providers.email.*]` \
                 provider that sends through it to the verification key SendGrid shows"
                    .into(),
            ));
        }
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let refused = match (header(SIGNATURE_HEADER), header(TIMESTAMP_HEADER)) {
            (Some(signature), Some(timestamp))
                if verify(&self.sendgrid_keys, timestamp, body, signature) =>
            {
                None
            }
            (None, _) => Some(
                "the X-Twilio-Email-Event-Webhook-Signature header is missing (is Signed Event \
                 Webhook Requests on in SendGrid?)"
                    .to_string(),
            ),
            (_, None) => {
                Some("the X-Twilio-Email-Event-Webhook-Timestamp header is missing".to_string())
            }
            (Some(_), Some(_)) => Some(format!(
                "X-Twilio-Email-Event-Webhook-Signature is not a signature of the timestamp \
                 header and the body by a configured verification key ({})",
                self.sendgrid_keys
                    .iter()
                    .map(|k| k.origin.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        if let Some(why) = refused {
            self.metrics
                .inbound_unattributed(PROVIDER, InboundResult::Rejected);
            tracing::warn!(provider = PROVIDER, reason = %why, "SendGrid events refused");
            return Err(InboundError::Rejected(why));
        }
        let records = sendgrid::parse(body);
        let total = records.len();
        let mut results: Vec<Option<RecordResult>> = vec![None; total];
        // Each account's records, with where they stand in the POST.
        let mut by_account = BTreeMap::<AccountKey, Vec<_>>::new();
        for (index, (raw, parsed)) in records.into_iter().enumerate() {
            let named = raw
                .get(sendgrid::ACCOUNT_ARG)
                .and_then(Value::as_str)
                .map(str::trim);
            match named.map(AccountKey::new) {
                Some(Ok(account)) => by_account
                    .entry(account)
                    .or_default()
                    .push((index, (raw, parsed))),
                named => {
                    let reason = match named {
                        Some(Err(e)) => format!(
                            "`{}` is not an account key ({e}): the record is no account's",
                            sendgrid::ACCOUNT_ARG
                        ),
                        _ => format!(
                            "the record names no account (no `{}`): a message Switchboard did \
                             not send, or sent before it named the account; it is logged, not \
                             kept",
                            sendgrid::ACCOUNT_ARG
                        ),
                    };
                    self.metrics
                        .inbound_unattributed(PROVIDER, InboundResult::NoAccount);
                    tracing::warn!(provider = PROVIDER, %reason, record = %raw,
                        "SendGrid event record went to no account");
                    results[index] = Some(RecordResult {
                        result: InboundResult::NoAccount.label().to_string(),
                        account_key: None,
                        message_id: None,
                        status: None,
                        transition: None,
                        event_id: None,
                        unmatched_id: None,
                        reason: Some(reason),
                    });
                }
            }
        }
        for (account, posted) in by_account {
            let (indices, records): (Vec<usize>, Vec<_>) = posted.into_iter().unzip();
            let receipt = self.apply(&account, Provider::Sendgrid, records).await?;
            for (index, mut result) in indices.into_iter().zip(receipt.results) {
                result.account_key = Some(account.to_string());
                results[index] = Some(result);
            }
        }
        let results: Vec<RecordResult> = results.into_iter().flatten().collect();
        let matched = results
            .iter()
            .filter(|r| r.result == InboundResult::Matched.label())
            .count();
        Ok(Receipt {
            provider: Provider::Sendgrid,
            records: results.len(),
            matched,
            unmatched: results.len() - matched,
            results,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn pair() -> EcdsaKeyPair {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap()
    }

    fn sign(pair: &EcdsaKeyPair, timestamp: &str, body: &[u8]) -> String {
        let signed = [timestamp.as_bytes(), body].concat();
        BASE64.encode(pair.sign(&SystemRandom::new(), &signed).unwrap().as_ref())
    }

    #[test]
    fn a_key_as_sendgrid_shows_it_reads_back_and_verifies_its_signatures() {
        let pair = pair();
        let shown = VerificationKey::from_point("t", pair.public_key().as_ref()).to_base64();
        assert!(
            shown.starts_with("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE"),
            "{shown}"
        );
        let key = VerificationKey::parse("providers.email.sg.event_webhook_key", &shown).unwrap();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n",
            &shown[..64],
            &shown[64..]
        );
        assert_eq!(
            VerificationKey::parse("pem", &pem).unwrap().point,
            key.point
        );

        let body = br#"[{"event":"delivered"}]"#;
        let signature = sign(&pair, "1763793600", body);
        let one = std::slice::from_ref(&key);
        assert!(verify(one, "1763793600", body, &signature));
        // Another timestamp, another body, another key, no signature.
        assert!(!verify(one, "1763793601", body, &signature));
        assert!(!verify(one, "1763793600", b"[]", &signature));
        let other = VerificationKey::from_point("o", self::pair().public_key().as_ref());
        let both = [other, key.clone()];
        assert!(!verify(&both[..1], "1763793600", body, &signature));
        assert!(verify(&both, "1763793600", body, &signature));
        assert!(!verify(one, "1763793600", body, "not base64!"));
    }

    #[test]
    fn a_key_that_is_not_p256_says_what_it_is() {
        let e = VerificationKey::parse("providers.email.sg.event_webhook_key", "%%%").unwrap_err();
        assert!(
            e.starts_with("providers.email.sg.event_webhook_key: not base64"),
            "{e}"
        );
        let e = VerificationKey::parse("k", &BASE64.encode([1u8; 40])).unwrap_err();
        assert!(e.contains("not a P-256 public key (40 bytes of DER"), "{e}");
    }
}
