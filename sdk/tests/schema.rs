//! The JSON Schema and the Rust validation describe one contract: every
//! example below is accepted by both or rejected by both.

use serde_json::{Value, json};
use switchboard_sdk::{DEFAULT_MAX_EVENT_BYTES, EVENT_SCHEMA_V1, VumiApiEvent};

fn valid_root() -> Value {
    json!({
        "v": 1,
        "id": "0190b5a4-5c3e-7d2a-9f00-6a1b2c3d4e5f",
        "account_key": "acme",
        "conversation_key": "poll-2026",
        "conversation_type": "survey",
        "event_type": "poll_complete",
        "event_data": {"msisdn": "+27820000000", "score": 4},
        "occurred_at": "2026-11-22T07:00:00Z",
        "expires_at": null,
        "parent_id": null,
        "root_id": "0190b5a4-5c3e-7d2a-9f00-6a1b2c3d4e5f",
        "depth": 0
    })
}

fn with(mut base: Value, field: &str, value: Value) -> Value {
    base[field] = value;
    base
}

fn without(mut base: Value, field: &str) -> Value {
    base.as_object_mut().unwrap().remove(field);
    base
}

fn child() -> Value {
    let base = with(valid_root(), "depth", json!(1));
    let base = with(base, "id", json!("0190b5a4-5c3e-7d2a-9f00-6a1b2c3d4e60"));
    with(
        base,
        "parent_id",
        json!("0190b5a4-5c3e-7d2a-9f00-6a1b2c3d4e5f"),
    )
}

fn examples() -> Vec<(&'static str, Value, bool)> {
    let r = valid_root;
    vec![
        ("root event", r(), true),
        ("child event", child(), true),
        (
            "expires_at set",
            with(r(), "expires_at", json!("2026-11-23T00:00:00+02:00")),
            true,
        ),
        (
            "optional fields absent",
            without(without(r(), "expires_at"), "parent_id"),
            true,
        ),
        (
            "+00:00 offset",
            with(
                r(),
                "occurred_at",
                json!("2026-11-22T07:00:00.123456+00:00"),
            ),
            true,
        ),
        (
            "uppercase uuid",
            with(r(), "id", json!("0190B5A4-5C3E-7D2A-9F00-6A1B2C3D4E5F")),
            true,
        ),
        (
            "longest account key",
            with(r(), "account_key", json!("a".repeat(64))),
            true,
        ),
        (
            "conversation key with dots",
            with(r(), "conversation_key", json!("poll.2026:v1")),
            true,
        ),
        (
            "nested event_data",
            with(r(), "event_data", json!({"a": {"b": [1, 2, {"c": null}]}})),
            true,
        ),
        ("empty event_data", with(r(), "event_data", json!({})), true),
        ("version 2", with(r(), "v", json!(2)), false),
        ("version 0", with(r(), "v", json!(0)), false),
        ("version missing", without(r(), "v"), false),
        ("id missing", without(r(), "id"), false),
        ("id not a uuid", with(r(), "id", json!("not-a-uuid")), false),
        (
            "id without hyphens",
            with(r(), "id", json!("0190b5a45c3e7d2a9f006a1b2c3d4e5f")),
            false,
        ),
        ("id a number", with(r(), "id", json!(12)), false),
        (
            "account key too long",
            with(r(), "account_key", json!("a".repeat(65))),
            false,
        ),
        (
            "account key empty",
            with(r(), "account_key", json!("")),
            false,
        ),
        (
            "account key with dot",
            with(r(), "account_key", json!("ac.me")),
            false,
        ),
        (
            "account key with space",
            with(r(), "account_key", json!("ac me")),
            false,
        ),
        (
            "conversation key too long",
            with(r(), "conversation_key", json!("c".repeat(129))),
            false,
        ),
        (
            "conversation type wildcard",
            with(r(), "conversation_type", json!("*")),
            false,
        ),
        (
            "event type with >",
            with(r(), "event_type", json!("a>")),
            false,
        ),
        (
            "event type unicode",
            with(r(), "event_type", json!("pöll")),
            false,
        ),
        (
            "event_data an array",
            with(r(), "event_data", json!([1, 2])),
            false,
        ),
        (
            "event_data null",
            with(r(), "event_data", json!(null)),
            false,
        ),
        ("event_data missing", without(r(), "event_data"), false),
        (
            "occurred_at not a date",
            with(r(), "occurred_at", json!("yesterday")),
            false,
        ),
        (
            "occurred_at bad month",
            with(r(), "occurred_at", json!("2026-13-22T07:00:00Z")),
            false,
        ),
        (
            "occurred_at not UTC",
            with(r(), "occurred_at", json!("2026-11-22T07:00:00+02:00")),
            false,
        ),
        ("occurred_at missing", without(r(), "occurred_at"), false),
        (
            "expires_at not a date",
            with(r(), "expires_at", json!("soon")),
            false,
        ),
        ("root_id missing", without(r(), "root_id"), false),
        ("depth negative", with(r(), "depth", json!(-1)), false),
        ("depth fractional", with(r(), "depth", json!(1.5)), false),
        ("depth a string", with(r(), "depth", json!("0")), false),
        (
            "root with a parent",
            with(
                r(),
                "parent_id",
                json!("0190b5a4-5c3e-7d2a-9f00-6a1b2c3d4e60"),
            ),
            false,
        ),
        (
            "child without parent",
            with(child(), "parent_id", json!(null)),
            false,
        ),
        ("child parent absent", without(child(), "parent_id"), false),
        ("unknown field", with(r(), "colour", json!("blue")), false),
        ("not an object", json!([1, 2, 3]), false),
        ("a string", json!("event"), false),
    ]
}

#[test]
fn schema_and_rust_validation_agree() {
    let schema: Value = serde_json::from_str(EVENT_SCHEMA_V1).expect("the schema is JSON");
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles");
    let mut disagreements = Vec::new();
    for (name, example, expected) in examples() {
        let by_schema = validator.is_valid(&example);
        let bytes = serde_json::to_vec(&example).unwrap();
        let by_rust = VumiApiEvent::decode(&bytes, DEFAULT_MAX_EVENT_BYTES);
        if by_schema != expected || by_rust.is_ok() != expected {
            disagreements.push(format!(
                "{name}: expected valid={expected}, schema says {by_schema}, rust says {:?}",
                by_rust.map(|_| "valid")
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[test]
fn generated_events_satisfy_the_schema() {
    let schema: Value = serde_json::from_str(EVENT_SCHEMA_V1).unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let root: VumiApiEvent =
        VumiApiEvent::decode(&serde_json::to_vec(&valid_root()).unwrap(), 1 << 20).unwrap();
    let fresh = VumiApiEvent::new(
        root.account_key.clone(),
        root.conversation_key.clone(),
        root.conversation_type.clone(),
        root.event_type.clone(),
        Default::default(),
    );
    let child = fresh.child(
        switchboard_sdk::EventId::derived(fresh.id, "c", "s", 0),
        fresh.conversation_key.clone(),
        fresh.conversation_type.clone(),
        fresh.event_type.clone(),
        Default::default(),
    );
    for event in [root, fresh, child] {
        let value: Value = serde_json::from_slice(&event.to_json()).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{value}: {errors:?}");
    }
}
