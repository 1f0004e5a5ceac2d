// Duplicati's helper protocol end to end, page security headers, and the logs.

use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE};
use serde_json::Value;

use crate::support::{
    CLIENT_SECRET, authid_from_page, click_to_provider, fake_config, form_fields, harness, logs, open_page, post_form,
    refresh,
};

#[tokio::test]
async fn the_whole_duplicati_flow_with_hand_off_refresh_and_revoke() {
    let h = harness(fake_config(), "").await;
    let token = "duplicati-handoff-4f1c2a9e";
    // The user opens the link Duplicati shows: the picker, starting a hand-off.
    let picker = h.get(&format!("/?token={token}&type=fake")).await;
    assert_eq!(picker.status(), 200);
    let html = picker.text().await.unwrap();
    let form = form_fields(&html, "/login");
    assert!(form.contains(&("id".into(), "fake".into())) && form.contains(&("token".into(), token.into())), "{html}");
    assert!(html.contains("A program is waiting for this login"), "the hand-off is named: {html}");
    let wait: Value = h.get(&format!("/fetch?token={token}")).await.json().await.unwrap();
    assert_eq!(wait, serde_json::json!({ "wait": "Not ready" }));
    let state: Value = h.get(&format!("/token-state?token={token}")).await.json().await.unwrap();
    assert_eq!(state["wait"], "Not ready");

    let page = h.browser_login("fake", Some(token)).await;
    let authid = authid_from_page(&page);
    assert!(authid.contains(':'));
    assert!(page.contains("will pick it up by itself"));

    let state: Value = h.get(&format!("/token-state?token={token}")).await.json().await.unwrap();
    assert_eq!(state["success"], true);
    let fetched = h.get(&format!("/fetch?token={token}")).await;
    assert_eq!(fetched.headers()[CACHE_CONTROL], "no-store");
    let fetched: Value = fetched.json().await.unwrap();
    assert_eq!(fetched["authid"], authid.as_str());
    let again = h.get(&format!("/fetch?token={token}")).await;
    assert_eq!(again.status(), 404, "released once");
    assert!(again.headers().contains_key("x-reason"));

    // Duplicati refreshes with the AuthID in X-AuthID.
    let answer = h
        .http
        .get(format!("{}/refresh", h.url))
        .header("X-AuthID", &authid)
        .header("User-Agent", "Duplicati v2.1.0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()[CACHE_CONTROL], "no-store");
    let body: Value = answer.json().await.unwrap();
    let access = body["access_token"].as_str().unwrap().to_owned();
    assert!(h.fake.is_active(&access));
    assert!(body["expires"].as_u64().unwrap() > 3000, "integer seconds left: {body}");
    assert_eq!(body["type"], "fake");
    // Form field and query parameter work too (old clients).
    let form = h.http.post(format!("{}/refresh", h.url)).form(&[("authid", authid.as_str())]).send().await.unwrap();
    assert_eq!(form.status(), 200);
    let query = h.get(&format!("/refresh?authid={}", authid.replace(':', "%3A"))).await;
    assert_eq!(query.status(), 200);

    // The user revokes it; Duplicati now gets a clear one-line reason.
    let revoke_form = h.get("/revoke").await;
    assert_eq!(revoke_form.status(), 200);
    let revoked = h.http.post(format!("{}/revoked", h.url)).form(&[("authid", authid.as_str())]).send().await.unwrap();
    assert_eq!(revoked.status(), 200);
    assert!(
        revoked.text().await.unwrap().contains("the login itself was revoked"),
        "the last AuthID revokes the login"
    );
    let refused = refresh(&h.http, &h.url, &authid).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["x-reason"], "this AuthID has been revoked");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "authid_revoked");

    // Nothing secret reached the logs.
    let logs = logs();
    assert!(logs.contains("route=\"/refresh\""), "requests are logged");
    let keyid = authid.split(':').next().unwrap();
    assert!(
        logs.lines().any(|l| l.contains("token served") && l.contains(&format!("keyid={keyid}"))),
        "a served token's log line names the keyid"
    );
    for secret in [authid.split(':').nth(1).unwrap(), &access, CLIENT_SECRET, token] {
        assert!(!logs.contains(secret), "the logs contain a secret");
    }
    h.server.stop().await;
}

/// The count of `/refresh` answers with `status` in `/metrics`.
async fn refresh_count(h: &crate::support::Harness, status: u16) -> u64 {
    let metrics = h.get("/metrics").await.text().await.unwrap();
    let line = format!("latchkey_http_requests_total{{route=\"/refresh\",status=\"{status}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(line.as_str())).map_or(0, |n| n.parse().unwrap())
}

/// Duplicati's usual request (`GET /refresh`, `X-AuthID`, no body) is
/// answered before the route table; a request that differs only by a body
/// goes through it. Both must answer, count and log alike, refusals too.
#[tokio::test]
async fn the_usual_refresh_answers_as_the_route_table_does() {
    let h = harness(fake_config(), "").await;
    let authid = h.login().await;
    let keyid = authid.split(':').next().unwrap().to_owned();
    let wrong_secret = format!("{keyid}:{}", "A".repeat(authid.split(':').nth(1).unwrap().len()));
    for (raw, status) in [(authid.as_str(), 200), ("not an authid", 401), (wrong_secret.as_str(), 401)] {
        let before = refresh_count(&h, status).await;
        let usual = refresh(&h.http, &h.url, raw).await;
        let routed = h.http.get(format!("{}/refresh", h.url)).header("X-AuthID", raw).body("x").send().await.unwrap();
        assert_eq!(refresh_count(&h, status).await, before + 2, "{raw}: both counted as /refresh {status}");
        let (a, b) = (usual.headers().clone(), routed.headers().clone());
        assert_eq!((usual.status().as_u16(), routed.status().as_u16()), (status, status), "{raw}");
        for (name, value) in a.iter().filter(|(name, _)| *name != "date") {
            assert_eq!(b.get(name), Some(value), "{raw}: header {name}");
        }
        assert_eq!(a.len(), b.len(), "{raw}: the same headers\n{a:?}\n{b:?}");
        let (mut a, mut b): (Value, Value) = (usual.json().await.unwrap(), routed.json().await.unwrap());
        // Seconds left may tick between the two.
        let (x, y) = (a["expires"].take(), b["expires"].take());
        assert!(x.as_u64().unwrap_or(0).abs_diff(y.as_u64().unwrap_or(0)) <= 1, "{x} {y}");
        assert_eq!(a, b, "{raw}: the same body");
    }
    // A header that is not visible ASCII is refused by the route table's
    // own parsing, not taken as an AuthID — in Duplicati's vocabulary, with
    // the X-Reason its clients show.
    let odd = h.http.get(format!("{}/refresh", h.url)).header("X-AuthID", &b"\xff\xfe"[..]).send().await.unwrap();
    assert_eq!(odd.status(), 400);
    assert_eq!(odd.headers().get("x-reason").and_then(|v| v.to_str().ok()), Some("a request header is malformed"));
    let body: Value = odd.json().await.unwrap();
    assert_eq!(
        (body["code"].as_str(), body["error"].as_str()),
        (Some("bad_request"), Some("a request header is malformed"))
    );
    let served = logs()
        .lines()
        .filter(|l| l.contains("route=\"/refresh\" status=200") && l.contains(&format!("keyid={keyid}")))
        .count();
    assert_eq!(served, 2, "one request line each, with the key id");
    h.server.stop().await;
}

#[tokio::test]
async fn every_page_carries_the_security_headers() {
    let h = harness(fake_config(), "").await;
    let authid_page = h.browser_login("fake", None).await;
    assert!(authid_page.contains("/static/authid.js"));
    for path in [
        "/",
        "/?type=fake",
        "/revoke",
        "/device",
        "/device?user_code=BCDF-GHJK",
        "/?type=nope",
        "/login?id=nope",
        "/logged-in?state=forged&code=x",
    ] {
        let response = h.get(path).await;
        let headers = response.headers();
        let csp = headers.get("content-security-policy").unwrap_or_else(|| panic!("{path}: no CSP")).to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}");
        assert!(csp.contains(&h.fake.base_url()), "forms may go to the provider: {csp}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(headers[CACHE_CONTROL], "no-store", "{path}");
        assert!(headers[CONTENT_TYPE].to_str().unwrap().starts_with("text/html"), "{path}");
        let body = response.text().await.unwrap();
        assert!(!body.contains("<script>"), "{path}: no inline script");
    }
    let script = h.get("/static/authid.js").await;
    assert_eq!(script.status(), 200);
    assert!(script.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/javascript"));
    assert_eq!(h.get("/favicon.ico").await.status(), 200, "no 404 in browser consoles");
    let privacy = h.get("/privacy-policy").await;
    assert!(privacy.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
}

#[tokio::test]
async fn the_authid_page_posts_only_to_allowed_openers() {
    let h = harness(fake_config(), "allowed_opener_origins = [\"http://localhost:8200\", \"https://backup.example\"]")
        .await;
    let page = h.browser_login("fake", None).await;
    assert!(page.contains("data-openers=\"http://localhost:8200 https://backup.example\""), "{page}");
    let script = h.get("/static/authid.js").await.text().await.unwrap();
    assert!(script.contains("postMessage(\"authid:\" + id, origin)"));
    assert!(!script.contains("\"*\""), "never to any origin");
}

#[tokio::test]
async fn a_refused_login_and_a_forged_callback_show_clear_pages() {
    let h = harness(fake_config(), "").await;
    h.fake.deny_logins(true);
    let (location, cookie) = click_to_provider(&h.http, &h.url, "/login?id=fake").await;
    let page = h.follow(location, &cookie).await;
    assert_eq!(page.status(), 400);
    let html = page.text().await.unwrap();
    assert!(html.contains("did not grant access (access_denied)"), "{html}");
    let forged = h.get("/logged-in?state=forged-state&code=abc").await;
    assert_eq!(forged.status(), 400);
    assert!(forged.text().await.unwrap().contains("start the login again"));
}

#[tokio::test]
async fn a_personal_login_token_logs_in_without_a_browser_redirect() {
    use base64::Engine;
    let jotta = latchkey_testkit::FakeProvider::start(latchkey_testkit::FakeConfig {
        client_id: "jottacli".into(),
        client_secrets: vec![],
        rotate: true,
        password_logins: vec![("user@example.com".into(), "auth-token-value".into())],
        ..latchkey_testkit::FakeConfig::default()
    })
    .await
    .unwrap();
    let extra = format!(
        "[providers.jotta]\nlogin_token = true\ntoken_url = \"{}\"\nclient_auth = \"none\"\nclient_id = \"jottacli\"\n\
         [services.jotta]\nprovider = \"jotta\"\ndisplay_name = \"Jotta\"\nscopes = [\"openid\", \"offline_access\"]",
        jotta.token_url()
    );
    let h = harness(fake_config(), &extra).await;
    let handoff = "cli-handoff-token-1";
    let start = h.get(&format!("/login?id=jotta&token={handoff}")).await;
    assert_eq!(start.status(), 302);
    assert_eq!(start.headers()["location"], format!("/cli-token?id=jotta&token={handoff}").as_str());
    let form = open_page(&h.http, &format!("{}/cli-token?id=jotta&token={handoff}", h.url)).await;
    assert!(form.html.contains("name=login_token"));
    let login_token = base64::engine::general_purpose::STANDARD
        .encode(r#"{"username":"user@example.com","realm":"jottacloud","auth_token":"auth-token-value"}"#);
    let mut fields = form_fields(&form.html, "/cli-token-login");
    fields.push(("login_token".into(), login_token.clone()));
    // Not from our page: no cookie, or another site's form.
    let bare = h.http.post(format!("{}/cli-token-login", h.url)).form(&fields).send().await.unwrap();
    assert_eq!(bare.status(), 403);
    let cross = h
        .http
        .post(format!("{}/cli-token-login", h.url))
        .header("Cookie", &form.cookie)
        .header("Sec-Fetch-Site", "cross-site")
        .form(&fields)
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    assert_eq!(jotta.token_requests().len(), 0, "refused before the provider is asked");
    let page = post_form(&h.http, &h.url, "/cli-token-login", &fields, &form.cookie).await;
    assert_eq!(page.status(), 200);
    let authid = authid_from_page(&page.text().await.unwrap());
    let fetched: Value = h.get(&format!("/fetch?token={handoff}")).await.json().await.unwrap();
    assert_eq!(fetched["authid"], authid.as_str());
    let refresh = refresh(&h.http, &h.url, &authid).await;
    assert_eq!(refresh.status(), 200);
    let request = jotta.token_requests().pop().unwrap();
    assert_eq!((request.form("grant_type"), request.form("client_id")), (Some("password"), Some("jottacli")));
    let form = open_page(&h.http, &format!("{}/cli-token?id=jotta", h.url)).await;
    let mut fields = form_fields(&form.html, "/cli-token-login");
    fields.push(("login_token".into(), "not-a-token".into()));
    let wrong = post_form(&h.http, &h.url, "/cli-token-login", &fields, &form.cookie).await;
    assert_eq!(wrong.status(), 400);
    assert!(!logs().contains("auth-token-value"), "the pasted token is not logged");
    // Which services take a login token is the catalogue's word: without an
    // id, the form is the first such service's; a redirect service has none.
    let default = open_page(&h.http, &format!("{}/cli-token", h.url)).await;
    assert!(default.html.contains("name=id value=\"jotta\""), "{}", default.html);
    assert_eq!(h.get("/cli-token?id=fake").await.status(), 404);
    assert_eq!(h.get("/login?id=fake").await.status(), 200, "a redirect login shows its confirmation");
}
