// Background upkeep: the sweep of expired logins, hand-offs and device codes
// ([sweep]), and a revocation whose notice the store would not publish
// (counted in /metrics, logged as an error, the revocation itself done).

use std::sync::Arc;
use std::time::{Duration, Instant};

use latchkey_core::testing::FaultStore;
use latchkey_core::{MemoryStore, RecordKind};

use crate::support::{click_to_provider, device_code, fake_config, harness_on, harness_tuned, logs, v1_token};

/// Polls until `done` holds, for at most `within`.
async fn eventually(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let give_up = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < give_up, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn expired_logins_handoffs_and_device_codes_are_swept_in_the_background() {
    let store = Arc::new(MemoryStore::new());
    let short = |c: &mut latchkey_core::EngineConfig| {
        c.login_ttl = Duration::from_secs(1);
        c.device_ttl = Duration::from_secs(1);
    };
    let h = harness_tuned(fake_config(), "[sweep]\ninterval_secs = 1", store.clone(), short).await;
    click_to_provider(&h.http, &h.url, "/login?id=fake").await;
    device_code(&h.http, &h.url, "fake").await;
    let counts =
        || [RecordKind::LoginTransaction, RecordKind::Handoff, RecordKind::DeviceGrant].map(|k| store.count(k));
    assert_eq!(counts(), [1, 1, 1]);
    eventually("three records swept", Duration::from_secs(10), async || {
        h.metric("latchkey_swept_records_total").await == 3
    })
    .await;
    assert_eq!(counts(), [0, 0, 0]);
}

#[tokio::test]
async fn a_revocation_whose_notice_cannot_be_published_succeeds_is_counted_and_logged() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    let h = harness_on(fake_config(), "", store.clone()).await;
    let authid = h.login().await;
    store.fail_publishes(true);
    let revoked = h.http.post(format!("{}/v1/grant/revoke", h.url)).bearer_auth(&authid).send().await.unwrap();
    assert_eq!(revoked.status(), 200, "the revocation itself succeeds");
    assert_eq!(v1_token(&h.http, &h.url, &authid).await.status(), 401);
    assert_eq!(h.metric("latchkey_notice_publish_failures_total").await, 1);
    eventually("an error in the log", Duration::from_secs(5), async || {
        logs().lines().any(|l| l.contains("ERROR") && l.contains("could not be published") && l.contains("failed=1"))
    })
    .await;
}
