//! A real, certified authorization server for interop tests: panva's
//! [`oidc-provider`](https://github.com/panva/node-oidc-provider) (9.13.3) on
//! loopback, run by Node.js from `interop/oidc/server.mjs`.
//!
//! Where [`FakeProvider`](crate::FakeProvider) is a model that can be told to
//! misbehave, [`OidcProvider`] is the real thing: tests against it prove that
//! a client speaks OAuth 2.0 the way a certified server expects. One
//! confidential client is registered with the [`OidcOptions`] given; it may
//! use the authorization code grant (PKCE S256 required), refresh tokens and
//! the device authorization grant, and the server offers RFC 7009 revocation,
//! RFC 7662 introspection and RFC 9207 `iss` in authorization responses.
//! `offline_access` yields a refresh token without `prompt=consent`.
//!
//! The server needs its npm packages: run `npm ci --prefix interop/oidc` once
//! (so must CI). Set `OIDC_VERBOSE=1` in the environment to see oidc-provider's
//! notices and request errors on stderr.
//!
//! Logging in is driven over HTTP with a cookie-keeping client
//! ([`OidcBrowser`]), through the same plain HTML pages a browser would see:
//! the login form (`form#login` with `#username`, `#password`, `#submit`), the
//! consent form (`#allow`, `#deny`) and, for the device flow, oidc-provider's
//! own pages at `/device` (`#submit`, then `#confirm` or `#abort`, ending at a
//! page with `#success`). Any username is accepted, with any password; the
//! account id (`sub`) is the username.

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use url::Url;

/// How long [`OidcProvider::start`] waits for the server to say it listens.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The password the login helpers type; the server accepts any.
pub const PASSWORD: &str = "interop-password";

/// How many redirects and form submissions one login may take.
const MAX_STEPS: usize = 24;

/// How the client authenticates at the token, revocation, introspection and
/// device authorization endpoints.
///
/// The server enforces the registered method: the other one gets
/// `401 invalid_client` (oidc-provider itself would accept either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuthMethod {
    /// `client_secret_basic`: HTTP Basic with the form-urlencoded id and secret
    /// (RFC 6749 §2.3.1).
    #[default]
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

impl ClientAuthMethod {
    /// The `token_endpoint_auth_method` name.
    pub fn name(self) -> &'static str {
        match self {
            ClientAuthMethod::Basic => "client_secret_basic",
            ClientAuthMethod::Post => "client_secret_post",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            ClientAuthMethod::Basic => "basic",
            ClientAuthMethod::Post => "post",
        }
    }
}

/// The one client the server registers, and its token lifetimes.
#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
    /// Registered redirect URIs (at least one); the first is the default.
    pub redirect_uris: Vec<String>,
    /// Access token lifetime, in seconds (at least 1).
    pub access_ttl_secs: u64,
    /// Issue a new refresh token on every refresh. Reusing a rotated-out
    /// refresh token then fails with `invalid_grant` and revokes the grant.
    pub rotate_refresh_tokens: bool,
    /// How the client authenticates.
    pub client_auth: ClientAuthMethod,
}

impl Default for OidcOptions {
    fn default() -> Self {
        OidcOptions {
            client_id: "latchkey-interop".into(),
            client_secret: "interop-secret".into(),
            redirect_uris: vec!["http://127.0.0.1:1/callback".into()],
            access_ttl_secs: 3600,
            rotate_refresh_tokens: true,
            client_auth: ClientAuthMethod::Basic,
        }
    }
}

/// The directory holding `server.mjs`, `package.json` and `node_modules`.
pub fn server_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("interop").join("oidc")
}

/// The S256 PKCE challenge for `verifier` (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

/// The value of `name` in the query of `url`, if any.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// The HTTP Basic `authorization` header value for a client, with id and
/// secret form-urlencoded first as RFC 6749 §2.3.1 requires.
pub fn basic_authorization(client_id: &str, client_secret: &str) -> String {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), encode(client_secret));
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
}

/// The endpoints from discovery.
#[derive(Debug, Clone)]
struct Endpoints {
    authorization: String,
    token: String,
    revocation: String,
    introspection: String,
    device_authorization: String,
}

/// panva's oidc-provider running on `127.0.0.1`, killed on drop.
#[derive(Debug)]
pub struct OidcProvider {
    options: OidcOptions,
    issuer: String,
    metadata: Value,
    endpoints: Endpoints,
    http: reqwest::Client,
    startup: Duration,
    child: Child,
    /// Held open: the server exits when its stdin closes, so it dies with this
    /// process even if this process is killed before `Drop` runs.
    _stdin: Option<ChildStdin>,
}

impl OidcProvider {
    /// Spawns `node interop/oidc/server.mjs`, waits (at most
    /// [`START_TIMEOUT`]) until it listens, and reads its discovery document.
    pub async fn start(options: OidcOptions) -> io::Result<OidcProvider> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
        if options.client_id.is_empty() || options.client_secret.is_empty() {
            return Err(invalid("client_id and client_secret must not be empty"));
        }
        if options.redirect_uris.is_empty() {
            return Err(invalid("at least one redirect URI is needed"));
        }
        if options.access_ttl_secs == 0 {
            return Err(invalid("access_ttl_secs must be at least 1"));
        }
        let dir = server_dir();
        if !dir.join("node_modules").join("oidc-provider").join("package.json").is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "oidc-provider is not installed in {}: run `npm ci --prefix interop/oidc` in the repository",
                    dir.display()
                ),
            ));
        }

        let began = Instant::now();
        let mut command = Command::new("node");
        command
            .current_dir(&dir)
            .arg("server.mjs")
            .args(["--port", "0", "--exit-on-stdin-eof"])
            .args(["--client-id", &options.client_id])
            .args(["--client-auth", options.client_auth.arg()])
            .args(["--access-ttl", &options.access_ttl_secs.to_string()])
            .args(["--rotate-refresh-tokens", if options.rotate_refresh_tokens { "true" } else { "false" }])
            // The secret goes through the environment: argv is visible in `ps`.
            .env("OIDC_CLIENT_SECRET", &options.client_secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for uri in &options.redirect_uris {
            command.args(["--redirect-uri", uri]);
        }
        let mut child = command.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                io::Error::new(e.kind(), "`node` is not on PATH: the oidc interop server needs Node.js 20 or later")
            } else {
                e
            }
        })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        // Forward the server's stderr, keeping the tail for error messages.
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_task = tokio::spawn({
            let tail = Arc::clone(&tail);
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = writeln!(io::stderr(), "[oidc-provider] {line}");
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == 40 {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });

        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("LISTENING ") {
                    return Ok(Some(rest.to_owned()));
                }
            }
            Ok::<_, io::Error>(None)
        })
        .await;
        let failure = |why: String, tail: &Mutex<VecDeque<String>>| {
            let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            let tail = tail.iter().map(String::as_str).collect::<Vec<_>>().join("\n");
            io::Error::other(format!("the oidc interop server did not start: {why}\n{tail}"))
        };
        let line = match listening {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), stderr_task).await;
                let status = match status {
                    Ok(Ok(status)) => status.to_string(),
                    _ => "still running".into(),
                };
                return Err(failure(format!("it closed stdout ({status})"), &tail));
            }
            Ok(Err(e)) => return Err(failure(format!("reading its stdout: {e}"), &tail)),
            Err(_) => {
                let _ = child.start_kill();
                return Err(failure(format!("no LISTENING line within {START_TIMEOUT:?}"), &tail));
            }
        };
        // Nothing else is written to stdout, but drain it so the server never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let issuer = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("issuer="))
            .or_else(|| line.split_whitespace().next())
            .unwrap_or_default()
            .to_owned();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(io::Error::other)?;
        let metadata: Value = http
            .get(format!("{issuer}/.well-known/openid-configuration"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(io::Error::other)?
            .json()
            .await
            .map_err(io::Error::other)?;
        if metadata["issuer"] != issuer.as_str() {
            return Err(io::Error::other(format!("discovery names issuer {}, not {issuer}", metadata["issuer"])));
        }
        let endpoint = |key: &str| {
            metadata[key].as_str().map(str::to_owned).ok_or_else(|| io::Error::other(format!("discovery has no {key}")))
        };
        let endpoints = Endpoints {
            authorization: endpoint("authorization_endpoint")?,
            token: endpoint("token_endpoint")?,
            revocation: endpoint("revocation_endpoint")?,
            introspection: endpoint("introspection_endpoint")?,
            device_authorization: endpoint("device_authorization_endpoint")?,
        };
        Ok(OidcProvider { options, issuer, metadata, endpoints, http, startup: began.elapsed(), child, _stdin: stdin })
    }

    /// The options it was started with.
    pub fn options(&self) -> &OidcOptions {
        &self.options
    }

    /// The issuer, `http://127.0.0.1:PORT`, which is also the base URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The whole discovery document (`/.well-known/openid-configuration`).
    pub fn metadata(&self) -> &Value {
        &self.metadata
    }

    /// The authorization endpoint.
    pub fn authorization_endpoint(&self) -> &str {
        &self.endpoints.authorization
    }

    /// The token endpoint.
    pub fn token_endpoint(&self) -> &str {
        &self.endpoints.token
    }

    /// The RFC 7009 revocation endpoint.
    pub fn revocation_endpoint(&self) -> &str {
        &self.endpoints.revocation
    }

    /// The RFC 7662 introspection endpoint.
    pub fn introspection_endpoint(&self) -> &str {
        &self.endpoints.introspection
    }

    /// The RFC 8628 device authorization endpoint.
    pub fn device_authorization_endpoint(&self) -> &str {
        &self.endpoints.device_authorization
    }

    /// The device verification page, where users enter a user code.
    pub fn device_verification_uri(&self) -> String {
        format!("{}/device", self.issuer)
    }

    /// How long [`start`](Self::start) took, from spawning node to having
    /// read discovery.
    pub fn startup_duration(&self) -> Duration {
        self.startup
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// An authorization request URL for the code flow with PKCE S256, to the
    /// first registered redirect URI.
    pub fn authorization_url(&self, scope: &str, state: &str, code_challenge: &str) -> String {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.options.client_id)
            .append_pair("redirect_uri", &self.options.redirect_uris[0])
            .append_pair("scope", scope)
            .append_pair("state", state)
            .append_pair("code_challenge", code_challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        format!("{}?{query}", self.endpoints.authorization)
    }

    /// A fresh user agent with its own cookie jar, that is, its own session
    /// at the provider.
    pub fn browser(&self) -> OidcBrowser<'_> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .cookie_store(true)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a reqwest client builds");
        OidcBrowser { provider: self, client }
    }

    /// Logs `username` in through the authorization URL in a fresh session
    /// and grants consent: the redirect to the client's redirect URI (with
    /// `code`, `state` and `iss`, or an `error`), which is not fetched.
    pub async fn login(&self, authorization_url: &str, username: &str) -> io::Result<String> {
        self.browser().authorize(authorization_url, username).await
    }

    /// Like [`login`](Self::login) but denies consent: the redirect carries
    /// `error=access_denied`.
    pub async fn login_and_deny(&self, authorization_url: &str, username: &str) -> io::Result<String> {
        self.browser().drive_authorization(authorization_url, Act::Deny(username)).await
    }

    /// Approves a device authorization as `username` through the provider's
    /// own device pages, in a fresh session.
    pub async fn approve_device(&self, user_code: &str, username: &str) -> io::Result<()> {
        self.browser().approve_device(user_code, username).await
    }

    /// Aborts a device authorization at the confirmation page: the device's
    /// next poll gets `access_denied`.
    pub async fn deny_device(&self, user_code: &str) -> io::Result<()> {
        self.browser().deny_device(user_code).await
    }

    /// Introspects `token` (RFC 7662) with the client's credentials: the
    /// whole response.
    pub async fn introspection(&self, token: &str) -> io::Result<Value> {
        let (status, body) = self.client_post(self.introspection_endpoint(), &[("token", token)]).await?;
        if status != 200 {
            return Err(io::Error::other(format!("introspection answered {status}: {body}")));
        }
        Ok(body)
    }

    /// Whether `token` (access or refresh) is active, by introspection.
    pub async fn introspect(&self, token: &str) -> io::Result<bool> {
        let body = self.introspection(token).await?;
        body["active"].as_bool().ok_or_else(|| io::Error::other(format!("introspection without `active`: {body}")))
    }

    /// POSTs `form` to `url`, authenticated as the client the way the options
    /// say: the status and the body as JSON (a JSON string if not JSON).
    pub async fn client_post(&self, url: &str, form: &[(&str, &str)]) -> io::Result<(u16, Value)> {
        let o = &self.options;
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        let mut request = self.http.post(url);
        match o.client_auth {
            ClientAuthMethod::Basic => {
                request = request.header("authorization", basic_authorization(&o.client_id, &o.client_secret));
            }
            ClientAuthMethod::Post => {
                fields.push(("client_id", &o.client_id));
                fields.push(("client_secret", &o.client_secret));
            }
        }
        let response = request.form(&fields).send().await.map_err(io::Error::other)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(io::Error::other)?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }
}

/// A user agent with a cookie jar, driving the provider's pages the way a
/// person in a browser would. Cookies persist across calls, so a second
/// authorization in the same browser finds the session and skips login.
#[derive(Debug)]
pub struct OidcBrowser<'a> {
    provider: &'a OidcProvider,
    client: reqwest::Client,
}

/// What to do at the provider's pages.
#[derive(Clone, Copy)]
enum Act<'a> {
    /// Log in as this user if asked, and grant consent.
    Allow(&'a str),
    /// Log in as this user if asked, and deny consent.
    Deny(&'a str),
    /// Fail at any page.
    Nothing,
}

/// Where a run through the pages ended.
enum End {
    /// A redirect to one of the client's redirect URIs.
    Redirect(String),
    /// The device flow's success page.
    DeviceSuccess,
}

impl OidcBrowser<'_> {
    /// Follows `authorization_url` through login (as `username`, if asked)
    /// and consent (granted, if asked): the redirect to the client.
    pub async fn authorize(&self, authorization_url: &str, username: &str) -> io::Result<String> {
        self.drive_authorization(authorization_url, Act::Allow(username)).await
    }

    /// Like [`authorize`](Self::authorize) but denies consent.
    pub async fn authorize_and_deny(&self, authorization_url: &str, username: &str) -> io::Result<String> {
        self.drive_authorization(authorization_url, Act::Deny(username)).await
    }

    /// Follows `authorization_url` through redirects only: the redirect to
    /// the client, or an error if the provider shows a login or consent page
    /// (as it does not when this browser's session already has both).
    pub async fn authorize_without_interaction(&self, authorization_url: &str) -> io::Result<String> {
        self.drive_authorization(authorization_url, Act::Nothing).await
    }

    async fn drive_authorization(&self, url: &str, act: Act<'_>) -> io::Result<String> {
        let url = Url::parse(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match self.drive(self.client.get(url.clone()), url, act).await? {
            End::Redirect(location) => Ok(location),
            End::DeviceSuccess => Err(io::Error::other("an authorization ended at the device success page")),
        }
    }

    /// Enters `user_code` at the device page, confirms it, logs in as
    /// `username` and grants consent.
    pub async fn approve_device(&self, user_code: &str, username: &str) -> io::Result<()> {
        let (action, fields) = self.device_confirmation(user_code).await?;
        let request = self.client.post(action.clone()).form(&fields);
        match self.drive(request, action, Act::Allow(username)).await? {
            End::DeviceSuccess => Ok(()),
            End::Redirect(location) => Err(io::Error::other(format!("device approval redirected to {location}"))),
        }
    }

    /// Enters `user_code` at the device page and aborts at the confirmation.
    pub async fn deny_device(&self, user_code: &str) -> io::Result<()> {
        let (action, mut fields) = self.device_confirmation(user_code).await?;
        fields.retain(|(name, _)| name != "confirm");
        fields.push(("abort".into(), "yes".into()));
        let (status, _, body) = self.send(self.client.post(action).form(&fields)).await?;
        if body.contains("id=\"aborted\"") {
            Ok(())
        } else {
            Err(io::Error::other(format!("aborting the device code answered {status}: {}", page_text(&body))))
        }
    }

    /// The confirmation form for `user_code`: its action and fields.
    async fn device_confirmation(&self, user_code: &str) -> io::Result<(Url, Vec<(String, String)>)> {
        let start = Url::parse(&self.provider.device_verification_uri()).map_err(io::Error::other)?;
        let (status, _, body) = self.send(self.client.get(start.clone())).await?;
        let input = find_form(&body, "op.deviceInputForm")
            .filter(|_| status == 200)
            .ok_or_else(|| io::Error::other(format!("no device code form ({status}): {}", page_text(&body))))?;
        let mut fields = input.fields;
        fields.retain(|(name, _)| name != "user_code");
        fields.push(("user_code".into(), user_code.into()));
        let action = start.join(&input.action).map_err(io::Error::other)?;
        let (status, _, body) = self.send(self.client.post(action.clone()).form(&fields)).await?;
        let confirm = find_form(&body, "op.deviceConfirmForm")
            .filter(|_| status == 200)
            .ok_or_else(|| io::Error::other(format!("user code not accepted ({status}): {}", page_text(&body))))?;
        Ok((action.join(&confirm.action).map_err(io::Error::other)?, confirm.fields))
    }

    /// Sends `first` (to `url`) and follows redirects and the login and
    /// consent forms until the client's redirect URI or the device success page.
    async fn drive(&self, first: reqwest::RequestBuilder, url: Url, act: Act<'_>) -> io::Result<End> {
        let mut request = first;
        let mut url = url;
        for _ in 0..MAX_STEPS {
            let (status, location, body) = self.send(request).await?;
            if let Some(location) = location.filter(|_| (300..400).contains(&status)) {
                let next = url.join(&location).map_err(io::Error::other)?;
                if self.is_redirect_uri(next.as_str()) {
                    return Ok(End::Redirect(next.into()));
                }
                request = self.client.get(next.clone());
                url = next;
                continue;
            }
            if status != 200 {
                return Err(io::Error::other(format!("{url} answered {status}: {}", page_text(&body))));
            }
            let interactive = find_form(&body, "login").is_some() || find_form(&body, "consent").is_some();
            let (username, allow) = match act {
                Act::Allow(username) => (username, true),
                Act::Deny(username) => (username, false),
                Act::Nothing if interactive => {
                    return Err(io::Error::other(format!("the provider asked for interaction at {url}")));
                }
                Act::Nothing => ("", true),
            };
            if let Some(form) = find_form(&body, "login") {
                let mut fields = form.fields;
                fields.push(("username".into(), username.into()));
                fields.push(("password".into(), PASSWORD.into()));
                let action = url.join(&form.action).map_err(io::Error::other)?;
                request = self.client.post(action.clone()).form(&fields);
                url = action;
            } else if let Some(form) = find_form(&body, if allow { "consent" } else { "deny-form" }) {
                let action = url.join(&form.action).map_err(io::Error::other)?;
                request = self.client.post(action.clone()).form(&form.fields);
                url = action;
            } else if body.contains("id=\"success\"") {
                return Ok(End::DeviceSuccess);
            } else {
                return Err(io::Error::other(format!("unexpected page at {url}: {}", page_text(&body))));
            }
        }
        Err(io::Error::other(format!("no end after {MAX_STEPS} steps, at {url}")))
    }

    fn is_redirect_uri(&self, url: &str) -> bool {
        let base = |u: &str| u.split(['?', '#']).next().unwrap_or_default().to_owned();
        self.provider.options.redirect_uris.iter().any(|uri| base(uri) == base(url))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> io::Result<(u16, Option<String>, String)> {
        let response = request.send().await.map_err(io::Error::other)?;
        let status = response.status().as_u16();
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.text().await.map_err(io::Error::other)?;
        Ok((status, location, body))
    }
}

/// A form found in a page: its action and the named inputs in it.
#[derive(Debug)]
struct Form {
    action: String,
    fields: Vec<(String, String)>,
}

/// The `<form id="{id}">` in `html`, with its `<input name=… value=…>`s.
fn find_form(html: &str, id: &str) -> Option<Form> {
    let mut rest = html;
    while let Some(start) = rest.find("<form") {
        let after = &rest[start + 5..];
        let tag_end = after.find('>')?;
        let attrs = attributes(&after[..tag_end]);
        let content = &after[tag_end + 1..];
        let inner = &content[..content.find("</form>").unwrap_or(content.len())];
        if attribute(&attrs, "id") == Some(id) {
            let mut fields = Vec::new();
            let mut inputs = inner;
            while let Some(i) = inputs.find("<input") {
                let tag = &inputs[i + 6..];
                let end = tag.find('>').unwrap_or(tag.len());
                let attrs = attributes(&tag[..end]);
                if let Some(name) = attribute(&attrs, "name") {
                    if attribute(&attrs, "type") != Some("text") && attribute(&attrs, "type") != Some("password") {
                        fields.push((name.to_owned(), attribute(&attrs, "value").unwrap_or_default().to_owned()));
                    }
                }
                inputs = &tag[end..];
            }
            return Some(Form { action: attribute(&attrs, "action").unwrap_or_default().to_owned(), fields });
        }
        rest = content;
    }
    None
}

fn attribute<'a>(attrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attrs.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The attributes of a tag's inside (`name="value"`, `name='value'`,
/// `name=value` or a bare `name`), with character references decoded.
fn attributes(tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = tag.trim_end_matches('/').chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == '/').is_some() {}
        let name: String = std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace() && *c != '=')).collect();
        if name.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let value = if chars.next_if_eq(&'=').is_some() {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            match chars.next_if(|c| *c == '"' || *c == '\'') {
                Some(quote) => {
                    let value: String = std::iter::from_fn(|| chars.next_if(|c| *c != quote)).collect();
                    chars.next();
                    value
                }
                None => std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace())).collect(),
            }
        } else {
            String::new()
        };
        out.push((name, unescape(&value)));
    }
    out
}

/// Decodes the character references oidc-provider and server.mjs emit.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A page's visible text, tags stripped, for error messages.
fn page_text(html: &str) -> String {
    let body = html.split_once("<body").map_or(html, |(_, b)| b);
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = unescape(&text.split_whitespace().collect::<Vec<_>>().join(" "));
    text.chars().take(400).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_their_hidden_fields_are_found() {
        let html = r#"<form id="other" action="/x"><input name="a" value="1"></form>
<form id="op.deviceConfirmForm" method="post" action="http://h/device">
<input type="hidden" name="xsrf" value="a&amp;b&#39;c"/>
<input type="hidden" name="user_code" value="BCDF-GHJK"/>
<input type="text" name="typed" value="no">
<input type="hidden" name=confirm value=yes />
</form>"#;
        let form = find_form(html, "op.deviceConfirmForm").unwrap();
        assert_eq!(form.action, "http://h/device");
        let fields: Vec<(&str, &str)> = form.fields.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(fields, [("xsrf", "a&b'c"), ("user_code", "BCDF-GHJK"), ("confirm", "yes")]);
        assert!(find_form(html, "missing").is_none());
        assert_eq!(find_form(html, "other").unwrap().fields, [("a".to_owned(), "1".to_owned())]);
    }

    #[test]
    fn basic_credentials_are_form_urlencoded_first() {
        assert_eq!(basic_authorization("id", "s:e/c+r%t"), format!("Basic {}", base64_of("id:s%3Ae%2Fc%2Br%25t")));
        assert_eq!(query_param("http://x/cb?code=a%2Bb&state=s#f", "code").as_deref(), Some("a+b"));
        assert_eq!(page_text("<html><body><p>a &amp;</p>\n<p>b</p></body>"), "a & b");
    }

    fn base64_of(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }
}
