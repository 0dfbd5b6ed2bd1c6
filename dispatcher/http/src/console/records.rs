//! The contacts and messages pages: what an account's chains made and
//! sent, and what providers posted that matched nothing.

use axum::extract::{Query, State};
use minijinja::context;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_sdk::format_rfc3339;

use super::{OnAccount, Page, internal, render, session_view, view};
use crate::api::ApiState;

/// Rows a records page shows at most.
const SHOWN: usize = 200;

#[derive(Deserialize)]
pub(super) struct Search {
    /// A contact's key, msisdn or e-mail.
    #[serde(default)]
    q: String,
}

pub(super) async fn contacts(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Query(search): Query<Search>,
) -> Page {
    let q = search.q.trim().to_string();
    let found = if q.is_empty() {
        s.contacts.list(&key, SHOWN)
    } else {
        s.contacts.lookup(&key, &q).map(|c| c.into_iter().collect())
    }
    .map_err(|e| internal(&session, &e))?;
    let rows: Vec<Value> = found
        .iter()
        .map(|c| {
            json!({
                "key": c.key,
                "name": c.name,
                "msisdn": c.msisdn,
                "email": c.email,
                "fields": if c.fields.is_empty() { None } else { serde_json::to_string(&c.fields).ok() },
                "updated_at": format_rfc3339(c.updated_at),
            })
        })
        .collect();
    Ok(render(
        "contacts.html",
        context! {
            account => key.as_str(),
            q,
            contacts => view(&rows),
            shown => SHOWN,
            session => session_view(&session),
        },
    ))
}

pub(super) async fn messages(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
) -> Page {
    let mut found = s
        .messages
        .list(&key, SHOWN)
        .map_err(|e| internal(&session, &e))?;
    found.sort_by_key(|m| std::cmp::Reverse(m.created_at));
    let rows: Vec<Value> = found
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "channel": serde_json::to_value(m.channel).ok(),
                "recipient": m.recipient,
                "subject": m.subject,
                "body": m.body,
                "provider": m.provider,
                "status": serde_json::to_value(m.status).ok(),
                "event_id": m.event_id,
                "chain": m.chain,
                "step": m.step,
                "created_at": format_rfc3339(m.created_at),
                "transitions": m.transitions.iter().map(|t| json!({
                    "from": t.from.and_then(|f| serde_json::to_value(f).ok()),
                    "to": serde_json::to_value(t.to).ok(),
                    "at": format_rfc3339(t.at),
                    "cause": t.cause,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(render(
        "messages.html",
        context! {
            account => key.as_str(),
            messages => view(&rows),
            shown => SHOWN,
            session => session_view(&session),
        },
    ))
}

pub(super) async fn unmatched(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
) -> Page {
    let found = s
        .inbound
        .unmatched
        .list(&key, SHOWN)
        .map_err(|e| internal(&session, &e))?;
    let rows: Vec<Value> = found
        .iter()
        .map(|u| {
            json!({
                "provider": u.provider.name(),
                "result": u.result,
                "reason": u.reason,
                "record": serde_json::to_string_pretty(&u.record).unwrap_or_default(),
                "received_at": format_rfc3339(u.received_at),
            })
        })
        .collect();
    Ok(render(
        "unmatched.html",
        context! {
            account => key.as_str(),
            unmatched => view(&rows),
            session => session_view(&session),
        },
    ))
}
