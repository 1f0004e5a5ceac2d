//! The route table: every path the broker serves, once. The filters match
//! these paths and the request metrics label requests with them, so no route
//! is served without a label of its own, and no label names a path that is
//! not served.

use warp::Filter;
use warp::filters::BoxedFilter;

/// A path the broker serves. Methods are the handlers' business; the path
/// and its metrics label are this table's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The service picker and its confirmation page.
    Index,
    /// A login link (GET) and the click that goes to the provider (POST).
    Login,
    /// The provider's redirect back: the broker's redirect URI.
    LoggedIn,
    /// Duplicati's token request.
    Refresh,
    /// The hand-off of a login's AuthID.
    Fetch,
    /// Whether a hand-off is ready.
    TokenState,
    /// The revoke form.
    Revoke,
    /// What the revoke form posts to.
    Revoked,
    /// The pasted-login-token form.
    CliToken,
    /// What that form posts to.
    CliTokenLogin,
    /// The device page (GET) and the typed code (POST).
    Device,
    /// The privacy policy.
    PrivacyPolicy,
    /// `/v1` token requests.
    V1Token,
    /// A login's AuthIDs: listed (GET) or one more minted (POST).
    V1Handles,
    /// A new AuthID in place of the caller's.
    V1HandlesRotate,
    /// One AuthID of the login, by keyid (DELETE).
    V1Handle,
    /// The whole login revoked.
    V1GrantRevoke,
    /// RFC 8628 device authorization.
    V1DeviceCode,
    /// RFC 8628 device token polls.
    V1DeviceToken,
    /// The services offered.
    V1Services,
    /// The RFC 6749 token endpoint.
    OAuth2Token,
    /// Liveness.
    Healthz,
    /// Readiness (the store answers).
    Readyz,
    /// Prometheus metrics.
    Metrics,
    /// The pages' stylesheet.
    StyleCss,
    /// The AuthID page's script.
    AuthidJs,
    /// The (empty) icon browsers ask for.
    Favicon,
}

/// The label of the static assets, and of any path under `/static/`.
const STATIC: &str = "/static";

impl Route {
    /// Every route.
    pub(crate) const ALL: [Route; 27] = [
        Route::Index,
        Route::Login,
        Route::LoggedIn,
        Route::Refresh,
        Route::Fetch,
        Route::TokenState,
        Route::Revoke,
        Route::Revoked,
        Route::CliToken,
        Route::CliTokenLogin,
        Route::Device,
        Route::PrivacyPolicy,
        Route::V1Token,
        Route::V1Handles,
        Route::V1HandlesRotate,
        Route::V1Handle,
        Route::V1GrantRevoke,
        Route::V1DeviceCode,
        Route::V1DeviceToken,
        Route::V1Services,
        Route::OAuth2Token,
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::StyleCss,
        Route::AuthidJs,
        Route::Favicon,
    ];

    /// The path as requests name it; `{keyid}` stands for one segment.
    pub(crate) const fn path(self) -> &'static str {
        match self {
            Route::Index => "/",
            Route::Login => "/login",
            Route::LoggedIn => latchkey_core::REDIRECT_PATH,
            Route::Refresh => "/refresh",
            Route::Fetch => "/fetch",
            Route::TokenState => "/token-state",
            Route::Revoke => "/revoke",
            Route::Revoked => "/revoked",
            Route::CliToken => "/cli-token",
            Route::CliTokenLogin => "/cli-token-login",
            Route::Device => "/device",
            Route::PrivacyPolicy => "/privacy-policy",
            Route::V1Token => "/v1/token",
            Route::V1Handles => "/v1/handles",
            Route::V1HandlesRotate => "/v1/handles/rotate",
            Route::V1Handle => "/v1/handles/{keyid}",
            Route::V1GrantRevoke => "/v1/grant/revoke",
            Route::V1DeviceCode => "/v1/device/code",
            Route::V1DeviceToken => "/v1/device/token",
            Route::V1Services => "/v1/services",
            Route::OAuth2Token => "/oauth2/token",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::StyleCss => "/static/style.css",
            Route::AuthidJs => "/static/authid.js",
            Route::Favicon => "/favicon.ico",
        }
    }

    /// The label in the request metrics and the request log: the path, except
    /// that the static assets share one. Never an id or a token.
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Route::StyleCss | Route::AuthidJs | Route::Favicon => STATIC,
            route => route.path(),
        }
    }

    /// The path's fixed segments, up to a `{…}` one.
    fn segments(self) -> impl Iterator<Item = &'static str> {
        self.path().split('/').filter(|s| !s.is_empty()).take_while(|s| !s.starts_with('{'))
    }

    fn has_param(self) -> bool {
        self.path().contains('{')
    }

    /// A filter matching exactly this route's path (one without a `{…}`
    /// segment), under whatever a mounting application's filters consumed
    /// before it: one comparison of the rest of the path, nothing allocated
    /// (a chain of segment filters would be boxed per segment).
    pub(crate) fn filter(self) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone + Send + Sync + 'static {
        debug_assert!(!self.has_param(), "{} takes a parameter: use filter_with_param", self.path());
        let rest = self.path().trim_start_matches('/');
        warp::path::tail()
            .and_then(move |tail: warp::path::Tail| {
                std::future::ready(if tail.as_str() == rest { Ok(()) } else { Err(warp::reject::not_found()) })
            })
            .untuple_one()
    }

    /// A filter matching this route's path, extracting its `{…}` segment.
    pub(crate) fn filter_with_param(self) -> BoxedFilter<(String,)> {
        debug_assert!(self.has_param(), "{} takes no parameter: use filter", self.path());
        self.segments()
            .fold(warp::any().boxed(), |f, s| f.and(warp::path(s)).boxed())
            .and(warp::path::param::<String>())
            .and(warp::path::end())
            .boxed()
    }

    /// The route a request path belongs to, if any. A path with a `{…}`
    /// segment takes anything under its fixed part.
    pub(crate) fn of(path: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.path() == path).or_else(|| {
            Route::ALL.into_iter().filter(|r| r.has_param()).find(|r| {
                let fixed = &r.path()[..r.path().find('{').unwrap_or(0)];
                path.starts_with(fixed)
            })
        })
    }
}

/// The metrics label of a request path: its route's, `/static` for anything
/// under `/static/`, `other` for the rest.
pub(crate) fn label(path: &str) -> &'static str {
    label_of(Route::of(path), path)
}

/// [`label`] of a path whose route is already known (`Route::of(path)`).
pub(crate) fn label_of(route: Option<Route>, path: &str) -> &'static str {
    match route {
        Some(route) => route.label(),
        None if path.starts_with("/static/") => STATIC,
        None => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_labelled_by_its_own_path() {
        for route in Route::ALL {
            assert_eq!(Route::of(route.path()), Some(route), "{route:?}");
            assert!(route.path().starts_with('/'), "{route:?}");
        }
        let mut paths: Vec<&str> = Route::ALL.iter().map(|r| r.path()).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), Route::ALL.len(), "each path once");
    }

    #[test]
    fn labels_name_routes_never_ids_or_tokens() {
        for (path, expected) in [
            ("/", "/"),
            ("/refresh", "/refresh"),
            ("/logged-in", "/logged-in"),
            ("/v1/handles", "/v1/handles"),
            ("/v1/handles/rotate", "/v1/handles/rotate"),
            ("/v1/handles/AAAAAAAAAAAAAAAAAAAAAA", "/v1/handles/{keyid}"),
            ("/v1/handles/", "/v1/handles/{keyid}"),
            ("/static/style.css", "/static"),
            ("/static/nothing.png", "/static"),
            ("/favicon.ico", "/static"),
            ("/refresh/", "other"),
            ("/fetch?token=secret", "other"),
            ("/nope", "other"),
        ] {
            assert_eq!(label(path), expected, "{path}");
        }
    }
}
