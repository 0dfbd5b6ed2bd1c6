//! Preferences: what the account sees and sets for a contact or an address,
//! and the one-click unsubscribe links its recipients follow
//! ([`crate::unsubscribe`]).

use serde_json::json;
use switchboard_api::records::{PreferencesAnswer, SetPreference};
use switchboard_handlers::records::contacts::{normalize_email, normalize_msisdn};
use switchboard_handlers::records::{Channel, Choice, Topic};

use crate::unsubscribe::{UnsubscribeError, escape, page, topic_words};

use super::*;

/// Whom preferences are asked about: a contact, or an address no contact has.
struct Who {
    /// The contact's key, if a contact.
    contact: Option<String>,
    /// Its e-mail address.
    email: Option<String>,
    /// Its number.
    sms: Option<String>,
}

/// The addresses `who` (a contact's key, msisdn or e-mail, or an address
/// no contact has) stands for.
fn addresses(s: &ApiState, account: &AccountKey, who: &str) -> Result<Who, ApiError> {
    if let Some(c) = s
        .contacts
        .lookup(account, who)
        .map_err(ApiError::internal)?
    {
        return Ok(Who {
            contact: Some(c.key),
            email: c.email,
            sms: c.msisdn,
        });
    }
    if let Ok(email) = normalize_email(who) {
        return Ok(Who {
            contact: None,
            email: Some(email),
            sms: None,
        });
    }
    if let Ok(msisdn) = normalize_msisdn(who) {
        return Ok(Who {
            contact: None,
            email: None,
            sms: Some(msisdn),
        });
    }
    Err(ApiError::not_found(format!(
        "account {account} has no contact {who:?}, and it is not an e-mail address or an \
         E.164 number"
    )))
}

fn channel_preferences(
    s: &ApiState,
    account: &AccountKey,
    channel: Channel,
    address: Option<String>,
) -> Result<Option<Value>, ApiError> {
    let Some(address) = address else {
        return Ok(None);
    };
    let stored = s
        .preferences
        .get(account, channel, &address)
        .map_err(ApiError::internal)?;
    Ok(Some(match stored {
        Some(p) => json!({"address": p.address, "topics": p.topics}),
        None => json!({"address": address, "topics": {}}),
    }))
}

fn answer(s: &ApiState, account: AccountKey, who: &str) -> ApiResult {
    let Who {
        contact,
        email,
        sms,
    } = addresses(s, &account, who)?;
    let email = channel_preferences(s, &account, Channel::Email, email)?;
    let sms = channel_preferences(s, &account, Channel::Sms, sms)?;
    Ok(Json(PreferencesAnswer {
        account_key: account,
        contact,
        email,
        sms,
    })
    .into_response())
}

pub(super) async fn show_preferences(
    State(s): State<ApiState>,
    Path((account, who)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    answer(&s, account, &who)
}

pub(super) async fn set_preferences(
    State(s): State<ApiState>,
    Path((account, who)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let set: SetPreference = serde_json::from_str(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "the body must be {{\"channel\": \"email\"|\"sms\", \"subscribed\": true|false, \
                 \"topic\": \"all\"|\"template:SLUG\"|\"category:NAME\" (optional), \"reason\": \
                 TEXT (optional)}}: {e}"
            ),
        )
    })?;
    let channel = match set.channel.as_str() {
        "email" => Channel::Email,
        "sms" => Channel::Sms,
        other => {
            return Err(ApiError::bad_request(
                "invalid_channel",
                format!("channel {other:?} is not one of \"email\", \"sms\""),
            ));
        }
    };
    let topic = Topic::parse(set.topic.as_deref().unwrap_or("all"))
        .map_err(|e| ApiError::bad_request("invalid_topic", format!("topic: {e}")))?;
    let Who {
        contact,
        email,
        sms,
    } = addresses(&s, &account, &who)?;
    let address = match channel {
        Channel::Email => email,
        Channel::Sms => sms,
    }
    .ok_or_else(|| {
        ApiError::bad_request(
            "no_address",
            format!(
                "{} has no {} address to set preferences for",
                contact
                    .as_deref()
                    .map_or(who.clone(), |k| format!("contact {k:?}")),
                channel.as_str()
            ),
        )
    })?;
    let cause = set.reason.unwrap_or_else(|| {
        if set.subscribed {
            "opted in by the account".to_string()
        } else {
            "opted out by the account".to_string()
        }
    });
    s.preferences
        .choose(
            &account,
            (channel, &address),
            &topic,
            Choice {
                subscribed: set.subscribed,
                at: switchboard_sdk::now(),
                cause,
                source: None,
            },
        )
        .map_err(ApiError::internal)?;
    s.store.flush().await.map_err(ApiError::internal)?;
    tracing::info!(%account, channel = channel.as_str(), %topic, subscribed = set.subscribed,
        "preference set");
    answer(&s, account, &who)
}

/// The page of a link that is not ours.
fn invalid_link(e: UnsubscribeError) -> Response {
    match e {
        UnsubscribeError::Invalid => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page(
                "Link not valid",
                &format!("<p>{}.</p>", escape(&e.to_string())),
            ),
        )
            .into_response(),
        e => {
            tracing::error!(error = %e, "an unsubscribe link could not be followed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                page(
                    "Please try again",
                    "<p>Your request could not be recorded just now. Please try again in a \
                     minute.</p>",
                ),
            )
                .into_response()
        }
    }
}

fn html(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// `GET` of a link (a person, or a scanner): asks, changes nothing.
pub(super) async fn unsubscribe_page(
    State(s): State<ApiState>,
    Path((account, token)): Path<(String, String)>,
) -> Response {
    match s.unsubscribe.verify(&account, &token) {
        Ok(link) => html(page(
            "Unsubscribe",
            &format!(
                "<p>Stop sending {} to <strong>{}</strong>?</p>\
                 <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" \
                 value=\"One-Click\"><button type=\"submit\">Unsubscribe</button></form>",
                escape(&topic_words(&link)),
                escape(&link.address)
            ),
        )),
        Err(e) => invalid_link(e),
    }
}

/// `POST` of a link: the one-click unsubscribe (RFC 8058), from a mail
/// client or the page's button.
pub(super) async fn unsubscribe_one_click(
    State(s): State<ApiState>,
    Path((account, token)): Path<(String, String)>,
) -> Response {
    match s.unsubscribe.unsubscribe(&account, &token).await {
        Ok(link) => html(page(
            "Unsubscribed",
            &format!(
                "<p><strong>{}</strong> will not be sent {} any more.</p>",
                escape(&link.address),
                escape(&topic_words(&link))
            ),
        )),
        Err(e) => invalid_link(e),
    }
}
