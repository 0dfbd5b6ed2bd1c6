//! SendGrid's Signed Event Webhook: each POST of the Event Webhook signed
//! with ECDSA (P-256, SHA-256) over the `X-Twilio-Email-Event-Webhook-Timestamp`
//! header's text followed by the body, the DER signature base64-encoded in
//! `X-Twilio-Email-Event-Webhook-Signature`. SendGrid shows the verification
//! key as base64 of its DER (a SubjectPublicKeyInfo).
//!
//! This is the proof of the deployment's SendGrid events route
//! (`/v1/inbound/sendgrid-events`), which takes no URL secret: any account's
//! records may come in one POST, each routed by the `switchboard_account`
//! argument `send_email` sets. A record moves only messages sent through
//! the provider whose key signed the POST: another SendGrid account, even
//! one the deployment also sends through, cannot speak for them.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use serde_json::Value;
use switchboard_engine::metrics::InboundResult;
use switchboard_handlers::records::MessageRecord;
use switchboard_sdk::AccountKey;

use super::{
    Inbound, InboundError, Parsed, Provider, Receipt, RecordResult, Report, sendgrid,
    unknown_message,
};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
/// The header whose text is signed before the body.
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";

/// How old a signed POST may be: SendGrid tries a failed POST again for up
/// to 72 hours. Older is a replay.
pub const MAX_AGE: Duration = Duration::from_secs(72 * 3600 + 3600);
/// How far ahead of this clock a signed POST's time may be.
pub const MAX_AHEAD: Duration = Duration::from_secs(300);

/// What every P-256 SubjectPublicKeyInfo holds before its point: the
/// algorithm (id-ecPublicKey), the curve (prime256v1) and the bit string's
/// head.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A Signed Event Webhook's verification key, of one e-mail provider.
#[derive(Clone, PartialEq, Eq)]
pub struct VerificationKey {
    /// The e-mail provider (`[providers.email.NAME]`) whose SendGrid
    /// account signs with it.
    pub provider: String,
    /// The public point, uncompressed (65 bytes).
    point: Vec<u8>,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// Reads `provider`'s key as SendGrid shows it (base64 of its DER; a
    /// PEM's framing and line breaks are allowed).
    pub fn parse(provider: &str, text: &str) -> Result<Self, String> {
        let origin = format!("providers.email.{provider}.event_webhook_key");
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
                provider: provider.to_string(),
                point: point.to_vec(),
            }),
            _ => Err(format!(
                "{origin}: not a P-256 public key ({} bytes of DER; SendGrid's verification key \
                 is the 91 bytes of an ECDSA P-256 SubjectPublicKeyInfo, base64 `MFkw…`)",
                der.len()
            )),
        }
    }

    /// The key SendGrid would show for the uncompressed P-256 `point`.
    pub fn shown(point: &[u8]) -> String {
        BASE64.encode([&P256_SPKI_PREFIX[..], point].concat())
    }
}

/// The providers of `keys` whose key `signature` (the header's text) is a
/// signature by, over `timestamp` (the other header's text) followed by
/// `body`: one SendGrid account may be the provider of several entries.
pub fn signers<'k>(
    keys: &'k [VerificationKey],
    timestamp: &str,
    body: &[u8],
    signature: &str,
) -> Vec<&'k str> {
    let Ok(signature) = BASE64.decode(signature.trim().as_bytes()) else {
        return Vec::new();
    };
    let signed = [timestamp.as_bytes(), body].concat();
    keys.iter()
        .filter(|key| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key.point)
                .verify(&signed, &signature)
                .is_ok()
        })
        .map(|key| key.provider.as_str())
        .collect()
}

/// Whether a signed `timestamp` (Unix seconds, as text) is within
/// [`MAX_AGE`] before `now` and [`MAX_AHEAD`] after it.
fn fresh(timestamp: &str, now: i64) -> bool {
    timestamp.trim().parse::<i64>().is_ok_and(|t| {
        t <= now.saturating_add(MAX_AHEAD.as_secs() as i64)
            && t >= now.saturating_sub(MAX_AGE.as_secs() as i64)
    })
}

/// Whose messages a POST's reports may move.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scope<'a> {
    /// Posted to the account's own URL: any of its messages, and a report
    /// on a message it does not know still notes its recipient's
    /// preference.
    Account,
    /// Posted to the deployment's SendGrid route, signed by the key of
    /// these e-mail providers (one SendGrid account): only the messages
    /// sent through them, and no preference from a report on a message
    /// they did not send.
    SignedBy(&'a [&'a str]),
}

impl Scope<'_> {
    /// Whether a report may move `message`.
    pub(super) fn reaches(self, message: &MessageRecord) -> bool {
        match self {
            Scope::Account => true,
            Scope::SignedBy(providers) => providers.contains(&message.provider.as_str()),
        }
    }

    /// Whether a report on `found` (none: not one of ours) notes its
    /// recipient's preference.
    pub(super) fn notes_unknown(self, found: Option<&MessageRecord>) -> bool {
        matches!(self, Scope::Account) || found.is_some()
    }

    /// Why a report matched no message of `account` in this scope.
    pub(super) fn unknown_message(self, account: &AccountKey, report: &Report) -> String {
        let reason = unknown_message(account, report);
        match self {
            Scope::Account => reason,
            Scope::SignedBy(providers) => format!(
                "{reason} through e-mail provider {}, whose key signed the post",
                providers
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        }
    }
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

    /// The providers whose key signed a POST of `headers` and `body`, or
    /// why none did (what is logged may name the providers; what is
    /// answered does not).
    fn signed_by(&self, headers: &HeaderMap, body: &[u8]) -> Result<Vec<&str>, String> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(signature), Some(timestamp)) =
            (header(SIGNATURE_HEADER), header(TIMESTAMP_HEADER))
        else {
            return Err(
                "the X-Twilio-Email-Event-Webhook-Signature or -Timestamp header is missing (is \
                 Signed Event Webhook Requests on in SendGrid?)"
                    .into(),
            );
        };
        let providers = signers(&self.sendgrid_keys, timestamp, body, signature);
        if providers.is_empty() {
            return Err(
                "X-Twilio-Email-Event-Webhook-Signature is not a signature of the timestamp \
                 header and the body by a configured verification key \
                 (providers.email.*.event_webhook_key)"
                    .into(),
            );
        }
        if !fresh(timestamp, switchboard_sdk::now().unix_timestamp()) {
            return Err(format!(
                "X-Twilio-Email-Event-Webhook-Timestamp {timestamp:?} is not within {} hours \
                 before now or {} minutes after: a replay, or a clock far off",
                MAX_AGE.as_secs() / 3600,
                MAX_AHEAD.as_secs() / 60
            ));
        }
        Ok(providers)
    }

    /// Handles a POST of SendGrid's Signed Event Webhook to
    /// `/v1/inbound/sendgrid-events`: the deployment's route for a SendGrid
    /// account that several accounts send through. The signature is its
    /// proof. Each record goes to the account its `switchboard_account`
    /// names, as if posted to that account's URL, but moves only messages
    /// sent through the signing key's provider; a record that names no
    /// account is logged and counted, not kept (it is no account's).
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
        let signers = match self.signed_by(headers, body) {
            Ok(providers) => providers,
            Err(why) => {
                self.metrics
                    .inbound_unattributed(PROVIDER, InboundResult::Rejected);
                tracing::warn!(provider = PROVIDER, reason = %why,
                    keys = ?self.sendgrid_keys, "SendGrid events refused");
                return Err(InboundError::Rejected(why));
            }
        };
        let records = sendgrid::parse(body);
        let mut results: Vec<Option<RecordResult>> = vec![None; records.len()];
        // Each account's records, with where they stand in the POST.
        let mut by_account = BTreeMap::<AccountKey, Vec<_>>::new();
        for (index, (raw, parsed)) in records.into_iter().enumerate() {
            let named = match &parsed {
                Parsed::Report(report) => report.account.as_deref().map(AccountKey::new),
                // A record that is no report may still say whose it is.
                _ => raw
                    .get(sendgrid::ACCOUNT_ARG)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(AccountKey::new),
            };
            if let Some(Ok(account)) = named {
                by_account
                    .entry(account)
                    .or_default()
                    .push((index, (raw, parsed)));
                continue;
            }
            let (result, mut reason) = match parsed {
                Parsed::Unusable { result, reason } => (result, reason),
                _ => (
                    InboundResult::NoAccount,
                    format!(
                        "the record names no account (no `{}`): a message Switchboard did not \
                         send, or sent before it named the account",
                        sendgrid::ACCOUNT_ARG
                    ),
                ),
            };
            if let Some(Err(e)) = named {
                let why = format!("`{}` is not an account key ({e})", sendgrid::ACCOUNT_ARG);
                reason = match result {
                    InboundResult::NoAccount => why,
                    _ => format!("{reason}; {why}"),
                };
            }
            reason.push_str("; no account's, it is logged, not kept");
            self.metrics.inbound_unattributed(PROVIDER, result);
            tracing::warn!(provider = PROVIDER, result = result.label(), %reason,
                record = %raw, "SendGrid event record went to no account");
            results[index] = Some(RecordResult {
                result: result.label().to_string(),
                account_key: None,
                message_id: None,
                status: None,
                transition: None,
                event_id: None,
                unmatched_id: None,
                reason: Some(reason),
            });
        }
        // Every account's events go on the bus before any account's
        // unmatched records are kept: a POST SendGrid repeats because the
        // bus failed keeps none twice (one repeated because keeping or the
        // flush failed keeps those kept before again, as on an account's
        // own URL).
        let span = self.store.span();
        let mut handled = Vec::with_capacity(by_account.len());
        for (account, posted) in by_account {
            let (indices, records): (Vec<usize>, Vec<_>) = posted.into_iter().unzip();
            let done = self
                .handle(
                    &account,
                    Provider::Sendgrid,
                    records,
                    Scope::SignedBy(&signers),
                )
                .await?;
            handled.push((account, indices, done));
        }
        for (account, indices, done) in handled {
            let receipt = self.keep(&account, Provider::Sendgrid, done)?;
            for (index, mut result) in indices.into_iter().zip(receipt.results) {
                result.account_key = Some(account.to_string());
                results[index] = Some(result);
            }
        }
        self.store.flush_span(span).await?;
        let results: Vec<RecordResult> = results
            .into_iter()
            .map(|r| r.expect("every record routed"))
            .collect();
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
    fn a_key_as_sendgrid_shows_it_reads_back_and_names_what_it_signs() {
        let pair = pair();
        let shown = VerificationKey::shown(pair.public_key().as_ref());
        assert!(
            shown.starts_with("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE"),
            "{shown}"
        );
        let key = VerificationKey::parse("sg", &shown).unwrap();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n",
            &shown[..64],
            &shown[64..]
        );
        assert_eq!(VerificationKey::parse("sg", &pem).unwrap(), key);

        let body = br#"[{"event":"delivered"}]"#;
        let signature = sign(&pair, "1763793600", body);
        let other = VerificationKey::parse(
            "other",
            &VerificationKey::shown(self::pair().public_key().as_ref()),
        )
        .unwrap();
        let both = [other, key];
        let named = |keys: &[VerificationKey], timestamp: &str, body: &[u8], signature: &str| {
            signers(keys, timestamp, body, signature).join(",")
        };
        assert_eq!(named(&both, "1763793600", body, &signature), "sg");
        // Another timestamp, another body, another key, no signature.
        assert_eq!(named(&both, "1763793601", body, &signature), "");
        assert_eq!(named(&both, "1763793600", b"[]", &signature), "");
        assert_eq!(named(&both[..1], "1763793600", body, &signature), "");
        assert_eq!(named(&both, "1763793600", body, "not base64!"), "");
        // One SendGrid account behind two providers: both are its.
        let twice = [
            both[1].clone(),
            VerificationKey::parse("sg-marketing", &shown).unwrap(),
        ];
        assert_eq!(
            named(&twice, "1763793600", body, &signature),
            "sg,sg-marketing"
        );
    }

    #[test]
    fn a_signed_time_too_old_or_too_far_ahead_is_not_fresh() {
        let now = 1_800_000_000;
        let age = MAX_AGE.as_secs() as i64;
        let ahead = MAX_AHEAD.as_secs() as i64;
        for (t, expected) in [
            (now.to_string(), true),
            ((now - age).to_string(), true),
            ((now - age - 1).to_string(), false),
            ((now + ahead).to_string(), true),
            ((now + ahead + 1).to_string(), false),
            ("soon".to_string(), false),
        ] {
            assert_eq!(fresh(&t, now), expected, "{t}");
        }
    }

    #[test]
    fn a_key_that_is_not_p256_says_what_it_is() {
        let e = VerificationKey::parse("sg", "%%%").unwrap_err();
        assert!(
            e.starts_with("providers.email.sg.event_webhook_key: not base64"),
            "{e}"
        );
        let e = VerificationKey::parse("k", &BASE64.encode([1u8; 40])).unwrap_err();
        assert!(e.contains("not a P-256 public key (40 bytes of DER"), "{e}");
    }
}
