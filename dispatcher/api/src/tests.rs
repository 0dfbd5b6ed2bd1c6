//! Round trips of the wire format: each case is the JSON the server sends,
//! decoded into its type and encoded again, which must give the same JSON —
//! the same keys, absent where they were absent and null where null.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::chains::{ChainHistory, ChainVersion};
use crate::dead_letters::{ReplayFilter, ReplayedLetters};
use crate::error::{ChainProblem, ErrorResponse};
use crate::health::Readiness;
use crate::inbound::{CreateInboundRequest, CreatedInbound, InboundList, Receipt};
use crate::tokens::{CreatedToken, NewTokenRequest, TokenList};
use crate::{ListQuery, paths};

/// Decodes `wire` as a `T`, checks that it encodes back to `wire` exactly,
/// and returns it.
fn check<T: Serialize + DeserializeOwned>(wire: Value) -> T {
    let typed: T = serde_json::from_value(wire.clone())
        .unwrap_or_else(|e| panic!("{wire} does not decode: {e}"));
    let again = serde_json::to_value(&typed).expect("serialises");
    assert_eq!(again, wire, "the round trip changed the JSON");
    typed
}

#[test]
fn error_without_details_has_no_details_key() {
    let e: ErrorResponse = check(json!({"error": {"code": "not_found", "message": "no such"}}));
    assert_eq!(e.error.code, "not_found");
    assert_eq!(e, ErrorResponse::new("not_found", "no such"));
}

#[test]
fn error_with_chain_problems() {
    let e: ErrorResponse = check(json!({"error": {
        "code": "invalid_chains",
        "message": "2 problems",
        "details": [
            {"chain": "welcome", "step": {"position": 2, "name": "text"}, "field": "config.to", "message": "missing"},
            {"chain": null, "step": null, "field": null, "message": "no chains"}
        ]
    }}));
    let problems: Vec<ChainProblem> =
        serde_json::from_value(e.error.details.expect("details")).expect("problems decode");
    assert_eq!(problems[0].step.as_ref().map(|s| s.position), Some(2));
    assert_eq!(problems[1].chain, None);
}

#[test]
fn chain_version_and_history() {
    let v: ChainVersion = check(json!({
        "account_key": "acme",
        "version": 3,
        "applied_at": "2026-12-02T07:00:00.123456789Z",
        "change": "apply",
        "chains": [{"name": "welcome", "steps": []}]
    }));
    assert_eq!(v.version, 3);
    let h: ChainHistory = check(json!({
        "account_key": "acme",
        "versions": [{"version": 1, "applied_at": "2026-12-02T07:00:00Z", "change": "remove all", "chains": []}]
    }));
    assert_eq!(h.versions[0].change, "remove all");
}

#[test]
fn readiness_partitions_are_null_when_not_shared() {
    let r: Readiness = check(json!({
        "ready": false, "bus": "embedded", "bus_connected": true, "store_open": true,
        "started": false, "replicated": false, "caught_up": true, "partitions": null,
        "state_partitions": null
    }));
    assert_eq!(r.partitions, None);
    assert_eq!(r.state_partitions, None);
    check::<Readiness>(json!({
        "ready": true, "bus": "nats", "bus_connected": true, "store_open": true,
        "started": true, "replicated": true, "caught_up": true, "partitions": [0, 3],
        "state_partitions": [3]
    }));
}

#[test]
fn token_name_is_absent_when_unnamed() {
    let created: CreatedToken = check(json!({
        "id": "0190d0b6-3c4e-7f00-8000-000000000000", "account_key": "acme",
        "created_at": "2026-12-02T07:00:00Z", "token": "sbt_x"
    }));
    assert_eq!(created.name, None);
    check::<TokenList>(json!({"account_key": "acme", "tokens": [
        {"id": "a", "account_key": "acme", "name": "ci", "created_at": "2026-12-02T07:00:00Z"},
        {"id": "b", "account_key": "acme", "created_at": "2026-12-02T07:00:01Z"}
    ]}));
    assert_eq!(
        serde_json::to_value(NewTokenRequest::default()).expect("serialises"),
        json!({})
    );
}

#[test]
fn inbound_secret_is_absent_for_providers_without_one() {
    check::<CreatedInbound>(json!({
        "account_key": "acme", "provider": "sendgrid", "created_at": "2026-12-02T07:00:00Z",
        "url": "http://x/v1/inbound/acme/sendgrid/s", "rotated": false
    }));
    check::<InboundList>(json!({"account_key": "acme", "inbound": [
        {"account_key": "acme", "provider": "webhook", "created_at": "2026-12-02T07:00:00Z", "secret": "hook_key"}
    ]}));
    assert_eq!(
        serde_json::to_value(CreateInboundRequest::default()).expect("serialises"),
        json!({"rotate": false})
    );
}

#[test]
fn receipt_leaves_out_what_does_not_apply() {
    let r: Receipt = check(json!({
        "provider": "sendgrid", "records": 2, "matched": 1, "unmatched": 1,
        "results": [
            {"result": "matched", "message_id": "m1", "status": "delivered", "transition": "applied", "event_id": "e1"},
            {"result": "unknown_message", "unmatched_id": "u1", "reason": "no such message"}
        ]
    }));
    assert_eq!(r.results[1].status, None);
}

#[test]
fn replay_filter_and_answer() {
    check::<ReplayedLetters>(json!({
        "account_key": "~unknown", "replayed": ["a"], "skipped": [{"id": "b", "error": "no event"}]
    }));
    assert_eq!(
        serde_json::to_value(ReplayFilter::default()).expect("serialises"),
        json!({})
    );
    let f: ReplayFilter = check(json!({"chain": "pay", "since": "2026-11-22T09:00:00Z"}));
    assert!(f.since.is_some());
    assert!(serde_json::from_value::<ReplayFilter>(json!({"chains": "pay"})).is_err());
}

#[test]
fn list_query_limits() {
    assert_eq!(ListQuery::default().effective_limit(), 100);
    assert_eq!(ListQuery::limit(50_000).effective_limit(), 10_000);
}

#[test]
fn paths_encode_each_segment() {
    assert_eq!(paths::chains("acme"), "/v1/accounts/acme/chains");
    assert_eq!(
        paths::contact("acme", "+27 82@x/y"),
        "/v1/accounts/acme/contacts/%2B27%2082%40x%2Fy"
    );
    assert_eq!(
        paths::dead_letters("~unknown"),
        "/v1/accounts/~unknown/dead-letters"
    );
}
