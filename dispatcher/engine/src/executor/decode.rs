//! From a delivery's bytes to an event, or to the reason it is poison.

use switchboard_sdk::{AccountKey, VumiApiEvent, cloudevents};

use crate::dead_letters::{DeadLetter, DeadReason, UNKNOWN_ACCOUNT};

/// A payload as an event: the envelope, or a CloudEvent in binary mode
/// (`ce-` headers) or structured mode (`content-type:
/// application/cloudevents+json`), for the account its subject names.
fn read(
    payload: &[u8],
    headers: &[(String, String)],
    account: Option<&str>,
    max_bytes: usize,
) -> Result<VumiApiEvent, String> {
    let structured = headers.iter().any(|(name, value)| {
        name.eq_ignore_ascii_case("content-type")
            && value
                .split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(cloudevents::STRUCTURED))
    });
    if !cloudevents::is_binary(headers) && !structured {
        match VumiApiEvent::decode(payload, max_bytes) {
            Ok(event) => return Ok(event),
            // A structured CloudEvent published without headers (as NATS
            // servers before 2.2 had to).
            Err(_) if payload.len() <= max_bytes && cloudevents::looks_structured(payload) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if payload.len() > max_bytes {
        return Err(format!(
            "CloudEvent is {} bytes, over the limit of {max_bytes} bytes",
            payload.len()
        ));
    }
    let account = account.and_then(|a| AccountKey::new(a).ok());
    let event = if !cloudevents::is_binary(headers) {
        let value = serde_json::from_slice(payload)
            .map_err(|e| format!("structured CloudEvent is not valid JSON: {e}"))?;
        cloudevents::from_structured(value, account.as_ref())
    } else {
        cloudevents::from_binary(headers, payload, account.as_ref())
    };
    event.map_err(|e| e.to_string())
}

/// How much of a poison payload its dead letter keeps.
const PAYLOAD_KEPT: usize = 64 * 1024;

/// Decodes a payload taken from `subject`: an event, valid, within
/// `max_bytes`, published on the subject its account, conversation type
/// and event type give (under `prefix`). Anything else is poison: the dead
/// letter to file under `account` (what the bus read from the subject), with
/// the reason and the payload.
pub(super) fn decode(
    subject: &str,
    account: Option<&str>,
    (payload, headers): (&[u8], &[(String, String)]),
    prefix: &str,
    max_bytes: usize,
) -> Result<VumiApiEvent, Box<DeadLetter>> {
    let result = read(payload, headers, account, max_bytes).and_then(|event| {
        let expected = event.subject(prefix);
        if expected == subject {
            Ok(event)
        } else {
            Err(format!(
                "event {} was published on {subject}, but its account, conversation_type and \
                 event_type give the subject {expected}",
                event.id
            ))
        }
    });
    result.map_err(|error| {
        let account = account.unwrap_or(UNKNOWN_ACCOUNT);
        let mut letter = DeadLetter::new(account, DeadReason::Poison, error);
        letter.subject = Some(subject.to_string());
        letter.payload =
            Some(String::from_utf8_lossy(&payload[..payload.len().min(PAYLOAD_KEPT)]).into_owned());
        Box::new(letter)
    })
}
