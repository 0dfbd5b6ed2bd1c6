//! Twilio's SMS status callbacks: one form-encoded message status per POST,
//! signed with `X-Twilio-Signature` = base64(HMAC-SHA1(auth token, the full
//! URL Twilio called + every POST parameter sorted by name, each name
//! followed by its value)).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha1::Sha1;
use switchboard_handlers::records::{Channel, MessageStatus};
use switchboard_handlers::sms::TwilioSms;

use super::replies::Reply;
use super::{Parsed, Report};
use switchboard_engine::metrics::InboundResult;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// Every message status Switchboard reads and the status it moves a message
/// to; the event emitted is `sms_<status>`.
pub const STATUSES: [(&str, MessageStatus); 10] = [
    ("accepted", MessageStatus::Sent),
    ("scheduled", MessageStatus::Sent),
    ("queued", MessageStatus::Sent),
    ("sending", MessageStatus::Sent),
    ("sent", MessageStatus::Sent),
    ("delivered", MessageStatus::Delivered),
    ("undelivered", MessageStatus::Undelivered),
    ("failed", MessageStatus::Failed),
    ("canceled", MessageStatus::Failed),
    ("read", MessageStatus::Opened),
];

fn mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<Sha1> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// The `X-Twilio-Signature` of a POST to `url` with `params`.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    BASE64.encode(mac(auth_token, url, params).finalize().into_bytes())
}

/// Whether `header` is the signature of a POST to `url` with `params` under
/// one of `providers`' auth tokens (compared in constant time). The
/// providers whose `account_sid` is the callback's `AccountSid` are tried;
/// when none is, all of them.
pub fn verify(
    providers: &[TwilioSms],
    url: &str,
    params: &[(String, String)],
    header: &str,
) -> bool {
    let Ok(expected) = BASE64.decode(header.trim()) else {
        return false;
    };
    let account_sid = params
        .iter()
        .find(|(k, _)| k == "AccountSid")
        .map(|(_, v)| v.as_str());
    let by_sid: Vec<&TwilioSms> = providers
        .iter()
        .filter(|p| Some(p.account_sid.as_str()) == account_sid)
        .collect();
    let candidates = if by_sid.is_empty() {
        providers.iter().collect()
    } else {
        by_sid
    };
    candidates.into_iter().any(|p| {
        mac(&p.auth_token, url, params)
            .verify_slice(&expected)
            .is_ok()
    })
}

/// The form parameters of a body, decoded, in order.
pub fn params(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// Reads a (verified) status callback.
pub fn parse(params: &[(String, String)]) -> Parsed {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let Some(sid) = get("MessageSid").or_else(|| get("SmsSid")) else {
        return Parsed::unusable(
            InboundResult::Malformed,
            "the callback has no MessageSid: it names no message",
        );
    };
    // A message to one of the account's numbers: `SmsStatus=received`, no
    // `MessageStatus`.
    if get("MessageStatus").is_none() && get("SmsStatus") == Some("received") {
        return reply(params, sid);
    }
    let Some(raw_status) = get("MessageStatus").or_else(|| get("SmsStatus")) else {
        return Parsed::unusable(
            InboundResult::Malformed,
            "the callback has no MessageStatus",
        );
    };
    let Some((name, status)) = STATUSES.iter().find(|(name, _)| *name == raw_status) else {
        return Parsed::unusable(
            InboundResult::Undocumented,
            format!(
                "Twilio message status {raw_status:?} is not one Switchboard reads ({})",
                STATUSES.map(|(n, _)| n).join(", ")
            ),
        );
    };
    let mut cause = format!("twilio {name}");
    if let Some(code) = get("ErrorCode") {
        cause.push_str(&format!(" (error {code})"));
    }
    let mut details = Map::new();
    for (from, to) in [
        ("MessageSid", "message_sid"),
        ("AccountSid", "account_sid"),
        ("From", "from"),
        ("To", "to"),
        ("ErrorCode", "error_code"),
        ("ErrorMessage", "error_message"),
    ] {
        if let Some(v) = get(from) {
            details.insert(to.to_string(), json!(v));
        }
    }
    Parsed::Report(Report {
        channel: Channel::Sms,
        message_id: None,
        account: None,
        remote_ids: vec![sid.to_string()],
        status: Some(*status),
        event_type: format!("sms_{name}"),
        provider_event: (*name).to_string(),
        // Twilio posts each status of a message once; a repeat is a retry.
        source: format!("twilio:{sid}:{name}"),
        occurred_at: None,
        details,
        cause,
    })
}

/// An incoming message (`sid`) as a [`Reply`]; malformed without a valid
/// `From` or `To`.
fn reply(params: &[(String, String)], sid: &str) -> Parsed {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let address = |name: &str| {
        let raw = get(name).unwrap_or_default();
        super::numbers::normalize_address(raw)
            .map_err(|e| format!("the incoming message's {name} {raw:?}: {e}"))
    };
    let (from, to) = match (address("From"), address("To")) {
        (Ok(from), Ok(to)) => (from, to),
        (Err(e), _) | (_, Err(e)) => return Parsed::unusable(InboundResult::Malformed, e),
    };
    Parsed::Reply(Reply {
        channel: Channel::Sms,
        transport: "twilio".to_string(),
        from,
        to,
        text: get("Body").unwrap_or_default().to_string(),
        source: format!("twilio:{sid}:received"),
        remote_id: sid.to_string(),
        email: None,
    })
}

/// The form parameters as a JSON object, for unmatched records and `event_data`.
pub fn params_json(params: &[(String, String)]) -> Value {
    Value::Object(
        params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}
