//! The committed seed corpus, generated: real sealed blobs and records made
//! with the fixed keys of the crate root, AuthIDs, provider answers, the
//! built-in catalogue and sample configurations, request bodies.
//!
//! `tests/replay.rs` checks that `corpus/<target>/<name>` holds exactly these
//! bytes, and writes them when `LATCHKEY_FUZZ_WRITE_SEEDS=1`. Generation is
//! deterministic (core's `SeqRandom`), so the files only change when a stored
//! format does.

use latchkey_core::envelope;
use latchkey_core::{
    AuthId, DeviceGrant, Grant, GrantId, GrantPayload, GrantState, Handle, Handoff, HandoffId, Lease, LoginId,
    LoginTransaction, MasterKeyring, PassphraseParams, Record, Tagged, Timestamp, UserCodeId,
};
use secrecy::SecretString;

use crate::{
    CURRENT_KEY, GRANT_ID, HANDOFF_TOKEN, OLD_KEY_ID, PLANTED, authid, data_key, keyring, master_context, old_keyring,
    payload_context,
};
use latchkey_core::testing::SeqRandom;

/// One seed file: target, file name, contents.
pub type Seed = (&'static str, String, Vec<u8>);

/// Every seed, for every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    envelope_open(&mut seeds);
    record_decode(&mut seeds);
    authid_parse(&mut seeds);
    token_response(&mut seeds);
    config_parse(&mut seeds);
    duplicati_request(&mut seeds);
    forwarded_for(&mut seeds);
    seeds
}

fn add(seeds: &mut Vec<Seed>, target: &'static str, name: &str, bytes: impl Into<Vec<u8>>) {
    seeds.push((target, name.to_owned(), bytes.into()));
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_unix_millis(ms)
}

fn payload() -> GrantPayload {
    GrantPayload {
        refresh_token: Some(SecretString::from("M.C5_BAY.refresh-token-for-fuzzing")),
        access_token: Some(SecretString::from("EwBwA8l6BAAU.access-token-for-fuzzing")),
        access_expires_at: Some(t(1_790_003_600_000)),
        refreshed_at: t(1_790_000_000_000),
        scopes: vec!["offline_access".to_owned(), "Files.ReadWrite".to_owned()],
        account_id: Some("00000000-0000-0000-66f3-3332eca7ea81".to_owned()),
        token_type: Some("Bearer".to_owned()),
        extra: vec![("hostname".to_owned(), "eapi.pcloud.com".to_owned())],
    }
}

fn grant(rng: &SeqRandom) -> Grant {
    Grant::new(GrantId::from_bytes(GRANT_ID), "onedrivev2", &payload(), &data_key(), t(1_790_000_000_000), rng)
}

fn envelope_open(seeds: &mut Vec<Seed>) {
    const T: &str = "envelope_open";
    let rng = SeqRandom::new(1);
    let dk = data_key();
    let payload = envelope::seal(&dk, &payload_context(), b"a grant payload", &rng);
    add(seeds, T, "data_key_blob", payload.as_bytes());
    let wrap = keyring().seal(&master_context(), &[0x5a; 60], &rng);
    add(seeds, T, "master_blob_current_key", wrap.as_bytes());
    let old = old_keyring().seal(&master_context(), &[0xa5; 60], &rng);
    add(seeds, T, "master_blob_old_key", old.as_bytes());
    let unknown = MasterKeyring::parse(&["retired:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="])
        .expect("fixed key parses")
        .seal(&master_context(), b"wrap", &rng);
    add(seeds, T, "master_blob_unknown_key", unknown.as_bytes());
    let empty = envelope::seal(&dk, &payload_context(), b"", &rng);
    add(seeds, T, "empty_plaintext", empty.as_bytes());
    let mut v2 = payload.as_bytes().to_vec();
    v2[0] = 2;
    add(seeds, T, "version_2", v2);
    add(seeds, T, "header_only", &wrap.as_bytes()[..3 + OLD_KEY_ID.len() + 24]);
    add(seeds, T, "master_key_text", format!("k2026:{}", base64_std(&CURRENT_KEY)));
    add(seeds, T, "keyring_text", format!("k2026:{}\nk2025:{}\n", base64_std(&CURRENT_KEY), base64_std(&[0x33; 32])));
    let params = PassphraseParams { m_kib: 19 * 1024, t: 2, p: 1, salt: [7; 16] };
    add(seeds, T, "passphrase_params", params.to_text());
}

fn base64_std(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn record_decode(seeds: &mut Vec<Seed>) {
    const T: &str = "record_decode";
    let rng = SeqRandom::new(2);
    let ring = keyring();
    let grant = grant(&rng);
    add(seeds, T, "grant", grant.encode());
    let mut revoked = grant.clone();
    revoked.state = GrantState::Revoked;
    add(seeds, T, "grant_revoked", revoked.encode());
    // The payload's own encoding, as the grant's sealed payload holds it.
    let plain = envelope::open(&data_key(), &payload_context(), &grant.payload).expect("seed payload opens");
    add(seeds, T, "grant_payload", plain.to_vec());
    let handle = Handle::new(&authid(), grant.id, &data_key(), "laptop backup", &ring, t(1_790_000_000_000), &rng);
    add(seeds, T, "handle", handle.encode());
    let old = Handle::new(&authid(), grant.id, &data_key(), "", &old_keyring(), t(1_790_000_000_000), &rng);
    let mut old = old;
    old.revoked_at = Some(t(1_790_000_500_000));
    add(seeds, T, "handle_old_key_revoked", old.encode());
    let keys = ring.record_keys();
    let mut tx = LoginTransaction {
        id: LoginId::for_state(&keys, "state-for-fuzzing"),
        version: 0,
        service: "googledrive".to_owned(),
        pkce_verifier: None,
        handoff: Some(HandoffId::for_token(&keys, HANDOFF_TOKEN)),
        browser: Some([9; 32]),
        label: "first login".to_owned(),
        created_at: t(1_790_000_000_000),
        expires_at: t(1_790_000_600_000),
        completed_at: None,
        tag: [0; 32],
    };
    tx.sign(&keys);
    add(seeds, T, "login_without_pkce", tx.encode());
    tx.seal_verifier(&SecretString::from("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"), &ring, &rng);
    tx.completed_at = Some(t(1_790_000_100_000));
    tx.sign(&keys);
    add(seeds, T, "login_with_pkce", tx.encode());
    let mut handoff = Handoff::new(&keys, HANDOFF_TOKEN, t(1_790_000_000_000), t(1_790_000_900_000));
    add(seeds, T, "handoff_pending", handoff.encode());
    handoff.seal_authid(&authid(), &rng);
    add(seeds, T, "handoff_ready", handoff.encode());
    handoff.authid = None;
    handoff.delivered_at = Some(t(1_790_000_100_000));
    handoff.denied_at = Some(t(1_790_000_100_001));
    add(seeds, T, "handoff_delivered", handoff.encode());
    let device = DeviceGrant {
        id: UserCodeId::for_user_code(&keys, "WDJB-MJHT"),
        version: 0,
        service: "dropbox".to_owned(),
        handoff: HandoffId::for_token(&keys, "device-code-for-fuzzing"),
        label: "nightly backup".to_owned(),
        created_at: t(1_790_000_000_000),
        expires_at: t(1_790_000_900_000),
        tag: [0; 32],
    };
    add(seeds, T, "device_grant", device.encode());
    let lease =
        Lease { grant_id: grant.id, version: 0, owner: "instance-7f3a".to_owned(), deadline: t(1_790_000_030_000) };
    add(seeds, T, "lease", lease.encode());
    add(seeds, T, "truncated_grant", &grant.encode()[..20]);
}

fn authid_parse(seeds: &mut Vec<Seed>) {
    const T: &str = "authid_parse";
    let text = authid().expose_text().to_string();
    let (k, s) = text.split_once(':').expect("canonical AuthID has ':'");
    add(seeds, T, "canonical", text.as_bytes());
    add(seeds, T, "percent_3A", format!("{k}%3A{s}"));
    add(seeds, T, "percent_3a", format!("{k}%3a{s}"));
    add(seeds, T, "whitespace", format!("  {text}\r\n"));
    add(seeds, T, "keyid_only", k);
    let generated = AuthId::generate(&SeqRandom::new(3)).expose_text();
    add(seeds, T, "generated", generated.as_bytes());
    add(seeds, T, "duplicati_v2", "v2:eyJhbGciOiJIUzI1NiJ9.payload");
    add(seeds, T, "access_token", "ya29.a0AfH6SMBrawaccesstokenwithoutseparator");
    add(seeds, T, "non_canonical", format!("{}B:{s}", &k[..21]));
    add(seeds, T, "double_separator", format!("{k}::{s}"));
}

fn token_response(seeds: &mut Vec<Seed>) {
    const T: &str = "token_response";
    // status (2 bytes), flags, body; flags bit 0: first line is Retry-After,
    // bits 1-2: account id source (0 none, 1 id_token, 2 account_id, 3 userid).
    let mut answer = |name: &str, status: u16, flags: u8, body: &str| {
        let mut bytes = status.to_be_bytes().to_vec();
        bytes.push(flags);
        bytes.extend_from_slice(body.as_bytes());
        add(seeds, T, name, bytes);
    };
    let id_token =
        "eyJhbGciOiJub25lIn0.eyJvaWQiOiIwMDAwMDAwMC0wMDAwLTAwMDAtNjZmMy0zMzMyZWNhN2VhODEiLCJzdWIiOiJhYmMifQ.sig";
    answer(
        "microsoft_ok",
        200,
        1 << 1,
        &format!(
            r#"{{"token_type":"Bearer","scope":"Files.ReadWrite offline_access","expires_in":3599,"ext_expires_in":3599,"access_token":"EwBwA8l6BAAU","refresh_token":"M.C5_BAY.CgMzw","id_token":"{id_token}"}}"#
        ),
    );
    answer(
        "dropbox_ok",
        200,
        2 << 1,
        r#"{"access_token":"sl.BxYz","token_type":"bearer","expires_in":"14400","refresh_token":"rt","scope":"files.content.write","uid":"123","account_id":"dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc"}"#,
    );
    answer(
        "pcloud_ok",
        200,
        (3 << 1) | 8,
        r#"{"result":0,"userid":12345678,"locationid":2,"access_token":"pcloud-token","token_type":"bearer"}"#,
    );
    answer("ok_null_expiry", 200, 0, r#"{"access_token":"a","expires_in":null,"refresh_token":""}"#);
    answer("ok_no_access_token", 200, 0, r#"{"refresh_token":"r"}"#);
    let [refresh, client_secret, code] = PLANTED;
    answer(
        "invalid_grant_echoing_secret",
        400,
        0,
        &format!(
            r#"{{"error":"invalid_grant","error_description":"AADSTS70000: refresh token {refresh} is expired"}}"#
        ),
    );
    answer(
        "invalid_client_echoing_secret",
        401,
        0,
        &format!(r#"{{"error":"invalid_client","error_description":"client secret '{client_secret}' is wrong"}}"#),
    );
    answer(
        "custom_error_with_code",
        400,
        0,
        &format!(r#"{{"error":"bad_code {code}","error_description":"code {code} was already redeemed"}}"#),
    );
    answer("invalid_grant_plain", 400, 0, r#"{"error":"invalid_grant","error_description":"AADSTS700082: expired"}"#);
    answer("rate_limited", 429, 1, "120\n{\"error\":\"too_many_requests\"}");
    answer("slow_down", 400, 1, "\n{\"error\":\"slow_down\"}");
    answer("authorization_pending", 400, 0, r#"{"error":"authorization_pending"}"#);
    answer("server_error_html", 503, 0, "<html><body>Service Unavailable</body></html>");
    answer("forbidden_empty", 403, 0, "");
    answer("id_token_sub_only", 200, 1 << 1, r#"{"access_token":"x","id_token":"e30.eyJzdWIiOiIxMjM0NSJ9.s"}"#);
}

fn config_parse(seeds: &mut Vec<Seed>) {
    const T: &str = "config_parse";
    add(seeds, T, "builtin_catalogue", latchkey_providers::config::BUILT_IN);
    add(seeds, T, "empty", "");
    add(
        seeds,
        T,
        "server_config",
        r#"listen = "0.0.0.0:8080"
public_url = "https://broker.example.com/"
trusted_proxies = ["10.0.0.0/8", "::1"]
allowed_opener_origins = ["http://localhost:8200"]

[store]
kind = "postgres"
url = "postgres://latchkey@db/latchkey"
schema = "latchkey"

[keys]
master_keys = ["k2026:IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI="]

[limits]
token_requests_per_minute_per_keyid = 60
token_requests_per_minute_per_address = 300
fetch_requests_per_minute_per_address = 60

[log]
format = "json"
level = "latchkey=debug"

[providers.microsoft]
client_id = "00000000-0000-0000-0000-000000000000"
client_secrets = ["new-secret", "old-secret"]

[providers.google]
client_id = "1234.apps.googleusercontent.com"
client_secrets = ["GOCSPX-secret"]
refresh_idle_lifetime_days = 7

[services.googledrive]
enabled = false
"#,
    );
    add(
        seeds,
        T,
        "catalogue_override",
        r#"[providers.example]
authorize_url = "https://auth.example.com/authorize"
token_url = "http://127.0.0.1:9000/token"
revocation_url = "https://auth.example.com/revoke"
revocation = "bearer"
device_authorization_url = "https://auth.example.com/device"
client_auth = "basic"
client_id = "id"
client_secrets = ["s"]
account_id = "field:user_id"
api_host_param = "hostname"
api_hosts = ["api.example.com"]
timeout_secs = 10
default_expires_in_secs = 600

[services.example]
provider = "example"
display_name = "Example Drive"
scopes = ["read", "write"]
auth_params = { prompt = "consent" }
hidden = true
"#,
    );
    add(
        seeds,
        T,
        "environment",
        "LATCHKEY_PUBLIC_URL=https://env.example\nLATCHKEY_LIMITS__TOKEN_REQUESTS_PER_MINUTE_PER_KEYID=7\n\
         LATCHKEY_PROVIDERS__DROPBOX__CLIENT_ID=app\nLATCHKEY_PROVIDERS__DROPBOX__CLIENT_SECRETS=[\"s1\", \"s2\"]\n",
    );
    add(
        seeds,
        T,
        "idle_lifetime_bounds",
        "[providers.jottacloud]\nrefresh_idle_lifetime_days = 36500\n\n[providers.google]\nclient_id = \"x\"\n\
         client_secrets = [\"s\"]\nrefresh_idle_lifetime_days = 9223372036854775807\n",
    );
    add(seeds, T, "durations_and_cidrs", "365d\n12h\n30m\n45s\n90\n2w\n10.0.0.0/8\n::1\nfd00::/8\n192.168.1.1/33\n");
}

fn duplicati_request(seeds: &mut Vec<Seed>) {
    const T: &str = "duplicati_request";
    // flags (bits 0-2 peer, bit 3 X-AuthID header), then X-Forwarded-For,
    // [X-AuthID,] query and body, separated by '\n'.
    let text = authid().expose_text().to_string();
    let (k, s) = text.split_once(':').expect("canonical AuthID has ':'");
    let mut request = |name: &str, flags: u8, lines: &[&str]| {
        let mut bytes = vec![flags];
        bytes.extend_from_slice(lines.join("\n").as_bytes());
        add(seeds, T, name, bytes);
    };
    request("form_body", 1, &["", "", &format!("authid={k}%3A{s}")]);
    request("form_body_colon", 3, &["", "", &format!("authid={text}&type=onedrivev2")]);
    request("json_body", 1, &["", "", &format!(r#"{{"authid":"{text}","n":1}}"#)]);
    request("query_only", 2, &["198.51.100.7", &format!("authid={k}%253A{s}"), ""]);
    request("header", 8 | 1, &["203.0.113.5, 10.0.0.2", &format!(" {text} "), "", ""]);
    request("forwarded_chain", 2, &["198.51.100.7, 10.0.0.1, 127.0.0.1", "", "authid=v2%3Aabc"]);
    request("untrusted_peer", 3, &["198.51.100.7", "authid=nope", ""]);
    request("ipv6_chain", 4, &["2001:db8::7, fd00::1", "", "authid="]);
    request("bad_separator", 5, &["junk, 10.0.0.1", "", &format!("authid={k}%20{s}")]);
    request("reason_injection", 0, &["", "", "authid=x\r\nInjected: yes\u{7f} ünïcode"]);
}

fn forwarded_for(seeds: &mut Vec<Seed>) {
    const T: &str = "forwarded_for";
    // flags (bits 0-2 peer), then X-Forwarded-For lines separated by '\n'.
    let mut lines = |name: &str, peer: u8, lines: &[&str]| {
        let mut bytes = vec![peer];
        bytes.extend_from_slice(lines.join("\n").as_bytes());
        add(seeds, T, name, bytes);
    };
    lines("one_line", 1, &["198.51.100.7, 10.0.0.2"]);
    lines("second_line_added_by_a_proxy", 1, &["6.6.6.6", "198.51.100.7", "10.0.0.2"]);
    lines("untrusted_peer", 3, &["198.51.100.7"]);
    lines("ipv6_client", 4, &["2001:db8:5:6::42", "fd00::1"]);
    lines("mapped_ipv4", 7, &["::ffff:198.51.100.9"]);
    lines("garbage_hop", 2, &["198.51.100.7, junk", "10.9.9.9"]);
    lines("no_lines", 1, &[]);
}
