//! `send_sms` and the SMS providers it can use: `nats` (a Vumi outbound
//! command to a transport worker), `http` (a generic JSON gateway) and
//! `twilio` (the Twilio Messages API).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::message_template::TemplateChannel;
use crate::options::{self, OptionSpec, Options, rendered_string, required_string};
use crate::ports::{CommandPort, HttpPort, HttpRequest, Method, redact_url};
use crate::records::contacts::normalize_msisdn;
use crate::records::messages::hashed_key;
use crate::records::{Channel, MessageRecord, MessageStatus, Messages, RecordError};
use crate::scheduled;
use crate::templated::{Outgoing, TemplatePorts, TemplateUse};
use crate::{Handler, StepError, StepInput, StepOutput, StepRef};

mod twilio;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An SMS provider of the deployment (`[providers.sms.NAME]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SmsProvider {
    /// Publish a Vumi outbound message to `{prefix}.outbound.{transport}`.
    Nats(NatsSms),
    /// POST JSON to a gateway.
    Http(HttpSms),
    /// The Twilio Messages API.
    Twilio(TwilioSms),
}

/// `type = "nats"`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSms {
    /// The transport worker's name.
    pub transport: String,
    /// Default sender address.
    #[serde(default)]
    pub from: Option<String>,
}

/// `type = "http"`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSms {
    /// The gateway's URL.
    pub url: String,
    /// Default sender address.
    #[serde(default)]
    pub from: Option<String>,
    /// Sent as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    /// How long to wait for the gateway's answer (e.g. `"5s"`; 10 s).
    #[serde(default, deserialize_with = "crate::options::deserialize_timeout")]
    pub timeout: Option<Duration>,
}

/// `type = "twilio"`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioSms {
    /// Account SID (`AC...`).
    pub account_sid: String,
    /// Auth token (also verifies status callbacks).
    pub auth_token: String,
    /// Default sender number.
    #[serde(default)]
    pub from: Option<String>,
    /// Messaging service, used when no `from` is given.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// The API's base URL (tests aim it at a local receiver).
    #[serde(default = "twilio_base_url")]
    pub base_url: String,
    /// Where Twilio posts status callbacks; `{account}` in it is replaced
    /// by the sending account's key, so that each account's messages report
    /// to that account (`{public_url}/v1/inbound/twilio-status/{account}`).
    #[serde(default)]
    pub status_callback: Option<String>,
    /// How long to wait for Twilio's answer (e.g. `"5s"`; 10 s).
    #[serde(default, deserialize_with = "crate::options::deserialize_timeout")]
    pub timeout: Option<Duration>,
}

fn twilio_base_url() -> String {
    "https://api.twilio.com".to_string()
}

impl SmsProvider {
    fn default_from(&self) -> Option<&str> {
        match self {
            SmsProvider::Nats(p) => p.from.as_deref(),
            SmsProvider::Http(p) => p.from.as_deref(),
            SmsProvider::Twilio(p) => p.from.as_deref(),
        }
    }
}

/// `send_sms`.
///
/// Options: an inline message — `to` (a number, or a list of numbers) and
/// `body` — or a template — `template` (an SMS template's slug), `context`
/// and `recipients` (contacts' keys or `{ name, email, phone }` tables),
/// each recipient's text rendered for it; `provider` (a name from the
/// deployment's `[providers.sms]`; optional when there is exactly one),
/// `from`. One message per recipient, each recorded.
/// Output: `message_id`, `remote_id`, `to`, `provider` of the first message
/// and `messages` (all of them).
#[derive(Debug, Clone)]
pub struct SendSms {
    providers: BTreeMap<String, SmsProvider>,
    http: Arc<dyn HttpPort>,
    commands: Arc<dyn CommandPort>,
    messages: Arc<dyn Messages>,
    templated: TemplatePorts,
}

impl SendSms {
    /// The handler over the deployment's providers and ports.
    pub(crate) fn new(
        providers: BTreeMap<String, SmsProvider>,
        http: Arc<dyn HttpPort>,
        commands: Arc<dyn CommandPort>,
        messages: Arc<dyn Messages>,
        templated: TemplatePorts,
    ) -> Self {
        Self {
            providers,
            http,
            commands,
            messages,
            templated,
        }
    }

    fn provider_name<'a>(&'a self, asked: Option<&'a str>) -> Result<&'a str, String> {
        match asked {
            Some(name) if self.providers.contains_key(name) => Ok(name),
            Some(name) => Err(format!(
                "SMS provider {name:?} is not configured in this deployment ({})",
                self.configured()
            )),
            None if self.providers.len() == 1 => {
                Ok(self.providers.keys().next().expect("one provider"))
            }
            None => Err(format!(
                "name the SMS provider to use ({})",
                self.configured()
            )),
        }
    }

    fn configured(&self) -> String {
        if self.providers.is_empty() {
            "none is configured: add [providers.sms.NAME] to the dispatcher's config file"
                .to_string()
        } else {
            format!(
                "configured: {}",
                self.providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    /// Hands `message`, whose whole text is `text` (its record may hold it
    /// cut), to `provider`; the provider's id for it, when it gives one.
    async fn deliver(
        &self,
        provider: &SmsProvider,
        message: &MessageRecord,
        (from, text): (Option<&str>, &str),
    ) -> Result<Option<String>, StepError> {
        match provider {
            SmsProvider::Nats(p) => {
                let command = json!({
                    "message_version": "20110921",
                    "message_type": "user_message",
                    "message_id": message.id,
                    "timestamp": vumi_timestamp(message.created_at),
                    "to_addr": message.recipient,
                    "from_addr": from,
                    "content": text,
                    "transport_name": p.transport,
                    "transport_type": "sms",
                    "in_reply_to": null,
                    "session_event": null,
                    "transport_metadata": {},
                    "helper_metadata": {"switchboard": {
                        "account_key": message.account_key,
                        "event_id": message.event_id,
                        "chain": message.chain,
                        "step": message.step,
                    }},
                });
                let subject = format!("outbound.{}", p.transport);
                self.commands
                    .publish(
                        &subject,
                        serde_json::to_vec(&command).expect("JSON serialises"),
                        &message.id,
                    )
                    .await
                    .map_err(|e| {
                        StepError::retryable(
                            format!("publishing to {}: {e}", self.commands.subject(&subject)),
                            None,
                        )
                    })?;
                Ok(None)
            }
            SmsProvider::Http(p) => {
                let body = json!({
                    "message_id": message.id,
                    "to": message.recipient,
                    "from": from,
                    "content": text,
                    "account_key": message.account_key,
                    "event_id": message.event_id,
                });
                let mut headers = vec![
                    ("content-type".to_string(), "application/json".to_string()),
                    ("idempotency-key".to_string(), message.id.clone()),
                ];
                if let Some(token) = &p.token {
                    headers.push(("authorization".to_string(), format!("Bearer {token}")));
                }
                let response = self
                    .http
                    .send(HttpRequest {
                        method: Method::Post,
                        url: p.url.clone(),
                        headers,
                        body: serde_json::to_vec(&body).expect("JSON serialises"),
                        basic_auth: None,
                        timeout: p.timeout.unwrap_or(DEFAULT_TIMEOUT),
                        provider: message.provider.clone(),
                        from_account: false,
                    })
                    .await?;
                response.check(&format!("SMS gateway {}", redact_url(&p.url)))?;
                let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                Ok(answer
                    .get("id")
                    .or_else(|| answer.get("message_id"))
                    .and_then(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .or_else(|| v.as_u64().map(|n| n.to_string()))
                    }))
            }
            SmsProvider::Twilio(p) => {
                let url = twilio::messages_url(p);
                let body = {
                    let mut form = form_urlencoded::Serializer::new(String::new());
                    form.append_pair("To", &message.recipient);
                    form.append_pair("Body", text);
                    match (from, &p.messaging_service_sid) {
                        (Some(from), _) => form.append_pair("From", from),
                        (None, Some(sid)) => form.append_pair("MessagingServiceSid", sid),
                        (None, None) => {
                            return Err(no_twilio_sender());
                        }
                    };
                    if let Some(callback) = &p.status_callback {
                        let callback = callback.replace("{account}", message.account_key.as_str());
                        form.append_pair("StatusCallback", &callback);
                    }
                    form.finish().into_bytes()
                };
                let response = self
                    .http
                    .send(HttpRequest {
                        method: Method::Post,
                        url: url.clone(),
                        headers: vec![(
                            "content-type".to_string(),
                            "application/x-www-form-urlencoded".to_string(),
                        )],
                        body,
                        basic_auth: Some((p.account_sid.clone(), p.auth_token.clone())),
                        timeout: p.timeout.unwrap_or(DEFAULT_TIMEOUT),
                        provider: message.provider.clone(),
                        from_account: false,
                    })
                    .await?;
                response.check("Twilio")?;
                let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                Ok(answer
                    .get("sid")
                    .and_then(Value::as_str)
                    .map(str::to_string))
            }
        }
    }
}

impl SendSms {
    /// Hands `record` to `provider` and records it `sent`, with the
    /// provider's id; unless Twilio has it already from an attempt that got
    /// no answer ([`twilio`]), when it is recorded `sent` with the id
    /// Twilio gave it then.
    async fn hand_over(
        &self,
        (provider, provider_name): (&SmsProvider, &str),
        mut record: MessageRecord,
        (from, text): (Option<&str>, &str),
    ) -> Result<MessageRecord, StepError> {
        let recording =
            |e: RecordError| StepError::retryable(format!("recording the message: {e}"), None);
        let mut cause = format!("accepted by {provider_name}");
        let remote_id = match (provider, record.handed_over_at()) {
            (SmsProvider::Twilio(p), Some(since)) => {
                twilio::answer_settled(p, &record, since)?;
                // Looked for, and sent again if Twilio lacks it, as it was
                // handed over, not as it renders now (a template's `now`,
                // a contact changed since): the recorded text, unless the
                // record keeps only part of it, from the recorded sender
                // (in E.164, as Twilio lists it).
                let text = match record.cut {
                    None => record.body.clone(),
                    Some(_) => text.to_string(),
                };
                let from = from.map(|f| record.sender.clone().unwrap_or_else(|| f.to_string()));
                let (from, text) = (from.as_deref(), text.as_str());
                let found = twilio::find_earlier(
                    p,
                    self.http.as_ref(),
                    self.messages.as_ref(),
                    (&record, from, text),
                    since,
                )
                .await?;
                match found {
                    Some(sid) => {
                        cause = format!(
                            "found at {provider_name} as {sid} after an attempt with no answer: \
                             not sent again"
                        );
                        Some(sid)
                    }
                    None => self.deliver(provider, &record, (from, text)).await?,
                }
            }
            (SmsProvider::Twilio(_), None) => {
                let handing = format!(
                    "handed to {provider_name}, which takes no idempotency key: a retry asks it \
                     for the message before sending it again"
                );
                record = (self.messages)
                    .transition_known(&record, MessageStatus::Sending, &handing, None)
                    .map_err(recording)?
                    .unwrap_or(record);
                // Durable before Twilio is asked: a crash must not leave a
                // message Twilio has looking unsent.
                (self.messages)
                    .flush(&record.account_key)
                    .await
                    .map_err(recording)?;
                self.deliver(provider, &record, (from, text)).await?
            }
            _ => self.deliver(provider, &record, (from, text)).await?,
        };
        Ok((self.messages)
            .transition_known(&record, MessageStatus::Sent, &cause, remote_id)
            .map_err(recording)?
            .unwrap_or(record))
    }
}

/// Vumi's timestamp format: `2026-11-22 07:00:00.000000`.
fn vumi_timestamp(t: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]"
    );
    t.format(&format).unwrap_or_default()
}

/// The recipients an option gives: one string or a list of them.
pub(crate) fn recipients(config: &Map<String, Value>, key: &str) -> Result<Vec<String>, StepError> {
    match config.get(key) {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Number(n)) => Ok(vec![n.to_string()]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(StepError::permanent(format!(
                    "config.{key}: {other} is not a recipient"
                ))),
            })
            .collect(),
        None => Err(StepError::permanent(format!(
            "config.{key}: required option is missing"
        ))),
        Some(other) => Err(StepError::permanent(format!(
            "config.{key}: must give a recipient or a list of them, but gave {other}"
        ))),
    }
}

/// The recipients at `key`, each normalised by `normalize` (E.164, a
/// lower-case address); one that is not a valid address fails the step.
pub(crate) fn normalized_recipients(
    config: &Map<String, Value>,
    key: &str,
    normalize: fn(&str) -> Result<String, String>,
) -> Result<Vec<String>, StepError> {
    recipients(config, key)?
        .iter()
        .map(|r| normalize(r).map_err(|e| StepError::permanent(format!("config.{key}: {e}"))))
        .collect()
}

/// A messaging step's output: the first message's `fields` at the top,
/// `provider`, and every message.
pub(crate) fn messages_output(sent: Vec<Value>, provider: &str, fields: &[&str]) -> StepOutput {
    let mut output = Map::new();
    if let Some(first) = sent.first() {
        for k in fields {
            output.insert((*k).into(), first[*k].clone());
        }
    }
    output.insert("provider".into(), json!(provider));
    output.insert("messages".into(), Value::Array(sent));
    StepOutput::next(output)
}

#[async_trait::async_trait]
impl Handler for SendSms {
    fn name(&self) -> &'static str {
        "send_sms"
    }

    fn description(&self) -> &'static str {
        "Sends an SMS to each recipient through one of the deployment's SMS providers, recording \
         each message; a step run again does not send again what was sent."
    }

    fn output(&self) -> &'static str {
        "`message_id`, `remote_id`, `to` and `status` of the first message, `provider`, and \
         `messages` (all of them)"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::recipients(
                "to",
                "The phone number to send to (E.164), or a list of them.",
                normalize_msisdn,
            ),
            OptionSpec::text("body", "The message's text."),
            OptionSpec::text(
                "template",
                "An SMS template of the account (`switchboard templates`), by slug, instead \
                 of an inline message.",
            ),
            OptionSpec::table(
                "context",
                "The data the template renders (checked against its schema before anything is sent).",
            ),
            OptionSpec::people(
                "recipients",
                "Whom a template is sent to: contacts (by key, msisdn or e-mail) or \
                 { name, email, phone } tables; each gets the template rendered for it.",
            ),
            options::provider("SMS", "sms", self.providers.keys().cloned().collect()),
            OptionSpec::text("from", "The sender (default: the provider's)."),
            scheduled::option(),
        ])
        .alternatives(crate::email::INLINE_OR_TEMPLATE(&["to", "body"]))
    }

    fn cancel_paused(
        &self,
        account: &switchboard_sdk::AccountKey,
        output: &Map<String, Value>,
        cause: &str,
    ) -> Result<(), RecordError> {
        scheduled::cancel_held(
            (self.messages.as_ref(), self.templated.idempotency.as_ref()),
            account,
            output,
            cause,
        )
    }

    fn failed_for_good(
        &self,
        step: &StepRef<'_>,
        error: &str,
        replayable: bool,
    ) -> Result<bool, RecordError> {
        crate::templated::give_up(
            (self.messages.as_ref(), self.templated.idempotency.as_ref()),
            step,
            (error, replayable),
        )
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let now = switchboard_sdk::now();
        let Prepared {
            provider_name,
            from,
            messages,
            template,
            scheduled_at,
        } = self.prepare(input, now)?;
        let provider = &self.providers[&provider_name];
        let mut sent = Vec::with_capacity(messages.len());
        let mut records = Vec::with_capacity(messages.len());
        for (i, outgoing) in messages.into_iter().enumerate() {
            let (recipient, body) =
                match self
                    .templated
                    .admit(input, i, template.as_ref(), outgoing)?
                {
                    Outgoing::Skip { shown, reason } => {
                        let mut line = self.templated.skip(
                            self.messages.as_ref(),
                            input,
                            (i, Channel::Sms, template.as_ref()),
                            (shown, provider_name.clone()),
                            reason,
                        )?;
                        line.insert("remote_id".into(), Value::Null);
                        sent.push(Value::Object(line));
                        continue;
                    }
                    Outgoing::Send { address, rendered } => (address, rendered),
                };
            // Claimed by `admit`: given back if the send fails for good.
            let key = template.as_ref().zip(body.idempotency.as_deref());
            let text = body.text.clone().unwrap_or_default();
            let record = self
                .messages
                .record(
                    MessageRecord {
                        template: template.as_ref().map(TemplateUse::reference),
                        scheduled_at,
                        idempotency_key: body.idempotency.as_deref().map(hashed_key),
                        // As replies name it: a number in E.164.
                        sender: from
                            .as_deref()
                            .map(|f| normalize_msisdn(f).unwrap_or_else(|_| f.to_string())),
                        ..MessageRecord::for_step(
                            input,
                            i,
                            Channel::Sms,
                            recipient,
                            text.clone(),
                            None,
                            provider_name.clone(),
                        )
                    }
                    .capped(self.templated.body_cap),
                )
                .map_err(|e| StepError::retryable(format!("recording the message: {e}"), None))?;
            let record = scheduled::fall_due(self.messages.as_ref(), record, now)?;
            // Cancelled before its time (`messages cancel`): nothing goes,
            // so the claim `admit` made again is given back.
            if record.status == MessageStatus::Cancelled
                && let Some((used, key)) = key
            {
                self.templated.release(input, i, &used.slug, key);
            }
            let template_key = template.as_ref().map(|t| (t, key.map(|(_, k)| k)));
            if let Some(mut line) = self.templated.suppress(
                (self.messages.as_ref(), input),
                i,
                &record,
                template_key,
            )? {
                line.insert("remote_id".into(), Value::Null);
                sent.push(Value::Object(line));
                continue;
            }
            // A re-run step does not send again what was already sent.
            let record = if record.unsent() {
                match self
                    .hand_over(
                        (provider, &provider_name),
                        record.clone(),
                        (from.as_deref(), &text),
                    )
                    .await
                {
                    Ok(record) => record,
                    Err(e) => {
                        if !e.is_retryable() {
                            if let Some((used, key)) = key {
                                self.templated.release(input, i, &used.slug, key);
                            }
                            let _ = self.messages.transition(
                                &record.account_key,
                                &record.id,
                                MessageStatus::Failed,
                                &e.to_string(),
                                None,
                            );
                        }
                        return Err(e);
                    }
                }
            } else {
                record
            };
            sent.push(json!({
                "message_id": record.id,
                "remote_id": record.remote_id,
                "to": record.recipient,
                "status": record.status,
            }));
            records.push(record);
        }
        let output = sms_output(sent, &provider_name, template.as_ref());
        Ok(scheduled::hold(output, &records))
    }

    /// The messages it would send, each `simulated`, with the ids they
    /// would have; no provider's id, which only sending tells.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let prepared = self.prepare(input, switchboard_sdk::now())?;
        let status = scheduled::simulated_status(prepared.scheduled_at);
        let mut sent = Vec::with_capacity(prepared.messages.len());
        for (i, outgoing) in prepared.messages.into_iter().enumerate() {
            let id = input.child_id(i).to_string();
            sent.push(match outgoing {
                Outgoing::Send { address, .. } => {
                    let at = (Channel::Sms, address.as_str());
                    match (self.templated).suppression(input, at, prepared.template.as_ref())? {
                        Some(reason) => json!({"message_id": id, "remote_id": null,
                            "to": address, "status": MessageStatus::Suppressed, "reason": reason}),
                        None => json!({"message_id": id, "remote_id": null, "to": address,
                            "status": status}),
                    }
                }
                Outgoing::Skip { shown, reason } => json!({"message_id": id, "remote_id": null,
                    "to": shown, "status": MessageStatus::Skipped, "reason": reason}),
            });
        }
        let output = sms_output(sent, &prepared.provider_name, prepared.template.as_ref());
        Ok(scheduled::simulated(output, prepared.scheduled_at))
    }
}

/// What a `send_sms` step sends, from its rendered config.
struct Prepared {
    provider_name: String,
    from: Option<String>,
    /// One per recipient, in order (numbers E.164).
    messages: Vec<Outgoing>,
    /// The template, when one is sent.
    template: Option<TemplateUse>,
    /// When to send, if that is still to come.
    scheduled_at: Option<time::OffsetDateTime>,
}

impl SendSms {
    /// Renders and checks the step's config: everything the step checks
    /// before it sends anything.
    fn prepare(
        &self,
        input: &StepInput<'_>,
        now: time::OffsetDateTime,
    ) -> Result<Prepared, StepError> {
        let config = input.render_config()?;
        let scheduled_at = scheduled::from_config(&config, now)?;
        let provider_name = self
            .provider_name(config.get("provider").and_then(Value::as_str))
            .map_err(StepError::permanent)?
            .to_string();
        let provider = &self.providers[&provider_name];
        let from = rendered_string(&config, "from")?
            .or_else(|| provider.default_from().map(str::to_string));
        if let SmsProvider::Twilio(p) = provider
            && from.is_none()
            && p.messaging_service_sid.is_none()
        {
            return Err(no_twilio_sender());
        }
        if config.contains_key("template") {
            let (used, messages) = self
                .templated
                .prepare(input, &config, TemplateChannel::Sms)?
                .split();
            return Ok(Prepared {
                provider_name,
                from,
                messages,
                template: Some(used),
                scheduled_at,
            });
        }
        let body = required_string(&config, "body")?;
        let messages = normalized_recipients(&config, "to", normalize_msisdn)?
            .into_iter()
            .map(|address| Outgoing::Send {
                address,
                rendered: crate::message_template::Rendered {
                    text: Some(body.clone()),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Prepared {
            provider_name,
            from,
            messages,
            template: None,
            scheduled_at,
        })
    }
}

/// Twilio is given neither a sender nor a messaging service (checked
/// before sending, and where the request is built).
fn no_twilio_sender() -> StepError {
    StepError::permanent(
        "twilio needs a sender: set `from` on the step or the provider, or messaging_service_sid",
    )
}

/// A `send_sms` step's output: with `template` (`slug`, `version`) when it
/// sent one.
fn sms_output(sent: Vec<Value>, provider_name: &str, template: Option<&TemplateUse>) -> StepOutput {
    let mut output = messages_output(
        sent,
        provider_name,
        &["message_id", "remote_id", "to", "status"],
    );
    if let Some(used) = template {
        output.data.insert("template".into(), used.output());
    }
    output
}
