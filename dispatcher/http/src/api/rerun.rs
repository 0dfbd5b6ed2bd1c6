//! Running an event again, whole: `POST
//! /v1/accounts/{account}/events/{id}/rerun` and the run view's button. The
//! event's data goes on the bus again as a new event (a new id, so a new
//! trace, new message ids, new webhook ids: every chain runs from its first
//! step, and steps with effects act again). Replaying a dead letter resumes
//! at the failed step instead.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use switchboard_api::events::Accepted;
use switchboard_engine::bus::BusError;
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};

use super::{ApiError, ApiState, account_key};

pub(super) async fn rerun(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let account = account_key(&account)?;
    let again = rerun_event(&s, &account, &id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            id: again.id,
            subject: again.subject(&s.prefix),
            duplicate: false,
        }),
    )
        .into_response())
}

/// Publishes `account`'s event `id` (found by its trace) again as a new
/// event; returns it.
pub(crate) async fn rerun_event(
    s: &ApiState,
    account: &AccountKey,
    id: &str,
) -> Result<VumiApiEvent, ApiError> {
    let not_found = || {
        ApiError::not_found(format!(
            "account {account} has no trace of event {id}: it cannot be run again"
        ))
    };
    let id = EventId::parse(id).map_err(|_| not_found())?;
    let trace = s
        .traces
        .get(account, &id)
        .map_err(ApiError::internal)?
        .ok_or_else(not_found)?;
    let old = trace.event;
    let again = VumiApiEvent::new(
        old.account_key,
        old.conversation_key,
        old.conversation_type,
        old.event_type,
        old.event_data,
    );
    // Each run again is a new event: a publish that failed may still have
    // reached the bus, and sending the request again would run it twice,
    // so the answer names the new event instead of asking for a retry.
    s.bus.publish(&again).await.map_err(|e| match &e {
        BusError::Unavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            format!(
                "{e}; the event may have been run again as {}: look for its trace before \
                 trying again",
                again.id
            ),
        ),
        BusError::Store(_) | BusError::InUse(_) => ApiError::internal(e),
    })?;
    tracing::info!(%account, event_id = %id, new_id = %again.id, "event run again as a new event");
    Ok(again)
}
