//! From a delivery's bytes to an event, or to the reason it is poison.

use switchboard_sdk::VumiApiEvent;

use crate::dead_letters::{DeadLetter, DeadReason, UNKNOWN_ACCOUNT};

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
    payload: &[u8],
    prefix: &str,
    max_bytes: usize,
) -> Result<VumiApiEvent, Box<DeadLetter>> {
    let result = VumiApiEvent::decode(payload, max_bytes)
        .map_err(|e| e.to_string())
        .and_then(|event| {
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
