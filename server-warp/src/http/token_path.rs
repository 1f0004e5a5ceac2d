//! The one path every request that presents an AuthID takes: `/refresh`,
//! `/v1/token`, `/oauth2/token`, `/revoked` and the `/v1` handle routes. Each
//! surface finds the AuthID where its protocol puts it and words the outcome
//! in its own vocabulary; between the two, the steps are the same:
//!
//! 1. the request is counted against its client address before the parse
//!    result is looked at, so malformed AuthIDs are limited too; while that
//!    address backs off after wrong secrets for the keyid, the secret is
//!    checked first and only a wrong one is refused;
//! 2. the engine does what the surface asks;
//! 3. a refusal counts a wrong secret against (keyid, address); a token
//!    request that succeeded is charged to its keyid's bucket — which only
//!    right secrets reach — and forgets that address's wrong secrets.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use latchkey_core::{AuthId, EngineError};

use super::AppState;
use super::reply::Failure;

/// What a success costs the AuthID's keyid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cost {
    /// A token request: one of the keyid's per-minute allowance.
    TokenRequest,
    /// Nothing: managing AuthIDs (`/v1/handles`, revoking) is not limited per keyid.
    Free,
}

/// Why the path ended without the engine's answer.
#[derive(Debug)]
pub(super) enum Refused {
    /// Over a limit, with how long to wait.
    Limited(Duration),
    /// The AuthID text does not parse (`AuthIdMalformed`).
    Malformed(EngineError),
    /// The engine refused (already counted against the keyid).
    Engine(EngineError),
}

impl Refused {
    /// The engine's error, when there is one.
    pub(super) fn engine_error(&self) -> Option<&EngineError> {
        match self {
            Refused::Limited(_) => None,
            Refused::Malformed(e) | Refused::Engine(e) => Some(e),
        }
    }

    /// The failure in the common vocabulary, for a surface to render.
    pub(super) fn failure(&self) -> Failure {
        match self {
            Refused::Limited(wait) => Failure::rate_limited(*wait),
            Refused::Malformed(e) | Refused::Engine(e) => Failure::from(e),
        }
    }
}

impl AppState {
    /// Runs `op` for the AuthID in `raw` from `client`: parse and limits
    /// first, the accounting after (see the module docs). Answers the AuthID
    /// with `op`'s result, for the surface to render.
    pub(super) async fn with_authid<T>(
        &self,
        raw: &str,
        client: IpAddr,
        cost: Cost,
        op: impl AsyncFnOnce(&AuthId) -> Result<T, EngineError>,
    ) -> Result<(AuthId, T), Refused> {
        let parsed = AuthId::parse(raw);
        // One reading of the clock for the request's limits: the keyid's
        // bucket, charged after `op`, never moves back in time (see
        // `limits::Buckets::take`), so a slow `op` only makes it refill less.
        let now = Instant::now();
        self.limiter.token_request(client, now).map_err(Refused::Limited)?;
        let authid = parsed.map_err(|e| Refused::Malformed(EngineError::from(e)))?;
        if let Err(wait) = self.limiter.backing_off(authid.keyid(), client, now) {
            // This address sent wrong secrets for the keyid. The secret is
            // checked before it is refused (a cached token, or the handle's
            // key unwrapped): whoever holds the right one is served, even
            // from the address someone else guessed from.
            if !self.broker.secret_is_right(&authid).await.unwrap_or(false) {
                return Err(Refused::Limited(wait));
            }
        }
        match op(&authid).await {
            Ok(answer) => {
                if cost == Cost::TokenRequest {
                    self.token_served(&authid, client, now).map_err(Refused::Limited)?;
                }
                Ok((authid, answer))
            }
            Err(e) => {
                self.refused(&authid, &e, client);
                Err(Refused::Engine(e))
            }
        }
    }

    /// A token request whose AuthID was right: charged to its keyid's bucket,
    /// and this address's failed secrets for it are forgotten. Logged at
    /// debug level (`LATCHKEY_LOG=latchkey_server=debug`): the keyid names
    /// the client, never its secret. A provider whose refreshes contradict
    /// the catalogue is warned about here, once.
    fn token_served(&self, authid: &AuthId, client: IpAddr, now: Instant) -> Result<(), Duration> {
        self.limiter.succeeded(&authid.keyid(), client);
        self.limiter.authenticated(authid.keyid(), now)?;
        tracing::debug!(keyid = %authid.keyid(), "token served");
        for mismatch in self.broker.take_rotation_mismatches() {
            tracing::warn!(provider = %mismatch.provider, rotated = mismatch.rotated, "{mismatch}");
        }
        Ok(())
    }

    /// A refused request: counts a failed secret against the keyid.
    fn refused(&self, authid: &AuthId, error: &EngineError, client: IpAddr) {
        if matches!(error, EngineError::AuthIdInvalid)
            && self.limiter.failed_secret(authid.keyid(), client, Instant::now())
        {
            crate::audit::backoff_engaged(&authid.keyid(), client);
        }
        tracing::info!(keyid = %authid.keyid(), code = error.code().as_str(), "token request refused");
    }
}
