use serde_json::json;

use super::*;

const SIGNED_UP: &str = r#"
slug = "signed-up"
channel = "email"
subject = "Welcome, {{ recipient.name }}"
html = """<p>Hi {{ recipient.name }},
your plan is <b>{{ context.plan }}</b>.</p>"""
text = "Hi {{ recipient.name }}, your plan is {{ context.plan }}."
idempotency = "{{ template }}:{{ recipient.email }}:{{ now | date(format='%Y') }}"

[context]
type = "object"
required = ["plan"]
properties.plan = { type = "string", maxLength = 20 }
"#;

#[test]
fn a_template_renders_per_recipient_with_its_html_escaped() {
    let t = MessageTemplate::compile("signed-up", SIGNED_UP).expect("it compiles");
    assert_eq!(t.channel(), TemplateChannel::Email);
    let context = json!({"plan": "<gold>"});
    let ada = t
        .render(
            &context,
            &json!({"name": "Ada & co", "email": "ada@example.org"}),
        )
        .expect("it renders");
    assert_eq!(ada.subject.as_deref(), Some("Welcome, Ada & co"));
    assert_eq!(
        ada.html.as_deref(),
        Some("<p>Hi Ada &amp; co,\nyour plan is <b>&lt;gold&gt;</b>.</p>")
    );
    assert_eq!(
        ada.text.as_deref(),
        Some("Hi Ada & co, your plan is <gold>.")
    );
    let year = switchboard_sdk::now().year();
    assert_eq!(
        ada.idempotency,
        Some(format!("signed-up:ada@example.org:{year}"))
    );
    let bob = t
        .render(
            &context,
            &json!({"name": "Bob", "email": "bob@example.org"}),
        )
        .expect("it renders");
    assert_eq!(bob.subject.as_deref(), Some("Welcome, Bob"));
}

#[test]
fn a_context_that_breaks_the_schema_names_the_field_and_the_rule() {
    let t = MessageTemplate::compile("signed-up", SIGNED_UP).expect("it compiles");
    let recipient = json!({"name": "Ada", "email": "ada@example.org"});
    let missing = t.render(&json!({}), &recipient).expect_err("refused");
    assert!(
        matches!(&missing, TemplateError::Context { rule, .. } if rule.contains("\"plan\" is a required property")),
        "{missing}"
    );
    let long = t
        .render(&json!({"plan": "x".repeat(21)}), &recipient)
        .expect_err("refused");
    assert!(
        matches!(&long, TemplateError::Context { field, rule } if field == "/plan" && rule.contains("longer than 20")),
        "{long}"
    );
}

#[test]
fn a_syntax_error_names_its_part_line_and_column() {
    let source = r#"
channel = "email"
subject = "Hello"
html = """<p>fine</p>
<p>{{ recipient.name }</p>"""
"#;
    let e = MessageTemplate::compile("hello", source).expect_err("refused");
    match &e {
        TemplateError::Part {
            part, line, column, ..
        } => {
            assert_eq!((*part, *line), ("html", Some(2)), "{e}");
            assert!(column.is_some_and(|c| c > 1), "{e}");
        }
        other => panic!("not a part error: {other}"),
    }
    assert!(
        e.to_string().starts_with("part `html` (line 2, column "),
        "{e}"
    );
}

#[test]
fn bad_files_are_refused_with_the_reason() {
    let refused = |source: &str, expected: &str| {
        let e = MessageTemplate::compile("t", source).expect_err("refused");
        assert!(
            e.to_string().contains(expected),
            "{e} should say {expected:?}"
        );
    };
    refused(
        "channel = \"fax\"\ntext = \"x\"",
        "channel \"fax\" is not one of",
    );
    refused(
        "channel = \"inbox\"\nsubject = \"s\"\ntext = \"x\"",
        "no `subject` or `html`",
    );
    refused(
        "channel = \"inbox\"\ncontent_type = \"url_action\"\ntext = \"x\"",
        "needs a `title`, a `url` and an `action_label`",
    );
    refused(
        "channel = \"inbox\"\ntitle = \"t\"\ntext = \"x\"",
        "are for content_type = \"url_action\"",
    );
    refused(
        "channel = \"inbox\"\ncontent_type = \"video\"\ntext = \"x\"",
        "content_type \"video\" is not one of",
    );
    refused(
        "channel = \"inbox\"\ntext = \"x\"\nidempotency = \"k\"",
        "no `idempotency`",
    );
    refused(
        "channel = \"sms\"\ntext = \"x\"\ntitle = \"t\"",
        "`title` is for in-app templates",
    );
    refused(
        "channel = \"sms\"\nsubject = \"s\"\ntext = \"x\"",
        "no `subject` or `html`",
    );
    refused("channel = \"sms\"", "needs a `text`");
    refused("channel = \"email\"\ntext = \"x\"", "needs a `subject`");
    refused(
        "channel = \"email\"\nsubject = \"s\"",
        "an `html` or a `text`",
    );
    refused(
        "slug = \"other\"\nchannel = \"sms\"\ntext = \"x\"",
        "is not the one it is put under",
    );
    refused(
        "channel = \"sms\"\ntext = \"x\"\nbody = \"y\"",
        "unknown field `body`",
    );
    refused("channel = \"sms\"\ntext = \"x\nunclosed", "line 2");
    refused(
        "channel = \"sms\"\ntext = \"x\"\n[context]\ntype = \"nothing\"",
        "`context` is not a valid JSON Schema",
    );
    refused(
        "channel = \"sms\"\ntext = \"x\"\nidempotency_window = \"1h\"",
        "`idempotency_window` without an `idempotency` key",
    );
    refused(
        "channel = \"sms\"\ntext = \"x\"\nidempotency = \"k\"\nidempotency_window = \"soon\"",
        "idempotency_window: ",
    );
}

#[test]
fn template_slugs_are_lowercase_words() {
    for ok in ["signed-up", "reminder_2", "7day"] {
        assert!(MessageTemplates::is_name(ok), "{ok}");
    }
    for bad in ["", "Signed", "-x", "a/b", "../x", &"x".repeat(65)] {
        assert!(!MessageTemplates::is_name(bad), "{bad}");
    }
}

#[test]
fn dates_format_with_the_supported_directives() {
    let t = "2026-12-03T09:05:07Z".to_string();
    assert_eq!(
        format_date(t.clone(), Some("%Y-%m-%d-%H:%M:%S %j %%".into())).unwrap(),
        "2026-12-03-09:05:07 337 %"
    );
    assert_eq!(format_date(t.clone(), None).unwrap(), "2026-12-03");
    assert!(format_date(t, Some("%Q".into())).is_err());
    assert!(format_date("yesterday".into(), None).is_err());
}

#[test]
fn the_example_template_compiles_and_renders() {
    let source = include_str!("../../../examples/templates/signed-up.toml");
    let t = MessageTemplate::compile("signed-up", source).expect("it compiles");
    let rendered = t
        .render(
            &json!({"plan": "gold"}),
            &json!({"name": "Ada", "email": "ada@example.org"}),
        )
        .expect("it renders");
    assert_eq!(rendered.subject.as_deref(), Some("Welcome to gold, Ada"));
    assert!(
        rendered
            .idempotency
            .is_some_and(|k| k.starts_with("signed-up:ada@example.org:20")),
    );
    assert!(t.render(&json!({"plan": "platinum"}), &json!({})).is_err());
}

#[test]
fn an_inbox_template_renders_its_parts_and_escapes_markdown_values() {
    let action = MessageTemplate::compile(
        "shipped",
        r#"
channel = "inbox"
content_type = "url_action"
title = "Order {{ context.order }} shipped"
text = "Hi {{ recipient.name }}"
url = "https://shop.example/orders/{{ context.order }}"
action_label = "Track"
"#,
    )
    .unwrap();
    assert_eq!(action.channel(), TemplateChannel::Inbox);
    assert_eq!(action.content_type(), Some("url_action"));
    let rendered = action
        .render(&json!({"order": "A-1"}), &json!({"name": "Ann"}))
        .unwrap();
    assert_eq!(rendered.title.as_deref(), Some("Order A-1 shipped"));
    assert_eq!(rendered.text.as_deref(), Some("Hi Ann"));
    assert_eq!(
        rendered.url.as_deref(),
        Some("https://shop.example/orders/A-1")
    );
    assert_eq!(rendered.action_label.as_deref(), Some("Track"));

    // Markdown: the template's own markup formats; a value's shows as
    // written.
    let markdown = MessageTemplate::compile(
        "tip",
        "channel = \"inbox\"\ncontent_type = \"markdown\"\ntext = \"**Tip** for {{ recipient.name }}: {{ context.tip | safe }}\"",
    )
    .unwrap();
    let rendered = markdown
        .render(
            &json!({"tip": "_use_ it"}),
            &json!({"name": "[click](https://evil.example) **Ann**"}),
        )
        .unwrap();
    let text = rendered.text.unwrap();
    assert!(text.starts_with("**Tip** for \\[click\\]"), "{text}");
    assert!(
        text.ends_with(": _use_ it"),
        "a value marked safe is kept: {text}"
    );
    let html = crate::records::inbox::markdown_html(&text);
    assert!(html.contains("<strong>Tip</strong>"), "{html}");
    assert!(!html.contains("<a "), "{html}");
    assert!(!html.contains("<strong>Ann"), "{html}");
    assert!(
        html.contains("[click](https://evil.example) **Ann**"),
        "{html}"
    );
    // A value's line breaks start no block of their own.
    assert_eq!(escape_markdown("a\n# b\r\n- c"), "a \\# b  \\- c");
}
