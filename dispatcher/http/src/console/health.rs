//! The dispatcher's health, for the admin: the bus and its lag, the store,
//! events by outcome over the last hour, dead letters by account, and the
//! replicas sharing the bus with the partitions each handles, as this one
//! sees them.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use minijinja::context;
use serde_json::{Value, json};
use switchboard_engine::dead_letters::LetterStatus;
use switchboard_engine::metrics::Outcome;
use switchboard_store::Collection;

use super::{Page, SignedIn, error_page, internal, render, session_view, view};
use crate::api::ApiState;
use crate::auth::Principal;

pub(super) async fn page(State(s): State<ApiState>, SignedIn(session): SignedIn) -> Page {
    if session.principal != Principal::Admin {
        return Err(error_page(
            StatusCode::NOT_FOUND,
            Some(&session),
            "The dispatcher's health is for the admin token.",
        )
        .into());
    }
    let lag = s.bus.lag().await;
    let (covered, recent) = s.metrics.recent();
    let outcomes: Vec<Value> = Outcome::ALL
        .iter()
        .zip(recent)
        .map(|(o, n)| json!({"outcome": o.label(), "count": n}))
        .collect();
    let mut letters = Vec::new();
    let mut dead_total = 0;
    for account in s.chains.accounts() {
        let mut dead = 0;
        s.letters
            .each(account.as_str(), |l| {
                dead += usize::from(l.status == LetterStatus::Dead);
            })
            .map_err(|e| internal(&session, &e))?;
        if dead > 0 {
            dead_total += dead;
            letters.push(json!({"account": account.to_string(), "dead": dead}));
        }
    }
    letters.sort_by_key(|l| std::cmp::Reverse(l["dead"].as_u64()));
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    // Every replica with a heartbeat in the store, and how this one sees
    // it: live with its partitions, or gone (its heartbeat stopped
    // changing; the entry is removed a minute later).
    let seen = s.replicas.as_ref().map(|v| v.borrow().clone());
    let replicas: Vec<Value> = if s.store.is_replicated() {
        s.store
            .scan_prefix(Collection::Replicas, &[])
            .map_err(|e| internal(&session, &e))?
            .into_iter()
            .map(|(id, beat)| {
                let id = String::from_utf8_lossy(&id).into_owned();
                let at = serde_json::from_slice::<Value>(&beat)
                    .ok()
                    .and_then(|b| b["at_ms"].as_u64());
                let share = seen
                    .as_ref()
                    .and_then(|v| v.members.iter().find(|m| m.id == id));
                json!({
                    "me": seen.as_ref().is_some_and(|v| v.me == id),
                    "live": share.is_some(),
                    "partitions": share.map(|m| m.partitions.clone()),
                    "heartbeat_s_ago": at.map(|at| now_ms.saturating_sub(at) as f64 / 1000.0),
                    "id": id,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let partitions = s.partitions.as_ref().map(|p| p.borrow().clone());
    Ok(render(
        "health.html",
        context! {
            session => session_view(&session),
            bus => s.bus.kind(),
            bus_connected => s.bus.is_ready(),
            lag,
            replicated => s.store.is_replicated(),
            caught_up => s.store.is_caught_up(),
            minutes => covered.as_secs() / 60,
            outcomes => view(&outcomes),
            dead_total,
            letters => view(&letters),
            replicas => view(&replicas),
            partitions,
        },
    ))
}
