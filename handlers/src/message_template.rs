//! Message templates: an account's reusable e-mail, SMS and in-app
//! messages, by slug, versioned like scripts ([`crate::versioned`]).
//!
//! A template is a TOML file:
//!
//! ```toml
//! slug = "signed-up"          # optional; the name it is put under
//! channel = "email"           # or "sms"
//! category = "onboarding"     # optional: preferences can opt out of a category
//! subject = "Welcome, {{ recipient.name }}"
//! html = "<p>Your plan: {{ context.plan }}</p>"   # HTML-escaped values
//! text = "Your plan: {{ context.plan }}"
//! idempotency = "{{ template }}:{{ recipient.email }}:{{ now | date(format='%Y-%m-%d-%H') }}"
//! idempotency_window = "24h"  # how long a key holds (the default)
//!
//! [context]                   # a JSON Schema of the data it needs
//! type = "object"
//! required = ["plan"]
//! properties.plan = { type = "string" }
//! ```
//!
//! An in-app template (`channel = "inbox"`, for `notify`) has a
//! `content_type` (`text`, `markdown` or `url_action`), a `text` (the
//! body; Markdown for `markdown`), and for an action a `title`, `url` and
//! `action_label`:
//!
//! ```toml
//! channel = "inbox"
//! content_type = "url_action"
//! title = "Order {{ context.order }} shipped"
//! text = "It is on its way, {{ recipient.name }}."
//! url = "https://shop.example/orders/{{ context.order }}"
//! action_label = "Track it"
//! ```
//!
//! Every part is a minijinja template over `context` (the data a step
//! gives), `recipient` (`name`, `email`, `phone` and a contact's fields),
//! `template` (the slug) and `now` (RFC 3339, UTC); undefined values are
//! errors. The `html` part escapes every value it inserts as HTML, and a
//! `markdown` template's `text` escapes them as Markdown (a value's `**` or
//! `[link](…)` shows as written, it does not format or link, and its line
//! breaks are spaces; a value marked `safe`, or made by `tojson`, goes in
//! as it is). A put
//! compiles every part and checks the schema; an error names the part, line
//! and column.

use std::fmt;

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value as JinjaValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::versioned::{Compiled, SourceKind, SourceStore, SourceStoreError};

/// The channels a template is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChannel {
    /// E-mail: a subject, and an HTML or a text body (or both).
    Email,
    /// SMS: a text.
    Sms,
    /// In-app (`notify`): a content type and its parts.
    Inbox,
}

impl TemplateChannel {
    /// The channel's name, as files and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            TemplateChannel::Email => "email",
            TemplateChannel::Sms => "sms",
            TemplateChannel::Inbox => "inbox",
        }
    }
}

/// The parts of a template, in the order they are checked and rendered.
const PARTS: [&str; 7] = [
    "subject",
    "html",
    "text",
    "idempotency",
    "title",
    "url",
    "action_label",
];

/// The auto-escape of a `markdown` template's `text`.
const MARKDOWN: &str = "markdown";

/// Bounds the work one part may do (loops over large data).
const FUEL: u64 = 50_000;

/// A template file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    slug: Option<String>,
    channel: String,
    category: Option<String>,
    subject: Option<String>,
    html: Option<String>,
    text: Option<String>,
    idempotency: Option<String>,
    idempotency_window: Option<String>,
    content_type: Option<String>,
    title: Option<String>,
    url: Option<String>,
    action_label: Option<String>,
    #[serde(default, deserialize_with = "shallow_context")]
    context: Option<toml::Table>,
}

/// How deep a template's sample context may nest (as deep as an event's
/// data may).
const MAX_CONTEXT_DEPTH: usize = switchboard_sdk::MAX_DATA_DEPTH;

/// A template's `context` table, refused when it nests deeper than
/// [`MAX_CONTEXT_DEPTH`]: while the file is read (see
/// [`switchboard_rules::from_toml`]), so that no such table outlives it.
fn shallow_context<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<toml::Table>, D::Error> {
    fn deeper(value: &toml::Value, limit: usize) -> bool {
        // `limit`: how many levels of tables and arrays `value` may be.
        match value {
            toml::Value::Table(t) => limit == 0 || t.values().any(|v| deeper(v, limit - 1)),
            toml::Value::Array(a) => limit == 0 || a.iter().any(|v| deeper(v, limit - 1)),
            _ => false,
        }
    }
    let table = <Option<toml::Table> as serde::Deserialize>::deserialize(d)?;
    if let Some(table) = &table
        && table.values().any(|v| deeper(v, MAX_CONTEXT_DEPTH - 1))
    {
        return Err(serde::de::Error::custom(format!(
            "context nests tables and arrays more than {MAX_CONTEXT_DEPTH} levels deep"
        )));
    }
    Ok(table)
}

/// How long a send's idempotency key holds unless the template says.
pub const DEFAULT_IDEMPOTENCY_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

/// The `channel` a template file names, read without compiling it (for
/// listings of versions stored, which all compiled when put). Read in
/// place, not on a thread of its own as a file put is: one that compiled
/// nests no deeper than its `context` may.
pub fn channel_of(source: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Channel {
        channel: String,
    }
    toml::from_str::<Channel>(source).ok().map(|c| c.channel)
}

/// Why a template cannot be stored or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The file is not TOML of a template.
    #[error("{0}")]
    File(String),
    /// A part does not compile or render.
    #[error("part `{part}`{}: {message}", at(*.line, *.column))]
    Part {
        /// `subject`, `html`, `text` or `idempotency`.
        part: &'static str,
        /// The line in the part, from 1.
        line: Option<usize>,
        /// The column in that line, from 1.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The `context` section is not a valid JSON Schema.
    #[error("`context` is not a valid JSON Schema: {0}")]
    Schema(String),
    /// A context given to render breaks the template's schema.
    #[error("the context does not match the template's schema: {field}: {rule}")]
    Context {
        /// Where, as a JSON pointer (`/plan`; empty for the whole context).
        field: String,
        /// The rule it breaks.
        rule: String,
    },
}

fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
        (Some(l), None) => format!(" (line {l})"),
        _ => String::new(),
    }
}

/// A template, compiled: its channel, its parts in an engine, its schema.
pub struct MessageTemplate {
    slug: String,
    channel: TemplateChannel,
    content_type: Option<String>,
    category: Option<String>,
    idempotency_window: std::time::Duration,
    env: Environment<'static>,
    parts: Vec<&'static str>,
    schema: Option<jsonschema::Validator>,
}

impl fmt::Debug for MessageTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageTemplate")
            .field("slug", &self.slug)
            .field("channel", &self.channel)
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

/// A template rendered for one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    /// The e-mail's subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The e-mail's HTML body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// The text body (e-mail) or the message (SMS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The send's idempotency key, when the template has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<String>,
    /// An in-app action's title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// An in-app action's link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// An in-app action's button label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_label: Option<String>,
}

impl MessageTemplate {
    /// Parses and compiles a template file put under `slug`.
    pub fn compile(slug: &str, source: &str) -> Result<Self, TemplateError> {
        let file: TemplateFile = switchboard_rules::from_toml(source)
            .map_err(|e| TemplateError::File(e.to_string().trim_end().replace('\n', " ")))?;
        if let Some(named) = &file.slug
            && named != slug
        {
            return Err(TemplateError::File(format!(
                "the file's slug {named:?} is not the one it is put under ({slug:?})"
            )));
        }
        let channel = match file.channel.as_str() {
            "email" => TemplateChannel::Email,
            "sms" => TemplateChannel::Sms,
            "inbox" => TemplateChannel::Inbox,
            other => {
                return Err(TemplateError::File(format!(
                    "channel {other:?} is not one of \"email\", \"sms\", \"inbox\""
                )));
            }
        };
        let inbox_parts = [
            ("content_type", file.content_type.is_some()),
            ("title", file.title.is_some()),
            ("url", file.url.is_some()),
            ("action_label", file.action_label.is_some()),
        ];
        if channel != TemplateChannel::Inbox
            && let Some((part, _)) = inbox_parts.iter().find(|(_, given)| *given)
        {
            return Err(TemplateError::File(format!(
                "`{part}` is for in-app templates (channel = \"inbox\"), not {}",
                channel.name()
            )));
        }
        let content_type = match channel {
            TemplateChannel::Inbox => {
                check_inbox_file(&file)?;
                Some(file.content_type.clone().unwrap_or_else(|| "text".into()))
            }
            _ => None,
        };
        let markdown = content_type.as_deref() == Some(MARKDOWN);
        match channel {
            TemplateChannel::Email if file.subject.is_none() => {
                return Err(TemplateError::File(
                    "an e-mail template needs a `subject`".into(),
                ));
            }
            TemplateChannel::Email if file.html.is_none() && file.text.is_none() => {
                return Err(TemplateError::File(
                    "an e-mail template needs an `html` or a `text` part (or both)".into(),
                ));
            }
            TemplateChannel::Sms if file.text.is_none() => {
                return Err(TemplateError::File("an SMS template needs a `text`".into()));
            }
            TemplateChannel::Sms if file.subject.is_some() || file.html.is_some() => {
                return Err(TemplateError::File(
                    "an SMS template has only a `text` (and an `idempotency`): no `subject` or `html`"
                        .into(),
                ));
            }
            _ => {}
        }
        if let Some(category) = &file.category
            && (category.is_empty()
                || category.len() > 64
                || !category
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
        {
            return Err(TemplateError::File(format!(
                "category {category:?}: use 1 to 64 of A-Z a-z 0-9 _ - ."
            )));
        }
        let idempotency_window = match &file.idempotency_window {
            None => DEFAULT_IDEMPOTENCY_WINDOW,
            Some(_) if file.idempotency.is_none() => {
                return Err(TemplateError::File(
                    "`idempotency_window` without an `idempotency` key".into(),
                ));
            }
            Some(w) => switchboard_rules::duration::parse(w)
                .map_err(|e| TemplateError::File(format!("idempotency_window: {e}")))?,
        };
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env.set_auto_escape_callback(move |name| match name {
            "html" => AutoEscape::Html,
            "text" if markdown => AutoEscape::Custom(MARKDOWN.into()),
            _ => AutoEscape::None,
        });
        env.set_formatter(|out, state, value| {
            if *state.auto_escape() == AutoEscape::Custom(MARKDOWN.into()) {
                let text = if value.is_safe() {
                    value.to_string()
                } else {
                    escape_markdown(&value.to_string())
                };
                return out.write_str(&text).map_err(minijinja::Error::from);
            }
            minijinja::escape_formatter(out, state, value)
        });
        env.add_filter("date", date_filter);
        let mut parts = Vec::new();
        for (part, source) in PARTS.into_iter().zip([
            file.subject,
            file.html,
            file.text,
            file.idempotency,
            file.title,
            file.url,
            file.action_label,
        ]) {
            let Some(source) = source else { continue };
            env.add_template_owned(part, source.clone())
                .map_err(|e| part_error(part, &source, &e))?;
            parts.push(part);
        }
        let schema = match file.context {
            None => None,
            Some(table) => {
                let schema = serde_json::to_value(&table)
                    .map_err(|e| TemplateError::Schema(e.to_string()))?;
                Some(
                    jsonschema::validator_for(&schema)
                        .map_err(|e| TemplateError::Schema(e.to_string()))?,
                )
            }
        };
        Ok(Self {
            slug: slug.to_string(),
            channel,
            content_type,
            category: file.category,
            idempotency_window,
            env,
            parts,
            schema,
        })
    }

    /// The channel it is for.
    pub fn channel(&self) -> TemplateChannel {
        self.channel
    }

    /// An in-app template's `content_type` (`text`, `markdown` or
    /// `url_action`).
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The category it belongs to, if any (preferences can be per category).
    pub fn category(&self) -> Option<&str> {
        self.category.as_deref()
    }

    /// How long a send's idempotency key holds.
    pub fn idempotency_window(&self) -> std::time::Duration {
        self.idempotency_window
    }

    /// Checks `context` against the template's schema (any context, when
    /// it has none).
    pub fn check_context(&self, context: &Value) -> Result<(), TemplateError> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        schema
            .validate(context)
            .map_err(|e| TemplateError::Context {
                field: e.instance_path().to_string(),
                rule: e.to_string(),
            })
    }

    /// Renders every part for `recipient`, after checking `context`.
    pub fn render(&self, context: &Value, recipient: &Value) -> Result<Rendered, TemplateError> {
        self.check_context(context)?;
        let scope = JinjaValue::from(minijinja::value::Serde(serde_json::json!({
            "context": context,
            "recipient": recipient,
            "template": self.slug,
            "now": switchboard_sdk::format_rfc3339(switchboard_sdk::now()),
        })));
        let mut rendered = Rendered::default();
        for part in &self.parts {
            let template = self
                .env
                .get_template(part)
                .expect("every part listed was added");
            let source = template.source().to_string();
            let text = template
                .render(&scope)
                .map_err(|e| part_error(part, &source, &e))?;
            let slot = match *part {
                "subject" => &mut rendered.subject,
                "html" => &mut rendered.html,
                "text" => &mut rendered.text,
                "title" => &mut rendered.title,
                "url" => &mut rendered.url,
                "action_label" => &mut rendered.action_label,
                _ => &mut rendered.idempotency,
            };
            *slot = Some(text);
        }
        Ok(rendered)
    }
}

/// What an in-app template must have for its `content_type`.
fn check_inbox_file(file: &TemplateFile) -> Result<(), TemplateError> {
    let refuse = |why: &str| Err(TemplateError::File(why.to_string()));
    if file.subject.is_some() || file.html.is_some() {
        return refuse(
            "an in-app template has a `text` (and for an action a `title`, `url` and \
             `action_label`): no `subject` or `html`",
        );
    }
    if file.idempotency.is_some() {
        return refuse(
            "an in-app template has no `idempotency`: a notify step leaves its notification once",
        );
    }
    if file.text.is_none() {
        return refuse("an in-app template needs a `text`");
    }
    match file.content_type.as_deref().unwrap_or("text") {
        "text" | "markdown"
            if file.title.is_some() || file.url.is_some() || file.action_label.is_some() =>
        {
            refuse("`title`, `url` and `action_label` are for content_type = \"url_action\"")
        }
        "text" | "markdown" => Ok(()),
        "url_action"
            if file.title.is_none() || file.url.is_none() || file.action_label.is_none() =>
        {
            refuse("content_type = \"url_action\" needs a `title`, a `url` and an `action_label`")
        }
        "url_action" => Ok(()),
        other => Err(TemplateError::File(format!(
            "content_type {other:?} is not one of \"text\", \"markdown\", \"url_action\""
        ))),
    }
}

/// `text` with every ASCII punctuation character backslash-escaped, and
/// its line breaks made spaces: in CommonMark it reads as itself, never as
/// markup, and starts no new block (a list, a heading, code).
pub fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\r' | '\n' => out.push(' '),
            c if c.is_ascii_punctuation() => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A part's error, with the line and column minijinja points at.
fn part_error(part: &'static str, source: &str, e: &minijinja::Error) -> TemplateError {
    let column = e.range().map(|r| {
        let start = r.start.min(source.len());
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        source[line_start..start].chars().count() + 1
    });
    let mut message = e.kind().to_string();
    if let Some(detail) = e.detail() {
        message.push_str(": ");
        message.push_str(detail);
    }
    TemplateError::Part {
        part,
        line: e.line(),
        column,
        message,
    }
}

/// `{{ now | date(format='%Y-%m-%d') }}` (or `date('%Y-%m-%d')`): see
/// [`format_date`].
fn date_filter(
    value: String,
    format: Option<String>,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, minijinja::Error> {
    let named: Option<String> = kwargs.get("format")?;
    kwargs.assert_all_used()?;
    format_date(value, format.or(named))
}

/// An RFC 3339 time formatted with `%Y` (year), `%m`, `%d`, `%H`, `%M`,
/// `%S` (two digits each), `%j` (day of the year, three digits) and `%%`;
/// `%Y-%m-%d` without a format.
fn format_date(value: String, format: Option<String>) -> Result<String, minijinja::Error> {
    let invalid = |why: String| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, why);
    let t = time::OffsetDateTime::parse(&value, &time::format_description::well_known::Rfc3339)
        .map_err(|e| invalid(format!("date: {value:?} is not an RFC 3339 time: {e}")))?;
    let format = format.unwrap_or_else(|| "%Y-%m-%d".to_string());
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{:04}", t.year())),
            Some('m') => out.push_str(&format!("{:02}", u8::from(t.month()))),
            Some('d') => out.push_str(&format!("{:02}", t.day())),
            Some('H') => out.push_str(&format!("{:02}", t.hour())),
            Some('M') => out.push_str(&format!("{:02}", t.minute())),
            Some('S') => out.push_str(&format!("{:02}", t.second())),
            Some('j') => out.push_str(&format!("{:03}", t.ordinal())),
            Some('%') => out.push('%'),
            other => {
                return Err(invalid(format!(
                    "date: %{} is not a supported directive (use %Y %m %d %H %M %S %j %%)",
                    other.map(String::from).unwrap_or_default()
                )));
            }
        }
    }
    Ok(out)
}

/// Message templates as a kind of versioned source.
#[derive(Debug, Default)]
pub struct MessageTemplates;

impl SourceKind for MessageTemplates {
    type Compiled = MessageTemplate;
    type Error = TemplateError;
    const NOUN: &'static str = "template";
    const NAME_RULE: &'static str = "use a lowercase letter or digit followed by lowercase letters, digits, - or _ (at most 64)";

    fn is_name(name: &str) -> bool {
        let mut bytes = name.bytes();
        matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
            && name.len() <= 64
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    }

    fn check(&self, name: &str, source: &str) -> Result<MessageTemplate, TemplateError> {
        MessageTemplate::compile(name, source)
    }
}

/// Every account's message templates.
pub type TemplateStore = SourceStore<MessageTemplates>;

/// A template's current version, compiled.
pub type CompiledTemplate = Compiled<MessageTemplate>;

/// Why a template store operation failed.
pub type TemplateStoreError = SourceStoreError<TemplateError>;

#[cfg(test)]
mod tests;
