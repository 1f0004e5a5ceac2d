//! The fast tier: the broker in this process over real HTTP on a random
//! port, the testkit's fake provider behind it. Seconds, no outside programs:
//! `cargo nextest run -p latchkey-server --test server`. Real processes,
//! Chromium and oidc-provider are the `e2e` binary's (tests/e2e.rs).

mod abuse;
mod api;
mod bad_input;
mod config;
mod duplicati;
mod duplicati_clients;
mod edge;
mod front_door;
mod mount;
mod openapi;
mod operator;
mod providers_doc;
mod support;
mod upkeep;
