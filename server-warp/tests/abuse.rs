// Abusive clients, as the front door's limits meet them: strangers who know a
// keyid, floods of unauthenticated requests that store records, user-code
// guessing, and X-Forwarded-For lines added by proxies. Every figure is
// printed and asserted; loops are bounded and on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use latchkey_core::engine::{SweepCursor, sweep_pass};
use latchkey_core::{Clock, MemoryStore, RecordKind, SystemClock};
use reqwest::header::COOKIE;

use crate::support::{Harness, fake_config, form_fields, harness, harness_on, login_cookie};

/// Requests come through a trusted proxy on loopback; X-Forwarded-For names the client.
const PROXIED: &str = "trusted_proxies = [\"127.0.0.1/32\"]";

/// A `/refresh` from `client` (as the proxy says) with `authid`.
async fn refresh_from(h: &Harness, client: &str, authid: &str) -> u16 {
    let request = h.http.get(format!("{}/refresh", h.url)).header("X-AuthID", authid).header("X-Forwarded-For", client);
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
#[allow(clippy::print_stderr)] // the figures
async fn a_thousand_wrong_secrets_from_fifty_addresses_leave_the_owner_served() {
    let h = harness(fake_config(), PROXIED).await;
    let authid = h.login().await;
    let keyid = authid.split(':').next().unwrap();
    let wrong = format!("{keyid}:{}", "A".repeat(43));
    let (mut unauthorized, mut backed_off, mut other) = (0, 0, 0);
    for i in 0..1_000 {
        let client = format!("198.18.{}.{}", i % 50, 1 + i % 50);
        match refresh_from(&h, &client, &wrong).await {
            401 => unauthorized += 1,
            503 => backed_off += 1,
            status => other += status as usize,
        }
    }
    eprintln!("1,000 wrong secrets from 50 addresses: {unauthorized} × 401, {backed_off} × 503 (backed off)");
    assert_eq!(other, 0);
    assert_eq!(unauthorized + backed_off, 1_000);
    assert!(unauthorized >= 50 * 5, "each address has its free failures");
    assert!(backed_off > 0, "each address backs off after its free failures");
    for _ in 0..20 {
        assert_eq!(refresh_from(&h, "192.0.2.200", &authid).await, 200, "the owner, elsewhere, is served");
    }
}

#[tokio::test]
#[allow(clippy::print_stderr)] // the figures
async fn ten_thousand_record_creations_from_one_address_store_no_more_than_the_allowance() {
    let memory = Arc::new(MemoryStore::new());
    let extra = format!("{PROXIED}\n[limits]\nrecord_creations_per_minute_per_address = 30");
    let h = harness_on(fake_config(), &extra, memory.clone()).await;
    let client = "203.0.113.50";
    let stored = || {
        [RecordKind::LoginTransaction, RecordKind::Handoff, RecordKind::DeviceGrant]
            .iter()
            .map(|k| memory.count(*k))
            .sum::<usize>()
    };
    // A browser's proof cookie and form, once: the page that hands them out stores nothing.
    let page = h.http.get(format!("{}/login?id=fake", h.url)).header("X-Forwarded-For", client).send().await.unwrap();
    let cookie = login_cookie(&page).unwrap();
    let fields = form_fields(&page.text().await.unwrap(), "/login");
    assert_eq!(stored(), 0, "pages that only show store nothing");
    let started = Instant::now();
    let mut answers = std::collections::BTreeMap::<(&str, u16), u32>::new();
    for i in 0..10_000u32 {
        let (route, request) = match i % 4 {
            0 => ("/?token=", h.http.get(format!("{}/?token=flooding-handoff-token-{i:06}", h.url))),
            1 => ("/v1/device/code", h.http.post(format!("{}/v1/device/code", h.url)).form(&[("service", "fake")])),
            2 => ("POST /login", h.http.post(format!("{}/login", h.url)).form(&fields)),
            _ => ("/cli-token-login", h.http.post(format!("{}/cli-token-login", h.url)).form(&fields)),
        };
        let request = request
            .header("X-Forwarded-For", client)
            .header(COOKIE, &cookie)
            .header("Origin", &h.url)
            .header("Sec-Fetch-Site", "same-origin");
        let status = request.send().await.unwrap().status().as_u16();
        *answers.entry((route, status)).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let refused: u32 = answers.iter().filter(|((_, s), _)| *s == 429).map(|(_, n)| n).sum();
    let through = 10_000 - refused;
    // The bucket refills at 30 a minute while the flood runs.
    let allowance = 30 + (elapsed.as_secs_f64() / 2.0).ceil() as u32;
    eprintln!(
        "10,000 record-creating requests from one address in {elapsed:?}: {through} passed the limit \
         (allowance {allowance}), {refused} × 429; stored records: {}; by route and status: {answers:?}",
        stored()
    );
    assert!(through <= allowance, "{through} > {allowance}");
    assert!(through >= 30, "the allowance itself is served");
    assert!(stored() <= allowance as usize, "the store holds at most the allowance: {}", stored());
    // Once they expire, one sweep pass (the background sweep's, at a time
    // past every lifetime) leaves none.
    let later = SystemClock.now().saturating_add(Duration::from_secs(86_400));
    let swept = sweep_pass(memory.as_ref(), later, 1_000, &mut SweepCursor::default()).await.unwrap();
    eprintln!("one sweep pass a day later: {swept:?}");
    assert_eq!(stored(), 0, "expired records are swept");
    // Another address is not limited by this one.
    let other =
        h.http.get(format!("{}/?token=another-address-token-0001", h.url)).header("X-Forwarded-For", "192.0.2.9");
    assert_eq!(other.send().await.unwrap().status(), 200);
}

#[tokio::test]
#[allow(clippy::print_stderr)] // the figures
async fn user_codes_cannot_be_guessed_at_speed() {
    let h =
        harness(fake_config(), &format!("{PROXIED}\n[limits]\nuser_code_attempts_per_minute_per_address = 10")).await;
    let page = h.http.get(format!("{}/device", h.url)).header("X-Forwarded-For", "203.0.113.60").send().await.unwrap();
    let cookie = login_cookie(&page).unwrap();
    let mut fields = form_fields(&page.text().await.unwrap(), "/device");
    fields.push(("user_code".into(), String::new()));
    let started = Instant::now();
    let mut refused = 0;
    for i in 0..2_000 {
        fields.last_mut().unwrap().1 = format!("WXYZ-{:04}", i % 10_000);
        let response = h
            .http
            .post(format!("{}/device", h.url))
            .header("X-Forwarded-For", "203.0.113.60")
            .header(COOKIE, &cookie)
            .header("Origin", &h.url)
            .header("Sec-Fetch-Site", "same-origin")
            .form(&fields)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            refused += 1;
        }
    }
    let tried = 2_000 - refused;
    let allowance = 10 + (started.elapsed().as_secs_f64() / 6.0).ceil() as u32;
    eprintln!("2,000 user-code guesses from one address: {tried} checked (allowance {allowance}), {refused} × 429");
    assert!((10..=allowance).contains(&tried), "{tried}");
}

#[tokio::test]
async fn a_client_address_a_proxy_adds_in_a_second_header_line_is_the_one_limited() {
    let h = harness(fake_config(), &format!("{PROXIED}\n[limits]\nrecord_creations_per_minute_per_address = 2")).await;
    let create = |lines: &'static [&'static str], n: u32| {
        let mut request = h.http.get(format!("{}/?token=two-line-forwarded-token-{n:04}", h.url));
        for line in lines {
            request = request.header("X-Forwarded-For", *line);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // The client spoofs a first line; the proxy appends the real address as a second.
    let statuses = [
        create(&["6.6.6.1", "198.51.100.70"], 1).await,
        create(&["6.6.6.2", "198.51.100.70"], 2).await,
        create(&["6.6.6.3", "198.51.100.70"], 3).await,
    ];
    assert_eq!(statuses, [200, 200, 429], "changing the spoofed first line does not escape the limit");
    assert_eq!(create(&["198.51.100.70", "198.51.100.71"], 4).await, 200, "the last line's address counts");
}

#[tokio::test]
async fn the_right_secret_is_served_from_an_address_that_is_backing_off() {
    // A guesser and the owner behind one NAT address: the back-off the
    // guesser's wrong secrets engaged never refuses the right secret.
    let h = harness(fake_config(), PROXIED).await;
    let authid = h.login().await;
    let keyid = authid.split(':').next().unwrap();
    let wrong = format!("{keyid}:{}", "A".repeat(43));
    let shared = "203.0.113.80";
    for _ in 0..10 {
        refresh_from(&h, shared, &wrong).await;
    }
    assert_eq!(refresh_from(&h, shared, &wrong).await, 503, "the guesser backs off");
    assert_eq!(refresh_from(&h, shared, &authid).await, 200, "the right secret (handle unwrapped) is served");
    for _ in 0..10 {
        refresh_from(&h, shared, &wrong).await;
    }
    assert_eq!(refresh_from(&h, shared, &wrong).await, 503, "backing off again");
    assert_eq!(refresh_from(&h, shared, &authid).await, 200, "the right secret (token cached) is served");
}
