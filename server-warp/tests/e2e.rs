//! The slow tier, end to end: the broker as real processes (PostgreSQL
//! stopped and restarted under them), in headless Chromium, and against a
//! real authorization server (oidc-provider on Node.js). The fast tier is the
//! `server` binary (tests/server.rs).

mod browser;
mod cli;
mod connections;
mod demo;
mod instances;
mod interop;
mod processes;
mod readme;
// The HTTP helpers; the in-process harness is the fast tier's.
#[allow(dead_code)]
mod support;
