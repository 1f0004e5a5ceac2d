// Error classification from status and OAuth error JSON, as a table.

use std::time::Duration;

use latchkey_core::ProviderError;
use latchkey_providers::classify::{AccountIdSource, ResponseRules, classify_error, parse_token_response};
use secrecy::ExposeSecret;

#[derive(Debug, PartialEq)]
enum Class {
    InvalidGrant,
    InvalidClient,
    RateLimited(Option<u64>),
    Transient,
    Protocol,
}

fn class(e: &ProviderError) -> Class {
    match e {
        ProviderError::InvalidGrant { .. } => Class::InvalidGrant,
        ProviderError::InvalidClient { .. } => Class::InvalidClient,
        ProviderError::RateLimited { retry_after } => Class::RateLimited(retry_after.map(|d| d.as_secs())),
        ProviderError::Transient { .. } => Class::Transient,
        ProviderError::Protocol { .. } => Class::Protocol,
        ProviderError::Unsupported(_) => panic!("never classified as unsupported"),
    }
}

#[test]
fn errors_are_classified_by_status_and_oauth_error() {
    let cases: [(u16, Option<&str>, &str, Class); 16] = [
        (400, None, r#"{"error":"invalid_grant"}"#, Class::InvalidGrant),
        (400, None, r#"{"error":"invalid_client"}"#, Class::InvalidClient),
        (401, None, r#"{"error":"unauthorized_client"}"#, Class::InvalidClient),
        (401, None, "Unauthorized", Class::InvalidClient),
        (400, None, r#"{"error":"invalid_scope"}"#, Class::InvalidClient),
        (400, None, r#"{"error":"invalid_request"}"#, Class::Protocol),
        (400, None, "<html>bad</html>", Class::Protocol),
        (404, None, "", Class::Protocol),
        (429, Some("17"), r#"{"error":"slow_down"}"#, Class::RateLimited(Some(17))),
        (429, Some("Wed, 21 Oct 2015 07:28:00 GMT"), "", Class::RateLimited(None)),
        (500, None, "<html>oops</html>", Class::Transient),
        (502, None, "", Class::Transient),
        (503, None, r#"{"error":"temporarily_unavailable"}"#, Class::Transient),
        (400, None, r#"{"error":"authorization_pending"}"#, Class::Transient),
        (400, None, r#"{"error":"slow_down"}"#, Class::RateLimited(Some(5))),
        (400, None, r#"{"error":"expired_token"}"#, Class::InvalidGrant),
    ];
    for (status, retry_after, body, want) in cases {
        let got = classify_error(status, retry_after, body.as_bytes(), &[]);
        assert_eq!(class(&got), want, "{status} {body}");
    }
}

#[test]
fn descriptions_are_sanitised_and_dropped_when_they_echo_a_secret() {
    let body = r#"{"error":"invalid_grant","error_description":"token rt-secret-123 is expired\r\nInjected: yes"}"#;
    match classify_error(400, None, body.as_bytes(), &["rt-secret-123"]) {
        ProviderError::InvalidGrant { description } => assert_eq!(description, None),
        other => panic!("{other:?}"),
    }
    match classify_error(400, None, body.as_bytes(), &["something-else"]) {
        ProviderError::InvalidGrant { description: Some(d) } => assert!(!d.contains('\n') && !d.contains('\r'), "{d}"),
        other => panic!("{other:?}"),
    }
    // A secret split by a control character must not come back whole once
    // the control character is removed.
    let split = "{\"error\":\"invalid_grant\",\"error_description\":\"token rt-sec\\u001cret-123 expired\"}";
    match classify_error(400, None, split.as_bytes(), &["rt-secret-123"]) {
        ProviderError::InvalidGrant { description } => assert_eq!(description, None),
        other => panic!("{other:?}"),
    }
    // Part of a token is as bad as all of it: twelve bytes or more of a
    // secret drop the description; shorter coincidences do not.
    let token = "1//0gAbCdEfGhIjKlMnOpQrStUvWxYz0123456789";
    let partial =
        r#"{"error":"invalid_grant","error_description":"Token 1//0gAbCdEfGh... has been expired or revoked."}"#;
    match classify_error(400, None, partial.as_bytes(), &[token]) {
        ProviderError::InvalidGrant { description } => assert_eq!(description, None),
        other => panic!("{other:?}"),
    }
    let coincidence = r#"{"error":"invalid_grant","error_description":"Token 1//0gAbC is bad."}"#;
    match classify_error(400, None, coincidence.as_bytes(), &[token]) {
        ProviderError::InvalidGrant { description: Some(d) } => assert_eq!(d, "Token 1//0gAbC is bad."),
        other => panic!("{other:?}"),
    }
    let unknown = classify_error(400, None, br#"{"error":"rt-secret-123"}"#, &[]);
    assert!(!unknown.to_string().contains("rt-secret-123"), "an unknown error code is not repeated: {unknown}");
    let long = format!(r#"{{"error":"invalid_grant","error_description":"{}"}}"#, "x".repeat(5000));
    match classify_error(400, None, long.as_bytes(), &[]) {
        ProviderError::InvalidGrant { description: Some(d) } => assert_eq!(d.len(), 200),
        other => panic!("{other:?}"),
    }
}

#[test]
fn token_responses_are_read_with_defaults_and_account_ids() {
    let rules = |default: Option<u64>, account: AccountIdSource| ResponseRules {
        default_expires_in: default.map(Duration::from_secs),
        account_id: account,
    };
    let r = parse_token_response(
        br#"{"access_token":"a","token_type":"Bearer"}"#,
        &rules(Some(3600), AccountIdSource::None),
    )
    .unwrap();
    assert_eq!(r.expires_in, Some(Duration::from_secs(3600)), "missing expires_in gets the default");
    assert!(r.refresh_token.is_none(), "a missing refresh_token stays missing (the engine keeps the old one)");
    let r = parse_token_response(br#"{"access_token":"a","expires_in":"60"}"#, &rules(None, AccountIdSource::None))
        .unwrap();
    assert_eq!(r.expires_in, Some(Duration::from_secs(60)), "expires_in as a string");
    let r = parse_token_response(br#"{"access_token":"a"}"#, &rules(None, AccountIdSource::None)).unwrap();
    assert_eq!(r.expires_in, None, "never expires");
    let claims = base64_url(r#"{"sub":"s-1","oid":"o-1"}"#);
    let body = format!(r#"{{"access_token":"a","refresh_token":"r","scope":"x y","id_token":"h.{claims}.sig"}}"#);
    let r = parse_token_response(body.as_bytes(), &rules(None, AccountIdSource::IdToken)).unwrap();
    assert_eq!(r.account_id.as_deref(), Some("o-1"));
    assert_eq!(r.scopes, Some(vec!["x".into(), "y".into()]));
    assert_eq!(r.refresh_token.unwrap().expose_secret(), "r");
    let r = parse_token_response(
        br#"{"access_token":"a","userid":1234}"#,
        &rules(None, AccountIdSource::Field("userid".into())),
    )
    .unwrap();
    assert_eq!(r.account_id.as_deref(), Some("1234"));
    for bad in [
        &b"<html>"[..],
        br#"{"token_type":"Bearer"}"#,
        br#"{"access_token":""}"#,
        br#"{"access_token":5}"#,
        br#"{"access_token":"a","expires_in":-1}"#,
    ] {
        let err = parse_token_response(bad, &rules(None, AccountIdSource::None)).unwrap_err();
        assert_eq!(class(&err), Class::Protocol, "{}", String::from_utf8_lossy(bad));
        assert!(!err.to_string().contains("html"), "the body is not repeated");
    }
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}
