//! (b) A plain hyper application that embeds the engine, with no warp and
//! no broker server: its own pages start and finish the login, and its own
//! API hands out access tokens with [`Broker::token`].
//!
//! | route | what |
//! |---|---|
//! | `GET /` | a page with one button, "Connect", that posts to `/connect` |
//! | `POST /connect` | begins a login ([`Broker::begin_login`]) and sends the browser to the provider |
//! | `GET /logged-in` | the provider's redirect back ([`Broker::complete_login`]): shows the new AuthID once |
//! | `GET /api/token` | `Authorization: Bearer <AuthID>` → `{"access_token", "expires_in", "service"}` |
//!
//! The engine is what [`engine`] builds: a [`Broker`] on any [`Store`], the
//! providers crate's HTTP providers from catalogue TOML, master keys, and
//! tokio through [`TokioRuntime`]. Everything the broker guarantees holds
//! here too: the refresh token is stored sealed under the AuthID, refreshed
//! once however many requests ask at the same moment, and a rotated one is
//! stored before any access token obtained with it leaves [`Broker::token`].
//!
//! What this app leaves out, and a real one must add: TLS in front, rate
//! limits per client (the broker server's `limits` module), and its own user
//! accounts. The AuthID is the user's credential: hand it to whoever runs
//! the job (the user's device, the job's configuration), and never keep it
//! in the same database as the store, or a copy of that database opens every
//! grant in it (with the master key).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use latchkey_core::engine::Callback;
use latchkey_core::{
    AuthId, Broker, BrokerParts, EngineConfig, EngineError, ErrorCode, MasterKeyring, OsRandom, Store,
};
use latchkey_providers::{BuildOptions, CatalogueConfig, TokioRuntime};
use secrecy::ExposeSecret;
use tokio::net::TcpListener;

/// The cookie that binds a login to the browser that began it.
const LOGIN_COOKIE: &str = "app-login";

/// Builds the engine: `store`, the services and providers in `catalogue`
/// (the broker's `[providers.<id>]` and `[services.<id>]` tables, as TOML),
/// `keyring`, on tokio. `public_url` is where browsers reach this app: the
/// redirect URI registered with each provider is `<public_url>/logged-in`.
///
/// Only the entries in `catalogue` are offered; lay them over
/// `CatalogueConfig::built_in()` with `with_overrides` to start from the
/// built-in ones (which then need their credentials).
pub async fn engine(
    store: Arc<dyn Store>,
    catalogue: &str,
    keyring: MasterKeyring,
    public_url: &str,
) -> anyhow::Result<Broker> {
    let options = BuildOptions {
        redirect_uri: latchkey_core::redirect_uri(public_url),
        default_timeout: Duration::from_secs(15),
    };
    let built = latchkey_providers::build(&CatalogueConfig::parse(catalogue)?, &options)?;
    if let Some(withheld) = built.withheld.first() {
        anyhow::bail!("service '{}' is not offered: {}", withheld.service, withheld.reason);
    }
    let broker = Broker::new(BrokerParts {
        store,
        catalogue: built.catalogue,
        keyring,
        runtime: Arc::new(TokioRuntime),
        rng: Arc::new(OsRandom),
        config: EngineConfig { public_url: public_url.to_owned(), ..EngineConfig::default() },
    });
    // Follows the store's notices (another instance revoked or refreshed a grant).
    broker.start().await?;
    Ok(broker)
}

/// The application: the engine and the one service its users connect.
pub struct App {
    /// The engine.
    pub broker: Broker,
    /// The service `/connect` logs in to.
    pub service: String,
}

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, app: Arc<App>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(app.handle(request).await) }
            });
            // A client that hangs up early is its own business.
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Deletes expired logins and hand-offs every minute, a bounded number a
/// pass (the broker server's background sweep does the same). Runs until
/// the task is dropped.
pub async fn sweep(broker: Broker) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        every.tick().await;
        // A pass the store fails is simply tried again at the next tick.
        let _ = broker.sweep_expired(1000).await;
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Answer {
    answer(status, "application/json", value.to_string())
}

/// An engine error as this app's API answers it: a status and the error's
/// code and one-line message (never a secret).
fn api_error(e: &EngineError) -> Answer {
    let status = match e.code() {
        ErrorCode::AuthIdInvalid | ErrorCode::AuthIdRevoked | ErrorCode::ReauthRequired => StatusCode::UNAUTHORIZED,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ProviderUnavailable | ErrorCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ProviderMisconfigured => StatusCode::BAD_GATEWAY,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
    };
    json(status, &serde_json::json!({ "error": e.code().as_str(), "message": e.to_string() }))
}

fn cookie<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    let header = request.headers().get(COOKIE)?.to_str().ok()?;
    header.split(';').find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

impl App {
    /// Answers one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Answer {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/") => answer(
                StatusCode::OK,
                "text/html; charset=utf-8",
                "<!doctype html><title>Connect</title><form method=post action=/connect>\
                 <button>Connect your storage</button></form>",
            ),
            (&Method::POST, "/connect") => self.connect(&request).await,
            (&Method::GET, latchkey_core::REDIRECT_PATH) => self.logged_in(&request).await,
            (&Method::GET, "/api/token") => self.token(&request).await,
            _ => answer(StatusCode::NOT_FOUND, "text/plain", "not found"),
        }
    }

    /// The click on our own page: a fresh browser proof, set as a cookie,
    /// begins the login. A GET never starts one, and a form posted from
    /// another site is refused, so no page elsewhere can log a visitor in.
    async fn connect(&self, request: &Request<Incoming>) -> Answer {
        let site = request.headers().get("sec-fetch-site").and_then(|v| v.to_str().ok());
        if site.is_some_and(|site| site != "same-origin" && site != "none") {
            return answer(StatusCode::FORBIDDEN, "text/plain", "the form was sent from another site");
        }
        let proof = self.broker.new_browser_proof();
        match self.broker.begin_login(&self.service, None, proof.expose_secret()).await {
            Ok(start) => {
                let mut response = answer(StatusCode::SEE_OTHER, "text/plain", "");
                let max_age = self.broker.login_ttl().as_secs();
                let cookie = format!(
                    "{LOGIN_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}",
                    proof.expose_secret()
                );
                if let (Ok(location), Ok(cookie)) = (start.authorization_url.parse(), cookie.parse()) {
                    response.headers_mut().insert(LOCATION, location);
                    response.headers_mut().insert(SET_COOKIE, cookie);
                }
                response
            }
            Err(e) => answer(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
        }
    }

    /// The provider's redirect back: completes the login in the browser
    /// that began it and shows the new AuthID, once.
    async fn logged_in(&self, request: &Request<Incoming>) -> Answer {
        let query: HashMap<String, String> =
            form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
        let field = |name: &str| query.get(name).map(String::as_str);
        let callback = Callback {
            state: field("state").unwrap_or_default(),
            code: field("code"),
            error: field("error"),
            iss: field("iss"),
            browser: cookie(request, LOGIN_COOKIE),
            ..Callback::default()
        };
        match self.broker.complete_login(&callback).await {
            Ok(done) => answer(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                format!(
                    "Connected. Give this AuthID to your backup job; it is shown once:\n{}\n",
                    done.authid.expose_text().as_str()
                ),
            ),
            Err(e) => answer(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", format!("Login failed: {e}\n")),
        }
    }

    /// The app's own API: an access token for the AuthID presented as
    /// bearer. The engine serves it from its cache, or refreshes it at the
    /// provider (once, however many ask) and stores the rotated refresh
    /// token before answering.
    async fn token(&self, request: &Request<Incoming>) -> Answer {
        let bearer = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let Some(text) = bearer.and_then(|v| v.strip_prefix("Bearer ")) else {
            return json(StatusCode::UNAUTHORIZED, &serde_json::json!({ "error": "authid_missing" }));
        };
        let authid = match AuthId::parse(text) {
            Ok(authid) => authid,
            Err(e) => return api_error(&EngineError::AuthIdMalformed(e)),
        };
        match self.broker.token(&authid, None).await {
            Ok(token) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "access_token": token.access_token.expose_secret(),
                    "expires_in": self.broker.expires_in(&token).map(|left| left.as_secs()),
                    "service": token.service,
                }),
            ),
            Err(e) => api_error(&e),
        }
    }
}
