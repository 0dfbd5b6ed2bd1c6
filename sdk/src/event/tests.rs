use super::*;
use serde_json::json;

fn sample() -> VumiApiEvent {
    VumiApiEvent::new(
        AccountKey::new("acme").unwrap(),
        ConversationKey::new("poll-2026").unwrap(),
        ConversationType::new("survey").unwrap(),
        EventType::new("poll_complete").unwrap(),
        json!({"msisdn": "+27820000000", "score": 4})
            .as_object()
            .unwrap()
            .clone(),
    )
}

fn decode_value(v: serde_json::Value) -> Result<VumiApiEvent, EventError> {
    VumiApiEvent::decode(&serde_json::to_vec(&v).unwrap(), DEFAULT_MAX_EVENT_BYTES)
}

#[test]
fn new_event_is_a_root() {
    let e = sample();
    assert_eq!(e.v, 1);
    assert_eq!(e.root_id, e.id);
    assert_eq!(e.depth, 0);
    assert_eq!(e.parent_id, None);
    assert_eq!(e.id.as_uuid().get_version_num(), 7);
}

#[test]
fn round_trips_through_json() {
    let e = sample();
    let back = VumiApiEvent::decode(&e.to_json(), DEFAULT_MAX_EVENT_BYTES).unwrap();
    assert_eq!(back, e);
}

#[test]
fn child_carries_lineage() {
    let parent = sample();
    let id = EventId::derived(parent.id, "poll-complete", "emit", 0);
    let child_of = |parent: &VumiApiEvent| {
        parent.child(
            id,
            parent.conversation_key.clone(),
            ConversationType::new("points").unwrap(),
            EventType::new("points_awarded").unwrap(),
            Map::new(),
        )
    };
    let child = child_of(&parent);
    assert_eq!(child.parent_id, Some(parent.id));
    assert_eq!(child.root_id, parent.id);
    assert_eq!(child.depth, 1);
    assert_eq!(child.account_key, parent.account_key);
    let back = VumiApiEvent::decode(&child.to_json(), DEFAULT_MAX_EVENT_BYTES).unwrap();
    assert_eq!(back, child);

    // A parent claiming the deepest depth there is (a dry run's sample may)
    // has a child as deep, not one of depth 0.
    let deepest = VumiApiEvent {
        depth: u32::MAX,
        parent_id: Some(parent.id),
        ..parent.clone()
    };
    assert_eq!(child_of(&deepest).depth, u32::MAX);
}

#[test]
fn derived_ids_are_stable_and_distinct() {
    let p = sample().id;
    assert_eq!(
        EventId::derived(p, "c", "s", 0),
        EventId::derived(p, "c", "s", 0)
    );
    assert_ne!(
        EventId::derived(p, "c", "s", 0),
        EventId::derived(p, "c", "s", 1)
    );
    assert_ne!(
        EventId::derived(p, "c", "s", 0),
        EventId::derived(p, "c", "t", 0)
    );
    assert_ne!(
        EventId::derived(p, "c", "s", 0),
        EventId::derived(p, "d", "s", 0)
    );
}

#[test]
fn oversize_is_rejected_before_parsing() {
    let err = VumiApiEvent::decode(&[b' '; 300], 100).unwrap_err();
    assert_eq!(
        err,
        EventError::TooLarge {
            size: 300,
            limit: 100
        }
    );
    assert_eq!(
        err.to_string(),
        "event is 300 bytes, over the limit of 100 bytes"
    );
}

#[test]
fn errors_name_the_field() {
    let mut v = serde_json::to_value(sample()).unwrap();
    v["account_key"] = json!("acme corp");
    let err = decode_value(v).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"event field `account_key`: invalid account_key "acme corp": must match ^[A-Za-z0-9_-]{1,64}$"#
    );

    let mut v = serde_json::to_value(sample()).unwrap();
    v.as_object_mut().unwrap().remove("event_type");
    let err = decode_value(v).unwrap_err();
    assert!(
        err.to_string().contains("missing field `event_type`"),
        "{err}"
    );

    let mut v = serde_json::to_value(sample()).unwrap();
    v["occurred_at"] = json!("2026-11-22T10:00:00+02:00");
    let err = decode_value(v).unwrap_err();
    assert!(
        err.to_string().starts_with("event field `occurred_at`:"),
        "{err}"
    );
    assert!(err.to_string().contains("not in UTC"), "{err}");
}

#[test]
fn unknown_version_is_named() {
    let mut v = serde_json::to_value(sample()).unwrap();
    v["v"] = json!(2);
    v["new_field_of_v2"] = json!(true);
    let err = decode_value(v).unwrap_err();
    assert_eq!(
        err.to_string(),
        "event schema version 2 is not supported (this dispatcher reads version 1)"
    );
}

#[test]
fn bad_json_says_where() {
    let err = VumiApiEvent::decode(b"{\"v\": 1,", 1000).unwrap_err();
    assert_eq!(err.code(), "invalid_json");
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn defaults_fill_a_draft() {
    let draft = json!({
        "account_key": "acme", "conversation_key": "c1", "conversation_type": "survey",
        "event_type": "poll_complete", "event_data": {"score": 1}
    });
    let e =
        VumiApiEvent::decode_with_defaults(&serde_json::to_vec(&draft).unwrap(), 10_000).unwrap();
    assert_eq!(e.root_id, e.id);
    assert_eq!(e.depth, 0);
    // An explicit id is kept, so a retried post is deduplicated.
    let mut with_id = draft.clone();
    with_id["id"] = json!("0190b5a4-0000-7000-8000-000000000001");
    let e =
        VumiApiEvent::decode_with_defaults(&serde_json::to_vec(&with_id).unwrap(), 10_000).unwrap();
    assert_eq!(e.id.to_string(), "0190b5a4-0000-7000-8000-000000000001");
    assert_eq!(e.root_id, e.id);
}

/// Data nested as deep as the limit decodes; a level more is refused,
/// naming the field and the limit, whether the deep part is in an object
/// or an array.
#[test]
fn data_nested_past_the_limit_is_refused() {
    let nested = |levels: usize, wrap: fn(serde_json::Value) -> serde_json::Value| {
        // `event_data` is the first level.
        let mut deep = serde_json::json!("bottom");
        for _ in 1..levels {
            deep = wrap(deep);
        }
        let mut v = serde_json::to_value(sample()).unwrap();
        v["event_data"] = serde_json::json!({ "flat": 1, "deep": deep });
        decode_value(v)
    };
    let in_object = |v| serde_json::json!({ "a": v });
    let in_array = |v| serde_json::json!([1, v]);
    for wrap in [in_object as fn(_) -> _, in_array] {
        let fits = nested(MAX_DATA_DEPTH, wrap).unwrap();
        assert!(fits.encode(DEFAULT_MAX_EVENT_BYTES).is_ok());
        // Nor is one encoded, as a publisher or a step would send it.
        let mut deeper = fits.clone();
        deeper.event_data = json!({ "one": fits.event_data })
            .as_object()
            .unwrap()
            .clone();
        let err = deeper.encode(DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert!(err.to_string().contains("64 levels"), "{err}");
        let err = nested(MAX_DATA_DEPTH + 1, wrap).unwrap_err();
        assert_eq!(err.code(), "invalid_event");
        let message = err.to_string();
        assert!(
            message.contains("event_data") && message.contains("64 levels"),
            "{message}"
        );
    }
}
