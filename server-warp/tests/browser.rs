// A real browser: headless Chromium driven over WebDriver (chromedriver),
// through the broker's pages and the login and consent forms of a real
// authorization server (panva's oidc-provider, via the testkit).
//
// Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium,
// /usr/bin/chromedriver) and `npm ci --prefix interop/oidc`. Every process
// and server listens on 127.0.0.1; Chromium resolves no other host name but
// `hostile.test`, which it maps to 127.0.0.1 too: a page served under that
// name is on another site than the broker (a page on 127.0.0.1 at another
// port is another origin of the same site).
//
// The browser console and every request the browser sends (in any of its
// windows) are read through chromedriver's log endpoint
// (`POST /session/{id}/se/log` with `{"type": "browser"}` or
// `{"type": "performance"}`; the session asks for both with
// `goog:loggingPrefs`). Each read drains what was logged since the previous
// one.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand, WindowHandle};
use fantoccini::{Client, ClientBuilder, Locator};
use latchkey_core::MemoryStore;
use latchkey_server::Running;
use latchkey_server::config::Config;
use latchkey_testkit::oidc::OidcProvider;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use warp::http::Method;
use warp::{Filter, Reply};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The longest any one step (a page load, a form, a message) may take.
const WAIT: Duration = Duration::from_secs(20);
/// How often a bounded wait looks again.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long a message that must not arrive is waited for.
const ABSENCE: Duration = Duration::from_secs(2);

const DISPLAY_NAME: &str = "OIDC storage";

/// A host name of another site, mapped to 127.0.0.1 in the browser only.
const HOSTILE_HOST: &str = "hostile.test";

/// The broker's login cookie (`__Host-` only over HTTPS, which these tests do not use).
const LOGIN_COOKIE: &str = "latchkey-login";

/// Desktop and phone window sizes.
const DESKTOP: (u32, u32) = (1280, 900);
const PHONE: (u32, u32) = (390, 844);

// ------------------------------------------------------------------ chromedriver

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        assert!(
            std::path::Path::new(CHROMEDRIVER).is_file() && std::path::Path::new(CHROMIUM).is_file(),
            "the browser tests need {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver"
        );
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        // A port found free can be taken before chromedriver binds it: try a few.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
            let mut driver = Driver { child, url: format!("http://127.0.0.1:{port}/") };
            let status = format!("{}status", driver.url);
            let deadline = Instant::now() + WAIT;
            loop {
                if let Ok(response) = http.get(&status).send().await {
                    let body: Value = response.json().await.unwrap_or_default();
                    if body["value"]["ready"] == true {
                        return driver;
                    }
                }
                if driver.child.try_wait().unwrap().is_some() || Instant::now() >= deadline {
                    break; // exited (port taken?) or never answered: drop kills it
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        }
        panic!("{CHROMEDRIVER} did not answer /status within {WAIT:?} (three tries)");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebDriver command fantoccini has no method for: `path` is relative to
/// the session (`se/log`, `permissions`).
#[derive(Debug)]
struct SessionCommand {
    method: Method,
    path: &'static str,
    body: Option<Value>,
}

impl WebDriverCompatibleCommand for SessionCommand {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/{}", session.unwrap_or_default(), self.path))
    }

    fn method_and_body(&self, _url: &url::Url) -> (Method, Option<String>) {
        (self.method.clone(), self.body.as_ref().map(Value::to_string))
    }
}

// ------------------------------------------------------------------ the browser

/// A headless Chromium session with a fresh profile. Dropped without
/// [`close`](Browser::close) (a failing test), it kills the browser process.
struct Browser {
    client: Client,
    /// The browser's main process (`goog:processID`).
    pid: Option<u64>,
    closed: bool,
    /// Every console entry read so far.
    console: Mutex<Vec<Value>>,
    /// Every request the browser was seen to send so far, in any window.
    traffic: Mutex<Traffic>,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let driver = Driver::start().await;
        let profile = tempfile::tempdir().unwrap();
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            // Only loopback: the hostile site's name is 127.0.0.1, every
            // other host name fails to resolve.
            format!("--host-resolver-rules=MAP {HOSTILE_HOST} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"),
            format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
            "goog:loggingPrefs": { "browser": "ALL", "performance": "ALL" },
            "timeouts": { "implicit": 0, "pageLoad": WAIT.as_millis() as u64, "script": WAIT.as_millis() as u64 },
        });
        let capabilities: Capabilities = serde_json::from_value(capabilities).unwrap();
        // chromedriver speaks plain HTTP on loopback: no TLS.
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver could not start {CHROMIUM}: {e}"));
        let pid = client.capabilities().and_then(|c| c.get("goog:processID")).and_then(Value::as_u64);
        Browser {
            client,
            pid,
            closed: false,
            console: Mutex::default(),
            traffic: Mutex::default(),
            _driver: driver,
            _profile: profile,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("loading {url}: {e}"));
    }

    /// The element `css` selects, waiting for it (bounded).
    async fn find(&self, css: &str) -> Element {
        match self.client.wait().at_most(WAIT).every(POLL_EVERY).for_element(Locator::Css(css)).await {
            Ok(element) => element,
            Err(e) => panic!("no `{css}` within {WAIT:?} ({e}) on {}:\n{}", self.url().await, self.body_text().await),
        }
    }

    /// The element `css` selects, if it is there now.
    async fn find_now(&self, css: &str) -> Option<Element> {
        self.client.find(Locator::Css(css)).await.ok()
    }

    async fn url(&self) -> String {
        self.client.current_url().await.map(String::from).unwrap_or_default()
    }

    async fn body_text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn title(&self) -> String {
        self.client.title().await.unwrap_or_default()
    }

    /// The HTTP status of the current document (Navigation Timing).
    async fn status(&self) -> u64 {
        let status = self.script("return performance.getEntriesByType('navigation')[0].responseStatus;").await;
        status.as_u64().unwrap_or_else(|| panic!("a response status: {status}"))
    }

    async fn script(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("running `{script}`: {e}"))
    }

    /// Clicks `element` (a link or a submit button) and waits until the page
    /// it was on is gone.
    async fn click_away(&self, element: &Element) {
        element.click().await.unwrap();
        self.until("the next page", || async { element.tag_name().await.is_err().then_some(()) }).await;
    }

    /// The console entries logged since the previous read; all of them are
    /// kept for [`console`](Browser::console).
    async fn read_console(&self) -> Vec<Value> {
        let command = SessionCommand { method: Method::POST, path: "se/log", body: Some(json!({ "type": "browser" })) };
        let entries = self.client.issue_cmd(command).await.expect("chromedriver's browser log");
        let entries = entries.as_array().cloned().unwrap_or_else(|| panic!("a log is a list: {entries}"));
        self.console.lock().unwrap().extend(entries.iter().cloned());
        entries
    }

    /// Every request the browser sent so far, in any of its windows (from
    /// the DevTools network events chromedriver logs).
    async fn requests(&self) -> Vec<Sent> {
        let command =
            SessionCommand { method: Method::POST, path: "se/log", body: Some(json!({ "type": "performance" })) };
        let entries = self.client.issue_cmd(command).await.expect("chromedriver's performance log");
        let entries = entries.as_array().cloned().unwrap_or_else(|| panic!("a log is a list: {entries}"));
        let mut traffic = self.traffic.lock().unwrap();
        for entry in entries {
            let Some(Ok(event)) = entry["message"].as_str().map(serde_json::from_str::<Value>) else { continue };
            let (event, params) = (&event["message"]["method"], &event["message"]["params"]);
            let id = params["requestId"].as_str().unwrap_or_default().to_owned();
            if event == "Network.requestWillBeSent" {
                let request = &params["request"];
                if let (Some(method), Some(url)) = (request["method"].as_str(), request["url"].as_str()) {
                    let (method, url) = (method.to_owned(), url.to_owned());
                    traffic.sent.push(Sent { id, method, url, wire_headers: Value::Null });
                }
            } else if event == "Network.requestWillBeSentExtraInfo" {
                traffic.wire_headers.push((id, params["headers"].clone()));
            }
        }
        let Traffic { sent, wire_headers } = &*traffic;
        sent.iter()
            .map(|s| {
                let headers = wire_headers.iter().rev().find(|(id, _)| *id == s.id).map(|(_, h)| h.clone());
                Sent { wire_headers: headers.unwrap_or(Value::Null), ..s.clone() }
            })
            .collect()
    }

    /// Every console message so far.
    async fn console(&self) -> Vec<String> {
        self.read_console().await;
        let console = self.console.lock().unwrap();
        messages(&console).into_iter().map(str::to_owned).collect()
    }

    /// Polls `probe` until it answers `Some`, at most [`WAIT`]; a timeout
    /// shows where the browser is and what its console says.
    async fn until<T, F, Fut>(&self, what: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited {WAIT:?} for {what} in vain; at {}:\n{}\nconsole: {:#?}",
                    self.url().await,
                    self.body_text().await,
                    self.console().await
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    async fn resize(&self, (width, height): (u32, u32)) {
        self.client.set_window_size(width, height).await.unwrap();
    }

    /// Saves a PNG of the window as `target/screenshots/<name>.png`.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
    }

    /// Ends the session: chromedriver closes the browser.
    async fn close(mut self) {
        self.client.clone().close().await.unwrap();
        self.closed = true;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let (false, Some(pid)) = (self.closed, self.pid) {
            // chromedriver, killed next, would leave it running.
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

/// A request the browser sent.
#[derive(Debug, Clone)]
struct Sent {
    /// DevTools' request id (shared by the hops of a redirect chain).
    id: String,
    method: String,
    url: String,
    /// The headers that went on the wire (with `Cookie` and `Sec-Fetch-*`),
    /// for the last hop of the request's chain; null if not logged (yet).
    wire_headers: Value,
}

impl Sent {
    /// A header as it went on the wire (names compared case-insensitively).
    fn header(&self, name: &str) -> Option<&str> {
        let headers = self.wire_headers.as_object()?;
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| v.as_str())
    }
}

/// What the performance log showed of the browser's requests.
#[derive(Default)]
struct Traffic {
    sent: Vec<Sent>,
    /// `Network.requestWillBeSentExtraInfo`: (request id, headers).
    wire_headers: Vec<(String, Value)>,
}

/// `scheme://host:port` of `url`.
fn origin_of(url: &str) -> String {
    url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}")).origin().ascii_serialization()
}

/// The messages of `entries`.
fn messages(entries: &[Value]) -> Vec<&str> {
    entries.iter().filter_map(|e| e["message"].as_str()).collect()
}

/// Whether a console message reports a Content-Security-Policy violation.
fn is_csp_violation(message: &str) -> bool {
    message.contains("Content Security Policy")
        || message.contains("Content-Security-Policy")
        || message.contains("Refused to")
}

// ------------------------------------------------------------------ the provider's pages

/// Which forms the provider showed on the way back to the broker.
#[derive(Debug, Default)]
struct Steps {
    login: bool,
    consent: bool,
}

enum Here {
    AuthId,
    Login,
    Consent,
    Error,
}

/// From a page on the way to the provider, through its login (as `user`) and
/// consent forms, to the broker's AuthID page: the AuthID and what was shown.
/// `at_login` runs once on the login page before it is filled.
async fn through_provider<F, Fut>(b: &Browser, broker: &str, user: &str, at_login: F) -> (String, Steps)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut steps = Steps::default();
    let mut at_login = Some(at_login);
    for _ in 0..6 {
        let here = b
            .until("a login or consent form or the AuthID page", || async {
                for (css, here) in [
                    ("#authid", Here::AuthId),
                    ("#username", Here::Login),
                    ("#allow", Here::Consent),
                    (".error, #error", Here::Error),
                ] {
                    if b.find_now(css).await.is_some() {
                        return Some(here);
                    }
                }
                None
            })
            .await;
        match here {
            Here::AuthId => {
                let url = b.url().await;
                assert!(url.starts_with(&format!("{broker}/logged-in?")), "the AuthID page is the broker's: {url}");
                // Its script (deferred) has run once the document is complete.
                b.until("the AuthID page to finish loading", || async {
                    (b.script("return document.readyState;").await == "complete").then_some(())
                })
                .await;
                return (authid_on_page(b).await, steps);
            }
            Here::Login => {
                if let Some(at_login) = at_login.take() {
                    at_login().await;
                }
                log_in_at_provider(b, user, &mut steps).await;
            }
            Here::Consent => allow_at_provider(b, &mut steps).await,
            Here::Error => panic!("an error page at {}:\n{}", b.url().await, b.body_text().await),
        }
    }
    panic!("no AuthID page after six pages; at {}:\n{}", b.url().await, b.body_text().await);
}

/// Fills and submits the provider's login form (once per way through).
async fn log_in_at_provider(b: &Browser, user: &str, steps: &mut Steps) {
    assert!(!steps.login, "the login form came back: {}", b.body_text().await);
    steps.login = true;
    b.find("#username").await.send_keys(user).await.unwrap();
    b.find("#password").await.send_keys("browser-password").await.unwrap();
    b.click_away(&b.find("#submit").await).await;
}

/// Allows the provider's consent form (once per way through).
async fn allow_at_provider(b: &Browser, steps: &mut Steps) {
    assert!(!steps.consent, "the consent form came back: {}", b.body_text().await);
    steps.consent = true;
    let scopes = b.find("#scopes").await.text().await.unwrap();
    // A new provider session asks for the scopes; one that already granted
    // them shows the consent again only because the broker asks for it
    // (`prompt=consent`), with nothing new.
    if steps.login {
        assert!(scopes.contains("offline_access") && scopes.contains("files"), "{scopes}");
    }
    b.click_away(&b.find("#allow").await).await;
}

/// Like [`through_provider`], in a popup whose opener closes it once the
/// AuthID page has posted it the AuthID (as Duplicati's new web UI does): from
/// a page on the way to the provider, through its forms, until `popup` is
/// gone. The browser is left on no window; switch to the opener.
async fn through_provider_until_closed(b: &Browser, popup: &WindowHandle, user: &str) -> Steps {
    let mut steps = Steps::default();
    for _ in 0..6 {
        let here = b
            .until("a login or consent form, or the popup closed by its opener", || async {
                if !b.client.windows().await.ok()?.contains(popup) {
                    return Some(None);
                }
                for (css, here) in
                    [("#username", Here::Login), ("#allow", Here::Consent), (".error, #error", Here::Error)]
                {
                    if b.find_now(css).await.is_some() {
                        return Some(Some(here));
                    }
                }
                None
            })
            .await;
        match here {
            None => return steps,
            Some(Here::Login) => log_in_at_provider(b, user, &mut steps).await,
            Some(Here::Consent) => allow_at_provider(b, &mut steps).await,
            Some(Here::Error) => panic!("an error page at {}:\n{}", b.url().await, b.body_text().await),
            Some(Here::AuthId) => unreachable!("not looked for"),
        }
    }
    panic!("the popup was not closed after six pages; at {}:\n{}", b.url().await, b.body_text().await);
}

/// The AuthID on the AuthID page: `#authid`'s text, equal to its `data-authid`.
async fn authid_on_page(b: &Browser) -> String {
    let code = b.find("#authid").await;
    let text = code.text().await.unwrap();
    let data = code.attr("data-authid").await.unwrap().unwrap_or_default();
    assert_eq!(text.trim(), data, "the AuthID shown is the one the script uses");
    assert!(data.len() > 40 && data.contains(':'), "an AuthID: {data}");
    data
}

// ------------------------------------------------------------------ the world

/// oidc-provider, the broker in process, and small page servers of our own
/// on other ports (other origins): the first origin is the only opener the
/// broker posts AuthIDs to.
struct World {
    oidc: OidcProvider,
    broker: Running,
    url: String,
    pages: Vec<Pages>,
    http: reqwest::Client,
}

async fn world(page_servers: usize) -> World {
    crate::support::capture_logs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut page_listeners = Vec::new();
    for _ in 0..page_servers.max(1) {
        page_listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let allowed = format!("http://{}", page_listeners[0].local_addr().unwrap());
    let oidc = OidcProvider::start(crate::interop::oidc_options(vec![format!("{url}/logged-in")], 3600))
        .await
        .expect("oidc-provider starts (npm ci --prefix interop/oidc)");
    // The same broker entries as the interop tests, plus the allowed opener.
    let text = format!(
        "public_url = \"{url}\"\nallowed_opener_origins = [\"{allowed}\"]\n[keys]\nmaster_keys = [\"{}\"]\n{}",
        crate::interop::MASTER_KEY,
        crate::interop::provider_toml(&oidc)
    );
    let config = Config::parse(&text).unwrap();
    let broker = latchkey_server::serve(&config, Arc::new(MemoryStore::new()), listener, |c| {
        c.device_interval = Duration::ZERO;
    })
    .await
    .unwrap();
    let pages = page_listeners.into_iter().map(|l| Pages::serve(l, &url)).collect();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    World { oidc, broker, url, pages, http }
}

impl World {
    async fn refresh(&self, authid: &str) -> reqwest::Response {
        crate::support::refresh(&self.http, &self.url, authid).await
    }

    /// `GET /fetch?token=`, as a program waiting for a hand-off (or an
    /// attacker who chose the token) polls it: the JSON answer.
    async fn fetch(&self, token: &str) -> Value {
        let response = self.http.get(format!("{}/fetch", self.url)).query(&[("token", token)]).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// Asserts that `/fetch?token=` carries no AuthID: not ready, or an error.
    async fn fetch_has_no_authid(&self, token: &str, why: &str) {
        let body = self.fetch(token).await;
        assert!(
            body.get("authid").is_none() && (body["wait"] == "Not ready" || body["error"].is_string()),
            "{why}: /fetch answered {body}"
        );
    }

    async fn stop(self) {
        self.broker.stop().await;
    }
}

/// A page server of the test's own, on its own port:
/// - `/opener[?token=T]` is Duplicati's new web UI (ngclient): its button
///   opens the broker's picker for the service in a popup
///   (`/?type=oidc[&token=T]`), it takes the AuthID from the first
///   `authid:<AuthID>` message into `#authid` and closes the popup; every
///   message it receives is also listed in `#messages`;
/// - `/classic?token=T` is Duplicati's classic web UI (AngularJS 1.4, from
///   `/angular.min.js`): its button opens the same popup and polls the
///   broker's `/fetch` with `$http.jsonp` (see [`CLASSIC_PAGE`]);
/// - `/csp-control` has an inline script its strict CSP blocks;
/// - `/hostile/open?token=T` is a hostile page: on load it opens the
///   broker's login link `/login?id=oidc&token=T` in a popup named
///   `latchkey-victim`;
/// - `/hostile/post?token=T[&target=W]` is a hostile page that, on load,
///   submits a forged login form (`id=oidc`, `token=T`, a made-up `csrf`) to
///   the broker's `POST /login`, into window `W` (default: itself).
struct Pages {
    /// `http://127.0.0.1:<port>`: another origin than the broker's, same site.
    origin: String,
    port: u16,
    task: JoinHandle<()>,
}

/// The name the hostile page gives the popup it opens.
const VICTIM_WINDOW: &str = "latchkey-victim";

const CSP_CONTROL_TITLE: &str = "CSP control";

/// AngularJS 1.4 as npm installs it (`npm ci --prefix interop/oidc`).
fn angular_js_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../interop/oidc/node_modules/angular/angular.min.js")
}

/// How often the classic page polls `/fetch` (Duplicati's: 3 s), and at
/// most how many times (Duplicati's: 100).
const CLASSIC_POLL_EVERY: Duration = Duration::from_secs(1);
const CLASSIC_POLLS: u32 = 60;

/// Duplicati's classic web UI, reduced to its OAuth part
/// (`ngax/scripts/directives/backendEditorUri.js`, `oauth_start_token_creation`):
/// the service link is the broker's URL with a `/`, the popup is
/// `<link>?type=oidc&token=T`, and `recheck` polls
/// `$http.jsonp(<link> + 'fetch?callback=JSON_CALLBACK', {params: {token: T}})`
/// until an answer carries an `authid` (into the `AuthID` field), a JSONP
/// load fails with 404, or the polls run out. Unlike Duplicati it polls
/// every [`CLASSIC_POLL_EVERY`] from the start and leaves the popup open (so
/// the test can read the AuthID page); every answer is kept, as JSON, in
/// `#states`, the last one in `#state`.
const CLASSIC_PAGE: &str = r#"<!doctype html><html lang=en ng-app=classic><head><meta charset=utf-8>
<title>Duplicati (classic UI)</title>
<script src="/angular.min.js"></script>
<script>
angular.module("classic", []).controller("BackendController", ["$scope", "$http", function ($scope, $http) {
  $scope.oauth_service_link = __BROKER__ + "/";
  $scope.oauth_create_token = new URLSearchParams(location.search).get("token");
  $scope.oauth_in_progress = false;
  $scope.AuthID = "";
  $scope.states = [];
  $scope.oauth_start_token_creation = function () {
    $scope.oauth_in_progress = true;
    var url = $scope.oauth_service_link + "?type=oidc&token=" + $scope.oauth_create_token;
    var countDown = __POLLS__;
    var ft = $scope.oauth_create_token;
    window.open(url, "_blank", "height=600,width=450,menubar=0,status=0,titlebar=0,toolbar=0");
    var recheck = function () {
      countDown--;
      if (countDown > 0 && ft == $scope.oauth_create_token) {
        $http.jsonp($scope.oauth_service_link + "fetch?callback=JSON_CALLBACK", { params: { token: ft } }).then(
          function (response) {
            $scope.states.push(JSON.stringify(response.data));
            if (response.data.authid) {
              $scope.AuthID = response.data.authid;
              $scope.oauth_in_progress = false;
              countDown = 0;
            } else {
              setTimeout(recheck, __EVERY__);
            }
          },
          function (response) {
            $scope.states.push(JSON.stringify({ failed: response.status }));
            if (response.status == 404) {
              $scope.oauth_in_progress = false;
              countDown = 0;
            } else {
              setTimeout(recheck, __EVERY__);
            }
          }
        );
      } else {
        $scope.$apply(function () {
          $scope.states.push(JSON.stringify({ gave_up: true }));
          $scope.oauth_in_progress = false;
        });
      }
    };
    setTimeout(recheck, __EVERY__);
    return false;
  };
}]);
</script></head>
<body ng-controller=BackendController>
<button id=open type=button ng-click="oauth_start_token_creation()">AuthID</button>
<label for=authid>AuthID</label> <input id=authid type=text ng-model=AuthID>
<p id=progress>{{oauth_in_progress ? "in progress" : "idle"}}</p>
<p id=state>{{states[states.length - 1]}}</p>
<ol id=states><li ng-repeat="state in states track by $index">{{state}}</li></ol>
</body></html>"#;

impl Pages {
    fn serve(listener: TcpListener, broker: &str) -> Pages {
        let address = listener.local_addr().unwrap();
        let origin = format!("http://{address}");
        let broker_js = serde_json::to_string(broker).unwrap();
        let opener = format!(
            r#"<!doctype html><html lang=en><head><meta charset=utf-8><title>Opener</title></head><body>
<button id=open type=button>Log in</button>
<label for=authid>AuthID</label> <input id=authid type=text>
<ol id=messages></ol>
<script>
var token = new URLSearchParams(location.search).get("token");
window.addEventListener("message", function (event) {{
  var item = document.createElement("li");
  item.setAttribute("data-data", typeof event.data === "string" ? event.data : JSON.stringify(event.data));
  item.setAttribute("data-origin", event.origin);
  item.textContent = event.origin + " " + event.data;
  document.getElementById("messages").appendChild(item);
}});
// As Duplicati's new web UI (ngclient, oauthStartTokenCreation): the popup,
// and a listener that takes the first authid: message and closes it.
document.getElementById("open").addEventListener("click", function () {{
  var startlink = {broker_js} + "/?type=oidc" + (token ? "&token=" + encodeURIComponent(token) : "");
  var w = 450, h = 600;
  var left = screen.width / 2 - w / 2, top = screen.height / 2 - h / 2;
  var wnd = window.open(startlink, "_blank",
    "height=" + h + ",width=" + w + ",menubar=0,status=0,titlebar=0,toolbar=0,left=" + left + ",top=" + top);
  window.addEventListener("message", function (event) {{
    var hasAuthId = typeof event.data === "string" && event.data.startsWith("authid:");
    var authId = hasAuthId ? event.data.replace("authid:", "") : null;
    if (hasAuthId) {{
      document.getElementById("authid").value = authId;
      if (wnd) {{ wnd.close(); }}
    }}
  }});
}});
</script></body></html>"#
        );
        let classic = CLASSIC_PAGE
            .replace("__BROKER__", &broker_js)
            .replace("__POLLS__", &CLASSIC_POLLS.to_string())
            .replace("__EVERY__", &CLASSIC_POLL_EVERY.as_millis().to_string());
        // Read now; a missing file is the classic test's to report.
        let angular = std::fs::read_to_string(angular_js_path()).ok();
        let control = format!(
            "<!doctype html><html lang=en><head><meta charset=utf-8><title>{CSP_CONTROL_TITLE}</title></head>\
             <body><p>The inline script below must not run.</p>\
             <script>document.title = \"inline script ran\";</script></body></html>"
        );
        let hostile_open = format!(
            r#"<!doctype html><html lang=en><head><meta charset=utf-8><title>Free storage</title></head><body>
<p>Claim your free storage!</p>
<script>
var token = new URLSearchParams(location.search).get("token");
window.open({broker_js} + "/login?id=oidc&token=" + encodeURIComponent(token), "{VICTIM_WINDOW}",
  "popup,width=480,height=720");
</script></body></html>"#
        );
        let hostile_post = format!(
            r#"<!doctype html><html lang=en><head><meta charset=utf-8><title>Free storage</title></head><body>
<form id=attack method=post action={login_js}>
<input type=hidden name=id value=oidc><input type=hidden name=token id=token>
<input type=hidden name=csrf value="made-up-by-another-site">
</form>
<script>
var query = new URLSearchParams(location.search);
var form = document.getElementById("attack");
document.getElementById("token").value = query.get("token");
form.target = query.get("target") || "_self";
form.submit();
</script></body></html>"#,
            login_js = serde_json::to_string(&format!("{broker}/login")).unwrap(),
        );
        let opener = warp::path!("opener").map(move || warp::reply::html(opener.clone()));
        let classic = warp::path!("classic").map(move || warp::reply::html(classic.clone()));
        let angular = warp::path!("angular.min.js").map(move || match &angular {
            Some(js) => warp::reply::with_header(js.clone(), "content-type", "application/javascript; charset=utf-8")
                .into_response(),
            None => warp::http::StatusCode::NOT_FOUND.into_response(),
        });
        let hostile_open = warp::path!("hostile" / "open").map(move || warp::reply::html(hostile_open.clone()));
        let hostile_post = warp::path!("hostile" / "post").map(move || warp::reply::html(hostile_post.clone()));
        let control = warp::path!("csp-control").map(move || {
            warp::reply::with_header(
                warp::reply::html(control.clone()),
                "content-security-policy",
                "default-src 'none'",
            )
        });
        let routes = warp::get().and(opener.or(classic).or(angular).or(control).or(hostile_open).or(hostile_post));
        let task = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Pages { origin, port: address.port(), task }
    }

    /// The same server under the hostile site's name: another site than the broker's.
    fn hostile_origin(&self) -> String {
        format!("http://{HOSTILE_HOST}:{}", self.port)
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------ the broker's pages

/// The picker's button for the service called `name`: a submit button of a
/// form that posts to `/login`.
async fn service_button(b: &Browser, name: &str) -> Element {
    b.until(&format!("a `{name}` button in the picker"), || async {
        let buttons = b.client.find_all(Locator::Css("ul.services li form[action='/login'] button")).await.ok()?;
        for button in buttons {
            if button.text().await.ok()?.trim() == name {
                return Some(button);
            }
        }
        None
    })
    .await
}

/// Checks the login confirmation page the browser shows (for the oidc
/// service, a hand-off when `handoff`): it names the service, warns when a
/// program waits, starts nothing, and its form repeats the browser's login
/// cookie (HttpOnly, SameSite=Lax). Answers its `#continue` button.
async fn confirmation(b: &Browser, handoff: bool) -> Element {
    let button = b.find("#continue").await;
    assert_eq!(button.text().await.unwrap(), format!("Continue to {DISPLAY_NAME}"));
    assert_eq!(b.title().await, "Log in · latchkey");
    let body = b.body_text().await;
    assert_eq!(body.contains("A program is waiting for this login"), handoff, "{body}");
    let form = b.find("form[method=post][action='/login']").await;
    let cookie = b.client.get_named_cookie(LOGIN_COOKIE).await.expect("the page set the login cookie");
    assert_eq!(cookie.http_only(), Some(true), "{cookie}");
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Lax)", "{cookie}");
    assert_eq!(cookie.path(), Some("/"), "{cookie}");
    let csrf = form.find(Locator::Css("input[name=csrf]")).await.unwrap().prop("value").await.unwrap();
    assert_eq!(csrf.as_deref(), Some(cookie.value()), "the form repeats the cookie");
    button
}

/// Waits for the broker's 403 "Refused" page in the current window, which
/// says `why`.
async fn refused(b: &Browser, why: &str) {
    b.until("the Refused page", || async { (b.title().await == "Refused · latchkey").then_some(()) }).await;
    assert_eq!(b.status().await, 403);
    assert_eq!(b.find("h1").await.text().await.unwrap(), "Refused");
    let body = b.body_text().await;
    assert!(body.contains(why), "the Refused page says {why:?}: {body}");
    assert!(b.find_now("#authid").await.is_none());
}

// ------------------------------------------------------------------ 1: picker to refresh

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_from_the_picker_copies_the_authid_and_it_refreshes_without_csp_violations() {
    let w = world(1).await;
    let b = Browser::start().await;

    // The picker lists the service; one click on its button starts the login.
    b.goto(&format!("{}/", w.url)).await;
    let button = service_button(&b, DISPLAY_NAME).await;
    assert!(!b.body_text().await.contains("A program is waiting"), "no hand-off here");
    b.click_away(&button).await;

    // The provider's own login and consent pages, then the broker's AuthID page.
    let (authid, steps) = through_provider(&b, &w.url, "alice", || async {}).await;
    assert!(steps.login && steps.consent, "a fresh browser sees both forms: {steps:?}");
    assert_eq!(b.client.title().await.unwrap(), "Your AuthID · latchkey");

    // The copy button's handler runs (the Clipboard API, or the fallback).
    b.find("#copy").await.click().await.unwrap();
    let copied = b
        .until("the copy handler to set #copy[data-copied]", || async {
            b.find_now("#copy").await?.attr("data-copied").await.ok().flatten()
        })
        .await;
    let status = b.find("#copy-status").await.text().await.unwrap();
    match copied.as_str() {
        "yes" => {
            assert_eq!(status, "Copied.");
            // What was copied is the AuthID (reading needs a permission).
            let grant = json!({ "descriptor": { "name": "clipboard-read" }, "state": "granted" });
            let grant = SessionCommand { method: Method::POST, path: "permissions", body: Some(grant) };
            b.client.issue_cmd(grant).await.expect("chromedriver grants clipboard-read");
            let read = "var done = arguments[arguments.length - 1];\
                        navigator.clipboard.readText().then(done, function (e) { done('refused: ' + e); });";
            let clipboard = b.client.execute_async(read, vec![]).await.unwrap();
            assert_eq!(clipboard, authid.as_str(), "the clipboard holds the AuthID");
        }
        "no" => assert_eq!(status, "Select the AuthID above and copy it."),
        other => panic!("data-copied={other:?}"),
    }

    // The AuthID read off the page works at /refresh, as Duplicati sends it.
    let refresh = w.refresh(&authid).await;
    assert_eq!(refresh.status(), 200);
    let body: Value = refresh.json().await.unwrap();
    let access = body["access_token"].as_str().expect("an access token");
    assert!(w.oidc.introspect(access).await.unwrap(), "the provider issued it: {body}");
    assert_eq!(body["type"], "oidc");

    // The console: the control page's inline script is refused, which proves
    // violations reach this log; nothing before it (the picker, the
    // provider's pages, the AuthID page and its script) was refused anything.
    let control = format!("{}/csp-control", w.pages[0].origin);
    b.goto(&control).await;
    assert_eq!(b.client.title().await.unwrap(), CSP_CONTROL_TITLE, "the control's inline script was blocked");
    b.until("the control page's CSP violation in the console", || async {
        let entries = b.read_console().await;
        messages(&entries).iter().any(|m| m.starts_with(control.as_str()) && is_csp_violation(m)).then_some(())
    })
    .await;
    let console = b.console().await;
    let violations: Vec<&String> =
        console.iter().filter(|m| !m.starts_with(control.as_str()) && is_csp_violation(m)).collect();
    assert!(violations.is_empty(), "CSP violations on the way: {violations:#?}");
    b.close().await;
    w.stop().await;
}

// ------------------------------------------------------------------ 2: postMessage to openers (the new web UI)

/// The messages the opener page in the current window received: (data, origin).
async fn received(b: &Browser) -> Vec<(String, String)> {
    let list = b
        .script(
            "return Array.from(document.querySelectorAll('#messages li'))\
             .map(function (li) { return [li.getAttribute('data-data'), li.getAttribute('data-origin')]; });",
        )
        .await;
    serde_json::from_value(list).unwrap()
}

/// The value of the input `css` in the current window.
async fn field(b: &Browser, css: &str) -> String {
    b.find(css).await.prop("value").await.unwrap().unwrap_or_default()
}

/// Clicks the opener's `#open` button and switches to the popup it opens:
/// (the opener's window, the popup's).
async fn open_popup(b: &Browser) -> (WindowHandle, WindowHandle) {
    let opener = b.client.window().await.unwrap();
    let before = b.client.windows().await.unwrap();
    b.find("#open").await.click().await.unwrap();
    let popup: WindowHandle = b
        .until("the popup window", || async {
            b.client.windows().await.unwrap().into_iter().find(|w| !before.contains(w))
        })
        .await;
    b.client.switch_to_window(popup.clone()).await.unwrap();
    (opener, popup)
}

/// In the popup: the picker `/?type=oidc[&token=T]` shows that one service
/// (warning that a program waits when `handoff`); clicks it.
async fn pick_the_service(b: &Browser, handoff: bool) {
    let button = service_button(b, DISPLAY_NAME).await;
    let buttons = b.client.find_all(Locator::Css("ul.services button")).await.unwrap();
    assert_eq!(buttons.len(), 1, "`?type=oidc` shows that one service");
    let body = b.body_text().await;
    assert_eq!(body.contains("A program is waiting for this login"), handoff, "{body}");
    b.click_away(&button).await;
}

/// Waits for the one message the opener page in the current window receives:
/// an AuthID from the broker. Checks the page took it into its field (as
/// Duplicati's new UI does) and answers it.
async fn authid_message(b: &Browser, broker: &str) -> String {
    let got = b
        .until("a message at the allowed opener", || async {
            let got = received(b).await;
            (!got.is_empty()).then_some(got)
        })
        .await;
    let [(data, origin)] = &got[..] else { panic!("one message: {got:?}") };
    assert_eq!(origin, broker, "from the broker's AuthID page");
    let authid = data.strip_prefix("authid:").unwrap_or_else(|| panic!("`authid:<AuthID>`: {data:?}"));
    assert!(authid.len() > 40 && authid.contains(':'), "an AuthID: {authid}");
    assert_eq!(field(b, "#authid").await, authid, "the page took it, as Duplicati's new UI does");
    authid.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authid_page_posts_the_authid_to_an_allowed_opener_only() {
    let w = world(2).await;
    let (allowed, other) = (w.pages[0].origin.clone(), w.pages[1].origin.clone());
    let hostile = w.pages[1].hostile_origin();
    let b = Browser::start().await;
    let token = "duplicati-popup-token-0001";

    // Duplicati's new web UI, at an allowed origin: it opens
    // `/?type=oidc&token=T`, one click goes to the provider, and the page gets
    // exactly `authid:<AuthID>`, from the broker's origin, takes it into its
    // field and closes the popup.
    b.goto(&format!("{allowed}/opener?token={token}")).await;
    let (allowed_window, popup) = open_popup(&b).await;
    pick_the_service(&b, true).await;
    let steps = through_provider_until_closed(&b, &popup, "alice").await;
    assert!(steps.login && steps.consent, "{steps:?}");
    b.client.switch_to_window(allowed_window.clone()).await.unwrap();
    assert_eq!(b.client.windows().await.unwrap(), vec![allowed_window.clone()], "the page closed its popup");
    let first = authid_message(&b, &w.url).await;
    assert_eq!(w.refresh(&first).await.status(), 200);
    // The program polling the hand-off receives the same AuthID, once.
    assert_eq!(w.fetch(token).await, json!({ "authid": first }));
    w.fetch_has_no_authid(token, "a hand-off is delivered once").await;

    // The current new UI opens `/?type=oidc` without a token: no hand-off,
    // the same message. (The provider remembers alice: only its consent.)
    b.goto(&format!("{allowed}/opener")).await;
    let (_, popup) = open_popup(&b).await;
    pick_the_service(&b, false).await;
    let steps = through_provider_until_closed(&b, &popup, "alice").await;
    assert!(!steps.login && steps.consent, "{steps:?}");
    b.client.switch_to_window(allowed_window.clone()).await.unwrap();
    assert_eq!(b.client.windows().await.unwrap(), vec![allowed_window.clone()], "the page closed its popup");
    let without_token = authid_message(&b, &w.url).await;
    assert_ne!(first, without_token);
    assert_eq!(w.refresh(&without_token).await.status(), 200);

    // The same page at origins the broker does not list -- another port of
    // its site, another site -- opens the same login in a new tab: the popup
    // shows an AuthID to copy, and the page receives nothing.
    for (round, (origin, user)) in [(other, "bob"), (hostile, "dave")].into_iter().enumerate() {
        let token = format!("another-popup-token-000{round}");
        let tab = b.client.new_window(true).await.unwrap();
        b.client.switch_to_window(tab.handle.clone()).await.unwrap();
        b.goto(&format!("{origin}/opener?token={token}")).await;
        // Deleting the cookies of 127.0.0.1 (the first round) ends the
        // provider's session: it asks for a login again. The second round's
        // page is on another host: bob's session stays, only the consent.
        b.client.delete_all_cookies().await.unwrap();
        let (page, popup) = open_popup(&b).await;
        pick_the_service(&b, true).await;
        let (authid, steps) = through_provider(&b, &w.url, user, || async {}).await;
        assert!(steps.consent && (round == 1 || steps.login), "without its cookies the provider asks again: {steps:?}");
        assert_eq!(b.find("#copy").await.text().await.unwrap(), "Copy AuthID");
        assert!(authid != first && authid != without_token);
        b.client.switch_to_window(page.clone()).await.unwrap();
        let deadline = Instant::now() + ABSENCE;
        while Instant::now() < deadline {
            let got = received(&b).await;
            assert!(got.is_empty(), "an opener the broker does not allow ({origin}) received {got:?}");
            tokio::time::sleep(POLL_EVERY).await;
        }
        assert_eq!(field(&b, "#authid").await, "");
        if round == 0 {
            // The popup did try: Chromium refused to deliver to the wrong
            // origin. (Across sites, it says nothing in this log.)
            let console = b.console().await;
            assert!(
                console.iter().any(|m| m.contains("postMessage") && m.contains(&allowed) && m.contains(&origin)),
                "the AuthID page addressed its message to {allowed} only: {console:#?}"
            );
        }
        // The control: the popup still has its opener, and a message for
        // any origin does reach the page.
        b.client.switch_to_window(popup.clone()).await.unwrap();
        b.script("window.opener.postMessage('control', '*'); return null;").await;
        b.client.switch_to_window(page.clone()).await.unwrap();
        let got = b
            .until("the control message", || async {
                let got = received(&b).await;
                (!got.is_empty()).then_some(got)
            })
            .await;
        assert_eq!(got, vec![("control".to_owned(), w.url.clone())]);
        assert_eq!(field(&b, "#authid").await, "", "and it is no AuthID");
        // The login itself completed: the AuthID works, and a program
        // polling the hand-off gets it.
        assert_eq!(w.refresh(&authid).await.status(), 200);
        assert_eq!(w.fetch(&token).await, json!({ "authid": authid }));
        b.client.switch_to_window(popup).await.unwrap();
        b.client.close_window().await.unwrap();
        b.client.switch_to_window(page).await.unwrap();
        b.client.close_window().await.unwrap();
        b.client.switch_to_window(allowed_window.clone()).await.unwrap();
    }
    // And the allowed opener still has its one message.
    assert_eq!(received(&b).await.len(), 1);
    let console = b.console().await;
    let violations: Vec<&String> = console.iter().filter(|m| is_csp_violation(m)).collect();
    assert!(violations.is_empty(), "CSP violations: {violations:#?}");
    b.close().await;
    w.stop().await;
}

// ------------------------------------------------------------------ 3: JSONP polls (the classic web UI)

/// The answers the classic page received so far, in order.
async fn classic_states(b: &Browser) -> Vec<Value> {
    let list = b
        .script(
            "return Array.from(document.querySelectorAll('#states li')).map(function (li) { return li.textContent; });",
        )
        .await;
    let list: Vec<String> = serde_json::from_value(list).unwrap();
    list.iter().map(|s| serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))).collect()
}

/// Runs one `$http.jsonp(url)` through the classic page's AngularJS:
/// `{status, data}`, or `{failed: status}`.
async fn angular_jsonp(b: &Browser, url: &str) -> Value {
    let script = "var done = arguments[arguments.length - 1];\
                  var http = angular.element(document.body).injector().get('$http');\
                  http.jsonp(arguments[0]).then(\
                    function (r) { done({ status: r.status, data: r.data }); },\
                    function (r) { done({ failed: r.status }); });";
    b.client.execute_async(script, vec![json!(url)]).await.unwrap_or_else(|e| panic!("$http.jsonp({url}): {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classic_angularjs_ui_polls_fetch_by_jsonp_and_receives_the_authid_the_popup_shows() {
    assert!(
        angular_js_path().is_file(),
        "{} is missing: npm ci --prefix interop/oidc (its package.json pins angular 1.4)",
        angular_js_path().display()
    );
    let w = world(1).await;
    let page = w.pages[0].origin.clone();
    let b = Browser::start().await;
    let token = "classic-angularjs-token-0001";

    // The page boots AngularJS 1.4 and binds its controller.
    b.goto(&format!("{page}/classic?token={token}")).await;
    b.until("AngularJS to bind the page", || async {
        (b.find_now("#progress").await?.text().await.ok()? == "idle").then_some(())
    })
    .await;
    let version = b.script("return angular.version.full;").await;
    assert!(version.as_str().is_some_and(|v| v.starts_with("1.4.")), "AngularJS 1.4, not {version}");

    // Its button opens `/?type=oidc&token=T` and starts polling. Before the
    // login, every poll is answered "Not ready".
    let (opener, popup) = open_popup(&b).await;
    b.client.switch_to_window(opener.clone()).await.unwrap();
    assert_eq!(b.find("#progress").await.text().await.unwrap(), "in progress");
    let early = b
        .until("two polls answered", || async {
            let states = classic_states(&b).await;
            (states.len() >= 2).then_some(states)
        })
        .await;
    assert!(early.iter().all(|s| *s == json!({ "wait": "Not ready" })), "{early:?}");
    assert_eq!(b.find("#state").await.text().await.unwrap(), r#"{"wait":"Not ready"}"#);

    // The user logs in in the popup.
    b.client.switch_to_window(popup).await.unwrap();
    pick_the_service(&b, true).await;
    let (shown, steps) = through_provider(&b, &w.url, "grace", || async {}).await;
    assert!(steps.login && steps.consent, "{steps:?}");
    assert!(b.body_text().await.contains("will pick it up by itself"));
    b.screenshot("classic-popup-authid").await;

    // The page's next poll receives the AuthID the popup shows, into its
    // AuthID field, and it stops polling.
    b.client.switch_to_window(opener).await.unwrap();
    let authid = b
        .until("the AuthID in the page's field", || async {
            let value = field(&b, "#authid").await;
            (!value.is_empty()).then_some(value)
        })
        .await;
    assert_eq!(authid, shown, "the AuthID the popup shows");
    assert_eq!(b.find("#progress").await.text().await.unwrap(), "idle");
    b.screenshot("classic-page").await;
    let states = classic_states(&b).await;
    let (last, before) = states.split_last().unwrap();
    assert_eq!(*last, json!({ "authid": shown }));
    assert!(before.len() >= 2 && before.iter().all(|s| *s == json!({ "wait": "Not ready" })), "{states:?}");
    // Every poll was a script of the broker's /fetch, each with its own
    // AngularJS callback in place of JSON_CALLBACK; the page ran each
    // answer (with `nosniff`, only as JavaScript).
    let polls: Vec<Sent> =
        b.requests().await.into_iter().filter(|r| r.url.starts_with(&format!("{}/fetch?", w.url))).collect();
    assert_eq!(polls.len(), states.len(), "one answer per poll: {polls:#?}");
    let mut callbacks = Vec::new();
    for poll in &polls {
        let callback = poll
            .url
            .strip_prefix(&format!("{}/fetch?callback=", w.url))
            .and_then(|rest| rest.strip_suffix(&format!("&token={token}")))
            .unwrap_or_else(|| panic!("`fetch?callback=<name>&token=T`: {}", poll.url));
        let id = callback.strip_prefix("angular.callbacks._").unwrap_or_else(|| panic!("{callback}"));
        assert!(!id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()), "{callback}");
        assert_eq!(poll.method, "GET");
        callbacks.push(callback);
    }
    callbacks.sort_unstable();
    callbacks.dedup();
    assert_eq!(callbacks.len(), polls.len(), "a callback per poll");
    // No more polls after the AuthID (two of the page's intervals).
    let deadline = Instant::now() + 2 * CLASSIC_POLL_EVERY;
    while Instant::now() < deadline {
        assert_eq!(classic_states(&b).await.len(), states.len(), "the page polls no more");
        tokio::time::sleep(POLL_EVERY).await;
    }

    // The AuthID works at /refresh.
    let refresh = w.refresh(&authid).await;
    assert_eq!(refresh.status(), 200);
    let body: Value = refresh.json().await.unwrap();
    assert!(w.oidc.introspect(body["access_token"].as_str().unwrap()).await.unwrap(), "{body}");
    // The hand-off was delivered once: the same JSONP poll now carries an
    // error (still a 200 script), and /token-state says it succeeded.
    w.fetch_has_no_authid(token, "after the page received it").await;
    let again = angular_jsonp(&b, &format!("{}/fetch?callback=JSON_CALLBACK&token={token}", w.url)).await;
    assert_eq!(again["status"], 200, "{again}");
    assert!(again["data"]["error"].is_string() && again["data"].get("authid").is_none(), "{again}");
    let state = angular_jsonp(&b, &format!("{}/token-state?callback=JSON_CALLBACK&token={token}", w.url)).await;
    assert_eq!(state, json!({ "status": 200, "data": { "success": true } }));

    // A callback that is not a plain name is not echoed into a script: the
    // script that would run it fails to load.
    let evil = format!("{}/fetch?callback=(function(){{window.ran=true}})&token={token}", w.url);
    let load = "var done = arguments[arguments.length - 1];\
                var s = document.createElement('script');\
                s.onload = function () { done({ event: 'load', ran: window.ran === true }); };\
                s.onerror = function () { done({ event: 'error', ran: window.ran === true }); };\
                s.src = arguments[0];\
                document.body.appendChild(s);";
    let loaded = b.client.execute_async(load, vec![json!(evil)]).await.unwrap();
    assert_eq!(loaded, json!({ "event": "error", "ran": false }), "{evil}");

    let console = b.console().await;
    let violations: Vec<&String> = console.iter().filter(|m| is_csp_violation(m)).collect();
    assert!(violations.is_empty(), "CSP violations: {violations:#?}");
    b.close().await;
    w.stop().await;
}

// ------------------------------------------------------------------ 4: screenshots

/// Screenshots of the current page at desktop and phone width, after
/// checking that nothing is wider than the phone's viewport.
async fn shoot(b: &Browser, name: &str) {
    b.resize(DESKTOP).await;
    b.screenshot(name).await;
    b.resize(PHONE).await;
    let width = b.script("return window.innerWidth;").await.as_u64().unwrap();
    assert!(width <= u64::from(PHONE.0), "a phone-sized viewport, not {width}px");
    let overflow = b.script("return document.documentElement.scrollWidth - window.innerWidth;").await;
    assert!(overflow.as_i64().unwrap() <= 0, "{name} scrolls sideways on a phone by {overflow}px");
    b.screenshot(&format!("{name}-phone")).await;
    b.resize(DESKTOP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_render_on_desktop_and_phone_and_their_forms_work() {
    let w = world(1).await;
    let b = Browser::start().await;

    b.goto(&format!("{}/", w.url)).await;
    let button = service_button(&b, DISPLAY_NAME).await;
    shoot(&b, "picker").await;
    b.click_away(&button).await;
    let (authid, _) = through_provider(&b, &w.url, "carol", || shoot(&b, "provider-login")).await;
    shoot(&b, "authid").await;

    // The device page: a code from the API, typed in, a confirmation naming
    // the service and the program, the provider, the AuthID page saying it
    // was handed over, and the device gets its AuthID.
    let start = crate::support::device_code(&w.http, &w.url, "oidc").await;
    let user_code = start["user_code"].as_str().expect("a user code");
    b.goto(&format!("{}/device", w.url)).await;
    b.find("#user-code").await;
    shoot(&b, "device").await;
    b.find("#user-code").await.send_keys(user_code).await.unwrap();
    b.click_away(&b.find("input[type=submit]").await).await;
    let button = b.find("#continue").await;
    assert_eq!(button.text().await.unwrap(), format!("Continue to {DISPLAY_NAME}"));
    assert_eq!(b.find("h1").await.text().await.unwrap(), format!("Connect test program to {DISPLAY_NAME}?"));
    let body = b.body_text().await;
    assert!(body.contains("A program is waiting for this login") && body.contains(user_code), "{body}");
    assert_eq!(b.url().await, format!("{}/device", w.url), "nothing started yet");
    shoot(&b, "device-confirm").await;
    b.click_away(&button).await;
    let (shown, steps) = through_provider(&b, &w.url, "carol", || async {}).await;
    assert!(
        !steps.login && steps.consent,
        "the provider's session skips the login, the broker's prompt=consent forces its screen: {steps:?}"
    );
    assert!(b.body_text().await.contains("will pick it up by itself"));
    let (_, poll_token) = crate::support::device_token(&w.http, &w.url, start["device_code"].as_str().unwrap()).await;
    assert_eq!(poll_token["authid"], shown.as_str(), "the device receives the AuthID the page showed");

    // The revoke page: the form revokes the first AuthID.
    b.goto(&format!("{}/revoke", w.url)).await;
    b.find("#authid-input").await;
    shoot(&b, "revoke").await;
    b.find("#authid-input").await.send_keys(&authid).await.unwrap();
    b.click_away(&b.find("input[type=submit]").await).await;
    let h1 = b.find("h1").await.text().await.unwrap();
    assert_eq!(h1, "Revoked", "{}", b.body_text().await);
    shoot(&b, "revoked").await;
    assert_eq!(w.refresh(&authid).await.status(), 401);
    assert_eq!(w.refresh(&shown).await.status(), 200, "the device's AuthID is another grant");

    let console = b.console().await;
    let violations: Vec<&String> = console.iter().filter(|m| is_csp_violation(m)).collect();
    assert!(violations.is_empty(), "CSP violations: {violations:#?}");
    b.close().await;
    w.stop().await;
}

// ------------------------------------------------------------------ 5: hostile pages

/// The requests so far that went to the provider (the issuer's origin).
async fn to_provider(b: &Browser, issuer: &str) -> Vec<Sent> {
    b.requests().await.into_iter().filter(|r| origin_of(&r.url) == issuer).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_page_that_opens_the_login_and_posts_its_form_never_reaches_the_provider() {
    let w = world(2).await;
    let b = Browser::start().await;
    let issuer = origin_of(w.oidc.issuer());
    // The token the hostile page chose: its server would poll /fetch with it.
    let token = "chosen-by-the-attacker-0001";
    let hostile = b.client.window().await.unwrap();
    let login = format!("{}/login", w.url);

    // Another site (its own host name), then another origin of the broker's
    // site (127.0.0.1 at another port, which gets the SameSite=Lax cookie).
    // The first posts its form into the popup showing our confirmation page,
    // the second into its own window.
    let rounds = [(w.pages[1].hostile_origin(), VICTIM_WINDOW), (w.pages[1].origin.clone(), "_self")];
    for (round, (origin, target)) in rounds.into_iter().enumerate() {
        // (i) The page opens the login link in a popup: our confirmation
        // page, which sets the browser's login cookie and starts nothing.
        b.client.switch_to_window(hostile.clone()).await.unwrap();
        let before = b.client.windows().await.unwrap();
        b.goto(&format!("{origin}/hostile/open?token={token}")).await;
        let popup: WindowHandle = b
            .until("the hostile page's popup", || async {
                b.client.windows().await.unwrap().into_iter().find(|w| !before.contains(w))
            })
            .await;
        b.client.switch_to_window(popup.clone()).await.unwrap();
        confirmation(&b, true).await;
        assert_eq!(b.url().await, format!("{login}?id=oidc&token={token}"));
        if round == 0 {
            shoot(&b, "confirm-handoff").await;
        }

        // (ii) The page submits a forged login form itself (it cannot read
        // the HttpOnly cookie, so its `csrf` is made up).
        b.client.switch_to_window(hostile.clone()).await.unwrap();
        b.goto(&format!("{origin}/hostile/post?token={token}&target={target}")).await;
        let refused_window = if target == "_self" { hostile.clone() } else { popup.clone() };
        b.client.switch_to_window(refused_window).await.unwrap();
        refused(&b, "sent from another site").await;
        assert_eq!(b.url().await, login, "the POST's answer, not the provider");
        if round == 0 {
            shoot(&b, "refused").await;
        }
        if target == "_self" {
            // The popup is still at our confirmation page.
            b.client.switch_to_window(popup.clone()).await.unwrap();
            assert!(b.find_now("#continue").await.is_some(), "{}", b.body_text().await);
        }
        // Nothing moves on from there.
        let deadline = Instant::now() + ABSENCE;
        while Instant::now() < deadline {
            let sent = to_provider(&b, &issuer).await;
            assert!(sent.is_empty(), "the browser went to the provider: {sent:#?}");
            tokio::time::sleep(POLL_EVERY).await;
        }
        b.client.switch_to_window(popup).await.unwrap();
        b.client.close_window().await.unwrap();
        // The attacker's server polls the hand-off in vain.
        w.fetch_has_no_authid(token, "a forged login form").await;
    }

    // The log did see both forged forms reach the broker (so it sees the
    // popup's requests too), and not one request to the provider.
    let requests = b.requests().await;
    let posts: Vec<&Sent> = requests.iter().filter(|r| r.method == "POST" && r.url == login).collect();
    assert_eq!(posts.len(), 2, "both forged forms were posted: {requests:#?}");
    assert!(to_provider(&b, &issuer).await.is_empty(), "{requests:#?}");
    // From another site, Chromium says so and keeps the SameSite=Lax cookie
    // back; from another origin of the same site, the cookie goes along and
    // only `Sec-Fetch-Site: same-site` (and the made-up csrf) refuse it.
    let cookie = |sent: &Sent| sent.header("cookie").unwrap_or_default().contains(&format!("{LOGIN_COOKIE}="));
    assert_eq!(posts[0].header("sec-fetch-site"), Some("cross-site"), "{:#?}", posts[0]);
    assert!(!cookie(posts[0]), "{:#?}", posts[0]);
    assert_eq!(posts[1].header("sec-fetch-site"), Some("same-site"), "{:#?}", posts[1]);
    assert!(cookie(posts[1]), "{:#?}", posts[1]);

    // The control: the user's own click on the confirmation page of a
    // program's login link goes to the provider (which the log sees), and the
    // program's /fetch gets the AuthID the page shows.
    b.client.switch_to_window(hostile).await.unwrap();
    let program = "the-users-own-program-0002";
    b.goto(&format!("{login}?id=oidc&token={program}")).await;
    let button = confirmation(&b, true).await;
    w.fetch_has_no_authid(program, "before the click").await;
    b.click_away(&button).await;
    let (authid, steps) = through_provider(&b, &w.url, "erin", || async {}).await;
    assert!(steps.login && steps.consent, "{steps:?}");
    assert!(b.body_text().await.contains("will pick it up by itself"));
    assert!(!to_provider(&b, &issuer).await.is_empty(), "the log sees the way to the provider");
    assert_eq!(w.fetch(program).await, json!({ "authid": authid }));
    assert_eq!(w.refresh(&authid).await.status(), 200);
    // The attacker's token still has nothing.
    w.fetch_has_no_authid(token, "after the user's own login").await;

    let logs = crate::support::logs();
    assert!(logs.contains("browser_refused"), "the refusals are audited");
    let console = b.console().await;
    let violations: Vec<&String> = console.iter().filter(|m| is_csp_violation(m)).collect();
    assert!(violations.is_empty(), "CSP violations: {violations:#?}");
    b.close().await;
    w.stop().await;
}

// ------------------------------------------------------------------ 6: a callback in another browser

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_callback_replayed_in_another_browser_is_refused_and_does_not_spend_the_login() {
    let w = world(1).await;
    let token = "replayed-callback-token-0001";

    // Browser A begins a hand-off login with its click: the broker's 303
    // takes it to the provider. The provider's answer to that authorization
    // request (its login and consent done by the testkit's own session) is
    // the callback URL, not loaded anywhere yet.
    let a = Browser::start().await;
    a.goto(&format!("{}/login?id=oidc&token={token}", w.url)).await;
    let a_cookie = a.client.get_named_cookie(LOGIN_COOKIE).await.unwrap().value().to_owned();
    a.click_away(&confirmation(&a, true).await).await;
    a.find("#username").await;
    let authorization = a
        .until("the broker's redirect to the provider in the request log", || async {
            let requests = a.requests().await;
            requests.into_iter().map(|r| r.url).find(|u| u.starts_with(w.oidc.authorization_endpoint()))
        })
        .await;
    let callback = w.oidc.login(&authorization, "frank").await.expect("login and consent at the provider");
    assert!(callback.starts_with(&format!("{}/logged-in?", w.url)) && callback.contains("code="), "{callback}");
    w.fetch_has_no_authid(token, "before any callback").await;

    // Browser B (another cookie jar) loads it: refused, nothing created.
    let b = Browser::start().await;
    b.goto(&callback).await;
    refused(&b, "started in another browser").await;
    shoot(&b, "refused-callback").await;
    // With a login cookie of its own, still refused.
    b.goto(&format!("{}/", w.url)).await;
    service_button(&b, DISPLAY_NAME).await;
    let b_cookie = b.client.get_named_cookie(LOGIN_COOKIE).await.unwrap().value().to_owned();
    assert_ne!(a_cookie, b_cookie);
    b.goto(&callback).await;
    refused(&b, "started in another browser").await;
    assert_eq!(w.fetch(token).await, json!({ "wait": "Not ready" }), "no AuthID was made");

    // A, which began the login, still completes it: the replays spent nothing.
    a.goto(&callback).await;
    a.find("#authid").await;
    assert_eq!(a.title().await, "Your AuthID · latchkey");
    let authid = authid_on_page(&a).await;
    assert_eq!(w.fetch(token).await, json!({ "authid": authid }));
    assert_eq!(w.refresh(&authid).await.status(), 200);

    // Once used, the callback gives B nothing either.
    b.goto(&callback).await;
    b.find(".error").await;
    assert!(b.find_now("#authid").await.is_none(), "{}", b.body_text().await);

    for browser in [&a, &b] {
        let console = browser.console().await;
        let violations: Vec<&String> = console.iter().filter(|m| is_csp_violation(m)).collect();
        assert!(violations.is_empty(), "CSP violations: {violations:#?}");
    }
    a.close().await;
    b.close().await;
    w.stop().await;
}
