// Shared set-up: a fake provider, a broker on port 0, an HTTP client, captured logs.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use latchkey_core::{MemoryStore, Store};
use latchkey_server::Running;
use latchkey_server::config::Config;
use latchkey_testkit::{FakeConfig, FakeProvider};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

pub(crate) const CLIENT_SECRET: &str = "fake-client-secret-value";

/// The PostgreSQL server as the tests of one binary share it (the `e2e`
/// binary's process tests): under `cargo test` they are threads of one
/// process, so a test that uses the server holds this shared and a test that
/// stops or restarts it holds it alone, for the whole test. (Under
/// cargo-nextest each test is a process of its own; the `postgres` test group
/// in `.config/nextest.toml` runs them one at a time.)
static POSTGRES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Holds the PostgreSQL server shared with the other tests that use it.
#[allow(dead_code)] // the fast tier uses no PostgreSQL
pub(crate) async fn postgres_shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    POSTGRES.read().await
}

/// Holds the PostgreSQL server alone, to stop or restart it: waits for the
/// tests using it to finish, and keeps new ones waiting until dropped.
#[allow(dead_code)] // the fast tier uses no PostgreSQL
pub(crate) async fn postgres_alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    POSTGRES.write().await
}

/// Every log line the broker wrote in this test process.
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a subscriber that keeps every log line (debug and up).
pub(crate) fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buffer
    });
}

pub(crate) fn logs() -> String {
    LOGS.get().map(|b| String::from_utf8_lossy(&b.lock().unwrap()).into_owned()).unwrap_or_default()
}

pub(crate) struct Harness {
    pub(crate) fake: FakeProvider,
    pub(crate) server: Running,
    pub(crate) url: String,
    pub(crate) http: reqwest::Client,
}

pub(crate) fn fake_config() -> FakeConfig {
    FakeConfig { client_secrets: vec![CLIENT_SECRET.into()], rotate: true, strict_reuse: true, ..FakeConfig::default() }
}

/// A broker on a MemoryStore, with a `fake` service at the fake provider.
pub(crate) async fn harness(fake: FakeConfig, extra: &str) -> Harness {
    harness_on(fake, extra, Arc::new(MemoryStore::new())).await
}

pub(crate) async fn harness_on(fake: FakeConfig, extra: &str, store: Arc<dyn Store>) -> Harness {
    harness_tuned(fake, extra, store, |_| {}).await
}

pub(crate) async fn harness_tuned(
    fake: FakeConfig,
    extra: &str,
    store: Arc<dyn Store>,
    tune: impl FnOnce(&mut latchkey_core::EngineConfig),
) -> Harness {
    capture_logs();
    let issuer = fake.issuer.as_ref().map(|i| format!("issuer = \"{i}\"")).unwrap_or_default();
    let fake = FakeProvider::start(fake).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let keys = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    // Top-level keys go first, tables last; `extra` may hold both, tables after keys.
    let tables_at = if extra.trim_start().starts_with('[') { Some(0) } else { extra.find("\n[").map(|i| i + 1) };
    let (top, tables) = extra.split_at(tables_at.unwrap_or(extra.len()));
    let public_url = if top.contains("public_url") { String::new() } else { format!("public_url = \"{url}\"") };
    let text = format!(
        r#"
        {top}
        {public_url}
        [keys]
        master_keys = ["{keys}"]
        [providers.fake]
        authorize_url = "{authorize}"
        token_url = "{token}"
        revocation_url = "{revoke}"
        client_auth = "basic"
        client_id = "latchkey-test"
        client_secrets = ["{CLIENT_SECRET}"]
        rotates_refresh_tokens = true
        {issuer}
        [services.fake]
        provider = "fake"
        display_name = "Fake storage"
        scopes = ["files", "offline_access"]
        [services.jottacloud]
        enabled = false
        {tables}
        "#,
        authorize = fake.authorize_url(),
        token = fake.token_url(),
        revoke = fake.revocation_url(),
    );
    // `extra` may name the fake's endpoints, for a second provider on it.
    let text = text
        .replace("{fake_authorize}", &fake.authorize_url())
        .replace("{fake_token}", &fake.token_url())
        .replace("{fake_base}", &fake.base_url());
    let config = Config::parse(&text).unwrap();
    let server = latchkey_server::serve(&config, store, listener, tune).await.unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Harness { fake, server, url, http }
}

impl Harness {
    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.url)).send().await.unwrap()
    }

    /// Follows a redirect chain by hand, sending `cookie` (the broker's
    /// login cookie) with every request, until it ends.
    pub(crate) async fn follow(&self, mut location: String, cookie: &str) -> reqwest::Response {
        loop {
            let response = self.http.get(&location).header(COOKIE, cookie).send().await.unwrap();
            match response.headers().get(LOCATION) {
                Some(next) if response.status().is_redirection() => location = next.to_str().unwrap().to_owned(),
                _ => return response,
            }
        }
    }

    /// A whole browser login for `service`, optionally with a hand-off token;
    /// answers the AuthID page's HTML.
    pub(crate) async fn browser_login(&self, service: &str, token: Option<&str>) -> String {
        let mut path = format!("/login?id={service}");
        if let Some(token) = token {
            path.push_str(&format!("&token={token}"));
        }
        let (location, cookie) = click_to_provider(&self.http, &self.url, &path).await;
        assert!(location.starts_with(&self.fake.authorize_url()), "{location}");
        let page = self.follow(location, &cookie).await;
        assert_eq!(page.status(), 200);
        page.text().await.unwrap()
    }

    pub(crate) async fn login(&self) -> String {
        authid_from_page(&self.browser_login("fake", None).await)
    }

    /// The value of the unlabelled metric `name` on `/metrics`.
    pub(crate) async fn metric(&self, name: &str) -> u64 {
        let page = self.get("/metrics").await.text().await.unwrap();
        let line = page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        line.unwrap_or_else(|| panic!("no {name} on /metrics")).parse().unwrap()
    }
}

/// A broker page as a browser holds it: its HTML and the login cookie it set.
pub(crate) struct Page {
    pub(crate) html: String,
    /// `name=value`, ready for a `Cookie` header.
    pub(crate) cookie: String,
}

/// Opens a broker page with a fresh cookie jar.
pub(crate) async fn open_page(http: &reqwest::Client, url: &str) -> Page {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let cookie = login_cookie(&response).unwrap_or_else(|| panic!("{url} sets the login cookie"));
    Page { html: response.text().await.unwrap(), cookie }
}

/// The login cookie a response sets, as `name=value`.
pub(crate) fn login_cookie(response: &reqwest::Response) -> Option<String> {
    response.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        let v = v.to_str().ok()?;
        v.contains("latchkey-login=").then(|| v.split(';').next().unwrap().to_owned())
    })
}

/// The hidden fields of the first form on a page that posts to `action`.
pub(crate) fn form_fields(html: &str, action: &str) -> Vec<(String, String)> {
    let start = html.find(&format!("action=\"{action}\"")).unwrap_or_else(|| panic!("a form to {action}: {html}"));
    let form = &html[start..start + html[start..].find("</form>").unwrap()];
    form.split("<input type=hidden name=")
        .skip(1)
        .map(|field| {
            let (name, rest) = field.split_once(" value=\"").unwrap();
            let value = rest.split('"').next().unwrap();
            (name.to_owned(), value.replace("&amp;", "&").replace("&quot;", "\"").replace("&#39;", "'"))
        })
        .collect()
}

/// Posts a form as the broker's own page does: same origin, with the cookie.
pub(crate) async fn post_form(
    http: &reqwest::Client,
    base: &str,
    action: &str,
    fields: &[(String, String)],
    cookie: &str,
) -> reqwest::Response {
    http.post(format!("{base}{action}"))
        .header(COOKIE, cookie)
        .header("Origin", base)
        .header("Sec-Fetch-Site", "same-origin")
        .form(fields)
        .send()
        .await
        .unwrap()
}

/// Opens a page that leads to a login (a confirmation page or the picker)
/// and clicks its first way onward: answers the provider URL the broker
/// sends the browser to, and the browser's login cookie.
pub(crate) async fn click_to_provider(http: &reqwest::Client, base: &str, path: &str) -> (String, String) {
    let page = open_page(http, &format!("{base}{path}")).await;
    let go = post_form(http, base, "/login", &form_fields(&page.html, "/login"), &page.cookie).await;
    assert_eq!(go.status(), 303, "{path}");
    (go.headers()[LOCATION].to_str().unwrap().to_owned(), page.cookie)
}

/// The AuthID in an AuthID page.
pub(crate) fn authid_from_page(html: &str) -> String {
    html.split("data-authid=\"").nth(1).and_then(|s| s.split('"').next()).expect("an AuthID on the page").to_owned()
}

/// `GET /refresh` with the AuthID in `X-AuthID`, as Duplicati sends it.
pub(crate) async fn refresh(http: &reqwest::Client, base: &str, authid: &str) -> reqwest::Response {
    http.get(format!("{base}/refresh")).header("X-AuthID", authid).send().await.unwrap()
}

/// `POST /v1/token` with the AuthID as the bearer token.
pub(crate) async fn v1_token(http: &reqwest::Client, base: &str, authid: &str) -> reqwest::Response {
    http.post(format!("{base}/v1/token")).bearer_auth(authid).send().await.unwrap()
}

/// `POST /v1/device/code` for `service`, as a program labelled "test program": the device flow's start.
pub(crate) async fn device_code(http: &reqwest::Client, base: &str, service: &str) -> serde_json::Value {
    http.post(format!("{base}/v1/device/code"))
        .form(&[("service", service), ("label", "test program")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `POST /v1/device/token`: one poll of the device flow, its status and body.
pub(crate) async fn device_token(
    http: &reqwest::Client,
    base: &str,
    device_code: &str,
) -> (reqwest::StatusCode, serde_json::Value) {
    let response =
        http.post(format!("{base}/v1/device/token")).form(&[("device_code", device_code)]).send().await.unwrap();
    (response.status(), response.json().await.unwrap())
}

/// `POST /v1/handles` with the AuthID as bearer and no label: a new AuthID for the same grant.
pub(crate) async fn mint_handle(http: &reqwest::Client, base: &str, authid: &str) -> serde_json::Value {
    bearer_post(http, base, "/v1/handles", authid, None).await
}

/// `POST <path>` of the `/v1` API with the AuthID as bearer and an optional JSON body; the JSON answer.
pub(crate) async fn bearer_post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    authid: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut request = http.post(format!("{base}{path}")).bearer_auth(authid);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap().json().await.unwrap()
}

/// Reads `stream` until the broker closes it; `None` if it is still open
/// after `give_up`.
pub(crate) async fn read_until_closed(stream: &mut tokio::net::TcpStream, give_up: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(give_up, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    closed.ok().map(|()| String::from_utf8_lossy(&answer).into_owned())
}
