//! latchkey-core's integration tests: one binary, one module per concern.

mod dependencies;
mod docs;
mod engine;
mod engine_model;
mod engine_world;
mod envelope_props;
mod key_rotation;
mod memory_store;
mod notices;
mod records_props;
mod redaction;
mod sweep;
