//! `send_email`: an e-mail with a plain-text part and an optional HTML part
//! (its templates auto-escaped), through one of the deployment's SMTP
//! providers. Each message carries its `switchboard_message_id` as a header and
//! as a SendGrid custom argument, so delivery events can be matched back.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use switchboard_rules::FieldProblem;

use crate::message_template::{Rendered, TemplateChannel};
use crate::options::{self, Alternative, OptionSpec, Options, rendered_string, required_string};
use crate::ports::{Attachment, Email, MailPort, Unsubscribe, UnsubscribeLinks};
use crate::records::contacts::normalize_email;
use crate::records::files::{check_file_name, sha256_hex};
use crate::records::messages::{AttachmentRef, hashed_key};
use crate::records::{Channel, Files, MessageRecord, MessageStatus, Messages, RecordError, Topic};
use crate::scheduled;
use crate::sms::{messages_output, normalized_recipients};
use crate::template::is_template;
use crate::templated::{Outgoing, TemplatePorts, TemplateUse};
use crate::{Handler, StepError, StepInput, StepOutput, StepRef};

/// The header that carries the message id.
pub const MESSAGE_ID_HEADER: &str = "X-Switchboard-Message-Id";

/// The id an SMTP server gave the message in its answer (`250 Ok: queued as
/// ID`), recorded as the message's `remote_id`. SendGrid's is the
/// X-Message-Id that starts the `sg_message_id` of its delivery events.
pub fn queue_id(answer: &str) -> Option<String> {
    let (_, rest) = answer.split_once("queued as ")?;
    let id = rest
        .split_whitespace()
        .next()?
        .trim_matches(|c: char| matches!(c, '<' | '>' | ',' | ';' | ')' | '('));
    (!id.is_empty()).then(|| id.to_string())
}

/// `send_email`.
///
/// Options: an inline message — `to` (an address or a list), `subject` and
/// `text`, `html` (optional; values inserted into it are HTML-escaped) — or
/// a template — `template` (an e-mail template's slug), `context` and
/// `recipients` (contacts' keys or `{ name, email, phone }` tables), each
/// recipient's message rendered for it; `provider` (optional when there is
/// exactly one), `from` (default: the provider's). Output: `message_id`,
/// `to`, `status` of the first message and `messages`.
#[derive(Debug, Clone)]
pub struct SendEmail {
    mail: Arc<dyn MailPort>,
    providers: Vec<String>,
    messages: Arc<dyn Messages>,
    templated: TemplatePorts,
    unsubscribe: Option<Arc<dyn UnsubscribeLinks>>,
    files: Arc<dyn Files>,
}

/// The ways of giving a message: inline, or a template.
pub(crate) const INLINE_OR_TEMPLATE: fn(&'static [&'static str]) -> Vec<Alternative> = |inline| {
    vec![
        Alternative {
            what: "an inline message",
            needs: inline,
            only: &["to", "subject", "text", "html", "body"],
        },
        Alternative {
            what: "a template",
            needs: &["template", "recipients"],
            only: &["template", "context", "recipients"],
        },
    ]
};

impl SendEmail {
    /// The handler over the mail port (whose providers are `providers`).
    pub(crate) fn new(
        mail: Arc<dyn MailPort>,
        providers: Vec<String>,
        messages: Arc<dyn Messages>,
        templated: TemplatePorts,
        unsubscribe: Option<Arc<dyn UnsubscribeLinks>>,
        files: Arc<dyn Files>,
    ) -> Self {
        Self {
            mail,
            providers,
            messages,
            templated,
            unsubscribe,
            files,
        }
    }

    /// The files a step's `attachments` name, read from the account's
    /// files: a name the account has no file for fails the step for good.
    async fn attachments(
        &self,
        input: &StepInput<'_>,
        names: &[String],
    ) -> Result<Vec<Attachment>, StepError> {
        let account = &input.event.account_key;
        let mut attached = Vec::with_capacity(names.len());
        for name in names {
            let found = self.files.get(account, name).await.map_err(|e| {
                StepError::retryable(format!("reading attachment {name:?}: {e}"), None)
            })?;
            let Some((info, bytes)) = found else {
                return Err(StepError::permanent(format!(
                    "config.attachments: account {account} has no file {name:?} (`switchboard \
                     files put {account} {name} PATH`)"
                )));
            };
            attached.push((info, bytes));
        }
        Ok(attached
            .into_iter()
            .map(|(info, bytes)| Attachment {
                name: info.name,
                content_type: info.content_type,
                bytes: bytes.into(),
            })
            .collect())
    }

    /// The message's `List-Unsubscribe` and `List-Unsubscribe-Post` headers
    /// (RFC 8058 one-click), when the dispatcher makes links: from the
    /// template's category, else the template, else all e-mail.
    fn unsubscribe_headers(
        &self,
        record: &MessageRecord,
        template: Option<&TemplateUse>,
    ) -> Vec<(String, String)> {
        let Some(links) = &self.unsubscribe else {
            return Vec::new();
        };
        let topic = match template {
            Some(TemplateUse {
                category: Some(category),
                ..
            }) => Topic::Category(category.clone()),
            Some(used) => Topic::Template(used.slug.clone()),
            None => Topic::All,
        };
        let Some(url) = links.url(&Unsubscribe {
            account: record.account_key.clone(),
            channel: Channel::Email,
            address: record.recipient.clone(),
            topic,
            message_id: record.id.clone(),
        }) else {
            return Vec::new();
        };
        vec![
            ("List-Unsubscribe".to_string(), format!("<{url}>")),
            (
                "List-Unsubscribe-Post".to_string(),
                "List-Unsubscribe=One-Click".to_string(),
            ),
        ]
    }

    fn provider_name(&self, asked: Option<&str>) -> Result<String, String> {
        let configured = || {
            if self.providers.is_empty() {
                "none is configured: add [providers.email.NAME] to the dispatcher's config file"
                    .to_string()
            } else {
                format!("configured: {}", self.providers.join(", "))
            }
        };
        match asked {
            Some(name) if self.mail.has_provider(name) => Ok(name.to_string()),
            Some(name) => Err(format!(
                "e-mail provider {name:?} is not configured in this deployment ({})",
                configured()
            )),
            None if self.providers.len() == 1 => Ok(self.providers[0].clone()),
            None => Err(format!(
                "name the e-mail provider to use ({})",
                configured()
            )),
        }
    }
}

#[async_trait::async_trait]
impl Handler for SendEmail {
    fn name(&self) -> &'static str {
        "send_email"
    }

    fn description(&self) -> &'static str {
        "Sends an e-mail to each recipient through one of the deployment's SMTP providers, \
         recording each message; a step run again does not send again what was sent."
    }

    fn output(&self) -> &'static str {
        "`message_id`, `to` and `status` of the first message, `provider`, and `messages` \
         (all of them)"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::recipients(
                "to",
                "The address to send to, or a list of them.",
                normalize_email,
            ),
            OptionSpec::text("subject", "The subject line."),
            OptionSpec::text("text", "The plain-text body."),
            OptionSpec::text(
                "html",
                "An HTML body besides the text; values inserted into it are HTML-escaped.",
            ),
            OptionSpec::text(
                "template",
                "An e-mail template of the account (`switchboard templates`), by slug, \
                 instead of an inline message.",
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
            options::provider("e-mail", "email", self.providers.clone()),
            OptionSpec::text(
                "from",
                "The sender, `Name <address>` or an address (default: the provider's).",
            ),
            OptionSpec::recipients(
                "attachments",
                "Files of the account (`switchboard files put`) to attach, by name, or a list \
                 of them (each may be a template: \"invoice-{{ event.event_data.invoice }}.pdf\").",
                |name| check_file_name(name).map(|()| name.to_string()),
            ),
            scheduled::option(),
        ])
        .alternatives(INLINE_OR_TEMPLATE(&["to", "subject", "text"]))
    }

    /// A literal sender must be one the mail port can send as.
    fn check_config(&self, config: &Map<String, Value>) -> Vec<FieldProblem> {
        match config.get("from") {
            Some(Value::String(from)) if !is_template(from) => match self.mail.check_sender(from) {
                Ok(()) => Vec::new(),
                Err(e) => vec![FieldProblem::new(
                    "config.from",
                    format!("sender {from:?} is not `Name <address>` or an address: {e}"),
                )],
            },
            _ => Vec::new(),
        }
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
            provider,
            from,
            messages,
            template,
            scheduled_at,
            attachments,
        } = self.prepare(input, now)?;
        let attachments = self.attachments(input, &attachments).await?;
        let attached: Vec<AttachmentRef> = attachments
            .iter()
            .map(|a| AttachmentRef {
                name: a.name.clone(),
                content_type: a.content_type.clone(),
                size: a.bytes.len() as u64,
                sha256: sha256_hex(&a.bytes),
            })
            .collect();
        let mut sent = Vec::with_capacity(messages.len());
        let mut records = Vec::with_capacity(messages.len());
        for (i, outgoing) in messages.into_iter().enumerate() {
            let (recipient, rendered) =
                match self
                    .templated
                    .admit(input, i, template.as_ref(), outgoing)?
                {
                    Outgoing::Skip { shown, reason } => {
                        sent.push(Value::Object(self.templated.skip(
                            self.messages.as_ref(),
                            input,
                            (i, Channel::Email, template.as_ref()),
                            (shown, provider.clone()),
                            reason,
                        )?));
                        continue;
                    }
                    Outgoing::Send { address, rendered } => (address, rendered),
                };
            // Claimed by `admit`: given back if the send fails for good.
            let key = template.as_ref().zip(rendered.idempotency.as_deref());
            let subject = rendered.subject.unwrap_or_default();
            let text = rendered.text.unwrap_or_default();
            let record = self
                .messages
                .record(
                    MessageRecord {
                        html: rendered.html.clone(),
                        template: template.as_ref().map(TemplateUse::reference),
                        scheduled_at,
                        idempotency_key: rendered.idempotency.as_deref().map(hashed_key),
                        sender: Some(from.clone()),
                        attachments: attached.clone(),
                        ..MessageRecord::for_step(
                            input,
                            i,
                            Channel::Email,
                            recipient,
                            text.clone(),
                            Some(subject.clone()),
                            provider.clone(),
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
            if let Some(line) = self.templated.suppress(
                (self.messages.as_ref(), input),
                i,
                &record,
                template_key,
            )? {
                sent.push(Value::Object(line));
                continue;
            }
            let record = if record.unsent() {
                let email = Email {
                    from: from.clone(),
                    // The address the message was first recorded for, which
                    // the opt-out check and the unsubscribe link are about:
                    // run again (a retry, a scheduled send falling due, a
                    // replay) after the contact's address changed, it does
                    // not go to the new address unchecked.
                    to: record.recipient.clone(),
                    subject,
                    text,
                    html: rendered.html,
                    headers: [
                        // Replies name it in `In-Reply-To`: how an e-mail
                        // reply finds the message it answers.
                        (
                            "Message-ID".to_string(),
                            format!("<{}@{}>", record.id, sender_domain(&from)),
                        ),
                        (MESSAGE_ID_HEADER.to_string(), record.id.clone()),
                        (
                            "X-SMTPAPI".to_string(),
                            json!({"unique_args": {
                                "switchboard_message_id": record.id,
                                "switchboard_account": record.account_key,
                            }})
                            .to_string(),
                        ),
                    ]
                    .into_iter()
                    .chain(self.unsubscribe_headers(&record, template.as_ref()))
                    .collect(),
                    attachments: attachments.clone(),
                };
                match self.mail.send(&provider, email).await {
                    Ok(answer) => self
                        .messages
                        .transition_known(&record, MessageStatus::Sent, &answer, queue_id(&answer))
                        .map_err(|e| {
                            StepError::retryable(format!("recording the message: {e}"), None)
                        })?
                        .unwrap_or(record),
                    Err(e) => {
                        if e.permanent {
                            if let Some((used, key)) = key {
                                self.templated.release(input, i, &used.slug, key);
                            }
                            let _ = self.messages.transition(
                                &record.account_key,
                                &record.id,
                                MessageStatus::Failed,
                                &e.message,
                                None,
                            );
                        }
                        return Err(e.into());
                    }
                }
            } else {
                record
            };
            sent.push(
                json!({"message_id": record.id, "to": record.recipient, "status": record.status}),
            );
            records.push(record);
        }
        let output = email_output(sent, &provider, template.as_ref());
        Ok(scheduled::hold(output, &records))
    }

    /// The messages it would send, each `simulated`, with the ids they
    /// would have.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let prepared = self.prepare(input, switchboard_sdk::now())?;
        self.attachments(input, &prepared.attachments).await?;
        let status = scheduled::simulated_status(prepared.scheduled_at);
        let mut sent = Vec::with_capacity(prepared.messages.len());
        for (i, outgoing) in prepared.messages.into_iter().enumerate() {
            let id = input.child_id(i).to_string();
            sent.push(match outgoing {
                Outgoing::Send { address, .. } => {
                    let at = (Channel::Email, address.as_str());
                    match (self.templated).suppression(input, at, prepared.template.as_ref())? {
                        Some(reason) => json!({"message_id": id, "to": address,
                            "status": MessageStatus::Suppressed, "reason": reason}),
                        None => json!({"message_id": id, "to": address, "status": status}),
                    }
                }
                Outgoing::Skip { shown, reason } => json!({"message_id": id, "to": shown,
                    "status": MessageStatus::Skipped, "reason": reason}),
            });
        }
        let output = email_output(sent, &prepared.provider, prepared.template.as_ref());
        Ok(scheduled::simulated(output, prepared.scheduled_at))
    }
}

/// The domain of `from` (`Name <a@example.org>` or `a@example.org`), for
/// the Message-IDs of what it sends: a fully qualified one, as spam filters
/// want (`switchboard.invalid` when it has none).
fn sender_domain(from: &str) -> &str {
    from.rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('>').trim())
        .filter(|d| !d.is_empty())
        .unwrap_or("switchboard.invalid")
}

/// What a `send_email` step sends, from its rendered config.
struct Prepared {
    provider: String,
    from: String,
    /// One per recipient, in order.
    messages: Vec<Outgoing>,
    /// The template, when one is sent.
    template: Option<TemplateUse>,
    /// When to send, if that is still to come.
    scheduled_at: Option<time::OffsetDateTime>,
    /// The names of the files to attach.
    attachments: Vec<String>,
}

impl SendEmail {
    /// Renders and checks the step's config: everything the step checks
    /// before it sends anything.
    fn prepare(
        &self,
        input: &StepInput<'_>,
        now: time::OffsetDateTime,
    ) -> Result<Prepared, StepError> {
        // Everything but `html` renders as plain text; `html` with escaping.
        let mut plain = input.step.config.to_map();
        let html_source = plain.remove("html");
        let mut config = Value::Object(plain);
        input
            .templates
            .render_in_place(&mut config, "config", input.scope)
            .map_err(StepError::permanent)?;
        let Value::Object(config) = config else {
            unreachable!("rendering an object in place leaves an object")
        };
        let scheduled_at = scheduled::from_config(&config, now)?;
        let html = match html_source {
            Some(Value::String(source)) => Some(
                input
                    .templates
                    .render_html(&source, "config.html", input.scope)
                    .map_err(StepError::permanent)?,
            ),
            _ => None,
        };
        let provider = self
            .provider_name(config.get("provider").and_then(Value::as_str))
            .map_err(StepError::permanent)?;
        let from = rendered_string(&config, "from")?
            .or_else(|| self.mail.default_from(&provider))
            .ok_or_else(|| {
                StepError::permanent(format!(
                    "no sender: set `from` on the step or on e-mail provider {provider:?}"
                ))
            })?;
        self.mail.check_sender(&from).map_err(|e| {
            StepError::permanent(format!(
                "sender {from:?} is not `Name <address>` or an address: {e}"
            ))
        })?;
        let attachments = match config.get("attachments") {
            None => Vec::new(),
            Some(_) => crate::sms::recipients(&config, "attachments")?
                .into_iter()
                .map(|name| {
                    check_file_name(&name)
                        .map(|()| name)
                        .map_err(|e| StepError::permanent(format!("config.attachments: {e}")))
                })
                .collect::<Result<_, _>>()?,
        };
        if config.contains_key("template") {
            let (used, messages) = self
                .templated
                .prepare(input, &config, TemplateChannel::Email)?
                .split();
            return Ok(Prepared {
                provider,
                from,
                messages,
                template: Some(used),
                scheduled_at,
                attachments,
            });
        }
        let subject = required_string(&config, "subject")?;
        let text = required_string(&config, "text")?;
        let to = normalized_recipients(&config, "to", normalize_email)?;
        let messages = to
            .into_iter()
            .map(|address| Outgoing::Send {
                address,
                rendered: Rendered {
                    subject: Some(subject.clone()),
                    html: html.clone(),
                    text: Some(text.clone()),
                    ..Rendered::default()
                },
            })
            .collect();
        Ok(Prepared {
            provider,
            from,
            messages,
            template: None,
            scheduled_at,
            attachments,
        })
    }
}

/// A `send_email` step's output: with `template` (`slug`, `version`) when
/// it sent one.
fn email_output(sent: Vec<Value>, provider: &str, template: Option<&TemplateUse>) -> StepOutput {
    let mut output = messages_output(sent, provider, &["message_id", "to", "status"]);
    if let Some(used) = template {
        output.data.insert("template".into(), used.output());
    }
    output
}
