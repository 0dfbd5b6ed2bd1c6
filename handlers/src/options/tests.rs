use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::Handler;
use crate::builtin::{Emit, Log};
use crate::contact::CreateContact;
use crate::records::contacts::normalize_msisdn;
use crate::records::test_util::MemoryContacts;

/// The options of a sending handler with `providers`, as `send_sms` has.
fn sending(providers: &[&str]) -> Options {
    Options::of(vec![
        OptionSpec::recipients("to", "to", normalize_msisdn).required(),
        OptionSpec::text("body", "body").required(),
        provider(
            "SMS",
            "sms",
            providers.iter().map(|p| p.to_string()).collect(),
        ),
        OptionSpec::text("secret", "secret").secret(),
    ])
}

fn contact() -> Options {
    CreateContact::new(Arc::new(MemoryContacts::default())).options()
}

/// The problems `options` finds in `config`, as `field: message`.
fn problems(options: &Options, config: Value) -> Vec<String> {
    options
        .check(config.as_object().expect("a config is a table"))
        .into_iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect()
}

#[test]
fn configs_are_checked_against_the_options() {
    let one = sending(&["gw"]);
    let two = sending(&["gw", "twilio"]);
    let none = sending(&[]);
    let check = |options: &Options, config: Value, expected: &[&str]| {
        assert_eq!(problems(options, config.clone()), expected, "{config}");
    };
    check(&one, json!({"to": "+27820000001", "body": "hi"}), &[]);
    check(
        &one,
        json!({"to": ["+27820000001", "{{ steps.c.msisdn }}"], "body": "{{ event.x }}"}),
        &[],
    );
    check(
        &one,
        json!({"body": "hi"}),
        &["config.to: required option is missing"],
    );
    check(
        &one,
        json!({"to": "+27820000001", "body": "hi", "bdy": 1}),
        &["config.bdy: unknown option; this handler takes to, body, provider, secret"],
    );
    check(
        &one,
        json!({"to": "+27820000001", "body": 7}),
        &["config.body: must be a string, not 7"],
    );
    check(
        &one,
        json!({"to": [], "body": "hi"}),
        &["config.to: must be a recipient or a non-empty list of them"],
    );
    check(
        &one,
        json!({"to": ["+27820000001", 5], "body": "hi"}),
        &["config.to[1]: must be a string"],
    );
    assert!(problems(&one, json!({"to": "call me", "body": "hi"}))[0].starts_with("config.to: "));
    check(
        &two,
        json!({"to": "+27820000001", "body": "hi"}),
        &["config.provider: name the SMS provider to use (configured: gw, twilio)"],
    );
    check(
        &two,
        json!({"to": "+27820000001", "body": "hi", "provider": "twilio"}),
        &[],
    );
    check(
        &two,
        json!({"to": "+27820000001", "body": "hi", "provider": "sms"}),
        &[
            r#"config.provider: SMS provider "sms" is not configured in this deployment (configured: gw, twilio)"#,
        ],
    );
    check(
        &two,
        json!({"to": "+27820000001", "body": "hi", "provider": "{{ event.p }}"}),
        &["config.provider: must be one of gw, twilio; it cannot be a template"],
    );
    check(
        &none,
        json!({"to": "+27820000001", "body": "hi"}),
        &[
            "config.provider: name the SMS provider to use (none is configured: add \
           [providers.sms.NAME] to the dispatcher's config file)",
        ],
    );
    check(
        &one,
        json!({"to": "+27820000001", "body": "hi", "secret": "{{ event.s }}"}),
        &["config.secret: names a secret; it cannot be a template"],
    );
    check(
        &contact(),
        json!({"name": "Thandi"}),
        &["config: needs msisdn or email (at least one) to key the contact"],
    );
    check(
        &contact(),
        json!({"email": "T@Example.org", "fields": {"a": 1}}),
        &[],
    );
    check(
        &contact(),
        json!({"email": "x", "fields": "just text"}),
        &[
            "config.email: \"x\" is not an e-mail address",
            "config.fields: must be a table of name = value, or a template that gives one",
        ],
    );
    check(
        &contact(),
        json!({"msisdn": "+27820000001", "fields": "{{ event.event_data }}"}),
        &[],
    );
    check(&Log.options(), json!({"level": "warn"}), &[]);
    check(
        &Log.options(),
        json!({"level": "loud"}),
        &[r#"config.level: "loud" is not one of trace, debug, info, warn, error"#],
    );
    check(&Options::open(), json!({"anything": [1, 2]}), &[]);
}

#[test]
fn the_json_schema_says_what_each_option_takes() {
    let schema = sending(&["gw", "twilio"]).json_schema();
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["required"], json!(["to", "body", "provider"]));
    let provider = &schema["properties"]["provider"];
    assert_eq!(provider["enum"], json!(["gw", "twilio"]));
    assert_eq!(provider["x-template"], false);
    assert_eq!(schema["properties"]["body"]["x-template"], true);
    assert_eq!(schema["properties"]["secret"]["x-secret"], true);
    let one = sending(&["gw"]).json_schema();
    assert_eq!(one["required"], json!(["to", "body"]));
    assert_eq!(one["properties"]["provider"]["default"], "gw");
    let contact = contact().json_schema();
    assert_eq!(
        contact["allOf"],
        json!([{"anyOf": [{"required": ["msisdn"]}, {"required": ["email"]}]}])
    );
    assert_eq!(
        Log.options().json_schema()["properties"]["level"]["default"],
        "info"
    );
    assert_eq!(Options::open().json_schema()["additionalProperties"], true);
    // No provider at all: nothing is accepted.
    let none = sending(&[]).json_schema();
    assert_eq!(none["properties"]["provider"]["enum"], json!([]));
}

/// The JSON Schema and [`Options::check`] give the same verdict on a
/// config's shape (the literal checks — a phone number's form, a URL — are
/// the options' own, so these configs keep to literals both accept).
#[test]
fn the_json_schema_and_the_check_agree() {
    let cases: Vec<(&str, Options, Value)> = vec![
        (
            "sms ok",
            sending(&["gw"]),
            json!({"to": "+27820000001", "body": "hi"}),
        ),
        (
            "sms list",
            sending(&["gw"]),
            json!({"to": ["+27820000001"], "body": "{{ x }}"}),
        ),
        (
            "sms no body",
            sending(&["gw"]),
            json!({"to": "+27820000001"}),
        ),
        (
            "sms empty list",
            sending(&["gw"]),
            json!({"to": [], "body": "hi"}),
        ),
        (
            "sms number body",
            sending(&["gw"]),
            json!({"to": "+27820000001", "body": 3}),
        ),
        (
            "sms unknown",
            sending(&["gw"]),
            json!({"to": "+27820000001", "body": "b", "x": 1}),
        ),
        (
            "sms no provider",
            sending(&["a", "b"]),
            json!({"to": "+27820000001", "body": "b"}),
        ),
        (
            "sms other provider",
            sending(&["a", "b"]),
            json!({"to": "+27820000001", "body": "b", "provider": "c"}),
        ),
        (
            "sms provider",
            sending(&["a", "b"]),
            json!({"to": "+27820000001", "body": "b", "provider": "b"}),
        ),
        (
            "sms secret template",
            sending(&["gw"]),
            json!({"to": "+27820000001", "body": "b", "secret": "{{ s }}"}),
        ),
        ("contact none", contact(), json!({"name": "T"})),
        (
            "contact email",
            contact(),
            json!({"email": "t@example.org"}),
        ),
        (
            "contact fields template",
            contact(),
            json!({"msisdn": "+27820000001", "fields": "{{ f }}"}),
        ),
        (
            "contact fields text",
            contact(),
            json!({"msisdn": "+27820000001", "fields": "f"}),
        ),
        (
            "contact fields list",
            contact(),
            json!({"msisdn": "+27820000001", "fields": [1]}),
        ),
        ("log level", Log.options(), json!({"level": "debug"})),
        (
            "log level template",
            Log.options(),
            json!({"level": "{{ l }}"}),
        ),
        ("log bad level", Log.options(), json!({"level": "loud"})),
        (
            "log message table",
            Log.options(),
            json!({"message": {"a": 1}}),
        ),
        (
            "emit",
            Emit.options(),
            json!({"event_type": "done", "data": {"a": "{{ b }}"}}),
        ),
        ("emit no type", Emit.options(), json!({"data": {}})),
        ("script", Options::open(), json!({"threshold": 3})),
        (
            "no provider",
            sending(&[]),
            json!({"to": "+27820000001", "body": "b", "provider": "x"}),
        ),
    ];
    let mut disagreements = Vec::new();
    for (name, options, config) in cases {
        let validator =
            jsonschema::validator_for(&options.json_schema()).expect("the schema compiles");
        let by_schema = validator.is_valid(&config);
        let by_check = problems(&options, config.clone());
        if by_schema != by_check.is_empty() {
            disagreements.push(format!(
                "{name}: the schema says valid={by_schema}, the check says {by_check:?}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
