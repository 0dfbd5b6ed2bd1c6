//! The client's paths (`switchboard_api::paths`) against the router's
//! [`ROUTES`]: every path a client builds reaches a route, and every route
//! has a path function.

use super::ROUTES;

/// Whether `path` (percent-encoded, as sent) fits the axum `template`: the
/// same number of segments, literal segments equal, `{name}` anything.
fn fits(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}

/// The template axum routes `path` to: a literal segment wins over a
/// `{name}` one, as in axum.
fn route_of(path: &str) -> Option<&'static str> {
    ROUTES
        .iter()
        .map(|(_, template)| *template)
        .filter(|t| fits(t, path))
        .max_by_key(|t| t.split('/').filter(|s| !s.starts_with('{')).count())
}

#[test]
fn every_client_path_reaches_a_route() {
    for path in switchboard_api::paths::samples() {
        assert!(
            route_of(&path).is_some(),
            "{path} reaches no route of the router"
        );
    }
}

#[test]
fn every_route_has_a_client_path() {
    let reached: Vec<&str> = switchboard_api::paths::samples()
        .iter()
        .filter_map(|p| route_of(p))
        .collect();
    for (method, template) in ROUTES {
        assert!(
            reached.contains(template),
            "{method} {template} has no function in switchboard_api::paths"
        );
    }
}

#[test]
fn static_segments_win() {
    assert_eq!(
        route_of(&switchboard_api::paths::unmatched("acme")),
        Some("/v1/accounts/{account}/messages/unmatched")
    );
    assert_eq!(
        route_of(&switchboard_api::paths::dead_letters_replay("acme")),
        Some("/v1/accounts/{account}/dead-letters/replay")
    );
}

// The answers that used to be a stored record serialised as it is (with a
// field or two added) must still be exactly that: built from the record,
// the api type gives the record's own JSON.

/// `record`'s own JSON, with `extra` added.
fn record_json(record: &impl serde::Serialize, extra: serde_json::Value) -> serde_json::Value {
    let mut json = serde_json::to_value(record).expect("serialises");
    if let (Some(json), serde_json::Value::Object(extra)) = (json.as_object_mut(), extra) {
        json.extend(extra);
    }
    json
}

#[test]
fn a_chain_version_answers_as_stored() {
    let stored: switchboard_rules::ChainVersion = serde_json::from_value(serde_json::json!({
        "account_key": "acme",
        "version": 2,
        "applied_at": "2026-12-02T07:00:00.5Z",
        "change": "apply",
        "chains": [{
            "name": "welcome",
            "conversation_type": "survey",
            "event_type": "poll_complete",
            "when": "event.score > 3",
            "steps": [{"handler": "log", "name": "note"}]
        }]
    }))
    .expect("a chain version decodes");
    let answer = serde_json::to_value(super::version_json(&stored).0).expect("serialises");
    assert_eq!(answer, record_json(&stored, serde_json::json!({})));
}

#[test]
fn tokens_hooks_and_unmatched_answer_as_stored() {
    let at = time::macros::datetime!(2026-12-02 07:00:00.25 UTC);
    let account = switchboard_sdk::AccountKey::new("acme").expect("a valid key");
    for name in [None, Some("ci".to_string())] {
        let token = crate::auth::TokenRecord {
            id: "t1".into(),
            account_key: account.clone(),
            name,
            created_at: at,
        };
        assert_eq!(
            serde_json::to_value(token.answer()).expect("serialises"),
            record_json(&token, serde_json::json!({}))
        );
    }
    for secret in [None, Some("hook_key".to_string())] {
        let hook = crate::inbound::Hook {
            account_key: account.clone(),
            provider: crate::inbound::Provider::Webhook,
            created_at: at,
            secret,
        };
        assert_eq!(
            serde_json::to_value(hook.answer()).expect("serialises"),
            record_json(&hook, serde_json::json!({}))
        );
    }
    let unmatched = crate::inbound::Unmatched {
        id: "u1".into(),
        account_key: account,
        provider: crate::inbound::Provider::Sendgrid,
        result: "malformed".into(),
        reason: "not JSON".into(),
        record: serde_json::json!("text"),
        record_bytes: None,
        received_at: at,
    };
    assert_eq!(
        serde_json::to_value(unmatched.answer()).expect("serialises"),
        record_json(&unmatched, serde_json::json!({}))
    );
}

/// A passing failure of the shared state, however deeply wrapped, answers
/// 503 with `Retry-After` (clients retry it); a write that may or may not
/// be stored answers 500 `outcome_unknown` (retrying it blindly could apply
/// it twice); any other failure below the API answers 500.
#[test]
fn passing_store_failures_answer_503_and_others_500() {
    use axum::http::StatusCode;
    use switchboard_handlers::records::{RecordError, Records};
    use switchboard_store::StoreError;

    use super::ApiError;

    let wrapped = |source: StoreError| RecordError::Storage {
        records: Records::Contacts,
        account: switchboard_sdk::AccountKey::new("acme").expect("an account key"),
        source: Box::new(source),
    };
    let no_owner = ApiError::internal(wrapped(StoreError::Remote {
        message: "writing to partition 3 through its owner: no replica takes the partition's \
                  writes"
            .into(),
    }));
    assert_eq!(no_owner.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        no_owner
            .message()
            .contains("no replica takes the partition's writes")
            && no_owner.message().ends_with("try again in a moment"),
        "{}",
        no_owner.message()
    );
    let moved = ApiError::internal(StoreError::PartitionMoved { partition: 3 });
    assert_eq!(moved.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = |e: ApiError| {
        axum::response::IntoResponse::into_response(e)
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .map(|v| v.to_str().expect("an ASCII header").to_string())
    };
    assert_eq!(retry_after(moved).as_deref(), Some("1"));
    let unsupported = ApiError::internal(wrapped(StoreError::Unsupported {
        what: "one write across partitions",
    }));
    assert_eq!(unsupported.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry_after(unsupported), None);
    let unknown = ApiError::internal(wrapped(StoreError::OutcomeUnknown {
        message: "writing to partition 3 through its owner: the changelog did not answer; the \
                  write may or may not be stored"
            .into(),
    }));
    assert_eq!(unknown.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(unknown.code, "outcome_unknown");
    assert!(
        unknown.message().contains("may or may not be stored")
            && unknown
                .message()
                .ends_with("read it back before sending it again"),
        "{}",
        unknown.message()
    );
    assert_eq!(retry_after(unknown), None);
    let io = ApiError::internal(std::io::Error::other("disk full"));
    assert_eq!(io.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// The errors that carry a store's error inside (chains, tokens, dead
/// letters) answer as the store's error does, and a bus's failure answers
/// 503 with `Retry-After` only when it is the bus's own, not the store's
/// under the embedded bus.
#[test]
fn wrapped_store_and_bus_failures_answer_as_what_they_carry() {
    use axum::http::StatusCode;
    use switchboard_engine::bus::BusError;
    use switchboard_engine::executor::LetterError;
    use switchboard_rules::ChainStoreError;
    use switchboard_store::StoreError;

    use super::ApiError;
    use crate::auth::TokenError;

    let retry_after = |e: ApiError| {
        axum::response::IntoResponse::into_response(e)
            .headers()
            .contains_key(axum::http::header::RETRY_AFTER)
    };
    let moved = ApiError::from(ChainStoreError::Store(StoreError::PartitionMoved {
        partition: 3,
    }));
    assert_eq!(moved.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry_after(moved));
    let unknown = ApiError::internal(TokenError::Store(StoreError::OutcomeUnknown {
        message: "no answer".into(),
    }));
    assert_eq!(unknown.code, "outcome_unknown");
    let bus_down = ApiError::from(LetterError::Bus {
        id: "l1".into(),
        source: BusError::Unavailable("no connection".into()),
    });
    assert_eq!(bus_down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(bus_down.code, "bus_unavailable");
    assert!(retry_after(bus_down));
    let bus_store = ApiError::from(LetterError::Bus {
        id: "l1".into(),
        source: BusError::Store(StoreError::Unsupported { what: "this" }),
    });
    assert_eq!(bus_store.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!retry_after(bus_store));
}
