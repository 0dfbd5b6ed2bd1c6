//! SendGrid Inbound Parse: an e-mail sent to one of the account's
//! addresses, posted as `multipart/form-data` to the account's `sendgrid`
//! URL (the Event Webhook posts JSON there).
//!
//! The fields read: `envelope` (JSON: `from`, `to`: the addresses of the
//! SMTP transaction), `subject`, `text`, `headers` (the raw header block:
//! `Message-ID`, `In-Reply-To` and `References`), and each file part
//! (`attachment1`, …).

use futures::stream;
use serde_json::Value;
use switchboard_handlers::records::Channel;

use super::replies::{EmailParts, Reply};

/// A file an e-mail carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    /// Its file name, as sent.
    pub file_name: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Reads an Inbound Parse post: what it holds, as kept when it matches
/// nothing (its fields, the text cut to 64 KiB, and its files' names and
/// sizes), and the reply it is or why it cannot be one.
pub async fn read(content_type: &str, body: &[u8]) -> (Value, Result<Reply, String>) {
    let mut summary = serde_json::json!({"content_type": content_type, "bytes": body.len()});
    let reply = read_fields(content_type, body, &mut summary).await;
    (summary, reply)
}

async fn read_fields(
    content_type: &str,
    body: &[u8],
    summary: &mut Value,
) -> Result<Reply, String> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| format!("the body is not multipart/form-data: {e}"))?;
    let body = body.to_vec();
    let mut form = multer::Multipart::new(
        stream::once(async move { Ok::<_, std::io::Error>(body) }),
        boundary,
    );
    let mut fields = std::collections::BTreeMap::new();
    let mut carried = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| format!("the multipart body does not parse: {e}"))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| format!("field {name:?} does not read: {e}"))?;
        match file_name {
            Some(file_name) => carried.push(Carried {
                file_name,
                bytes: bytes.to_vec(),
            }),
            None => {
                fields.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    for (name, value) in &fields {
        let kept: String = value.chars().take(64 * 1024).collect();
        summary[name.as_str()] = Value::String(kept);
    }
    summary["files"] = carried
        .iter()
        .map(|c| serde_json::json!({"file_name": c.file_name, "size": c.bytes.len()}))
        .collect();
    let envelope: Value = fields
        .get("envelope")
        .and_then(|e| serde_json::from_str(e).ok())
        .ok_or("the post has no `envelope` (JSON of the SMTP sender and recipients): is this SendGrid Inbound Parse?")?;
    let address = |v: Option<&Value>, what: &str| {
        let raw = v.and_then(Value::as_str).unwrap_or_default();
        super::numbers::normalize_address(raw)
            .map_err(|e| format!("the envelope's {what} {raw:?}: {e}"))
    };
    let from = address(envelope.get("from"), "from")?;
    let to = address(envelope.get("to").and_then(|t| t.get(0)), "first to")?;
    let headers = fields
        .get("headers")
        .map(String::as_str)
        .unwrap_or_default();
    let message_id = header(headers, "Message-ID");
    // What it answers: In-Reply-To, then References newest first.
    let mut answers = header(headers, "In-Reply-To")
        .map(|v| message_ids(&v))
        .unwrap_or_default();
    let references = header(headers, "References").map(|v| message_ids(&v));
    for id in references.unwrap_or_default().into_iter().rev() {
        if !answers.contains(&id) {
            answers.push(id);
        }
    }
    let text = fields.get("text").cloned().unwrap_or_default();
    let source = match &message_id {
        Some(id) => format!("email:{id}"),
        None => format!(
            "email:{}",
            super::digest(format!("{from}\n{to}\n{headers}\n{text}").as_bytes())
        ),
    };
    Ok(Reply {
        channel: Channel::Email,
        transport: "sendgrid".to_string(),
        from,
        to,
        text,
        remote_id: message_id.unwrap_or_default(),
        source,
        email: Some(EmailParts {
            subject: fields.get("subject").cloned().unwrap_or_default(),
            answers,
            carried,
        }),
    })
}

/// The Message-IDs in a header's value (`<a@x> <b@y>`, `<a@x><b@y>`),
/// without their angle brackets, in order.
fn message_ids(value: &str) -> Vec<String> {
    value
        .split('<')
        .skip(1)
        .filter_map(|part| part.split_once('>').map(|(id, _)| id.trim().to_string()))
        .filter(|id| !id.is_empty())
        .collect()
}

/// The value of header `name` in a raw header block (folded lines joined).
fn header(block: &str, name: &str) -> Option<String> {
    let mut lines = block.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case(name) {
            continue;
        }
        let mut value = v.trim().to_string();
        while let Some(next) = lines.peek()
            && next.starts_with([' ', '\t'])
        {
            value.push(' ');
            value.push_str(next.trim());
            lines.next();
        }
        return Some(value);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_folded_and_in_any_case() {
        let block = "From: Ann <ann@example.org>\r\nmessage-id: <abc@mail>\r\nReferences: <a@switchboard>\r\n <b@switchboard>\r\nSubject: Re: hi\r\n";
        assert_eq!(header(block, "Message-ID").as_deref(), Some("<abc@mail>"));
        assert_eq!(
            header(block, "references").as_deref(),
            Some("<a@switchboard> <b@switchboard>")
        );
        assert_eq!(header(block, "In-Reply-To"), None);
        assert_eq!(message_ids("<a@x><b@y> <c@z>"), ["a@x", "b@y", "c@z"]);
        assert!(message_ids("none").is_empty());
    }

    #[tokio::test]
    async fn a_body_that_is_not_multipart_is_refused_with_the_reason() {
        let e = read("application/json", b"[]").await.1.unwrap_err();
        assert!(e.contains("not multipart/form-data"), "{e}");
        let (kept, e) = read(
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhi\r\n--x--\r\n",
        )
        .await;
        assert!(e.unwrap_err().contains("no `envelope`"));
        // What it held is kept with it.
        assert_eq!(kept["text"], "hi", "{kept}");
    }
}
