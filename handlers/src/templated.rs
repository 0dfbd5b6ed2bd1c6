//! Sending with a message template ([`crate::message_template`]): a
//! `send_email` or `send_sms` step's `template`, `context` and
//! `recipients`, resolved into one message per recipient, each rendered
//! with that recipient in scope.
//!
//! The context is checked against the template's schema before anything is
//! sent (a failure is permanent and names the field and the rule). A
//! recipient is a contact (by key, msisdn or e-mail), whose `recipient` is
//! `key`, `name`, `email`, `phone`, `language` and `fields`; or a
//! `{ name, email, phone }` table, which is its `recipient` as given. One
//! without an address for the channel is not sent to, and says why.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::message_template::{Rendered, TemplateChannel, TemplateStore, TemplateStoreError};
use crate::records::contacts::{normalize_email, normalize_msisdn};
use crate::records::messages::record_skipped;
use crate::records::{
    Channel, Contacts, IdempotencyKeys, MessageRecord, MessageStatus, Messages, Preferences,
};
use crate::{StepError, StepInput};

/// What a templated send sends.
#[derive(Debug)]
pub(crate) struct Templated {
    /// The template's slug.
    pub slug: String,
    /// The version used.
    pub version: u64,
    /// Its category, if it has one.
    pub category: Option<String>,
    /// How long a message's idempotency key holds.
    pub window: std::time::Duration,
    /// One per recipient, in the order given.
    pub messages: Vec<Outgoing>,
}

/// The template a send used.
#[derive(Debug, Clone)]
pub(crate) struct TemplateUse {
    /// Its slug.
    pub slug: String,
    /// The version.
    pub version: u64,
    /// Its category, if it has one.
    pub category: Option<String>,
    /// How long a message's idempotency key holds.
    pub window: std::time::Duration,
}

impl Templated {
    /// The template used, apart from the messages.
    pub fn split(self) -> (TemplateUse, Vec<Outgoing>) {
        (
            TemplateUse {
                slug: self.slug,
                version: self.version,
                category: self.category,
                window: self.window,
            },
            self.messages,
        )
    }
}

impl TemplateUse {
    /// As a message record keeps it.
    pub fn reference(&self) -> crate::records::messages::TemplateRef {
        crate::records::messages::TemplateRef {
            slug: self.slug.clone(),
            version: self.version,
            category: self.category.clone(),
        }
    }

    /// As a step's output shows it.
    pub fn output(&self) -> Value {
        json!({"slug": self.slug, "version": self.version})
    }
}

/// The scope a template's idempotency keys are claimed in (with the
/// template's slug): across the account's chains and steps.
const KEY_SCOPE: &str = "~template";

/// Gives back the template idempotency key a message `record` claimed,
/// now that it will not go (it was cancelled before its time, or its step
/// failed for good), so that another message may be sent with the key
/// within the window.
pub fn release_recorded(idempotency: &dyn IdempotencyKeys, record: &MessageRecord) {
    let (Some(template), Some(hashed)) = (&record.template, &record.idempotency_key) else {
        return;
    };
    if let Err(e) = idempotency.release_hashed(
        &record.account_key,
        KEY_SCOPE,
        &template.slug,
        hashed,
        &record.id,
    ) {
        tracing::warn!(account = %record.account_key, template = template.slug, message_id = record.id,
            error = %e, "giving an unsent message's idempotency key back failed; the key holds until its window ends");
    }
}

/// A send `step` failed for good (its error was permanent, its retries ran
/// out, or its run ended before its next attempt) with `error`: each
/// message it recorded that was not accepted by its provider (`pending`,
/// or `scheduled` for a time past) is recorded `failed`, naming `error`,
/// and gives its template idempotency key back, so that neither stays as
/// if still to go. (A provider whose answer was lost, a timeout after the
/// SMTP DATA say, may have it all the same.) A message handed to Twilio
/// with no answer (`sending`) is left as it is, and so, when the step is
/// `replayable` (its run ended in dead letters), is one scheduled for a
/// time still to come: replaying the letter runs the step again, which
/// holds it until then, claims the keys anew and sends the failed ones.
/// Whether any message went (or may have: `sending`).
pub(crate) fn give_up(
    (messages, idempotency): (&dyn Messages, &dyn IdempotencyKeys),
    step: &crate::StepRef<'_>,
    (error, replayable): (&str, bool),
) -> Result<bool, crate::records::RecordError> {
    let account = &step.event.account_key;
    let cause = format!("not sent: its step failed for good: {error}");
    let now = switchboard_sdk::now();
    let mut went = false;
    // A step records its messages in order, one per recipient, each before
    // it sends: the first index without a record is past the last.
    for index in 0.. {
        let id = step.child_id(index).to_string();
        let Some(record) = messages.get(account, &id)? else {
            break;
        };
        match record.status {
            // Its time is still to come (the step failed before it): a
            // replay holds it until then.
            MessageStatus::Scheduled
                if replayable && record.scheduled_at.is_some_and(|at| at > now) =>
            {
                continue;
            }
            MessageStatus::Scheduled | MessageStatus::Pending => {}
            MessageStatus::Failed
            | MessageStatus::Skipped
            | MessageStatus::Suppressed
            | MessageStatus::Cancelled => continue,
            _ => {
                went = true;
                continue;
            }
        }
        if let Some((record, true)) =
            messages.transition_from(account, &id, record.status, MessageStatus::Failed, &cause)?
        {
            release_recorded(idempotency, &record);
        }
    }
    Ok(went)
}

/// One recipient's message.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// To send to `address`, as rendered for its recipient.
    Send {
        /// The normalised address (e-mail or msisdn).
        address: String,
        /// Every part, rendered.
        rendered: Rendered,
    },
    /// Not sent: the recipient (as shown) and why.
    Skip {
        /// The recipient: an address, a name or a contact's key.
        shown: String,
        /// Why nothing is sent to it.
        reason: String,
    },
}

/// Where templated sends find templates and contacts, and claim their
/// idempotency keys.
#[derive(Debug, Clone)]
pub(crate) struct TemplatePorts {
    /// The account templates (none: a dispatcher without a template store).
    pub templates: Option<Arc<TemplateStore>>,
    /// The account contacts.
    pub contacts: Arc<dyn Contacts>,
    /// Where a template's `idempotency` keys are claimed.
    pub idempotency: Arc<dyn IdempotencyKeys>,
    /// Who opted out of what: every send is checked against them.
    pub preferences: Arc<dyn Preferences>,
    /// The most of each body a message record keeps, in bytes.
    pub body_cap: usize,
}

impl TemplatePorts {
    /// Resolves a step's rendered `config` (its `template`, `context` and
    /// `recipients`) for `channel`: everything checked before anything is
    /// sent.
    pub fn prepare(
        &self,
        input: &StepInput<'_>,
        config: &Map<String, Value>,
        channel: TemplateChannel,
    ) -> Result<Templated, StepError> {
        let account = &input.event.account_key;
        let slug = match config.get("template") {
            Some(Value::String(s)) => s.clone(),
            other => {
                return Err(StepError::permanent(format!(
                    "config.template: must be a template's slug, not {}",
                    other.map_or("nothing".to_string(), Value::to_string)
                )));
            }
        };
        let store = self.templates.as_ref().ok_or_else(|| {
            StepError::permanent("this dispatcher has no template store".to_string())
        })?;
        let compiled = match store.compiled(account, &slug) {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(StepError::permanent(format!(
                    "account {account} has no template named {slug:?} (`switchboard templates put {account} {slug} FILE`)"
                )));
            }
            Err(TemplateStoreError::Records(e)) => {
                return Err(StepError::retryable(
                    format!("reading template {slug:?}: {e}"),
                    None,
                ));
            }
            Err(e) => return Err(StepError::permanent(e.to_string())),
        };
        let template = &compiled.compiled;
        if template.channel() != channel {
            return Err(StepError::permanent(format!(
                "template {slug:?} is an {} template; this step sends {}",
                template.channel().name(),
                channel.name()
            )));
        }
        let context = config
            .get("context")
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        template.check_context(&context).map_err(|e| {
            StepError::permanent(format!("template {slug:?} v{}: {e}", compiled.version))
        })?;
        let people = match config.get("recipients") {
            Some(Value::Array(items)) => items.clone(),
            Some(one) => vec![one.clone()],
            None => Vec::new(),
        };
        let mut messages = Vec::with_capacity(people.len());
        for person in people {
            let recipient = match self.recipient(input, person)? {
                Ok(r) => r,
                Err(skip) => {
                    messages.push(skip);
                    continue;
                }
            };
            let mut recipient = recipient;
            let address = match address(&recipient, channel) {
                Ok((field, a)) => {
                    // Templates (and idempotency keys) see the address
                    // as it is sent to.
                    recipient[field] = json!(a);
                    a
                }
                Err(reason) => {
                    messages.push(Outgoing::Skip {
                        shown: shown(&recipient),
                        reason,
                    });
                    continue;
                }
            };
            let rendered = template.render(&context, &recipient).map_err(|e| {
                StepError::permanent(format!(
                    "template {slug:?} v{} for {address}: {e}",
                    compiled.version
                ))
            })?;
            messages.push(Outgoing::Send { address, rendered });
        }
        Ok(Templated {
            slug,
            version: compiled.version,
            category: template.category().map(str::to_string),
            window: template.idempotency_window(),
            messages,
        })
    }

    /// Message `index` as it is to go out: a send whose template's
    /// `idempotency` key (rendered for its recipient) another message holds
    /// within the template's window becomes a skip; otherwise the key is
    /// claimed for it. The claimant is the message's own id, so a step run
    /// again wins its own claim.
    pub fn admit(
        &self,
        input: &StepInput<'_>,
        index: usize,
        template: Option<&TemplateUse>,
        outgoing: Outgoing,
    ) -> Result<Outgoing, StepError> {
        let (Some(used), Outgoing::Send { address, rendered }) = (template, &outgoing) else {
            return Ok(outgoing);
        };
        let Some(key) = rendered.idempotency.as_deref() else {
            return Ok(outgoing);
        };
        let claimant = input.child_id(index).to_string();
        match self.idempotency.claim(
            &input.event.account_key,
            KEY_SCOPE,
            &used.slug,
            key,
            used.window,
            &claimant,
        ) {
            Ok(true) => Ok(outgoing),
            Ok(false) => Ok(Outgoing::Skip {
                shown: address.clone(),
                reason: format!(
                    "template {:?}: idempotency key {key:?} was sent to within {}",
                    used.slug,
                    humantime_window(used.window)
                ),
            }),
            Err(e) => Err(StepError::retryable(
                format!("claiming template {:?}'s idempotency key: {e}", used.slug),
                None,
            )),
        }
    }

    /// Why a message of `template` on `channel` is not to go to `address`,
    /// if it opted out of it ([`Preferences`]).
    pub fn suppression(
        &self,
        input: &StepInput<'_>,
        (channel, address): (Channel, &str),
        template: Option<&TemplateUse>,
    ) -> Result<Option<String>, StepError> {
        let preferences = self
            .preferences
            .get(&input.event.account_key, channel, address)
            .map_err(|e| {
                StepError::retryable(format!("reading the preferences of {address}: {e}"), None)
            })?;
        let topic = template.map(|t| (t.slug.as_str(), t.category.as_deref()));
        Ok(preferences.and_then(|p| p.suppression(topic)))
    }

    /// Message `index`'s `record`, about to go, as its recipient's
    /// preferences allow: one still to be sent (pending, or failed and run
    /// again) to an address that opted out is recorded `suppressed` (and its
    /// template's idempotency key given back); the step's line for it.
    /// `None` when it is to go (or went already: a record further along is
    /// left as it is, a `sending` one included, which may have gone).
    pub fn suppress(
        &self,
        (messages, input): (&dyn Messages, &StepInput<'_>),
        index: usize,
        record: &MessageRecord,
        template: Option<(&TemplateUse, Option<&str>)>,
    ) -> Result<Option<Map<String, Value>>, StepError> {
        if !matches!(
            record.status,
            MessageStatus::Pending | MessageStatus::Failed
        ) {
            return Ok(None);
        }
        let Some(reason) = self.suppression(
            input,
            (record.channel, &record.recipient),
            template.map(|(t, _)| t),
        )?
        else {
            return Ok(None);
        };
        let moved = messages
            .transition_from(
                &record.account_key,
                &record.id,
                record.status,
                MessageStatus::Suppressed,
                &reason,
            )
            .map_err(|e| StepError::retryable(format!("recording the message: {e}"), None))?;
        if let Some((used, Some(key))) = template {
            self.release(input, index, &used.slug, key);
        }
        let status = moved.map_or(record.status, |(m, _)| m.status);
        let mut line = Map::new();
        line.insert("message_id".into(), json!(record.id));
        line.insert("to".into(), json!(record.recipient));
        line.insert("status".into(), json!(status));
        line.insert("reason".into(), json!(reason));
        Ok(Some(line))
    }

    /// Records message `index` (to `shown`, on `channel`, from `template`
    /// if one) as skipped for `reason`; returns its line of the step's
    /// `messages`.
    pub fn skip(
        &self,
        messages: &dyn Messages,
        input: &StepInput<'_>,
        (index, channel, template): (usize, Channel, Option<&TemplateUse>),
        (shown, provider): (String, String),
        reason: String,
    ) -> Result<Map<String, Value>, StepError> {
        let record = record_skipped(
            messages,
            input,
            (index, channel, template),
            (shown, provider),
            &reason,
        )?;
        let mut line = Map::new();
        line.insert("message_id".into(), json!(record.id));
        line.insert("to".into(), json!(record.recipient));
        line.insert("status".into(), json!(record.status));
        line.insert("reason".into(), json!(reason));
        Ok(line)
    }

    /// Gives message `index`'s claim on `key` back: it failed for good, so
    /// another message may be sent with the key.
    pub fn release(&self, input: &StepInput<'_>, index: usize, slug: &str, key: &str) {
        let claimant = input.child_id(index).to_string();
        if let Err(e) =
            self.idempotency
                .release(&input.event.account_key, KEY_SCOPE, slug, key, &claimant)
        {
            tracing::warn!(account = %input.event.account_key, template = slug, error = %e,
                "giving a failed message's idempotency key back failed; the key holds until its window ends");
        }
    }

    /// A recipient as templates see it, or why there is none.
    fn recipient(
        &self,
        input: &StepInput<'_>,
        person: Value,
    ) -> Result<Result<Value, Outgoing>, StepError> {
        let account = &input.event.account_key;
        match person {
            Value::String(id) => match self.contacts.lookup(account, &id) {
                Ok(Some(c)) => Ok(Ok(c.as_recipient())),
                Ok(None) => Ok(Err(Outgoing::Skip {
                    shown: id.clone(),
                    reason: format!("account {account} has no contact {id:?}"),
                })),
                Err(e) => Err(StepError::retryable(
                    format!("looking up contact {id:?}: {e}"),
                    None,
                )),
            },
            person @ Value::Object(_) => Ok(Ok(person)),
            other => Ok(Err(Outgoing::Skip {
                shown: other.to_string(),
                reason: "a recipient is a contact's key or a { name, email, phone } table"
                    .to_string(),
            })),
        }
    }
}

/// The recipient's address for `channel` (its field and the address,
/// normalised), or why it has none.
fn address(recipient: &Value, channel: TemplateChannel) -> Result<(&'static str, String), String> {
    type Normalize = fn(&str) -> Result<String, String>;
    let (field, what, normalize): (&'static str, &str, Normalize) = match channel {
        TemplateChannel::Email => ("email", "e-mail address", normalize_email),
        TemplateChannel::Sms => ("phone", "phone number", normalize_msisdn),
        // `prepare` checked the channel: in-app templates are `notify`'s.
        TemplateChannel::Inbox => {
            return Err("an in-app template has no address to send to".into());
        }
    };
    match recipient.get(field) {
        Some(Value::String(raw)) if !raw.trim().is_empty() => normalize(raw)
            .map(|a| (field, a))
            .map_err(|e| format!("{field} {raw:?} is not a valid {what}: {e}")),
        _ => Err(format!("the recipient has no {what}")),
    }
}

/// The recipient as a record shows it: its address for any channel, its
/// name or its key.
fn shown(recipient: &Value) -> String {
    ["email", "phone", "name", "key"]
        .iter()
        .find_map(|k| recipient.get(*k).and_then(Value::as_str))
        .unwrap_or("(unnamed)")
        .to_string()
}

/// A window as people write it: `24h`, `90m`, `45s`.
fn humantime_window(window: std::time::Duration) -> String {
    let secs = window.as_secs();
    if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}
