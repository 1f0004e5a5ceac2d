//! The examples, exercised: each application started in this process on
//! `127.0.0.1:0` against the testkit's fake provider, the custom store
//! through the conformance suite, the custom provider against a stand-in
//! service. One binary: `cargo nextest run -p latchkey-examples`.

mod custom_provider;
mod custom_store;
mod hyper_app;
mod warp_app;
