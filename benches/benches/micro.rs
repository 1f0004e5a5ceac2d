//! Criterion micro benchmarks of the per-request work in the core: AuthID
//! parsing, handle key derivation, data-key unwrap/wrap, grant payload
//! seal/open, record encode/decode and the refresh decision; and what a
//! cached token request costs with 1, 10,000, 50,000 and 100,000 AuthIDs
//! cached (`hit_path/N`: parse, cache lookup, the answer's strings copied,
//! the keyid's rate-limit bucket charged — the broker's own work per cached
//! `/refresh`, without HTTP), to show what more AuthIDs cost in memory.
//!
//! Run: `cargo bench -p latchkey-benches --bench micro -- --quick`.

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use latchkey_benches::{keyring, mint, now, payload, populate};
use latchkey_core::engine::decide::decide;
use latchkey_core::keys::derive_handle_key;
use latchkey_core::records::Record;
use latchkey_core::{
    AuthId, Broker, BrokerParts, Catalogue, EngineConfig, Grant, GrantId, GrantState, Handle, MemoryStore, OsRandom,
    Store,
};
use latchkey_server::config::LimitsConfig;
use latchkey_server::limits::Limiter;
use latchkey_server::runtime::TokioRuntime;
use secrecy::ExposeSecret;

fn micro(c: &mut Criterion) {
    let ring = keyring();
    let t = now();
    let valid = payload("bench-refresh", t.saturating_add(Duration::from_secs(3600)), t);
    let minted = mint(&ring, &valid, t);
    let authid = AuthId::parse(&minted.authid).unwrap_or_else(|e| panic!("{e}"));
    let data_key = minted.handle.unwrap_data_key(authid.secret(), &ring).unwrap_or_else(|e| panic!("{e}"));
    let grant_bytes = minted.grant.encode();
    let handle_bytes = minted.handle.encode();

    c.bench_function("authid_parse", |b| b.iter(|| AuthId::parse(black_box(&minted.authid))));
    c.bench_function("derive_handle_key", |b| {
        b.iter(|| derive_handle_key(black_box(authid.secret()), black_box(&minted.handle.salt), &authid.keyid()))
    });
    c.bench_function("handle_unwrap_data_key", |b| {
        b.iter(|| minted.handle.unwrap_data_key(black_box(authid.secret()), &ring))
    });
    c.bench_function("handle_new_wrap", |b| {
        b.iter(|| Handle::new(black_box(&authid), minted.grant.id, &data_key, "bench", &ring, t, &OsRandom))
    });
    c.bench_function("grant_new_seal", |b| {
        b.iter(|| Grant::new(GrantId::generate(&OsRandom), "fake", black_box(&valid), &data_key, t, &OsRandom))
    });
    c.bench_function("grant_open_payload", |b| b.iter(|| minted.grant.open_payload(black_box(&data_key))));
    c.bench_function("grant_encode", |b| b.iter(|| black_box(&minted.grant).encode()));
    c.bench_function("grant_decode", |b| b.iter(|| Grant::decode(black_box(&grant_bytes), 1)));
    c.bench_function("handle_encode", |b| b.iter(|| black_box(&minted.handle).encode()));
    c.bench_function("handle_decode", |b| b.iter(|| Handle::decode(black_box(&handle_bytes), 1)));
    c.bench_function("decide", |b| {
        b.iter(|| decide(black_box(t), GrantState::Active, black_box(&valid), Duration::from_secs(300)))
    });
}

/// A cached token request at each size, AuthIDs in a shuffled order, so
/// that the lookups of one size touch its maps and tokens where they lie,
/// as a server's clients do. The AuthIDs' text is laid out in that order,
/// so reading it is a sequential scan and not one more miss per request.
fn hit_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("hit_path");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    for n in [1usize, 10_000, 50_000, 100_000] {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let filled = runtime
            .block_on(populate(Arc::clone(&store), n as u64, 32, n, None, |_, _| {}))
            .unwrap_or_else(|e| panic!("{e}"));
        let broker = Broker::new(BrokerParts {
            store,
            catalogue: Catalogue::default(),
            keyring: keyring(),
            runtime: Arc::new(TokioRuntime),
            rng: Arc::new(OsRandom),
            config: EngineConfig { cache_capacity: n.max(1) * 2, ..EngineConfig::default() },
        });
        let mut order = filled.sample;
        // A fixed shuffle (xorshift), the same every run.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let width = order[0].len();
        assert!(order.iter().all(|a| a.len() == width), "AuthIDs are all as long");
        let text: String = order.concat();
        for authid in &order {
            let authid = AuthId::parse(authid).unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(broker.shared_token(&authid, None)).unwrap_or_else(|e| panic!("{e}"));
        }
        let limits = LimitsConfig { token_requests_per_minute_per_keyid: u32::MAX, ..LimitsConfig::default() };
        let limiter = Limiter::new(&limits);
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let raw = &text[next * width..(next + 1) * width];
                next = (next + 1) % order.len();
                let authid = AuthId::parse(black_box(raw)).unwrap_or_else(|e| panic!("{e}"));
                let token = broker
                    .shared_token(&authid, None)
                    .now_or_never()
                    .unwrap_or_else(|| panic!("a cached token request waited"))
                    .unwrap_or_else(|e| panic!("{e}"));
                let secret = token.access_token.expose_secret();
                let mut body = Vec::with_capacity(secret.len() + token.service.len());
                body.extend_from_slice(secret.as_bytes());
                body.extend_from_slice(token.service.as_bytes());
                let charged = limiter.authenticated(authid.keyid(), Instant::now());
                (black_box(body), charged)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, micro, hit_path);
criterion_main!(benches);
