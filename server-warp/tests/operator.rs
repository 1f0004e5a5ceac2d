// The operator's grant commands as engine calls, in this process: what
// `latchkey grants …` and `latchkey handles …` run, against a serving broker
// on the same store (the `e2e` binary runs the commands as processes).

use latchkey_core::engine::GrantFilter;
use latchkey_core::{AuthId, GrantState};
use serde_json::Value;

use crate::support::{fake_config, harness, mint_handle, v1_token};

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn an_operator_revokes_without_the_authid_and_the_broker_drops_its_cached_token() {
    let h = harness(fake_config(), "").await;
    let broker = &h.server.broker;
    let first = h.login().await;
    let second = mint_handle(&h.http, &h.url, &first).await["authid"].as_str().unwrap().to_owned();
    let other = h.login().await;
    assert_eq!(v1_token(&h.http, &h.url, &first).await.status(), 200);

    let all = broker.list_grants(&GrantFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    let keyid = |a: &str| AuthId::parse(a).unwrap().keyid();
    let mut grant = None;
    for g in &all {
        let details = broker.show_grant(&g.grant_id).await.unwrap().unwrap();
        if details.handles.iter().any(|h| h.keyid == keyid(&first)) {
            assert_eq!(details.handles.len(), 2);
            assert_eq!((details.grant.handles_active, details.grant.handles_revoked), (2, 0));
            grant = Some(g.grant_id);
        }
    }
    let grant = grant.expect("the first login's grant is listed");
    let filter = |state| GrantFilter { state: Some(state), ..GrantFilter::default() };
    assert!(broker.list_grants(&filter(GrantState::Revoked)).await.unwrap().is_empty());
    let unused = GrantFilter { unused_for: Some(std::time::Duration::from_secs(3600)), ..GrantFilter::default() };
    assert!(broker.list_grants(&unused).await.unwrap().is_empty());
    let service = GrantFilter { service: Some("fake".into()), ..GrantFilter::default() };
    assert_eq!(broker.list_grants(&service).await.unwrap().len(), 2);

    // One AuthID of two: the other keeps working.
    let one = broker.revoke_handle_as_operator(&keyid(&second)).await.unwrap().unwrap();
    assert_eq!((one.grant_revoked, one.handles_revoked, one.handles_left), (false, 1, 1));
    assert_eq!(error_of(v1_token(&h.http, &h.url, &second).await).await, (401, "authid_revoked".into()));
    assert_eq!(v1_token(&h.http, &h.url, &first).await.status(), 200);

    // The whole grant, while its token is cached here.
    let whole = broker.revoke_grant_as_operator(&grant).await.unwrap().unwrap();
    assert_eq!((whole.grant_revoked, whole.handles_revoked), (true, 1));
    assert_eq!(error_of(v1_token(&h.http, &h.url, &first).await).await, (401, "authid_revoked".into()));
    let shown = broker.show_grant(&grant).await.unwrap().unwrap();
    assert_eq!(shown.grant.state, GrantState::Revoked);
    assert!(shown.handles.iter().all(|h| h.revoked_at.is_some()));

    // The last AuthID of a grant takes the grant with it.
    let last = broker.revoke_handle_as_operator(&keyid(&other)).await.unwrap().unwrap();
    assert_eq!((last.grant_revoked, last.handles_left), (true, 0));
    assert_eq!(error_of(v1_token(&h.http, &h.url, &other).await).await, (401, "authid_revoked".into()));
    assert_eq!(broker.list_grants(&filter(GrantState::Revoked)).await.unwrap().len(), 2);

    // Unknown ids are answered as such.
    let nobody = latchkey_core::GrantId::from_bytes([0; 16]);
    assert!(broker.show_grant(&nobody).await.unwrap().is_none());
    assert!(broker.revoke_grant_as_operator(&nobody).await.unwrap().is_none());
    assert!(broker.revoke_handle_as_operator(&latchkey_core::KeyId::from_bytes([0; 16])).await.unwrap().is_none());
}
