//! How the operator commands (`latchkey grants …`, `latchkey handles …`)
//! print what the engine answered: a table for people, or JSON with
//! `--json`. Never a secret: the engine's answers hold none.

use latchkey_core::Timestamp;
use latchkey_core::engine::{GrantDetails, GrantSummary, HandleSummary, OperatorRevocation};
use serde_json::{Value, json};

/// What every revocation by the operator prints: the provider was not told.
pub const PROVIDER_NOTE: &str = "the provider was not told: its refresh token is sealed under the grant's data key, \
     which only an AuthID opens, so it stays valid there until it expires or the user revokes the app \
     at the provider; nothing on this broker can decrypt it any more";

/// A timestamp as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc(t: Timestamp) -> String {
    let u = t.utc();
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", u.year, u.month, u.day, u.hour, u.minute, u.second)
}

fn summary_json(g: &GrantSummary) -> Value {
    json!({
        "grant_id": g.grant_id.to_string(),
        "service": g.service,
        "state": g.state.as_str(),
        "created_at": utc(g.created_at),
        "updated_at": utc(g.updated_at),
        "last_used_at": utc(g.last_used_at),
        "handles_active": g.handles_active,
        "handles_revoked": g.handles_revoked,
    })
}

fn handle_json(h: &HandleSummary) -> Value {
    json!({
        "keyid": h.keyid.to_string(),
        "label": Value::Null,
        "created_at": utc(h.created_at),
        "last_used_at": utc(h.last_used_at),
        "state": if h.revoked_at.is_some() { "revoked" } else { "active" },
        "revoked_at": h.revoked_at.map(utc),
    })
}

/// `grants list`.
pub fn grant_list(grants: &[GrantSummary], as_json: bool) -> String {
    if as_json {
        return Value::Array(grants.iter().map(summary_json).collect()).to_string();
    }
    let mut out = format!(
        "{:<22}  {:<14}  {:<15}  {:<20}  {:<20}  {}\n",
        "GRANT", "SERVICE", "STATE", "CREATED", "LAST USED", "AUTHIDS (LIVE/REVOKED)"
    );
    for g in grants {
        out.push_str(&format!(
            "{:<22}  {:<14}  {:<15}  {:<20}  {:<20}  {}/{}\n",
            g.grant_id.to_string(),
            g.service,
            g.state.as_str(),
            utc(g.created_at),
            utc(g.last_used_at),
            g.handles_active,
            g.handles_revoked
        ));
    }
    out.push_str(&format!("{} grant(s)", grants.len()));
    out
}

/// `grants show`.
pub fn grant_details(details: &GrantDetails, as_json: bool) -> String {
    let g = &details.grant;
    if as_json {
        let mut value = summary_json(g);
        value["handles"] = Value::Array(details.handles.iter().map(handle_json).collect());
        return value.to_string();
    }
    let mut out = format!(
        "grant      {}\nservice    {}\nstate      {}\ncreated    {}\nupdated    {}\nlast used  {}\n\n",
        g.grant_id,
        g.service,
        g.state.as_str(),
        utc(g.created_at),
        utc(g.updated_at),
        utc(g.last_used_at)
    );
    out.push_str(&format!("{:<22}  {:<8}  {:<20}  {:<20}  {}\n", "KEYID", "STATE", "CREATED", "LAST USED", "REVOKED"));
    for h in &details.handles {
        out.push_str(&format!(
            "{:<22}  {:<8}  {:<20}  {:<20}  {}\n",
            h.keyid.to_string(),
            if h.revoked_at.is_some() { "revoked" } else { "active" },
            utc(h.created_at),
            utc(h.last_used_at),
            h.revoked_at.map(utc).unwrap_or_else(|| "-".into())
        ));
    }
    out.push_str("(labels are sealed under the grant's data key: only an AuthID holder sees them, at GET /v1/handles)");
    out
}

/// `grants revoke` and `handles revoke`.
pub fn revocation(r: &OperatorRevocation, as_json: bool) -> String {
    if as_json {
        return json!({
            "grant_id": r.grant_id.to_string(),
            "service": r.service,
            "grant_revoked": r.grant_revoked,
            "handles_revoked": r.handles_revoked,
            "handles_left": r.handles_left,
            "provider_revoked": false,
            "note": PROVIDER_NOTE,
        })
        .to_string();
    }
    let grant = if r.grant_revoked {
        format!("grant {} ({}) revoked and its payload erased", r.grant_id, r.service)
    } else if r.handles_left == 0 {
        format!("grant {} ({}) was revoked already", r.grant_id, r.service)
    } else {
        format!("grant {} ({}) stays active with {} live AuthID(s)", r.grant_id, r.service, r.handles_left)
    };
    format!("{grant}; {} AuthID(s) revoked and their key wraps erased\nnote: {PROVIDER_NOTE}", r.handles_revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(Timestamp::EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(utc(Timestamp::from_unix_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(utc(Timestamp::from_unix_secs(1_796_011_199)), "2026-11-30T03:59:59Z");
    }
}
