//! Inbound provider webhooks: what providers post back — delivery reports,
//! bounces, signed callbacks — at `POST /v1/inbound/{account}/{provider}/{secret}`.
//!
//! The secret in the URL is made per (account, provider) by
//! [`HookStore::create`] and kept only as its SHA-256, by which it is looked
//! up; a wrong secret, account or provider is one answer: not found. Each
//! provider then proves itself its own way (Twilio's signature, Standard
//! Webhooks signatures) and its records are read one by one
//! ([`sendgrid`], [`twilio`], [`parse_webhook`]): a record that reports on a
//! message moves the message record's status (never backwards, each report
//! once) and is published on the bus as an event that chains can act on,
//! with an id derived from the provider's own event id so that a provider's
//! retry is deduplicated. Records for unknown messages, undocumented event
//! types and malformed records never fail the request: they are logged,
//! counted and kept as unmatched, with the record and the reason.

use std::sync::Arc;

use axum::http::HeaderMap;
use serde_json::{Map, Value, json};
use switchboard_handlers::records::{
    Channel, Choice, Contacts, DeliveryReport, FilePolicy, Files, IdempotencyKeys, MessageRecord,
    MessageStatus, Messages, Preferences, RecordError, Reported, Secrets,
};
use switchboard_handlers::sms::TwilioSms;
use switchboard_sdk::{
    AccountKey, ConversationKey, ConversationType, EventId, EventType, VumiApiEvent,
};
use switchboard_store::{Store, StoreError};
use time::OffsetDateTime;

use switchboard_engine::bus::{Bus, BusError};
use switchboard_engine::metrics::{InboundResult, Metrics};

pub mod numbers;
pub mod parse;
pub mod replies;
pub mod sendgrid;
pub mod signed_events;
mod store;
pub mod twilio;

pub use store::{Hook, HookStore, MAX_UNMATCHED_PER_ACCOUNT, Unmatched, UnmatchedStore};

#[cfg(test)]
mod tests;

/// Namespace of the ids of events made from inbound records.
const INBOUND_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x3b0f_6c2a_51d4_4f0e_9a7e_c1d2_8e44_b6a9);

/// The providers (part of the API: their names are the `{provider}` of the
/// routes), and what a provider's POST is answered.
pub use switchboard_api::inbound::{Provider, Receipt, RecordResult};

/// What one record says, read without touching the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A delivery report about a message Switchboard sent.
    Report(Report),
    /// An event of its own (a generic webhook).
    Event {
        /// The event type.
        event_type: EventType,
        /// The conversation key.
        conversation_key: ConversationKey,
        /// `event_data`.
        data: Map<String, Value>,
        /// What identifies it (the event id is derived from it).
        source: String,
    },
    /// A message a person sent to one of the account's addresses.
    Reply(replies::Reply),
    /// A record that cannot be used.
    Unusable {
        /// `Undocumented` or `Malformed`.
        result: InboundResult,
        /// Why, in words.
        reason: String,
    },
}

impl Parsed {
    fn unusable(result: InboundResult, reason: impl Into<String>) -> Self {
        Parsed::Unusable {
            result,
            reason: reason.into(),
        }
    }
}

/// A provider's report about one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// What the message went out on.
    pub channel: Channel,
    /// The message id the record carries (`switchboard_message_id`), tried first.
    pub message_id: Option<String>,
    /// The account the record says sent the message (SendGrid's
    /// `switchboard_account`, which `send_email` sets); `None` when it does
    /// not say.
    pub account: Option<String>,
    /// The provider's ids for the message, tried in order against
    /// `remote_id`; the last is the one its answer to the send gave
    /// (SendGrid's X-Message-Id, Twilio's MessageSid).
    pub remote_ids: Vec<String>,
    /// The status it reports; `None` leaves the message's status as it is.
    pub status: Option<MessageStatus>,
    /// The event type to emit (`email_bounced`, `sms_delivered`).
    pub event_type: String,
    /// The provider's name for what happened (`bounce`).
    pub provider_event: String,
    /// Identifies the report (`sendgrid:{sg_event_id}`): logged with the
    /// transition so that it is applied once; the event id derives from it.
    pub source: String,
    /// When it happened, when the record says.
    pub occurred_at: Option<OffsetDateTime>,
    /// The record's useful fields, for `event_data`.
    pub details: Map<String, Value>,
    /// The transition's cause, in words.
    pub cause: String,
}

impl Report {
    /// The report, as the message's log keeps it once `raw` moved it.
    fn logged<'a>(&'a self, raw: &'a Value) -> DeliveryReport<'a> {
        DeliveryReport {
            source: &self.source,
            remote_id: self.remote_ids.last().map(String::as_str),
            payload: Some(raw),
        }
    }
}

/// Hex SHA-256, for records without an id of their own.
pub(crate) use switchboard_handlers::records::sha256_hex as digest;

/// The Standard Webhooks headers.
const WEBHOOK_HEADERS: [&str; 3] = ["webhook-id", "webhook-timestamp", "webhook-signature"];

/// Reads a (verified) generic webhook's body, posted with `webhook_id`: a JSON
/// object that becomes the `event_data` of an event of type `event_type`
/// (when the object has that field: a valid event type) or
/// `webhook_received`, in the conversation `conversation_key` (when it has
/// that field), else the webhook id (when it is a valid key), else `webhook`.
pub fn parse_webhook(body: &[u8], webhook_id: &str) -> Parsed {
    let data = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(data)) => data,
        Ok(_) => {
            return Parsed::unusable(
                InboundResult::Malformed,
                "the body is JSON but not an object",
            );
        }
        Err(e) => {
            return Parsed::unusable(
                InboundResult::Malformed,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let event_type = match data.get("event_type") {
        None => EventType::new("webhook_received").expect("a valid event type"),
        Some(Value::String(s)) => match EventType::new(s.clone()) {
            Ok(t) => t,
            Err(e) => {
                return Parsed::unusable(InboundResult::Malformed, e.to_string());
            }
        },
        Some(other) => {
            return Parsed::unusable(
                InboundResult::Malformed,
                format!("event_type must be a string, not {other}"),
            );
        }
    };
    let conversation_key = data
        .get("conversation_key")
        .and_then(Value::as_str)
        .and_then(|k| ConversationKey::new(k).ok())
        .or_else(|| ConversationKey::new(webhook_id).ok())
        .unwrap_or_else(|| ConversationKey::new("webhook").expect("a valid key"));
    Parsed::Event {
        event_type,
        conversation_key,
        data,
        source: format!("webhook:{webhook_id}"),
    }
}

/// Why an inbound POST was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// No hook has this account, provider and secret (which of them is wrong is not said).
    #[error(
        "no inbound webhook at this URL: check the account, the provider and the secret \
         (`switchboard inbound list ACCOUNT`; `inbound create --rotate` makes a new URL)"
    )]
    NotFound,
    /// What the provider needs is not configured here.
    #[error("{0}")]
    NotConfigured(String),
    /// The request did not prove it came from the provider.
    #[error("{0}")]
    Rejected(String),
    /// The store failed; the provider should post again.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A message record or secret could not be read or written; the
    /// provider should post again.
    #[error(transparent)]
    Records(#[from] RecordError),
    /// The bus would not take an event; the provider should post again.
    #[error("the bus would not take the events: {0}; post again later")]
    Bus(#[from] BusError),
}

/// Why an inbound webhook could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// No such provider.
    #[error("{0:?} is not an inbound provider: use one of {names}", names = Provider::names())]
    UnknownProvider(String),
    /// `webhook` needs an account secret to check signatures with.
    #[error(
        "the webhook provider checks Standard Webhooks signatures with an account secret: name \
         it with --secret NAME (set it first with `switchboard secrets set {0} NAME`)"
    )]
    SecretRequired(AccountKey),
    /// Only `webhook` takes a secret.
    #[error("--secret is for the webhook provider only; {0} needs none")]
    SecretNotTaken(Provider),
    /// The named secret is not set.
    #[error(
        "account secret {name:?} of account {account} is not set; set it first with \
         `switchboard secrets set {account} {name}` (a Standard Webhooks secret, whsec_ + base64)"
    )]
    SecretNotSet {
        /// The account.
        account: AccountKey,
        /// The secret's name.
        name: String,
    },
    /// What the provider needs is not configured here.
    #[error("{0}")]
    NotConfigured(String),
    /// The account has a URL for the provider already.
    #[error(
        "account {account} already has an inbound {provider} webhook (made {created_at}); \
         --rotate makes a new URL and the old one stops working at once"
    )]
    Exists {
        /// The account.
        account: AccountKey,
        /// The provider.
        provider: Provider,
        /// When the existing one was made.
        created_at: String,
    },
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The account's secrets could not be read.
    #[error(transparent)]
    Records(#[from] RecordError),
}

/// The inbound webhooks of a dispatcher.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The URLs.
    pub hooks: HookStore,
    /// Records that matched nothing.
    pub unmatched: UnmatchedStore,
    /// The addresses accounts own, which replies are sent to.
    pub numbers: numbers::NumberStore,
    messages: Arc<dyn Messages>,
    secrets: Arc<dyn Secrets>,
    preferences: Arc<dyn Preferences>,
    contacts: Arc<dyn Contacts>,
    files: Arc<dyn Files>,
    file_policy: FilePolicy,
    idempotency: Arc<dyn IdempotencyKeys>,
    twilio: Vec<TwilioSms>,
    sendgrid_keys: Vec<signed_events::VerificationKey>,
    public_url: String,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    store: Store,
    max_event_bytes: usize,
}

/// What became of a POST's records for one account, before the unmatched
/// ones are kept.
#[derive(Debug)]
struct Handled {
    /// Per record, in order; `None` for those still to be kept.
    results: Vec<Option<RecordResult>>,
    /// The records to keep: where they stand, the result, why, the record.
    unmatched: Vec<(usize, InboundResult, String, Value)>,
}

/// What the deployment's providers prove their posts with.
#[derive(Debug, Clone, Default)]
pub struct ProviderKeys {
    /// The Twilio providers: their auth tokens sign status callbacks and
    /// incoming messages.
    pub twilio: Vec<TwilioSms>,
    /// The verification keys of SendGrid's Signed Event Webhook
    /// (`providers.email.NAME.event_webhook_key`): the proof of the
    /// deployment's SendGrid events route.
    pub sendgrid: Vec<signed_events::VerificationKey>,
}

/// The records inbound webhooks read and change.
#[derive(Debug, Clone)]
pub struct InboundRecords {
    /// The message records delivery reports move.
    pub messages: Arc<dyn Messages>,
    /// The secrets signatures are checked with.
    pub secrets: Arc<dyn Secrets>,
    /// The preferences unsubscribes, spam reports, bounces and STOP
    /// replies set.
    pub preferences: Arc<dyn Preferences>,
    /// The contacts replies are matched to.
    pub contacts: Arc<dyn Contacts>,
    /// Where the files e-mail replies carry are kept.
    pub files: Arc<dyn Files>,
    /// What files may be kept.
    pub file_policy: FilePolicy,
    /// Where a reply is noted as taken, so that a provider's repeat of it
    /// changes no preference again.
    pub idempotency: Arc<dyn IdempotencyKeys>,
}

impl Inbound {
    /// Inbound webhooks over `store`, moving the message records of
    /// `records` and checking signatures with its secrets and `keys`,
    /// publishing on `bus`. `public_url` is the base URL providers post to.
    pub fn new(
        store: Store,
        records: InboundRecords,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        public_url: &str,
        keys: ProviderKeys,
        max_event_bytes: usize,
    ) -> Self {
        Self {
            hooks: HookStore::new(store.clone()),
            numbers: numbers::NumberStore::new(store.clone()),
            contacts: records.contacts,
            files: records.files,
            file_policy: records.file_policy,
            idempotency: records.idempotency,
            unmatched: UnmatchedStore::new(store.clone()),
            messages: records.messages,
            secrets: records.secrets,
            preferences: records.preferences,
            twilio: keys.twilio,
            sendgrid_keys: keys.sendgrid,
            public_url: public_url.trim_end_matches('/').to_string(),
            bus,
            metrics,
            store,
            max_event_bytes,
        }
    }

    /// Removes the account's URL for `provider`, durably; returns it if there was one.
    pub async fn revoke(
        &self,
        account: &AccountKey,
        provider: Provider,
    ) -> Result<Option<Hook>, StoreError> {
        let hook = self.hooks.revoke(account, provider)?;
        self.store.flush().await?;
        Ok(hook)
    }

    /// The URL of a hook with `secret`.
    pub fn url(&self, account: &AccountKey, provider: Provider, secret: &str) -> String {
        format!(
            "{}/v1/inbound/{account}/{}/{secret}",
            self.public_url,
            provider.name()
        )
    }

    fn twilio_missing() -> String {
        "no Twilio provider is configured in this deployment, so Twilio callbacks cannot be \
         verified: add [providers.sms.NAME] with type = \"twilio\", account_sid and auth_token \
         to the dispatcher's config file"
            .to_string()
    }

    /// Makes (or with `rotate`, remakes) the account's URL for `provider`,
    /// durably. Returns the URL, shown once, and the hook.
    pub async fn create(
        &self,
        account: &AccountKey,
        provider: &str,
        secret: Option<String>,
        rotate: bool,
    ) -> Result<(String, Hook), CreateError> {
        let provider = Provider::parse(provider)
            .ok_or_else(|| CreateError::UnknownProvider(provider.into()))?;
        match (provider, &secret) {
            (Provider::Webhook, None) => return Err(CreateError::SecretRequired(account.clone())),
            (Provider::Webhook, Some(name)) if self.secrets.get(account, name)?.is_none() => {
                return Err(CreateError::SecretNotSet {
                    account: account.clone(),
                    name: name.clone(),
                });
            }
            (Provider::Webhook, Some(_)) => {}
            (_, Some(_)) => return Err(CreateError::SecretNotTaken(provider)),
            (Provider::Twilio, None) if self.twilio.is_empty() => {
                return Err(CreateError::NotConfigured(Self::twilio_missing()));
            }
            _ => {}
        }
        if !rotate && let Some(existing) = self.hooks.get(account, provider)? {
            return Err(CreateError::Exists {
                account: account.clone(),
                provider,
                created_at: switchboard_sdk::format_rfc3339(existing.created_at),
            });
        }
        let (url_secret, hook) = self.hooks.create(Hook {
            account_key: account.clone(),
            provider,
            created_at: switchboard_sdk::now(),
            secret,
        })?;
        self.store.flush().await?;
        tracing::info!(%account, provider = provider.name(), rotate, "inbound webhook created");
        Ok((self.url(account, provider, &url_secret), hook))
    }

    /// The account, provider and record of an inbound URL, if `secret` is
    /// the URL's: else [`InboundError::NotFound`]. Checked before a post's
    /// body is read.
    pub fn opens(
        &self,
        account: &str,
        provider: &str,
        secret: &str,
    ) -> Result<(AccountKey, Provider, store::Hook), InboundError> {
        let (Ok(account), Some(provider)) = (AccountKey::new(account), Provider::parse(provider))
        else {
            return Err(InboundError::NotFound);
        };
        let hook = self.hooks.find(secret)?.ok_or(InboundError::NotFound)?;
        if hook.account_key != account || hook.provider != provider {
            return Err(InboundError::NotFound);
        }
        Ok((account, provider, hook))
    }

    /// Handles a POST to `/v1/inbound/{account}/{provider}/{secret}`;
    /// `path_and_query` is the request's, as received.
    pub async fn receive(
        &self,
        account: &str,
        provider: &str,
        secret: &str,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Receipt, InboundError> {
        let (account, provider, hook) = self.opens(account, provider, secret)?;
        let content_type = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let records = match provider {
            // Inbound Parse: an e-mail sent to one of the account's addresses.
            Provider::Sendgrid if content_type.starts_with("multipart/form-data") => {
                match parse::read(content_type, body).await {
                    (kept, Ok(reply)) => vec![(kept, Parsed::Reply(reply))],
                    (kept, Err(reason)) => {
                        vec![(kept, Parsed::unusable(InboundResult::Malformed, reason))]
                    }
                }
            }
            Provider::Sendgrid => sendgrid::parse(body),
            Provider::Twilio => self
                .twilio_records((path_and_query, secret), headers, body)?
                .map_err(|why| self.reject(&account, provider, why))?,
            Provider::Webhook => {
                let name = hook.secret.clone().unwrap_or_default();
                let key = self.secrets.get(&account, &name)?.ok_or_else(|| {
                    InboundError::NotConfigured(format!(
                        "account secret {name:?} of account {account}, which this webhook's \
                         signatures are checked with, is not set: set it with `switchboard \
                         secrets set {account} {name}`"
                    ))
                })?;
                let [id, timestamp, signatures] = WEBHOOK_HEADERS.map(|h| {
                    headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                });
                let verified = match (&id, &timestamp, &signatures) {
                    (Some(id), Some(timestamp), Some(signatures)) => {
                        switchboard_handlers::webhook::verify(
                            &key,
                            id,
                            timestamp,
                            signatures,
                            body,
                            switchboard_sdk::now().unix_timestamp(),
                        )
                    }
                    _ => {
                        let missing = WEBHOOK_HEADERS
                            .iter()
                            .zip([&id, &timestamp, &signatures])
                            .find(|(_, v)| v.is_none())
                            .map_or("webhook-id", |(h, _)| *h);
                        Err(switchboard_handlers::webhook::VerifyError::MissingHeader(
                            missing,
                        ))
                    }
                };
                match verified {
                    Ok(()) => {}
                    Err(e @ switchboard_handlers::webhook::VerifyError::Secret(_)) => {
                        // What is wrong with the secret is the operator's
                        // to read, not the sender's: it would tell of the
                        // secret's text.
                        tracing::error!(%account, secret = name, error = %e,
                            "an inbound webhook's signing secret is unusable");
                        return Err(InboundError::NotConfigured(format!(
                            "the signing secret is not a Standard Webhooks secret: set account \
                             secret {name:?} of account {account} to whsec_ + base64 of the key \
                             (`switchboard secrets set {account} {name}`)"
                        )));
                    }
                    Err(e) => return Err(self.reject(&account, provider, e.to_string())),
                }
                let id = id.unwrap_or_default();
                let raw = serde_json::from_slice(body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
                vec![(raw, parse_webhook(body, &id))]
            }
        };
        self.apply(&account, provider, records).await
    }

    /// Handles a Twilio status callback posted to
    /// `/v1/inbound/twilio-status/{account}`: the URL a Twilio provider's
    /// `status_callback` names with `{account}` in it, so that each
    /// account's messages report to that account. Authenticated by the
    /// signature alone (the auth token is the deployment's).
    pub async fn receive_twilio_status(
        &self,
        account: &str,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Receipt, InboundError> {
        let account = AccountKey::new(account).map_err(|_| InboundError::NotFound)?;
        // Refused unsigned, it is not counted under the account its path
        // names: anyone may post any name here.
        let records = self
            .twilio_records((path_and_query, ""), headers, body)?
            .map_err(|why| {
                tracing::warn!(path = path_and_query, reason = %why, "Twilio status callback refused");
                InboundError::Rejected(why)
            })?;
        self.apply(&account, Provider::Twilio, records).await
    }

    /// The records of a Twilio callback to `path_and_query` (its secret,
    /// if any, left out of what is said), once its signature is checked:
    /// `Ok(Err(why))` when it does not check out.
    fn twilio_records(
        &self,
        (path_and_query, secret): (&str, &str),
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Result<Vec<(Value, Parsed)>, String>, InboundError> {
        if self.twilio.is_empty() {
            return Err(InboundError::NotConfigured(Self::twilio_missing()));
        }
        let params = twilio::params(body);
        let url = format!("{}{path_and_query}", self.public_url);
        let signature = headers
            .get(twilio::SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok());
        let verified =
            signature.is_some_and(|sig| twilio::verify(&self.twilio, &url, &params, sig));
        if !verified {
            let why = match signature {
                None => "the X-Twilio-Signature header is missing".to_string(),
                Some(_) => format!(
                    "X-Twilio-Signature does not match the callback signed for {} with the auth \
                     token of a configured Twilio provider (is http.public_url the address \
                     Twilio posts to?)",
                    redact_secret(&url, secret)
                ),
            };
            return Ok(Err(why));
        }
        Ok(Ok(vec![(
            twilio::params_json(&params),
            twilio::parse(&params),
        )]))
    }

    fn reject(&self, account: &AccountKey, provider: Provider, why: String) -> InboundError {
        self.metrics
            .inbound(provider.name(), account.as_str(), InboundResult::Rejected);
        tracing::warn!(%account, provider = provider.name(), reason = %why, "inbound webhook refused");
        InboundError::Rejected(why)
    }

    /// Matches, applies and publishes each record; keeps the unmatched ones;
    /// makes it all durable before the provider is told.
    async fn apply(
        &self,
        account: &AccountKey,
        provider: Provider,
        records: Vec<(Value, Parsed)>,
    ) -> Result<Receipt, InboundError> {
        let span = self.store.span();
        let handled = self
            .handle(account, provider, records, signed_events::Scope::Account)
            .await?;
        let receipt = self.keep(account, provider, handled)?;
        self.store.flush_span(span).await?;
        Ok(receipt)
    }

    /// Matches, applies and publishes each record posted for `account`
    /// within `scope`: what became of the ones that did, and the others,
    /// still to be kept ([`Inbound::keep`]).
    async fn handle(
        &self,
        account: &AccountKey,
        provider: Provider,
        records: Vec<(Value, Parsed)>,
        scope: signed_events::Scope<'_>,
    ) -> Result<Handled, InboundError> {
        let mut results = Vec::with_capacity(records.len());
        let mut unmatched = Vec::new();
        for (raw, parsed) in records {
            let outcome = match parsed {
                Parsed::Report(report) => {
                    if let Some(sender) =
                        report.account.as_deref().filter(|a| *a != account.as_str())
                    {
                        let reason = self.sent_by_another(account, sender);
                        // The record is the other account's: this one is
                        // told what it was, not to whom it went.
                        let kept = sendgrid::redacted(&raw);
                        unmatched.push((results.len(), InboundResult::OtherAccount, reason, kept));
                        results.push(None);
                        continue;
                    }
                    let found = self
                        .find_message(account, &report)?
                        .filter(|m| scope.reaches(m));
                    if provider == Provider::Sendgrid && scope.notes_unknown(found.as_ref()) {
                        self.note_preference(account, &report, found.as_ref())?;
                    }
                    match found {
                        Some(message) => {
                            self.report(account, provider, message, report, raw).await?
                        }
                        None => {
                            let reason = scope.unknown_message(account, &report);
                            unmatched.push((
                                results.len(),
                                InboundResult::UnknownMessage,
                                reason,
                                raw,
                            ));
                            results.push(None);
                            continue;
                        }
                    }
                }
                Parsed::Event {
                    event_type,
                    conversation_key,
                    data,
                    source,
                } => {
                    let made = self.event(
                        account,
                        provider.name(),
                        &source,
                        conversation_key,
                        ConversationType::new("webhook").expect("a valid type"),
                        event_type,
                        data,
                        None,
                    );
                    let event = match made {
                        Ok(event) => event,
                        Err(reason) => {
                            unmatched.push((results.len(), InboundResult::Malformed, reason, raw));
                            results.push(None);
                            continue;
                        }
                    };
                    self.bus.publish(&event).await?;
                    tracing::info!(%account, provider = provider.name(), event_id = %event.id,
                        event_type = %event.event_type, "inbound webhook published");
                    RecordResult {
                        account_key: None,
                        result: InboundResult::Matched.label().to_string(),
                        message_id: None,
                        status: None,
                        transition: None,
                        event_id: Some(event.id.to_string()),
                        unmatched_id: None,
                        reason: None,
                    }
                }
                Parsed::Reply(reply) => match self.reply(account, provider.name(), &reply).await? {
                    Ok(outcome) => outcome,
                    Err((result, reason)) => {
                        unmatched.push((results.len(), result, reason, raw));
                        results.push(None);
                        continue;
                    }
                },
                Parsed::Unusable { result, reason } => {
                    unmatched.push((results.len(), result, reason, raw));
                    results.push(None);
                    continue;
                }
            };
            self.metrics
                .inbound(provider.name(), account.as_str(), InboundResult::Matched);
            results.push(Some(outcome));
        }
        Ok(Handled { results, unmatched })
    }

    /// Keeps the records `handled` left unmatched, under `account`: the
    /// receipt of them all. Called once every event of the POST is on the
    /// bus, so that a POST the provider has to repeat (the bus failed) does
    /// not keep them twice; durable once the caller flushes.
    fn keep(
        &self,
        account: &AccountKey,
        provider: Provider,
        handled: Handled,
    ) -> Result<Receipt, InboundError> {
        let Handled {
            mut results,
            unmatched,
        } = handled;
        let kept = unmatched.len();
        for (index, result, reason, record) in unmatched {
            let (record, record_bytes) = store::kept_record(record);
            let u = Unmatched {
                id: uuid::Uuid::now_v7().to_string(),
                account_key: account.clone(),
                provider,
                result: result.label().to_string(),
                reason: reason.clone(),
                record,
                record_bytes,
                received_at: switchboard_sdk::now(),
            };
            self.unmatched.put(&u)?;
            self.metrics
                .inbound(provider.name(), account.as_str(), result);
            tracing::warn!(%account, provider = provider.name(), result = result.label(),
                unmatched_id = u.id, %reason, "inbound record matched nothing: kept as unmatched");
            results[index] = Some(RecordResult {
                account_key: None,
                result: result.label().to_string(),
                message_id: None,
                status: None,
                transition: None,
                event_id: None,
                unmatched_id: Some(u.id),
                reason: Some(reason),
            });
        }
        let results: Vec<RecordResult> = results
            .into_iter()
            .map(|r| r.expect("every record handled or kept"))
            .collect();
        Ok(Receipt {
            provider,
            records: results.len(),
            matched: results.len() - kept,
            unmatched: kept,
            results,
        })
    }

    /// Why a record about a message `sender` sent is not applied when posted
    /// to `account`'s URL: its status and its recipient's preferences are
    /// `sender`'s.
    fn sent_by_another(&self, account: &AccountKey, sender: &str) -> String {
        format!(
            "the record is about a message account {sender:?} sent (its `{arg}`), not one of \
             account {account}'s, so it is not applied here: a SendGrid account that several \
             accounts send through posts its Event Webhook to {url}, which takes each record \
             to the account that sent its message",
            arg = sendgrid::ACCOUNT_ARG,
            url = self.sendgrid_events_url(),
        )
    }

    /// Records what a SendGrid `report` (about `message`, when known) says
    /// of its recipient's preferences ([`sendgrid::preference_change`]);
    /// whether it said anything. A provider's report posted again changes
    /// nothing more.
    fn note_preference(
        &self,
        account: &AccountKey,
        report: &Report,
        message: Option<&MessageRecord>,
    ) -> Result<bool, RecordError> {
        let Some((address, topic, subscribed)) = sendgrid::preference_change(report, message)
        else {
            return Ok(false);
        };
        self.preferences.choose(
            account,
            (Channel::Email, &address),
            &topic,
            Choice {
                subscribed,
                at: report.occurred_at.unwrap_or_else(switchboard_sdk::now),
                cause: report.cause.clone(),
                source: Some(report.source.clone()),
            },
        )?;
        tracing::info!(%account, %topic, subscribed, provider_event = %report.provider_event,
            "preference recorded from a SendGrid event");
        Ok(true)
    }

    /// The message a report is about: by its message id, then by each of
    /// its remote ids, on the report's channel.
    fn find_message(
        &self,
        account: &AccountKey,
        report: &Report,
    ) -> Result<Option<MessageRecord>, RecordError> {
        if let Some(id) = &report.message_id
            && let Some(m) = self.messages.get(account, id)?
            && m.channel == report.channel
        {
            return Ok(Some(m));
        }
        for remote in &report.remote_ids {
            if let Some(m) = self
                .messages
                .find_by_remote_id(account, report.channel, remote)?
            {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Applies a report to its message and publishes it.
    async fn report(
        &self,
        account: &AccountKey,
        provider: Provider,
        message: MessageRecord,
        report: Report,
        raw: Value,
    ) -> Result<RecordResult, InboundError> {
        let before = message.status;
        let (message, transition) = match report.status {
            Some(to) => {
                match self.messages.report(
                    account,
                    &message.id,
                    (to, &report.cause),
                    report.logged(&raw),
                )? {
                    Some((m, Reported::Applied { .. })) => (m, "applied"),
                    Some((m, Reported::Duplicate)) => (m, "duplicate"),
                    Some((m, Reported::Stale { .. })) => (m, "stale"),
                    None => (message, "none"),
                }
            }
            None => (message, "none"),
        };
        if transition == "applied" {
            tracing::info!(%account, provider = provider.name(), message_id = message.id,
                from = %before, to = %message.status, cause = report.cause, "message status changed");
        }
        let channel = message.channel.as_str();
        let mut data = Map::new();
        data.insert("message_id".into(), json!(message.id));
        data.insert("provider".into(), json!(provider.name()));
        data.insert("event".into(), json!(report.provider_event));
        data.insert("status".into(), json!(message.status));
        data.insert("previous_status".into(), json!(before));
        data.insert("transition".into(), json!(transition));
        data.insert("recipient".into(), json!(message.recipient));
        data.insert(
            "sent_by".into(),
            json!({"event_id": message.event_id, "chain": message.chain, "step": message.step}),
        );
        data.insert(
            "occurred_at".into(),
            json!(report.occurred_at.map(switchboard_sdk::format_rfc3339)),
        );
        data.extend(report.details);
        data.insert("record".into(), raw);
        let made = self.event(
            account,
            provider.name(),
            &report.source,
            ConversationKey::new(message.id.clone()).unwrap_or_else(|_| {
                ConversationKey::new(channel).expect("a valid conversation key")
            }),
            ConversationType::new(channel).expect("a valid conversation type"),
            EventType::new(report.event_type).expect("event types are made valid"),
            data,
            report.occurred_at,
        );
        // The message's status is what the report is for; an event too
        // large to emit (the provider's own fields are) is told about.
        let (event_id, reason) = match made {
            Ok(event) => {
                self.bus.publish(&event).await?;
                (Some(event.id.to_string()), None)
            }
            Err(reason) => {
                tracing::warn!(%account, provider = provider.name(), message_id = message.id,
                    %reason, "a delivery report was applied but its event not emitted");
                (
                    None,
                    Some(format!("applied, but no event emitted: {reason}")),
                )
            }
        };
        Ok(RecordResult {
            account_key: None,
            result: InboundResult::Matched.label().to_string(),
            message_id: Some(message.id),
            status: Some(message.status.as_str().to_string()),
            transition: Some(transition.to_string()),
            event_id,
            unmatched_id: None,
            reason,
        })
    }

    /// A root event with an id derived from (provider, account, source), so
    /// that the same record posted again is the same event. Over the size
    /// limit, `event_data.record` (the record as posted) is left out; `Err`
    /// (why) if the event is over it even so: the bus would refuse it.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        account: &AccountKey,
        provider: &str,
        source: &str,
        conversation_key: ConversationKey,
        conversation_type: ConversationType,
        event_type: EventType,
        mut data: Map<String, Value>,
        occurred_at: Option<OffsetDateTime>,
    ) -> Result<VumiApiEvent, String> {
        let id = EventId::from(uuid::Uuid::new_v5(
            &INBOUND_ID_NAMESPACE,
            format!("{provider}\n{account}\n{source}").as_bytes(),
        ));
        let mut event = VumiApiEvent::new(
            account.clone(),
            conversation_key,
            conversation_type,
            event_type,
            Map::new(),
        );
        event.id = id;
        event.root_id = id;
        if let Some(at) = occurred_at {
            event.occurred_at = at;
        }
        let size = serde_json::to_vec(&data).map_or(0, |v| v.len()) + 1024;
        if size > self.max_event_bytes {
            data.remove("record");
            data.insert(
                "record_omitted".into(),
                json!("over limits.max_event_bytes"),
            );
        }
        event.event_data = data;
        match event.encode(self.max_event_bytes) {
            Ok(_) => Ok(event),
            Err(e) => Err(format!(
                "the event it makes is too large for the bus: {e} (limits.max_event_bytes)"
            )),
        }
    }
}

/// Why a report matched no message.
fn unknown_message(account: &AccountKey, report: &Report) -> String {
    let mut names = Vec::new();
    if let Some(id) = &report.message_id {
        names.push(format!("message id {id}"));
    }
    if let Some(remote) = report.remote_ids.first() {
        names.push(format!("provider id {remote}"));
    }
    let channel = match report.channel {
        Channel::Sms => "SMS",
        Channel::Email => "e-mail",
    };
    format!(
        "account {account} sent no {channel} with {}",
        names.join(" or ")
    )
}

/// `url` with the URL secret replaced, fit for logs and answers.
fn redact_secret(url: &str, secret: &str) -> String {
    if secret.is_empty() {
        url.to_string()
    } else {
        url.replace(secret, "{secret}")
    }
}
