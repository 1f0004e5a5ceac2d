//! Security events, one structured line each on the `latchkey::audit` log
//! target (JSON with `log.format = "json"`): who did what to which login, by
//! keyid, grant id, service and client address — never a secret.
//!
//! An operator filters them with `LATCHKEY_LOG=latchkey::audit=info` or by
//! target in their log pipeline.

use std::net::IpAddr;

use latchkey_core::KeyId;
use latchkey_core::records::GrantId;

/// The log target every audit line uses.
pub const TARGET: &str = "latchkey::audit";

/// A browser login (or a pasted login token) created a grant and its first AuthID.
pub fn login_completed(service: &str, grant: &GrantId, keyid: &KeyId, handed_off: bool, client: IpAddr) {
    tracing::info!(target: TARGET, event = "login_completed", service, grant_id = %grant, keyid = %keyid, handed_off, client = %client);
}

/// A login handed out the provider's access token itself (pCloud); nothing was stored.
pub fn access_token_handed_out(service: &str, handed_off: bool, client: IpAddr) {
    tracing::info!(target: TARGET, event = "access_token_handed_out", service, handed_off, client = %client);
}

/// A hand-off that already carried another AuthID was named by a second login: refused.
pub fn handoff_refused(service: &str, grant: &GrantId, client: IpAddr) {
    tracing::warn!(target: TARGET, event = "handoff_refused", service, grant_id = %grant, client = %client, "a second AuthID for one hand-off was refused");
}

/// A waiting client fetched its AuthID (`/fetch`, a device poll).
pub fn handoff_delivered(keyid: &KeyId, client: IpAddr) {
    tracing::info!(target: TARGET, event = "handoff_delivered", keyid = %keyid, client = %client);
}

/// Another AuthID was minted for a grant.
pub fn authid_minted(by: &KeyId, keyid: &KeyId, client: IpAddr) {
    tracing::info!(target: TARGET, event = "authid_minted", by = %by, keyid = %keyid, client = %client);
}

/// An AuthID was replaced by a new one.
pub fn authid_rotated(old: &KeyId, new: &KeyId, client: IpAddr) {
    tracing::info!(target: TARGET, event = "authid_rotated", keyid = %old, new_keyid = %new, client = %client);
}

/// An AuthID was revoked.
pub fn authid_revoked(by: &KeyId, keyid: &KeyId, client: IpAddr) {
    tracing::info!(target: TARGET, event = "authid_revoked", by = %by, keyid = %keyid, client = %client);
}

/// A whole grant was revoked (every AuthID, and at the provider where it can be).
pub fn grant_revoked(by: &str, handles_revoked: usize, provider: &str, client: IpAddr) {
    tracing::info!(target: TARGET, event = "grant_revoked", by, handles_revoked, provider, client = %client);
}

/// Failed secrets for a keyid crossed the free allowance: back-off engaged.
pub fn backoff_engaged(keyid: &KeyId, client: IpAddr) {
    tracing::warn!(target: TARGET, event = "backoff_engaged", keyid = %keyid, client = %client);
}

/// A browser step was refused by the front door (cross-site form, missing
/// or foreign proof cookie, replayed form or callback).
pub fn browser_refused(route: &str, reason: &str, client: IpAddr) {
    tracing::warn!(target: TARGET, event = "browser_refused", route, reason, client = %client);
}
