//! From a delivery's bytes to an event, or to the reason it is poison.

use switchboard_sdk::{AccountKey, VumiApiEvent, cloudevents};

use crate::dead_letters::{DeadLetter, DeadReason, UNKNOWN_ACCOUNT, derived_id};

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
/// the reason and the payload; its id derives from the message's place on
/// the bus (`at`: its sequence and, when the bus says, when it was stored),
/// so the same message delivered again is filed again under the same id.
pub(super) fn decode(
    (subject, at): (&str, (u64, Option<u64>)),
    account: Option<&str>,
    (payload, headers): (&[u8], &[(String, String)]),
    prefix: &str,
    max_bytes: usize,
) -> Result<VumiApiEvent, Box<DeadLetter>> {
    // A reader that panics on some payload (a library's edge) files it as
    // poison instead of stopping the consume loop, which decodes every
    // delivery: the message would come back, to this replica or the next,
    // and stop that one too.
    let read = std::panic::catch_unwind(|| read(payload, headers, account, max_bytes))
        .unwrap_or_else(|_| {
            Err("reading the event panicked: a value in it that the reader cannot handle".into())
        });
    let result = read.and_then(|event| {
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
        if let (seq, Some(published_ms)) = at {
            let name = format!("{subject}\0{seq}");
            letter.id = derived_id(published_ms, &name).to_string();
        }
        letter.subject = Some(subject.to_string());
        letter.payload =
            Some(String::from_utf8_lossy(&payload[..payload.len().min(PAYLOAD_KEPT)]).into_owned());
        Box::new(letter)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same poison message delivered again (its letter's announcement
    /// failed, or the process died before the ack) is filed under the same
    /// id, so it replaces its letter; another message gets its own. Without
    /// the time the bus stored it, the id is a fresh one each time.
    #[test]
    fn poison_delivered_again_is_filed_under_the_same_id() {
        let subject = "vumi.events.acme.survey.signed_up";
        let poison = |seq: u64, published: Option<u64>| {
            decode(
                (subject, (seq, published)),
                Some("acme"),
                (b"{not json", &[]),
                "vumi.events",
                1024,
            )
            .expect_err("poison")
        };
        let first = poison(7, Some(1_700_000_000_000));
        assert_eq!(first.reason, DeadReason::Poison);
        assert_eq!(first.account_key, "acme");
        let again = poison(7, Some(1_700_000_000_000));
        assert_eq!(again.id, first.id);
        let other = poison(8, Some(1_700_000_000_001));
        assert_ne!(other.id, first.id);
        assert!(
            other.id > first.id,
            "letters sort by when the bus stored them"
        );
        assert_ne!(poison(7, None).id, poison(7, None).id);
    }
}
