use switchboard_handlers::sms::TwilioSms;

use super::*;

const SENDGRID: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/sendgrid-event-webhook.json"
));
const TWILIO: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/twilio-status-callbacks.txt"
));

/// One line per record: what it reports, or why it cannot be used.
fn summary(parsed: &Parsed) -> String {
    match parsed {
        Parsed::Report(r) => format!(
            "{} -> {} ({}) id={} remote={} source={}",
            r.provider_event,
            r.status.map_or("-".to_string(), |s| s.to_string()),
            r.event_type,
            r.message_id.as_deref().unwrap_or("-"),
            r.remote_ids.join("|"),
            r.source,
        ),
        Parsed::Event {
            event_type,
            conversation_key,
            source,
            ..
        } => format!("event {event_type} in {conversation_key} source={source}"),
        Parsed::Reply(r) => format!(
            "reply from {} to {} on {}: {:?} source={}",
            r.from, r.to, r.transport, r.text, r.source
        ),
        Parsed::Unusable { result, reason } => format!("{}: {reason}", result.label()),
    }
}

fn check(got: Vec<String>, expected: &[&str]) {
    let got: Vec<&str> = got.iter().map(String::as_str).collect();
    assert_eq!(got, expected, "\ngot:\n{}", got.join("\n"));
}

#[test]
fn sendgrid_fixture_records_are_read_one_by_one() {
    let records = sendgrid::parse(SENDGRID.as_bytes());
    let sgm1 = "sgm-0001.filter0001.16648.5515E0B88.0|sgm-0001";
    check(
        records.iter().map(|(_, p)| summary(p)).collect(),
        &[
            &format!(
                "processed -> sent (email_processed) id=0192f1c0-7b1c-7cc3-9a55-000000000001 remote={sgm1} source=sendgrid:ZmE1YjM0-processed-1"
            ),
            &format!(
                "deferred -> deferred (email_deferred) id=0192f1c0-7b1c-7cc3-9a55-000000000001 remote={sgm1} source=sendgrid:ZmE1YjM0-deferred-1"
            ),
            &format!(
                "delivered -> delivered (email_delivered) id=0192f1c0-7b1c-7cc3-9a55-000000000001 remote={sgm1} source=sendgrid:ZmE1YjM0-delivered-1"
            ),
            &format!(
                "open -> opened (email_opened) id=- remote={sgm1} source=sendgrid:ZmE1YjM0-open-1"
            ),
            &format!(
                "click -> clicked (email_clicked) id=- remote={sgm1} source=sendgrid:ZmE1YjM0-click-1"
            ),
            "bounce -> bounced (email_bounced) id=0192f1c0-7b1c-7cc3-9a55-000000000002 remote=sgm-0002.filter0001.16648.5515E0B88.0|sgm-0002 source=sendgrid:ZmE1YjM0-bounce-2",
            "dropped -> dropped (email_dropped) id=0192f1c0-7b1c-7cc3-9a55-000000000003 remote=sgm-0003.filter0001.16648.5515E0B88.0|sgm-0003 source=sendgrid:ZmE1YjM0-dropped-3",
            &format!(
                "spamreport -> spam_reported (email_spam_reported) id=- remote={sgm1} source=sendgrid:ZmE1YjM0-spam-1"
            ),
            &format!(
                "group_unsubscribe -> unsubscribed (email_group_unsubscribed) id=- remote={sgm1} source=sendgrid:ZmE1YjM0-unsub-1"
            ),
            "undocumented: SendGrid event type \"a_new_event_type_nobody_documented\" is not one Switchboard reads (processed, deferred, delivered, bounce, dropped, open, click, spamreport, unsubscribe, group_unsubscribe, group_resubscribe)",
            "delivered -> delivered (email_delivered) id=0192f1c0-7b1c-7cc3-9a55-00000000ffff remote=sgm-9999.unknown|sgm-9999 source=sendgrid:ZmE1YjM0-ghost-1",
            "malformed: `timestamp` \"not-a-number\" is not a Unix time in seconds (of the years 0000 to 9999)",
        ],
    );
    // The bounce carries what a chain needs to act on it.
    let Parsed::Report(bounce) = &records[5].1 else {
        panic!("the bounce is a report")
    };
    assert_eq!(bounce.details["email"], "nobody@example.org");
    assert_eq!(bounce.details["reason"], "550 5.1.1 unknown recipient");
    assert_eq!(bounce.details["smtp_status"], "5.1.1");
    assert_eq!(bounce.cause, "sendgrid bounce: 550 5.1.1 unknown recipient");
    assert_eq!(
        bounce.occurred_at.map(|t| t.unix_timestamp()),
        Some(1763793620)
    );
}

#[test]
fn sendgrid_bodies_that_are_not_arrays_are_one_malformed_record() {
    check(
        [&b"not json"[..], b"{\"event\": \"delivered\"}", b"[42, {}]"]
            .iter()
            .flat_map(|b| sendgrid::parse(b))
            .map(|(_, p)| summary(&p))
            .collect(),
        &[
            "malformed: the body is not JSON: expected ident at line 1 column 2",
            "malformed: the body is JSON but not an array of event records (SendGrid posts an array)",
            "malformed: the record is not a JSON object",
            "malformed: the record has no `event` (the SendGrid event type)",
        ],
    );
    // A record without sg_event_id is identified by its content.
    let a =
        sendgrid::parse_record(&json!({"event": "open", "sg_message_id": "x.y", "timestamp": 1}));
    let b =
        sendgrid::parse_record(&json!({"event": "open", "sg_message_id": "x.y", "timestamp": 2}));
    let (Parsed::Report(a), Parsed::Report(b)) = (a, b) else {
        panic!("reports")
    };
    assert!(a.source.starts_with("sendgrid:") && a.source != b.source);
    assert_eq!(
        summary(&sendgrid::parse_record(&json!({"event": "open"}))),
        "malformed: the record names no message: it has neither switchboard_message_id nor sg_message_id"
    );
    // An id of the wrong kind is named as such, not as missing.
    assert_eq!(
        summary(&sendgrid::parse_record(
            &json!({"event": "open", "sg_message_id": 14123})
        )),
        "malformed: `sg_message_id` is a number (14123), not the text of a message id"
    );
    assert_eq!(
        summary(&sendgrid::parse_record(
            &json!({"event": "open", "sg_message_id": "x.y", "switchboard_message_id": ["a"]})
        )),
        "malformed: `switchboard_message_id` is an array ([\"a\"]), not the text of a message id"
    );
    assert_eq!(
        summary(&sendgrid::parse_record(
            &json!({"event": "open", "sg_message_id": "x.y", "switchboard_account": 7})
        )),
        "malformed: `switchboard_account` is a number (7), not the text of an account key"
    );
    // The account a record names is the report's.
    let Parsed::Report(named) = sendgrid::parse_record(
        &json!({"event": "open", "sg_message_id": "x.y", "switchboard_account": " beta "}),
    ) else {
        panic!("a report")
    };
    assert_eq!(named.account.as_deref(), Some("beta"));
    // A time RFC 3339 cannot write (the year -1) is no SendGrid time.
    assert_eq!(
        summary(&sendgrid::parse_record(
            &json!({"event": "unsubscribe", "email": "a@b.c", "sg_message_id": "x", "timestamp": -62167219201i64})
        )),
        "malformed: `timestamp` -62167219201 is not a Unix time in seconds (of the years 0000 to 9999)"
    );
}

#[test]
fn twilio_signature_matches_twilios_documented_example() {
    // The example of Twilio's webhook security documentation.
    let params: Vec<(String, String)> = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+12349013030"),
        ("Digits", "1234"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
    assert_eq!(
        twilio::signature("12345", url, &params),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );
    // The order parameters arrive in does not matter.
    let mut reversed = params.clone();
    reversed.reverse();
    assert_eq!(
        twilio::signature("12345", url, &reversed),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );
}

fn provider(sid: &str, token: &str) -> TwilioSms {
    TwilioSms {
        account_sid: sid.into(),
        auth_token: token.into(),
        from: None,
        messaging_service_sid: None,
        base_url: "https://api.twilio.com".into(),
        status_callback: None,
        timeout: None,
    }
}

#[test]
fn twilio_callbacks_verify_against_the_provider_of_their_account() {
    let url = "https://hooks.example.org/v1/inbound/acme/twilio/s3cret";
    let providers = [provider("AC1", "token-1"), provider("AC2", "token-2")];
    let body = TWILIO
        .lines()
        .next()
        .unwrap()
        .replace("AC00000000000000000000000000000000", "AC2");
    let params = twilio::params(body.as_bytes());
    let good = twilio::signature("token-2", url, &params);
    assert!(twilio::verify(&providers, url, &params, &good));
    // Signed with another provider's token: refused when AccountSid names one.
    let other = twilio::signature("token-1", url, &params);
    assert!(!twilio::verify(&providers, url, &params, &other));
    // Another URL, another body, garbage: refused.
    assert!(!twilio::verify(
        &providers,
        "https://elsewhere.example/",
        &params,
        &good
    ));
    let mut tampered = params.clone();
    tampered.push(("MessageStatus".into(), "delivered".into()));
    assert!(!twilio::verify(&providers, url, &tampered, &good));
    assert!(!twilio::verify(&providers, url, &params, "not base64!"));
    // No AccountSid (or an unknown one): any configured token may have signed it.
    let bare = twilio::params(b"MessageSid=&MessageStatus=delivered");
    let sig = twilio::signature("token-1", url, &bare);
    assert!(twilio::verify(&providers, url, &bare, &sig));
    assert!(!twilio::verify(&[], url, &bare, &sig));
}

#[test]
fn twilio_fixture_callbacks_are_read() {
    check(
        TWILIO
            .lines()
            .map(|l| summary(&twilio::parse(&twilio::params(l.as_bytes()))))
            .chain(
                [
                    "MessageSid=SM1&MessageStatus=receiving",
                    "MessageSid=SM1",
                    "SmsSid=SM9&SmsStatus=queued",
                    // Incoming messages: replies.
                    "MessageSid=SMr1&SmsStatus=received&From=%2B27820000001&To=%2B15005550006&Body=Stop+please",
                    "MessageSid=SMr2&SmsStatus=received&From=nobody&To=%2B15005550006&Body=hi",
                ]
                .iter()
                .map(|l| summary(&twilio::parse(&twilio::params(l.as_bytes())))),
            )
            .collect(),
        &[
            "sent -> sent (sms_sent) id=- remote=SM0001aaaabbbbccccddddeeeeffff0001 source=twilio:SM0001aaaabbbbccccddddeeeeffff0001:sent",
            "delivered -> delivered (sms_delivered) id=- remote=SM0001aaaabbbbccccddddeeeeffff0001 source=twilio:SM0001aaaabbbbccccddddeeeeffff0001:delivered",
            "undelivered -> undelivered (sms_undelivered) id=- remote=SM0002aaaabbbbccccddddeeeeffff0002 source=twilio:SM0002aaaabbbbccccddddeeeeffff0002:undelivered",
            "failed -> failed (sms_failed) id=- remote=SM0003aaaabbbbccccddddeeeeffff0003 source=twilio:SM0003aaaabbbbccccddddeeeeffff0003:failed",
            "malformed: the callback has no MessageSid: it names no message",
            "undocumented: Twilio message status \"receiving\" is not one Switchboard reads (accepted, scheduled, queued, sending, sent, delivered, undelivered, failed, canceled, read)",
            "malformed: the callback has no MessageStatus",
            "queued -> sent (sms_queued) id=- remote=SM9 source=twilio:SM9:queued",
            "reply from +27820000001 to +15005550006 on twilio: \"Stop please\" source=twilio:SMr1:received",
            "malformed: the incoming message's From \"nobody\": \"nobody\" is not an E.164 number: write it with the country code, e.g. +27821234567 (an address is an E.164 number, a short code of 3 to 8 digits, or an e-mail address)",
        ],
    );
    let Parsed::Report(undelivered) =
        twilio::parse(&twilio::params(TWILIO.lines().nth(2).unwrap().as_bytes()))
    else {
        panic!("a report")
    };
    assert_eq!(undelivered.cause, "twilio undelivered (error 30003)");
    assert_eq!(undelivered.details["error_code"], "30003");
    assert_eq!(undelivered.details["to"], "+27830000000");
}

#[test]
fn generic_webhooks_become_the_event_they_name() {
    check(
        [
            &br#"{"event_type": "payment_settled", "amount": 500}"#[..],
            br#"{"amount": 500, "conversation_key": "order-42"}"#,
            br#"{"event_type": "payment.settled"}"#,
            br#"{"event_type": 7}"#,
            br#"[1, 2]"#,
            b"amount=500",
        ]
        .iter()
        .map(|b| summary(&parse_webhook(b, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W")))
        .collect(),
        &[
            "event payment_settled in msg_2KWPBgLlAfxdpx2AI54pPJ85f4W source=webhook:msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
            "event webhook_received in order-42 source=webhook:msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
            "malformed: invalid event_type \"payment.settled\": must match ^[A-Za-z0-9_-]{1,64}$",
            "malformed: event_type must be a string, not 7",
            "malformed: the body is JSON but not an object",
            "malformed: the body is not JSON: expected value at line 1 column 1",
        ],
    );
    // A webhook id that is no conversation key gives the conversation `webhook`.
    let Parsed::Event {
        conversation_key, ..
    } = parse_webhook(b"{}", "id with spaces")
    else {
        panic!("an event")
    };
    assert_eq!(conversation_key.as_str(), "webhook");
}

/// What each SendGrid event of the fixture says of its recipient's
/// preferences, given a message of template `news` (category `newsletter`)
/// or none.
#[test]
fn sendgrid_events_say_what_they_mean_for_preferences() {
    use switchboard_handlers::records::Topic;
    use switchboard_handlers::records::messages::TemplateRef;

    let record = |event: &str, extra: Value| {
        let mut raw = json!({"email": "Ann@Example.org", "event": event,
            "sg_event_id": format!("e-{event}"), "sg_message_id": "sgm-1.filter"});
        raw.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        match sendgrid::parse_record(&raw) {
            Parsed::Report(r) => r,
            other => panic!("{other:?}"),
        }
    };
    let message = |category: Option<&str>| {
        let at = switchboard_sdk::now();
        MessageRecord {
            id: "m-1".into(),
            account_key: AccountKey::new("acme").unwrap(),
            channel: Channel::Email,
            recipient: "ann@example.org".into(),
            sender: None,
            body: String::new(),
            subject: None,
            provider: "sink".into(),
            remote_id: None,
            status: MessageStatus::Sent,
            event_id: "e".into(),
            chain: "c".into(),
            step: "s".into(),
            created_at: at,
            updated_at: at,
            transitions: Vec::new(),
            html: None,
            template: Some(TemplateRef {
                slug: "news".into(),
                version: 1,
                category: category.map(str::to_string),
            }),
            scheduled_at: None,
            sent_at: None,
            idempotency_key: None,
            cut: None,
            attachments: Vec::new(),
        }
    };
    let ann =
        |topic: Topic, subscribed: bool| Some(("ann@example.org".to_string(), topic, subscribed));
    let with_category = message(Some("newsletter"));
    let without = message(None);
    for (report, message, expected) in [
        (
            record("unsubscribe", json!({})),
            None,
            ann(Topic::All, false),
        ),
        (
            record("spamreport", json!({})),
            Some(&with_category),
            ann(Topic::All, false),
        ),
        (
            record("bounce", json!({"type": "bounce"})),
            None,
            ann(Topic::All, false),
        ),
        // A blocked bounce is temporary: no opt-out.
        (record("bounce", json!({"type": "blocked"})), None, None),
        (
            record("group_unsubscribe", json!({"asm_group_id": 7})),
            Some(&with_category),
            ann(Topic::Category("newsletter".into()), false),
        ),
        (
            record("group_unsubscribe", json!({})),
            Some(&without),
            ann(Topic::Template("news".into()), false),
        ),
        // A group is not all e-mail: unknown, it changes nothing.
        (record("group_unsubscribe", json!({})), None, None),
        (record("group_resubscribe", json!({})), None, None),
        (
            record("group_resubscribe", json!({})),
            Some(&with_category),
            ann(Topic::Category("newsletter".into()), true),
        ),
        // Deliveries, opens and clicks say nothing of preferences.
        (record("delivered", json!({})), Some(&with_category), None),
        (record("open", json!({})), None, None),
    ] {
        assert_eq!(
            sendgrid::preference_change(&report, message),
            expected,
            "{} {:?}",
            report.provider_event,
            report.details
        );
    }
}
