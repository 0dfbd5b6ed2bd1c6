use super::*;

fn acme() -> Principal {
    Principal::Account(AccountKey::new("acme").unwrap())
}

/// One row per path: what an account token of `acme` may do with it.
#[test]
fn what_an_account_token_reaches() {
    let check = |path: &str, expected: Access| {
        let got = match access(&acme(), path) {
            // The reason is for people; the row says which answer.
            Access::Forbidden(_) => Access::Forbidden(""),
            other => other,
        };
        assert_eq!(got, expected, "{path}");
        assert_eq!(access(&Principal::Admin, path), Access::Allowed, "{path}");
    };
    check("/v1/events", Access::Allowed);
    check("/v1/accounts", Access::Allowed);
    check("/v1/accounts/acme", Access::Allowed);
    check("/v1/accounts/acme/chains", Access::Allowed);
    check("/v1/accounts/acme/dead-letters/x/replay", Access::Allowed);
    check("/v1/accounts/acme/tokens", Access::Forbidden(""));
    check("/v1/accounts/acme/tokens/0190", Access::Forbidden(""));
    check("/v1/accounts/acme/numbers", Access::Allowed);
    check(
        "/v1/accounts/acme/numbers/twilio/+15005550006",
        Access::Forbidden(""),
    );
    check("/v1/accounts/acme/tokensmith", Access::Allowed);
    check("/v1/accounts/beta/chains", Access::Hidden);
    check("/v1/accounts/beta", Access::Hidden);
    check("/v1/accounts/acmex/chains", Access::Hidden);
    check("/v1/accounts/acm/chains", Access::Hidden);
    check("/v1/accounts/~unknown/dead-letters", Access::Hidden);
    check("/v1/accounts/", Access::Hidden);
    check("/v1/accounts//chains", Access::Hidden);
    // Escaped forms are refused, not decoded.
    check("/v1/accounts/%61cme/chains", Access::Hidden);
    // Outside the allow-list: admin only.
    check("/v1//accounts/beta/chains", Access::Hidden);
    check("/v1/admin", Access::Hidden);
    check("/v1/events/", Access::Hidden);
}

/// A receiver token reaches its inbox and nothing else (401); the inbox
/// routes are for receiver tokens only (403 for the others).
#[test]
fn what_a_receiver_token_reaches() {
    let ann = Principal::Receiver(crate::receiver_tokens::Receiver {
        account: AccountKey::new("acme").unwrap(),
        receiver: "ann".into(),
        expires_at: time::OffsetDateTime::UNIX_EPOCH,
    });
    for path in [
        "/v1/inbox",
        "/v1/inbox/count",
        "/v1/inbox/x/read",
        "/v1/inbox/stream",
    ] {
        assert_eq!(access(&ann, path), Access::Allowed, "{path}");
        for other in [Principal::Admin, acme()] {
            assert!(
                matches!(access(&other, path), Access::Forbidden(_)),
                "{other:?} {path}"
            );
        }
    }
    for path in [
        "/v1/events",
        "/v1/accounts",
        "/v1/accounts/acme/inbox/ann",
        "/v1/accounts/acme/chains",
        "/v1/inboxes",
        "/v1/handlers",
    ] {
        assert!(
            matches!(access(&ann, path), Access::Unauthorized(_)),
            "{path}"
        );
    }
}

#[test]
fn which_paths_need_a_token() {
    for path in [
        "/v1",
        "/v1/",
        "/v1/events",
        "/v1/accounts/acme/chains",
        "/v1/inbound",
    ] {
        assert!(needs_token(path), "{path}");
    }
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/inbound/acme/sendgrid/secret",
        "/v10/events",
        "/",
    ] {
        assert!(!needs_token(path), "{path}");
    }
}

#[test]
fn bearer_headers() {
    let parse = |value: &str| {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        match bearer(&h) {
            Bearer::Missing => "missing".to_string(),
            Bearer::OtherScheme => "not bearer".to_string(),
            Bearer::Token(t) => t.to_string(),
        }
    };
    assert_eq!(parse("Bearer sbt_abc"), "sbt_abc");
    assert_eq!(parse("bearer sbt_abc "), "sbt_abc");
    assert_eq!(parse("Basic dXNlcjpwYXNz"), "not bearer");
    assert_eq!(parse("Bearer "), "not bearer");
    assert_eq!(parse("sbt_abc"), "not bearer");
    assert!(matches!(bearer(&HeaderMap::new()), Bearer::Missing));
}

#[tokio::test]
async fn tokens_are_created_found_listed_and_revoked() {
    let store = Store::temporary().unwrap();
    let tokens = TokenStore::new(store.clone());
    let acme = AccountKey::new("acme").unwrap();
    let beta = AccountKey::new("beta").unwrap();
    let first = tokens.create(&acme, Some("ci")).await.unwrap();
    let second = tokens.create(&acme, None).await.unwrap();
    let other = tokens.create(&beta, None).await.unwrap();

    assert!(first.token.starts_with("sbt_"));
    // sbt_ and 32 bytes of URL-safe base64 without padding.
    assert_eq!(first.token.len(), 4 + 43);
    assert_ne!(first.token, second.token);
    assert!(!format!("{first:?}").contains(&first.token));

    // Nothing stored holds the token itself.
    for c in [Collection::Tokens, Collection::TokenIndex] {
        for (k, v) in store.scan_prefix(c, b"").unwrap() {
            let secret = first.token.as_bytes();
            assert!(!k.windows(secret.len()).any(|w| w == secret));
            assert!(!v.windows(secret.len()).any(|w| w == secret));
        }
    }

    let receivers = crate::receiver_tokens::ReceiverTokens::new(store.clone());
    let auth = Auth::new(
        &AdminToken::try_from("admin-token-for-tests".to_string()).unwrap(),
        tokens.clone(),
        receivers.clone(),
    );
    let ann = receivers
        .mint(&acme, "ann", std::time::Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        auth.principal(&ann.token).unwrap(),
        Some(Principal::Receiver(crate::receiver_tokens::Receiver {
            account: acme.clone(),
            receiver: "ann".into(),
            expires_at: ann.expires_at,
        }))
    );
    assert_eq!(auth.principal("sbr_forged.token").unwrap(), None);
    assert_eq!(
        auth.principal("admin-token-for-tests").unwrap(),
        Some(Principal::Admin)
    );
    assert_eq!(
        auth.principal(&first.token).unwrap(),
        Some(Principal::Account(acme.clone()))
    );
    assert_eq!(
        auth.principal(&other.token).unwrap(),
        Some(Principal::Account(beta.clone()))
    );
    assert_eq!(auth.principal("sbt_nope").unwrap(), None);
    assert_eq!(auth.principal("").unwrap(), None);

    let listed = tokens.list(&acme).unwrap();
    assert_eq!(listed, vec![first.record.clone(), second.record.clone()]);
    assert_eq!(listed[0].name.as_deref(), Some("ci"));
    assert_eq!(tokens.list(&beta).unwrap(), vec![other.record.clone()]);

    // Another account's id revokes nothing.
    assert_eq!(tokens.revoke(&beta, &first.record.id).await.unwrap(), None);
    assert_eq!(
        tokens.revoke(&acme, &first.record.id).await.unwrap(),
        Some(first.record.clone())
    );
    assert_eq!(auth.principal(&first.token).unwrap(), None);
    assert_eq!(tokens.list(&acme).unwrap(), vec![second.record.clone()]);
    assert_eq!(tokens.revoke(&acme, &first.record.id).await.unwrap(), None);
}

#[tokio::test]
async fn token_names_are_checked() {
    let tokens = TokenStore::new(Store::temporary().unwrap());
    let acme = AccountKey::new("acme").unwrap();
    for bad in ["", "a\nb", &"x".repeat(65)] {
        assert!(matches!(
            tokens.create(&acme, Some(bad)).await,
            Err(TokenError::InvalidName(_))
        ));
    }
    assert!(tokens.create(&acme, Some("survey worker 2")).await.is_ok());
}

#[test]
fn admin_tokens_are_checked_and_never_shown() {
    for bad in ["short", "has a space in it ok", "tab\tinside-the-token"] {
        let e = AdminToken::try_from(bad.to_string()).unwrap_err();
        assert!(!e.contains(bad), "{e}");
    }
    let t = AdminToken::try_from("0123456789abcdef".to_string()).unwrap();
    assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
    let generated = AdminToken::generate().unwrap();
    assert!(generated.expose().starts_with("sba_"));
    assert_ne!(generated, AdminToken::generate().unwrap());
}

#[test]
fn the_admin_token_file_is_made_once_for_the_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let (token, path, created) = admin_token_file(dir.path()).unwrap();
    assert!(created);
    assert_eq!(path, dir.path().join("admin-token"));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", token.expose())
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (again, _, created) = admin_token_file(dir.path()).unwrap();
    assert!(!created);
    assert_eq!(again, token);

    std::fs::write(&path, "too short\n").unwrap();
    let e = admin_token_file(dir.path()).unwrap_err();
    assert!(e.contains("admin-token"), "{e}");
    assert!(!e.contains("too short"), "{e}");
}
