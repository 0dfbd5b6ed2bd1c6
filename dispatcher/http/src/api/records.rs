//! The records chains keep: contacts, message records, and secrets
//! (write-only).

use super::*;

pub(super) async fn list_contacts(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let contacts = s
        .contacts
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(ContactList {
        account_key: account,
        contacts: contacts.iter().map(to_json).collect(),
    })
    .into_response())
}

pub(super) async fn show_contact(
    State(s): State<ApiState>,
    Path((account, key)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    // A contact can be asked for by its key, its msisdn or its e-mail.
    let contact = s
        .contacts
        .lookup(&account, &key)
        .map_err(ApiError::internal)?;
    match contact {
        // The record itself: a `Contact` (see `switchboard_api::records`).
        Some(c) => Ok(Json(c).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no contact {key:?}"
        ))),
    }
}

pub(super) async fn list_messages(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let messages = s
        .messages
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(MessageList {
        account_key: account,
        messages: messages.iter().map(to_json).collect(),
    })
    .into_response())
}

pub(super) async fn show_message(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    match s.messages.get(&account, &id).map_err(ApiError::internal)? {
        Some(m) => Ok(Json(m).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no message {id}"
        ))),
    }
}

/// Cancels a scheduled message before it goes: 409 `not_scheduled` once it
/// went (or was cancelled, or was never scheduled).
pub(super) async fn cancel_message(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let cancelled = s
        .messages
        .transition_from(
            &account,
            &id,
            MessageStatus::Scheduled,
            MessageStatus::Cancelled,
            "cancelled by the account",
        )
        .map_err(ApiError::internal)?;
    match cancelled {
        Some((m, true)) => {
            switchboard_handlers::release_recorded(s.idempotency.as_ref(), &m);
            tracing::info!(%account, message_id = id, "scheduled message cancelled");
            Ok(Json(m).into_response())
        }
        Some((m, false)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_scheduled",
            format!(
                "message {id} of account {account} is {}, not scheduled: only a scheduled \
                 message can be cancelled",
                m.status
            ),
        )),
        None => Err(ApiError::not_found(format!(
            "account {account} has no message {id}"
        ))),
    }
}

pub(super) async fn list_secrets(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let names = s.secrets.names(&account).map_err(ApiError::internal)?;
    Ok(Json(SecretList {
        account_key: account,
        secrets: names,
    })
    .into_response())
}

pub(super) async fn set_secret(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    check_secret_name(&name).map_err(|e| ApiError::bad_request("invalid_secret_name", e))?;
    // A trailing newline from `echo value | ...` is not part of the secret.
    let value = body.strip_suffix('\n').unwrap_or(&body);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_secret",
            "the secret's value is empty",
        ));
    }
    s.secrets
        .set(&account, &name, value)
        .map_err(ApiError::internal)?;
    // Durable before the answer: a chain applied next may sign with it.
    s.store.flush().await.map_err(ApiError::internal)?;
    tracing::info!(%account, secret = name, "secret set");
    Ok(Json(SecretSet {
        account_key: account,
        secret: name,
        set: true,
    })
    .into_response())
}

pub(super) async fn remove_secret(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    if s.secrets
        .get(&account, &name)
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "account {account} has no secret {name:?}"
        )));
    }
    let writes = s.config_write_lock();
    let mut users = Vec::new();
    if let Some(current) = s.chains.current(&account)? {
        for chain in &current.chains {
            for step in &chain.steps {
                if s.registry
                    .secrets_named(step)
                    .iter()
                    .any(|(_, named)| *named == name)
                {
                    users.push(format!("chain {} step {}", chain.name, step.step_name()));
                }
            }
        }
    }
    for hook in s.inbound.hooks.list(&account).map_err(ApiError::internal)? {
        if hook.secret.as_deref() == Some(name.as_str()) {
            users.push(format!(
                "the inbound {} URL (`switchboard inbound revoke {account} {}`)",
                hook.provider.name(),
                hook.provider.name()
            ));
        }
    }
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "secret_in_use",
            format!(
                "secret {name:?} of account {account} is used by {}; change or remove them first",
                users.join(", ")
            ),
        ));
    }
    let removed = s
        .secrets
        .remove(&account, &name)
        .map_err(ApiError::internal)?;
    drop(writes);
    if removed {
        s.store.flush().await.map_err(ApiError::internal)?;
        Ok(Json(SecretRemoved {
            account_key: account,
            secret: name,
            removed: true,
        })
        .into_response())
    } else {
        Err(ApiError::not_found(format!(
            "account {account} has no secret {name:?}"
        )))
    }
}
