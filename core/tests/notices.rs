// Notices that go missing: a revocation whose "grant changed" notice the
// store would not publish, and a store that says notices may have been lost
// (`Notice::Resync`, as the PostgreSQL listener does after a reconnect).

use latchkey_core::engine::EngineError;
use latchkey_core::testing::ScriptedProvider;
use latchkey_core::{Notice, Store};

use crate::engine_world::{World, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_whose_notice_cannot_be_published_succeeds_and_is_counted() {
    let world = World::new(ScriptedProvider::new());
    let a = world.broker("a", |_| {}).await;
    let login = world.login(&a).await;
    let second = a.mint_handle(&login.authid, "nas").await.unwrap().authid;
    a.token(&login.authid, None).await.unwrap();
    world.store.fail_publishes(true);
    a.revoke_handle(&login.authid, login.authid.keyid()).await.expect("the revocation itself succeeds");
    assert_eq!(a.metrics().notice_publish_failures, 1);
    assert_eq!(a.token(&login.authid, None).await.unwrap_err(), EngineError::AuthIdRevoked, "here at once");
    a.revoke_grant(&second).await.expect("so does revoking the whole grant");
    assert_eq!(a.metrics().notice_publish_failures, 2);
    world.store.fail_publishes(false);
    assert_eq!(a.token(&second, None).await.unwrap_err(), EngineError::AuthIdRevoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_notice_drops_every_cached_token_so_a_lost_revocation_takes_effect() {
    let world = World::new(ScriptedProvider::new());
    let a = world.broker("a", |_| {}).await;
    let b = world.broker("b", |_| {}).await;
    let first = world.login(&a).await;
    let other = world.login(&a).await;
    for authid in [&first.authid, &other.authid] {
        b.token(authid, None).await.unwrap();
    }
    assert_eq!(b.metrics().cached_tokens, 2);
    // The notice is lost on its way to b.
    world.store.fail_publishes(true);
    a.revoke_handle(&first.authid, first.authid.keyid()).await.unwrap();
    world.store.fail_publishes(false);
    assert!(b.token(&first.authid, None).await.is_ok(), "b still answers from its cache");
    // b's store comes back and says notices may have been lost.
    world.memory.publish(Notice::Resync).await.unwrap();
    until("b dropped its whole cache", || b.metrics().cached_tokens == 0).await;
    assert_eq!(b.token(&first.authid, None).await.unwrap_err(), EngineError::AuthIdRevoked);
    assert!(b.token(&other.authid, None).await.is_ok(), "the other grant is re-read, not refused");
}
