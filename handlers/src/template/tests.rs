use serde_json::json;
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

use super::*;

fn scope(t: &Templates) -> Scope {
    let event = VumiApiEvent::new(
        AccountKey::new("acme").unwrap(),
        ConversationKey::new("poll-2026").unwrap(),
        ConversationType::new("survey").unwrap(),
        EventType::new("poll_complete").unwrap(),
        json!({"msisdn": "+27820000000", "score": 4, "name": "<Thandi>"})
            .as_object()
            .unwrap()
            .clone(),
    );
    let steps = json!({"create_contact": {"key": "c-1", "fields": {"a": 1}}});
    t.scope(
        &EventValue::new(&event),
        steps.as_object().unwrap(),
        &event.account_key,
    )
}

/// Renders `input` (a JSON value) and compares with `expected`.
fn check(input: serde_json::Value, expected: Result<serde_json::Value, &str>) {
    let t = Templates::new();
    let got = t.render(&input, "config", &scope(&t));
    match (&got, &expected) {
        (Ok(g), Ok(e)) => assert_eq!(g, e, "{input}"),
        (Err(g), Err(e)) => assert!(g.contains(e), "{input}: error {g:?} should contain {e:?}"),
        _ => panic!("{input}: got {got:?}, expected {expected:?}"),
    }
}

#[test]
fn rendering() {
    check(json!("plain text"), Ok(json!("plain text")));
    check(json!("{{ event.event_data.score }}"), Ok(json!(4)));
    check(json!("{{ event.event_data.score + 1 }}"), Ok(json!(5)));
    check(
        json!("score: {{ event.event_data.score }}"),
        Ok(json!("score: 4")),
    );
    check(
        json!("{{ steps.create_contact.fields }}"),
        Ok(json!({"a": 1})),
    );
    check(
        json!("{{ account.key }}/{{ event.conversation_key }}"),
        Ok(json!("acme/poll-2026")),
    );
    check(
        json!({"a": ["{{ event.event_type }}", 1, true]}),
        Ok(json!({"a": ["poll_complete", 1, true]})),
    );
    // No HTML escaping in config strings.
    check(
        json!("Hi {{ event.event_data.name }}"),
        Ok(json!("Hi <Thandi>")),
    );
    check(
        json!({"to": "{{ event.event_data.nope }}"}),
        Err(
            "config.to: template \"{{ event.event_data.nope }}\": `event.event_data.nope` is undefined for this event",
        ),
    );
    check(
        json!("x {{ steps.create_contact.missing.deeper }}"),
        Err("`steps.create_contact.missing` is undefined for this event"),
    );
    check(
        json!("{% for i in range(100000) %}{{ i }}{% endfor %}"),
        Err("fuel"),
    );
}

fn problems(input: serde_json::Value, earlier: &[&str]) -> Vec<String> {
    let t = Templates::new();
    let mut out = Vec::new();
    t.check(&input, "config", earlier, &mut out);
    out.into_iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect()
}

#[test]
fn checking() {
    assert!(problems(json!({"to": "{{ event.event_data.msisdn }}", "n": 3}), &[]).is_empty());
    assert!(
        problems(
            json!("{{ steps.create_contact.msisdn }}"),
            &["create_contact"]
        )
        .is_empty()
    );
    assert!(problems(json!("{% for x in range(3) %}{{ x }}{% endfor %}"), &[]).is_empty());

    let p = problems(json!({"to": "{{ steps.create_contact.msisdn }}"}), &["log"]);
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("config.to: template"), "{p:?}");
    assert!(
        p[0].contains(
            "no earlier step of this chain is called \"create_contact\" (earlier steps: log)"
        ),
        "{p:?}"
    );

    let p = problems(json!({"body": ["{{ evnt.event_data }}"]}), &[]);
    assert!(p[0].starts_with("config.body[0]: template"), "{p:?}");
    assert!(
        p[0].contains("refers to `evnt.event_data`, which is not defined"),
        "{p:?}"
    );

    let p = problems(json!({"x": "{{ event.data }}"}), &[]);
    assert!(p[0].contains("`event.data`"), "{p:?}");

    let p = problems(json!({"x": "{% if %}"}), &[]);
    assert!(p[0].contains("does not compile: syntax error"), "{p:?}");
}

#[test]
fn compiled_templates_are_kept_and_render_the_same_each_time() {
    let t = Templates::new();
    let s = scope(&t);
    for source in [
        "Hi {{ event.event_data.name }}",
        // A name ending in .html must not turn on escaping.
        "Hi {{ event.event_data.name }} at page.html",
        "{{ event.event_data.score * 2 }}",
    ] {
        let first = t.render(&json!(source), "config", &s).unwrap();
        let again = t.render(&json!(source), "config", &s).unwrap();
        assert_eq!(first, again, "{source}");
    }
    assert_eq!(
        t.render(
            &json!("Hi {{ event.event_data.name }} at page.html"),
            "config",
            &s
        )
        .unwrap(),
        json!("Hi <Thandi> at page.html")
    );
    assert_eq!(
        t.render(&json!("{{ event.event_data.score * 2 }}"), "config", &s)
            .unwrap(),
        json!(8)
    );
    // An error is reported each time, not cached as a result.
    for _ in 0..2 {
        let e = t
            .render(&json!("{{ event.nope }} x"), "config", &s)
            .unwrap_err();
        assert!(e.contains("event.nope"), "{e}");
    }
}

#[test]
fn the_cache_starts_over_when_full_and_keeps_rendering() {
    let t = Templates::new();
    let s = scope(&t);
    for i in 0..CACHE_LIMIT + 10 {
        let template = format!("{i}: {{{{ event.event_data.score }}}}");
        assert_eq!(
            t.render(&json!(template), "config", &s).unwrap(),
            json!(format!("{i}: 4"))
        );
        let expression = format!("{{{{ event.event_data.score + {i} }}}}");
        assert_eq!(
            t.render(&json!(expression), "config", &s).unwrap(),
            json!(4 + i)
        );
    }
    assert!(t.templates.read().unwrap().count <= CACHE_LIMIT);
    assert!(t.expressions.read().unwrap().len() <= CACHE_LIMIT);
}
