//! Dead letters: list, show, replay (one or many) and discard.

use super::*;

pub(super) async fn list_dead_letters(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    dead_letter_account(&account)?;
    let letters = s
        .letters
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(DeadLetterList {
        account_key: account,
        dead_letters: letters.iter().map(to_json).collect(),
    })
    .into_response())
}

pub(super) async fn show_dead_letter(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    dead_letter_account(&account)?;
    match s.letters.get(&account, &id).map_err(ApiError::internal)? {
        Some(letter) => Ok(Json(letter).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no dead letter {id}"
        ))),
    }
}

impl From<LetterError> for ApiError {
    fn from(e: LetterError) -> Self {
        match &e {
            LetterError::NotFound { .. } => ApiError::not_found(e.to_string()),
            LetterError::NoEvent(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_replayable", e.to_string())
            }
            LetterError::Replaying(_) => {
                ApiError::new(StatusCode::CONFLICT, "being_replayed", e.to_string())
            }
            LetterError::Store(_) => ApiError::internal(e),
            LetterError::Bus { source, .. } => ApiError::bus(&e, source),
        }
    }
}

pub(super) async fn replay_dead_letter(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    dead_letter_account(&account)?;
    let letter = s.letters.replay(&account, &id).await?;
    Ok(Json(ReplayedLetter {
        account_key: account,
        replayed: to_json(&letter),
    })
    .into_response())
}

pub(super) async fn discard_dead_letter(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    dead_letter_account(&account)?;
    let letter = s.letters.discard(&account, &id).await?;
    Ok(Json(DiscardedLetter {
        account_key: account,
        discarded: to_json(&letter),
    })
    .into_response())
}

/// Replays every dead letter of the account that the filter selects and that
/// holds an event, oldest first. Letters already being replayed are left alone.
pub(super) async fn replay_dead_letters(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    TextBody(body): TextBody,
) -> ApiResult {
    dead_letter_account(&account)?;
    let filter: ReplayFilter = if body.trim().is_empty() {
        ReplayFilter::default()
    } else {
        serde_json::from_str(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_filter",
                format!(
                    "the body must be {{\"chain\": NAME, \"since\": RFC 3339 time}}, both optional: {e}"
                ),
            )
        })?
    };
    // The ids of those selected (read a page at a time: an account's many
    // letters are never all in memory), then each replayed: one failing
    // again is filed anew and not replayed again by this request.
    let mut selected = Vec::new();
    s.letters
        .each(&account, |letter| {
            let wanted = letter.status == LetterStatus::Dead
                && filter
                    .chain
                    .as_ref()
                    .is_none_or(|c| letter.chain.as_ref() == Some(c))
                && filter.since.is_none_or(|t| letter.at >= t);
            if wanted {
                selected.push(letter.id);
            }
        })
        .map_err(ApiError::internal)?;
    let mut replayed = Vec::new();
    let mut skipped = Vec::new();
    for id in selected {
        match s.letters.replay(&account, &id).await {
            Ok(_) => replayed.push(id),
            Err(e @ LetterError::NoEvent(_)) => {
                skipped.push(SkippedLetter {
                    id,
                    error: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(ReplayedLetters {
        account_key: account,
        replayed,
        skipped,
    })
    .into_response())
}
