//! Criterion micro benchmarks of the per-request work in the core: AuthID
//! parsing, handle key derivation, data-key unwrap/wrap, grant payload
//! seal/open, record encode/decode and the refresh decision.
//!
//! Run: `cargo bench -p latchkey-benches --bench micro -- --quick`.

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use latchkey_benches::{keyring, mint, now, payload};
use latchkey_core::engine::decide::decide;
use latchkey_core::keys::derive_handle_key;
use latchkey_core::records::Record;
use latchkey_core::{AuthId, Grant, GrantId, GrantState, Handle, OsRandom};

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

criterion_group!(benches, micro);
criterion_main!(benches);
