//! `notify`: leaves a notification in a person's in-app inbox
//! ([`crate::records::inbox`]).

use std::sync::Arc;

use serde_json::{Map, Value, json};
use switchboard_rules::FieldProblem;

use crate::message_template::{TemplateChannel, TemplateStore, TemplateStoreError};
use crate::options::{Alternative, OptionSpec, Options, rendered_string};
use crate::records::inbox::{
    Audience, CONTENT_TYPES, Content, Notification, broadcast_id, check_action_url, check_label,
    check_receiver, content_of,
};
use crate::records::{Contact, Contacts, Inbox};
use crate::template::is_template;
use crate::{Handler, StepError, StepInput, StepOutput};

/// The category of a notification whose step names none.
const DEFAULT_CATEGORY: &str = "basic";

/// Contacts a broadcast reads, and notifications it makes durable, at a time.
const BROADCAST_BATCH: usize = 200;

/// `notify`.
///
/// Options: `to` (the receiver: a contact's key, or the account's own id
/// for that person; or a broadcast to the account's contacts, `{ all =
/// true }` or `{ field = F, equals = V }`), `content_type` (`text`,
/// `markdown` or `url_action`) and its fields (`body`; `title`, `url`,
/// `action_label` for an action), `category`, `sender`. Output: the
/// notification, or for a broadcast how many it reached.
///
/// A broadcast leaves one notification per matching contact, each under an
/// id made of the step's and the contact's ([`broadcast_id`]), and makes
/// them durable a batch at a time: a step run again after a crash finds
/// those it left and leaves the rest, so nobody is skipped or notified
/// twice.
#[derive(Debug, Clone)]
pub struct Notify {
    inbox: Arc<dyn Inbox>,
    contacts: Arc<dyn Contacts>,
    templates: Option<Arc<TemplateStore>>,
}

/// Where a step's content comes from.
enum Source {
    /// Its config: the same for everyone.
    Inline(Content),
    /// An in-app template of the account, rendered for each receiver.
    Template {
        template: crate::versioned::Current<crate::message_template::MessageTemplates>,
        context: Value,
    },
}

impl Source {
    /// The content for `recipient` (a contact as templates see it, or
    /// `{ "key": receiver }` for a receiver that is not a contact).
    fn content_for(&self, recipient: &Value) -> Result<Content, StepError> {
        let (template, context) = match self {
            Source::Inline(content) => return Ok(content.clone()),
            Source::Template { template, context } => (template, context),
        };
        let about = |e: String| {
            StepError::permanent(format!(
                "template {:?} v{}: {e}",
                template.name, template.version
            ))
        };
        let rendered = template
            .compiled
            .render(context, recipient)
            .map_err(|e| about(e.to_string()))?;
        let mut fields = Map::new();
        fields.insert(
            "content_type".into(),
            json!(template.compiled.content_type().unwrap_or("text")),
        );
        for (field, value) in [
            ("body", rendered.text),
            ("title", rendered.title),
            ("url", rendered.url),
            ("action_label", rendered.action_label),
        ] {
            if let Some(v) = value {
                fields.insert(field.into(), json!(v));
            }
        }
        content_of(&fields).map_err(|e| about(e.replace("config.", "part ")))
    }
}

impl Notify {
    /// The handler over the inboxes, broadcasting to `contacts`, with the
    /// account's message `templates` (none: a step naming one fails).
    pub(crate) fn new(
        inbox: Arc<dyn Inbox>,
        contacts: Arc<dyn Contacts>,
        templates: Option<Arc<TemplateStore>>,
    ) -> Self {
        Self {
            inbox,
            contacts,
            templates,
        }
    }

    /// Where the step's rendered config takes its content from.
    fn source(
        &self,
        input: &StepInput<'_>,
        config: &Map<String, Value>,
    ) -> Result<Source, StepError> {
        let Some(slug) = config.get("template") else {
            return Ok(Source::Inline(
                content_of(config).map_err(StepError::permanent)?,
            ));
        };
        let account = &input.event.account_key;
        let slug = slug.as_str().ok_or_else(|| {
            StepError::permanent(format!(
                "config.template: must be a template's slug, not {slug}"
            ))
        })?;
        let store = self.templates.as_ref().ok_or_else(|| {
            StepError::permanent("this dispatcher has no template store".to_string())
        })?;
        let template = match store.compiled(account, slug) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(StepError::permanent(format!(
                    "config.template: account {account} has no template named {slug:?} \
                     (`switchboard templates put {account} {slug} FILE`)"
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
        if template.compiled.channel() != TemplateChannel::Inbox {
            return Err(StepError::permanent(format!(
                "config.template: {slug:?} is an {} template; notify takes an in-app one \
                 (channel = \"inbox\")",
                template.compiled.channel().name()
            )));
        }
        let context = config
            .get("context")
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        template.compiled.check_context(&context).map_err(|e| {
            StepError::permanent(format!("template {slug:?} v{}: {e}", template.version))
        })?;
        Ok(Source::Template { template, context })
    }

    /// `receiver` as a template sees it: its contact's fields when it is a
    /// contact's key, else just the key.
    fn recipient(&self, input: &StepInput<'_>, receiver: &str) -> Result<Value, StepError> {
        match self.contacts.get(&input.event.account_key, receiver) {
            Ok(Some(contact)) => Ok(contact.as_recipient()),
            Ok(None) => Ok(json!({ "key": receiver })),
            Err(e) => Err(StepError::retryable(
                format!("looking up contact {receiver:?}: {e}"),
                None,
            )),
        }
    }

    /// Whom the step's rendered config is for.
    fn audience(config: &Map<String, Value>) -> Result<Audience, StepError> {
        match config.get("to") {
            Some(Value::Object(table)) => Audience::of_table(table)
                .map_err(|e| StepError::permanent(format!("config.to: {e}"))),
            _ => {
                let receiver = rendered_string(config, "to")?
                    .ok_or_else(|| StepError::permanent("config.to: required option is missing"))?;
                check_receiver(&receiver)
                    .map_err(|e| StepError::permanent(format!("config.to: {e}")))?;
                Ok(Audience::One(receiver))
            }
        }
    }

    /// Leaves the notification `template` with every contact of
    /// `audience`. A contact its template cannot be rendered for (a field
    /// it lacks, a link that is not http) is passed over and reported; the
    /// others still get theirs.
    async fn broadcast(
        &self,
        input: &StepInput<'_>,
        audience: &Audience,
        source: &Source,
        template: &Notification,
    ) -> Result<Broadcast, StepError> {
        let account = &template.account_key;
        let failed = |e: crate::records::RecordError| {
            StepError::retryable(format!("broadcasting the notification: {e}"), None)
        };
        let step = input.child_id(0).to_string();
        let mut done = Broadcast::default();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .contacts
                .list_after(account, after.as_deref(), BROADCAST_BATCH)
                .map_err(failed)?;
            // A short page may only have passed over a record it could not
            // read: the end is an empty one.
            let Some(last) = page.last() else {
                return Ok(done);
            };
            after = Some(last.key.clone());
            for contact in page.iter().filter(|c| audience.admits(c)) {
                done.matched += 1;
                let content = match source.content_for(&Contact::as_recipient(contact)) {
                    Ok(content) => content,
                    Err(e) if !e.is_retryable() => {
                        done.skipped += 1;
                        if done.reasons.len() < 3 {
                            done.reasons.push(format!("contact {}: {e}", contact.key));
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let (_, left_now) = self
                    .inbox
                    .place(Notification {
                        id: broadcast_id(&step, &contact.key),
                        receiver: contact.key.clone(),
                        content,
                        ..template.clone()
                    })
                    .map_err(failed)?;
                done.left += u64::from(left_now);
            }
            self.inbox.flush(account).await.map_err(failed)?;
        }
    }

    /// How many contacts `audience` matches now (a dry run's answer).
    fn count(
        &self,
        account: &switchboard_sdk::AccountKey,
        audience: &Audience,
    ) -> Result<u64, StepError> {
        let mut matched = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .contacts
                .list_after(account, after.as_deref(), BROADCAST_BATCH)
                .map_err(|e| StepError::retryable(format!("reading contacts: {e}"), None))?;
            matched += page.iter().filter(|c| audience.admits(c)).count() as u64;
            match page.last() {
                Some(last) => after = Some(last.key.clone()),
                None => return Ok(matched),
            }
        }
    }

    /// Whom the step is for, where its content comes from, and the
    /// notification its config makes (for one receiver; for a broadcast,
    /// the model of each one, with no receiver yet).
    fn notification(
        &self,
        input: &StepInput<'_>,
    ) -> Result<(Audience, Source, Notification), StepError> {
        let config = input.render_config()?;
        let audience = Self::audience(&config)?;
        let source = self.source(input, &config)?;
        let (receiver, content) = match &audience {
            Audience::One(receiver) => (
                receiver.clone(),
                source.content_for(&self.recipient(input, receiver)?)?,
            ),
            _ => (
                String::new(),
                Content::Text {
                    body: String::new(),
                },
            ),
        };
        let label = |name: &str| -> Result<Option<String>, StepError> {
            let value = rendered_string(&config, name)?.filter(|v| !v.is_empty());
            if let Some(v) = &value {
                check_label(v).map_err(|e| StepError::permanent(format!("config.{name}: {e}")))?;
            }
            Ok(value)
        };
        // The step's, else the template's, else `basic`.
        let category = label("category")?
            .or_else(|| match &source {
                Source::Template { template, .. } => {
                    template.compiled.category().map(str::to_string)
                }
                Source::Inline(_) => None,
            })
            .unwrap_or_else(|| DEFAULT_CATEGORY.to_string());
        let sender = label("sender")?;
        let notification = Notification {
            id: input.child_id(0).to_string(),
            account_key: input.event.account_key.clone(),
            receiver,
            category,
            sender,
            content,
            event_id: input.event.id.to_string(),
            created_at: switchboard_sdk::now(),
            read_at: None,
            archived_at: None,
        };
        Ok((audience, source, notification))
    }
}

/// What a broadcast did.
#[derive(Debug, Default)]
struct Broadcast {
    /// Contacts of the audience.
    matched: u64,
    /// Notifications left by this run (the others by an earlier one).
    left: u64,
    /// Contacts passed over: their content could not be made.
    skipped: u64,
    /// Why, for the first few.
    reasons: Vec<String>,
}

fn broadcast_output(notification: &Notification, source: &Source, done: &Broadcast) -> StepOutput {
    let mut out = Map::new();
    out.insert("broadcast".into(), json!(true));
    out.insert("receivers".into(), json!(done.matched));
    out.insert("left_now".into(), json!(done.left));
    if done.skipped > 0 {
        out.insert("skipped".into(), json!(done.skipped));
        out.insert("skipped_reasons".into(), json!(done.reasons));
    }
    out.insert("category".into(), json!(notification.category));
    match source {
        Source::Inline(content) => {
            out.insert(
                "content".into(),
                serde_json::to_value(content).unwrap_or(Value::Null),
            );
        }
        Source::Template { template, .. } => {
            out.insert(
                "template".into(),
                json!({"slug": template.name, "version": template.version}),
            );
        }
    }
    StepOutput::next(out)
}

fn output(notification: &Notification) -> StepOutput {
    let mut out = Map::new();
    out.insert("notification_id".into(), json!(notification.id));
    out.insert("receiver".into(), json!(notification.receiver));
    out.insert("category".into(), json!(notification.category));
    out.insert(
        "content".into(),
        serde_json::to_value(&notification.content).unwrap_or(Value::Null),
    );
    StepOutput::next(out)
}

#[async_trait::async_trait]
impl Handler for Notify {
    fn name(&self) -> &'static str {
        "notify"
    }

    fn effects(&self) -> crate::Effects {
        crate::Effects::Local
    }

    fn description(&self) -> &'static str {
        "Leaves a notification in a person's in-app inbox: text, Markdown (rendered and \
         sanitised) or an action with a link; a step run again does not leave it twice."
    }

    fn output(&self) -> &'static str {
        "`notification_id`, `receiver`, `category` and `content` (with `html` for Markdown)"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text_or_table(
                "to",
                "Whom it is for: a contact's key, or the account's own id for that person; or \
                 every contact ({ all = true }) or those whose field has a value ({ field = \
                 \"language\", equals = \"fr\" }).",
                |table| Audience::of_table(table).map(|_| ()),
            )
            .required()
            .literal(check_receiver),
            OptionSpec::text("content_type", "What it is: text, markdown or url_action.")
                .default("text")
                .choices(CONTENT_TYPES),
            OptionSpec::text(
                "body",
                "Its text (Markdown for markdown: rendered, raw HTML and javascript: links removed).",
            ),
            OptionSpec::text("title", "url_action: its title."),
            OptionSpec::text("url", "url_action: where it leads (http or https).")
                .literal(check_action_url),
            OptionSpec::text("action_label", "url_action: the button's label."),
            OptionSpec::text(
                "category",
                "Its category (default basic): inboxes filter by it.",
            )
            .literal(check_label),
            OptionSpec::text("sender", "Who it is from, as shown.").literal(check_label),
            OptionSpec::text(
                "template",
                "An in-app template of the account (`switchboard templates`, channel = \
                 \"inbox\"), by slug, instead of inline content; rendered for each receiver.",
            ),
            OptionSpec::table(
                "context",
                "The data the template renders (checked against its schema first).",
            ),
        ])
        .alternatives(vec![
            Alternative {
                what: "inline content",
                needs: &["body"],
                only: &["content_type", "body", "title", "url", "action_label"],
            },
            Alternative {
                what: "a template",
                needs: &["template"],
                only: &["template", "context"],
            },
        ])
    }

    /// A content whose fields are all literals is checked when the chain
    /// is stored; one with templates, when the step runs.
    fn check_config(&self, config: &Map<String, Value>) -> Vec<FieldProblem> {
        if config.contains_key("template") {
            return Vec::new();
        }
        let literal = |v: &Value| v.as_str().is_some_and(|s| !is_template(s));
        let fields = ["content_type", "body", "title", "url", "action_label"];
        if !fields.iter().filter_map(|f| config.get(*f)).all(literal) {
            return Vec::new();
        }
        match content_of(config) {
            Ok(_) => Vec::new(),
            Err(e) => {
                let (field, message) = e.split_once(": ").unwrap_or(("config", e.as_str()));
                vec![FieldProblem::new(field, message)]
            }
        }
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let (audience, source, notification) = self.notification(input)?;
        if !matches!(audience, Audience::One(_)) {
            let done = self
                .broadcast(input, &audience, &source, &notification)
                .await?;
            return Ok(broadcast_output(&notification, &source, &done));
        }
        let stored = self
            .inbox
            .deliver(notification)
            .map_err(|e| StepError::retryable(format!("storing the notification: {e}"), None))?;
        Ok(output(&stored))
    }

    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let (audience, source, notification) = self.notification(input)?;
        if !matches!(audience, Audience::One(_)) {
            let matched = self.count(&notification.account_key, &audience)?;
            let done = Broadcast {
                matched,
                ..Broadcast::default()
            };
            return Ok(broadcast_output(&notification, &source, &done));
        }
        Ok(output(&notification))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_content_is_checked_when_the_chain_is_stored() {
        use crate::records::RecordError;
        use crate::records::inbox::{Cursor, InboxCount, InboxFilter, InboxPage, Mark};
        use switchboard_sdk::AccountKey;
        /// Checking a config reads and writes no inbox.
        #[derive(Debug)]
        struct NoInbox;
        impl Inbox for NoInbox {
            fn place(&self, _: Notification) -> Result<(Notification, bool), RecordError> {
                unreachable!("checking a config delivers nothing")
            }
            fn newest(&self, _: &AccountKey, _: &str) -> Result<Option<Cursor>, RecordError> {
                unreachable!("checking a config reads no inbox")
            }
            fn page(
                &self,
                _: &AccountKey,
                _: &str,
                _: &InboxFilter,
                _: Option<&Cursor>,
                _: usize,
            ) -> Result<InboxPage, RecordError> {
                unreachable!("checking a config reads no inbox")
            }
            fn after(
                &self,
                _: &AccountKey,
                _: &str,
                _: &Cursor,
                _: usize,
            ) -> Result<Vec<Notification>, RecordError> {
                unreachable!("checking a config reads no inbox")
            }
            fn count(&self, _: &AccountKey, _: &str) -> Result<InboxCount, RecordError> {
                unreachable!("checking a config reads no inbox")
            }
            fn mark(
                &self,
                _: &AccountKey,
                _: &str,
                _: &str,
                _: Mark,
            ) -> Result<Option<Notification>, RecordError> {
                unreachable!("checking a config changes no inbox")
            }
            fn read_all(
                &self,
                _: &AccountKey,
                _: &str,
                _: Option<&str>,
            ) -> Result<u64, RecordError> {
                unreachable!("checking a config changes no inbox")
            }
            fn expire(
                &self,
                _: &crate::records::inbox::InboxPolicy,
                _: time::OffsetDateTime,
            ) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
                unreachable!("checking a config changes no inbox")
            }
            fn flush<'a>(
                &'a self,
                _: &'a AccountKey,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<(), RecordError>> + Send + 'a>,
            > {
                unreachable!("checking a config changes no inbox")
            }
        }
        let notify = Notify::new(
            Arc::new(NoInbox),
            Arc::new(crate::records::test_util::MemoryContacts::default()),
            None,
        );
        let check = |config: Value| {
            notify
                .check_config(config.as_object().unwrap())
                .into_iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect::<Vec<_>>()
        };
        assert!(check(json!({"to": "ann", "body": "hi"})).is_empty());
        let problems = check(
            json!({"to": "ann", "content_type": "url_action", "title": "t",
            "body": "b", "url": "javascript:alert(1)", "action_label": "go"}),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("config.url: "), "{problems:?}");
        // Templated: checked when it runs.
        assert!(
            check(
                json!({"to": "ann", "content_type": "url_action", "title": "t", "body": "b",
                "url": "{{ event.event_data.url }}", "action_label": "go"})
            )
            .is_empty()
        );
    }
}
