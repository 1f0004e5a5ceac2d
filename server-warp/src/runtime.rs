//! The engine's [`Runtime`](latchkey_core::Runtime) on tokio: it lives in
//! `latchkey-providers` (so a program that embeds the engine needs no warp)
//! and is re-exported here for code that named it in this crate.

pub use latchkey_providers::TokioRuntime;
