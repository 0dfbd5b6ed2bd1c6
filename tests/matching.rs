//! Which chains an event runs, end to end over HTTP on the embedded bus: one
//! table of (conversation type, event type, conversation key) → the chains
//! the event's trace shows, in file order.

use serde_json::json;

use crate::util::{Dispatcher, TIMEOUT, chain_names};

const CHAINS: &str = r#"
account_key = "match"

[[chains]]
name = "exact"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"

[[chains]]
name = "any-survey-event"
conversation_type = "survey"
event_type = "*"

[[chains.steps]]
handler = "log"

[[chains]]
name = "poll-complete-anywhere"
conversation_type = "*"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"

[[chains]]
name = "poll-7-only"
conversation_type = "survey"
event_type = "poll_complete"
conversation_key = "poll-7"

[[chains.steps]]
handler = "log"

[[chains]]
name = "vip"
conversation_type = "*"
event_type = "*"
conversation_key = "vip-1"

[[chains.steps]]
handler = "log"

[[chains]]
name = "default"

[[chains.steps]]
handler = "log"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_run_every_matching_chain_or_else_the_default() {
    let d = Dispatcher::embedded();
    d.apply_chains("match.toml", CHAINS).await;

    // (conversation_type, event_type, conversation_key) → chains, in file order.
    let table: &[(&str, &str, &str, &[&str])] = &[
        (
            "survey",
            "poll_complete",
            "poll-1",
            &["exact", "any-survey-event", "poll-complete-anywhere"],
        ),
        (
            "survey",
            "poll_complete",
            "poll-7",
            &[
                "exact",
                "any-survey-event",
                "poll-complete-anywhere",
                "poll-7-only",
            ],
        ),
        ("survey", "poll_started", "poll-7", &["any-survey-event"]),
        (
            "sms",
            "poll_complete",
            "poll-7",
            &["poll-complete-anywhere"],
        ),
        ("sms", "inbound", "poll-7", &["default"]),
        ("sms", "inbound", "vip-1", &["vip"]),
        (
            "survey",
            "poll_complete",
            "vip-1",
            &["exact", "any-survey-event", "poll-complete-anywhere", "vip"],
        ),
        // Keys are case-sensitive.
        (
            "Survey",
            "poll_complete",
            "poll-1",
            &["poll-complete-anywhere"],
        ),
        ("survey", "Poll_Complete", "VIP-1", &["any-survey-event"]),
    ];
    let mut posted = Vec::new();
    for (conversation_type, event_type, conversation, _) in table {
        let id = d
            .post_event(&json!({
                "account_key": "match",
                "conversation_key": conversation,
                "conversation_type": conversation_type,
                "event_type": event_type,
                "event_data": {},
            }))
            .await;
        posted.push(id);
    }
    for ((conversation_type, event_type, conversation, expected), id) in table.iter().zip(&posted) {
        let trace = d.wait_for_trace("match", id, TIMEOUT).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
        assert_eq!(
            chain_names(&trace),
            *expected,
            "{conversation_type}/{event_type} in {conversation}"
        );
        for chain in trace["chains"].as_array().unwrap() {
            assert_eq!(chain["version"], 1);
            assert_eq!(chain["steps"][0]["outcome"], "ok");
        }
    }
    assert_eq!(d.metric("handled", "match").await, table.len() as u64);
    assert_eq!(d.metric("unrouted", "match").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_no_chain_takes_are_unrouted_and_counted() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "nodefault.toml",
        r#"
account_key = "nodefault"

[[chains]]
name = "polls"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"
"#,
    )
    .await;
    let post = |account: &str, conversation_type: &str| {
        json!({
            "account_key": account,
            "conversation_key": "c-1",
            "conversation_type": conversation_type,
            "event_type": "poll_complete",
            "event_data": {},
        })
    };
    // An account with chains, but none for this event and no default.
    let unmatched = d.post_event(&post("nodefault", "sms")).await;
    // An account that never had chains.
    let stranger = d.post_event(&post("stranger", "survey")).await;
    // And one that the account's chain does take, for contrast.
    let matched = d.post_event(&post("nodefault", "survey")).await;

    for (account, id) in [("nodefault", &unmatched), ("stranger", &stranger)] {
        let trace = d.wait_for_trace(account, id, TIMEOUT).await;
        assert_eq!(trace["status"], "unrouted", "{trace:#}");
        assert_eq!(trace["chains"], json!([]));
        assert_eq!(trace["children"], json!([]));
        assert!(trace["finished_at"].is_string(), "{trace:#}");
    }
    let trace = d.wait_for_trace("nodefault", &matched, TIMEOUT).await;
    assert_eq!(trace["status"], "done");
    assert_eq!(chain_names(&trace), ["polls"]);

    assert_eq!(d.metric("unrouted", "nodefault").await, 1);
    assert_eq!(d.metric("unrouted", "stranger").await, 1);
    assert_eq!(d.metric("handled", "nodefault").await, 1);
    assert_eq!(d.metric("handled", "stranger").await, 0);
    assert_eq!(d.metric("received", "nodefault").await, 2);
    // A trace belongs to its account: another account cannot read it.
    assert_eq!(d.trace("stranger", &unmatched).await, None);
}
