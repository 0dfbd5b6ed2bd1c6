//! Twilio's Messages API, and the guard that keeps a retry from texting
//! twice.
//!
//! Twilio takes no idempotency key: a send whose answer never came (a
//! timeout, a connection reset) may or may not have created the message.
//! So a message is recorded `sending` before it is handed over, and a step
//! run again that finds it so waits until Twilio's answer could no longer
//! come ([`answer_settled`]), then lists Twilio's recent messages to that
//! number and looks for it — same recipient, sender and body (as the record
//! kept them when it was handed over, not as they render now), created
//! since it was handed over, and not already another of the account's
//! messages — before sending it again. Twilio's answer is needed: if it cannot be
//! asked, the step is retried rather than risk a second text.

use serde_json::Value;
use time::OffsetDateTime;

use super::{DEFAULT_TIMEOUT, TwilioSms};
use crate::StepError;
use crate::ports::{HttpPort, HttpRequest, Method};
use crate::records::{Channel, MessageRecord, Messages};

/// How much earlier than our clock's handing-over time Twilio's
/// `date_created` may be (the clocks differ; Twilio's has whole seconds).
const CLOCK_SLACK: time::Duration = time::Duration::seconds(60);

/// How many of the number's latest messages are looked through.
const PAGE_SIZE: &str = "50";

/// Whether Twilio is to be asked about `message`, handed over at `since`
/// with no answer: not before the provider's timeout has passed twice over
/// since then — by then a request Twilio was still working on when the
/// answer was given up on has become a message, or never will — else the
/// step is retried when it has.
pub(super) fn answer_settled(
    p: &TwilioSms,
    message: &MessageRecord,
    since: OffsetDateTime,
) -> Result<(), StepError> {
    let timeout = p.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let settled = since + timeout * 2;
    let wait = settled - switchboard_sdk::now();
    if wait <= time::Duration::ZERO {
        return Ok(());
    }
    Err(StepError::retryable(
        format!(
            "message {} was handed to Twilio at {} with no answer: Twilio is asked whether it has \
             it from {} on, before it is sent again",
            message.id,
            switchboard_sdk::format_rfc3339(since),
            switchboard_sdk::format_rfc3339(settled)
        ),
        Some(wait.unsigned_abs()),
    ))
}

/// The Messages resource of the provider's account.
pub(super) fn messages_url(p: &TwilioSms) -> String {
    format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        p.base_url.trim_end_matches('/'),
        p.account_sid
    )
}

/// The sid Twilio gave `message` (from `from`, its whole text `text`),
/// handed over at `since` with no answer, if Twilio has it; `None` if it
/// has not (it is to be sent).
pub(super) async fn find_earlier(
    p: &TwilioSms,
    http: &dyn HttpPort,
    messages: &dyn Messages,
    (message, from, text): (&MessageRecord, Option<&str>, &str),
    since: OffsetDateTime,
) -> Result<Option<String>, StepError> {
    let asking = || {
        format!(
            "asking Twilio whether it has message {} (handed over at {} with no answer) before \
             sending it again",
            message.id,
            switchboard_sdk::format_rfc3339(since)
        )
    };
    let query = {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("To", &message.recipient);
        if let Some(from) = from {
            query.append_pair("From", from);
        }
        query.append_pair("PageSize", PAGE_SIZE);
        query.finish()
    };
    let response = http
        .send(HttpRequest {
            method: Method::Get,
            url: format!("{}?{query}", messages_url(p)),
            headers: Vec::new(),
            body: Vec::new(),
            basic_auth: Some((p.account_sid.clone(), p.auth_token.clone())),
            timeout: p.timeout.unwrap_or(DEFAULT_TIMEOUT),
            provider: message.provider.clone(),
            from_account: false,
        })
        .await
        .map_err(|e| StepError::retryable(format!("{}: {e}", asking()), None))?;
    // Whatever Twilio answers, the message is not sent again without its
    // word, nor recorded failed while it may have gone.
    if let Err(e) = response.check(&asking()) {
        let after = match &e {
            StepError::Retryable { after, .. } => *after,
            StepError::Permanent { .. } => None,
        };
        return Err(StepError::retryable(e.to_string(), after));
    }
    let listed: Value = serde_json::from_slice(&response.body).map_err(|e| {
        StepError::retryable(
            format!("{}: the answer is not Twilio's message list: {e}", asking()),
            None,
        )
    })?;
    let sender = match from {
        Some(from) => Sender::From(from),
        None => Sender::Service(p.messaging_service_sid.as_deref().unwrap_or_default()),
    };
    for sid in candidates(&listed, (&message.recipient, text), sender, since) {
        // A sid another of the account's messages has is not this one's
        // (the same text sent twice to one number).
        match messages.find_by_remote_id(&message.account_key, Channel::Sms, &sid) {
            Ok(Some(other)) if other.id != message.id => continue,
            Ok(_) => return Ok(Some(sid)),
            Err(e) => {
                return Err(StepError::retryable(format!("{}: {e}", asking()), None));
            }
        }
    }
    Ok(None)
}

/// Who a message was sent from: a number, or a messaging service's pool.
#[derive(Debug, Clone, Copy)]
pub(super) enum Sender<'a> {
    From(&'a str),
    Service(&'a str),
}

/// The sids in Twilio's message list `listed` that may be the message to
/// `recipient` with `text`, oldest first: to its recipient, from its
/// sender, with its text, created no earlier than `since` (less the
/// clocks' slack).
pub(super) fn candidates(
    listed: &Value,
    (recipient, text): (&str, &str),
    sender: Sender<'_>,
    since: OffsetDateTime,
) -> Vec<String> {
    let format = time::format_description::well_known::Rfc2822;
    let field = |m: &Value, k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let mut found: Vec<(OffsetDateTime, String)> = (listed.get("messages"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| field(m, "to").as_deref() == Some(recipient))
        .filter(|m| field(m, "body").as_deref() == Some(text))
        .filter(|m| match sender {
            Sender::From(from) => field(m, "from").as_deref() == Some(from),
            Sender::Service(sid) => field(m, "messaging_service_sid").as_deref() == Some(sid),
        })
        .filter_map(|m| {
            let created = OffsetDateTime::parse(&field(m, "date_created")?, &format).ok()?;
            Some((created, field(m, "sid")?))
        })
        .filter(|(created, _)| *created >= since - CLOCK_SLACK)
        .collect();
    found.sort();
    found.into_iter().map(|(_, sid)| sid).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    fn listed(sid: &str, to: &str, from: &str, body: &str, created: &str) -> Value {
        json!({"sid": sid, "to": to, "from": from, "body": body, "date_created": created,
               "messaging_service_sid": "MG1", "status": "queued"})
    }

    fn check(messages: Vec<Value>, sender: Sender<'_>, expected: &[&str]) {
        let since = datetime!(2026-12-04 17:00:00 UTC);
        let found = candidates(
            &json!({ "messages": messages }),
            ("+27820000001", "Your code is 1234"),
            sender,
            since,
        );
        assert_eq!(found, expected, "{messages:#?}");
    }

    #[test]
    fn a_provider_timeout_that_cannot_work_is_refused() {
        let provider = |timeout: &str| {
            serde_json::from_value::<super::super::SmsProvider>(json!({
                "type": "twilio", "account_sid": "AC1", "auth_token": "t", "timeout": timeout,
            }))
            .map(|p| match p {
                super::super::SmsProvider::Twilio(p) => p.timeout,
                other => panic!("{other:?}"),
            })
            .map_err(|e| e.to_string())
        };
        assert_eq!(provider("2s"), Ok(Some(std::time::Duration::from_secs(2))));
        assert!(provider("0s").unwrap_err().contains("must be more than 0s"));
        assert!(provider("soon").unwrap_err().starts_with("timeout: "));
    }

    #[test]
    fn only_a_message_that_may_be_this_one_is_taken_for_it() {
        let at = "Fri, 04 Dec 2026 17:00:01 +0000";
        let (to, from, body) = ("+27820000001", "+15005550006", "Your code is 1234");
        check(
            vec![listed("SM1", to, from, body, at)],
            Sender::From(from),
            &["SM1"],
        );
        // Another recipient, sender or text is another message.
        check(
            vec![
                listed("SM2", "+27820000002", from, body, at),
                listed("SM3", to, "+15005550007", body, at),
                listed("SM4", to, from, "Your code is 9999", at),
            ],
            Sender::From(from),
            &[],
        );
        // Created before it was handed over (beyond the clocks' slack).
        check(
            vec![
                listed("SM5", to, from, body, "Fri, 04 Dec 2026 16:58:59 +0000"),
                listed("SM6", to, from, body, "Fri, 04 Dec 2026 16:59:30 +0000"),
            ],
            Sender::From(from),
            &["SM6"],
        );
        // Oldest first; an unreadable date is not taken.
        check(
            vec![
                listed("SM8", to, from, body, "Fri, 04 Dec 2026 17:00:09 +0000"),
                listed("SM7", to, from, body, "Fri, 04 Dec 2026 17:00:02 +0000"),
                listed("SM9", to, from, body, "yesterday"),
            ],
            Sender::From(from),
            &["SM7", "SM8"],
        );
        // Sent through a messaging service: any of its numbers.
        check(
            vec![listed("SMA", to, "+15005550099", body, at)],
            Sender::Service("MG1"),
            &["SMA"],
        );
        check(
            vec![listed("SMB", to, from, body, at)],
            Sender::Service("MG2"),
            &[],
        );
        // Not a list at all.
        let since = datetime!(2026-12-04 17:00:00 UTC);
        assert!(
            candidates(
                &json!({"code": 20404}),
                (to, body),
                Sender::From(from),
                since
            )
            .is_empty()
        );
    }
}
