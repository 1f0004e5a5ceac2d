// The background sweep of expired login transactions, hand-offs and device
// codes, driven by the manual clock. Its store-level behaviour (bounded
// pages, concurrent passes) is also a conformance case every store runs.

use std::time::Duration;

use latchkey_core::RecordKind;
use latchkey_core::testing::ScriptedProvider;

use crate::engine_world::{SERVICE, World, begin};

fn short_lived(world: &World) -> [usize; 3] {
    [RecordKind::LoginTransaction, RecordKind::Handoff, RecordKind::DeviceGrant].map(|k| world.memory.count(k))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sweep_pass_deletes_every_expired_login_handoff_and_device_code() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    begin(&broker, SERVICE, None).await;
    begin(&broker, SERVICE, Some("a-hand-off-token-of-the-first-login")).await;
    broker.start_handoff("a-hand-off-token-nobody-used").await.unwrap();
    broker.begin_device(SERVICE, None).await.unwrap();
    let completed = world.login(&broker).await; // its login transaction stays, completed, until it expires
    assert_eq!(short_lived(&world), [3, 3, 1]);

    assert_eq!(broker.sweep_expired(100).await.unwrap().removed(), 0, "nothing has expired yet");
    // Logins live 10 minutes, hand-offs and device codes 15.
    world.clock.advance(Duration::from_secs(601));
    let report = broker.sweep_expired(100).await.unwrap();
    assert_eq!((report.expired_logins, report.expired_handoffs, report.expired_devices), (3, 0, 0), "{report:?}");
    world.clock.advance(Duration::from_secs(300));
    begin(&broker, SERVICE, None).await; // begun just now: stays
    let report = broker.sweep_expired(100).await.unwrap();
    assert_eq!((report.expired_logins, report.expired_handoffs, report.expired_devices), (0, 3, 1), "{report:?}");
    assert!(!report.more);
    assert_eq!(short_lived(&world), [1, 0, 0], "only the login begun after the expiry is left");
    assert_eq!(broker.metrics().swept_records, 7);
    assert_eq!(world.memory.count(RecordKind::Grant), 1, "grants are gc's, never the sweep's");
    assert!(broker.token(&completed.authid, None).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_pass_reads_at_most_its_limit_of_each_kind_and_the_next_goes_on() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    for i in 0..5 {
        begin(&broker, SERVICE, Some(&format!("hand-off-token-number-{i}"))).await;
    }
    world.clock.advance(Duration::from_secs(901));
    let mut passes = Vec::new();
    loop {
        let report = broker.sweep_expired(2).await.unwrap();
        assert!(report.examined <= 2 * 3, "{report:?}");
        assert!(report.expired_logins <= 2 && report.expired_handoffs <= 2, "{report:?}");
        passes.push(report.removed());
        if !report.more {
            break;
        }
        assert!(passes.len() < 10, "the sweep never finishes: {passes:?}");
    }
    assert_eq!(passes, [4, 4, 2], "two logins and two hand-offs a pass");
    assert_eq!(short_lived(&world), [0, 0, 0]);
    assert_eq!(broker.metrics().swept_records, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_that_the_store_refuses_fails_and_the_next_pass_sweeps() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    begin(&broker, SERVICE, None).await;
    world.clock.advance(Duration::from_secs(601));
    world.store.fail_reads(true);
    assert!(broker.sweep_expired(100).await.is_err());
    world.store.fail_reads(false);
    assert_eq!(broker.sweep_expired(100).await.unwrap().expired_logins, 1);
    assert_eq!(short_lived(&world), [0, 0, 0]);
}
