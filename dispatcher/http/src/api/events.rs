//! Events: ingest, the account list, traces, the listing and the kinds of
//! event an account has had.

use super::*;
use switchboard_sdk::cloudevents;

/// How `POST /v1/events` reads its body, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ingest {
    /// The event envelope (`application/json`, or no type).
    Envelope,
    /// One structured-mode CloudEvent.
    CloudEvent,
    /// A batch of structured-mode CloudEvents.
    CloudEvents,
}

impl Ingest {
    fn of(headers: &HeaderMap) -> Self {
        let media = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match media.as_str() {
            cloudevents::STRUCTURED => Ingest::CloudEvent,
            cloudevents::BATCH => Ingest::CloudEvents,
            _ => Ingest::Envelope,
        }
    }
}

/// The events of a body, as `kind` says to read it, for `principal`.
fn events_of(
    body: &[u8],
    kind: Ingest,
    principal: &Principal,
    max_event_bytes: usize,
) -> Result<Vec<VumiApiEvent>, ApiError> {
    let account = match principal {
        Principal::Account(own) => Some(own),
        Principal::Admin => None,
        Principal::Receiver(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a receiver token cannot send events",
            ));
        }
    };
    let invalid = |e: cloudevents::CloudEventError| {
        ApiError::bad_request("invalid_cloudevent", e.to_string())
    };
    let json = || {
        serde_json::from_slice::<serde_json::Value>(body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}"))
        })
    };
    let events = match kind {
        Ingest::Envelope => {
            let event = VumiApiEvent::decode_with_defaults(body, max_event_bytes)
                .map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
            return Ok(vec![event]);
        }
        Ingest::CloudEvent => {
            vec![cloudevents::from_structured(json()?, account).map_err(invalid)?]
        }
        Ingest::CloudEvents => {
            let serde_json::Value::Array(items) = json()? else {
                return Err(ApiError::bad_request(
                    "invalid_cloudevent",
                    format!(
                        "a {} body is a JSON array of CloudEvents",
                        cloudevents::BATCH
                    ),
                ));
            };
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    cloudevents::from_structured(item, account).map_err(|e| {
                        ApiError::bad_request(
                            "invalid_cloudevent",
                            format!("CloudEvent [{i}]: {e}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    for event in &events {
        event
            .encode(max_event_bytes)
            .map_err(|e| ApiError::bad_request(e.code(), format!("event {}: {e}", event.id)))?;
    }
    Ok(events)
}

/// `POST /v1/events`: an event envelope, a structured-mode CloudEvent
/// (`application/cloudevents+json`) or a batch of them
/// (`application/cloudevents-batch+json`, answered with every event's
/// acceptance). A batch is checked, and its rate taken, whole before any
/// of it is published (a bus failure part-way answers 503: publishing the
/// batch again is safe, the bus drops what it has by id).
///
/// The request is an OpenTelemetry server span, continuing the trace of
/// its `traceparent` header; the events published carry its context.
pub(super) async fn ingest(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult {
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        target: switchboard_engine::otel::TARGET,
        "POST /v1/events",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = "/v1/events",
        http.response.status_code = tracing::field::Empty,
    );
    if !span.is_disabled()
        && let Some(parent) = switchboard_sdk::trace_context::extract(
            headers
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
        )
    {
        let _ = span.set_parent(parent);
    }
    let answer = publish_events(s, principal, headers, body)
        .instrument(span.clone())
        .await;
    let status = match &answer {
        Ok(response) => response.status(),
        Err(e) => e.status,
    };
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    answer
}

async fn publish_events(
    s: ApiState,
    principal: Principal,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    let kind = Ingest::of(&headers);
    let events = events_of(&body, kind, &principal, s.max_event_bytes)?;
    for event in &events {
        if let Principal::Account(own) = &principal
            && own != &event.account_key
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this token belongs to account {own}; it cannot publish events of account {}",
                    event.account_key
                ),
            ));
        }
    }
    // The whole batch's worth first: a batch is published whole or not at
    // all as far as the rate goes (every event is of one account: the
    // token's, or checked below for the admin's).
    let mut per_account: Vec<(&AccountKey, usize)> = Vec::new();
    for event in &events {
        match per_account
            .iter_mut()
            .find(|(a, _)| *a == &event.account_key)
        {
            Some((_, n)) => *n += 1,
            None => per_account.push((&event.account_key, 1)),
        }
    }
    for (account, n) in per_account {
        let wait = match s.ingest_limit.take_many(account.as_str(), n) {
            Ok(()) => continue,
            Err(wait) => wait,
        };
        let Some(wait) = wait else {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "a batch of {n} events of account {account} is more than its ingest burst \
                     (limits.ingest_burst) allows at once; send smaller batches"
                ),
            ));
        };
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "account {account} is over its ingest rate (limits.ingest_rate); retry in {secs} s"
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        return Ok(response);
    }
    let mut accepted = Vec::with_capacity(events.len());
    for event in &events {
        let published = s
            .bus
            .publish(event)
            .await
            .map_err(|e| ApiError::bus(&e, &e))?;
        accepted.push(Accepted {
            id: event.id,
            subject: event.subject(&s.prefix),
            duplicate: published.duplicate,
        });
    }
    if kind == Ingest::CloudEvents {
        return Ok((
            StatusCode::ACCEPTED,
            Json(switchboard_api::events::AcceptedBatch { accepted }),
        )
            .into_response());
    }
    let one = accepted.pop().expect("one event was accepted");
    Ok((StatusCode::ACCEPTED, Json(one)).into_response())
}

/// Accounts that have chains; for an account token, only its own.
pub(super) async fn list_accounts(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
) -> Json<AccountList> {
    let mut accounts = s.chains.accounts();
    accounts.retain(|a| principal.reaches(a.as_str()));
    Json(AccountList { accounts })
}

pub(super) async fn trace(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let id = EventId::parse(&id).map_err(|e| ApiError::bad_request("invalid_event_id", e))?;
    match s.traces.get(&account, &id).map_err(ApiError::internal)? {
        Some(trace) => Ok(Json(trace).into_response()),
        None => Err(ApiError::not_found(format!(
            "no trace of event {id} in account {account} (not handled yet, or never received)"
        ))),
    }
}

pub(super) async fn list_events(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<switchboard_api::events::EventListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let page = s
        .traces
        .list(&account, &q)
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::bad_request("invalid_cursor", e))?;
    Ok(Json(page).into_response())
}

pub(super) async fn account_counts(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    use switchboard_api::events::{AccountCounts, EventTypeCounts, InboundCount};
    let account = account_key(&account)?;
    let counts = s.metrics.of_account(account.as_str());
    let events = counts
        .events
        .into_iter()
        .map(|(event_type, n)| {
            let [received, handled, unrouted, expired, dead_lettered, retried] = n;
            EventTypeCounts {
                event_type,
                received,
                handled,
                unrouted,
                expired,
                dead_lettered,
                retried,
            }
        })
        .collect();
    let inbound = counts
        .inbound
        .into_iter()
        .map(|(provider, result, count)| InboundCount {
            provider,
            result: result.label().to_string(),
            count,
        })
        .collect();
    Ok(Json(AccountCounts {
        account_key: account,
        since: s.metrics.started(),
        events,
        inbound,
    })
    .into_response())
}

pub(super) async fn list_event_kinds(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let kinds = s.event_kinds.of(&account).map_err(ApiError::internal)?;
    Ok(Json(switchboard_api::events::EventKindList {
        account_key: account,
        kinds,
    })
    .into_response())
}

/// `GET /v1/accounts/{account}/timers`: the chains of the account paused
/// by a `delay` step, the soonest to go on first.
pub(super) async fn list_timers(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    use switchboard_api::timers::{Timer, TimerList};
    let account = account_key(&account)?;
    let timers = switchboard_engine::timers::list(&s.store, &account, q.effective_limit())
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|t| Timer {
            event_id: t.event_id,
            chain: t.chain,
            due_at: time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(t.due_ms) * 1_000_000,
            )
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        })
        .collect();
    Ok(Json(TimerList {
        account_key: account,
        timers,
    })
    .into_response())
}
