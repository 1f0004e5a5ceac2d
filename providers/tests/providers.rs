//! latchkey-providers against the testkit's fake provider: catalogue, quirks,
//! client authentication, errors, revocation, redaction.

mod catalogue;
mod classify_table;
mod requests;
