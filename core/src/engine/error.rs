//! The engine's errors and the product's error vocabulary.

use std::time::Duration;

use crate::authid::AuthIdError;
use crate::provider::ProviderError;
use crate::store::StoreError;

/// The error codes every front end maps to HTTP (`docs/protocol.md`, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// Malformed, unknown, or wrong secret.
    AuthIdInvalid,
    /// Handle or grant revoked.
    AuthIdRevoked,
    /// The provider rejected the stored grant; the user must log in again.
    ReauthRequired,
    /// Too many requests.
    RateLimited,
    /// The provider is down or slow.
    ProviderUnavailable,
    /// The broker's own store cannot be reached.
    StoreUnavailable,
    /// The provider refused the broker's app credentials, or is misconfigured.
    ProviderMisconfigured,
    /// Anything else the client got wrong.
    BadRequest,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthIdInvalid => "authid_invalid",
            ErrorCode::AuthIdRevoked => "authid_revoked",
            ErrorCode::ReauthRequired => "reauth_required",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ProviderUnavailable => "provider_unavailable",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::ProviderMisconfigured => "provider_misconfigured",
            ErrorCode::BadRequest => "bad_request",
        }
    }
}

/// Why an engine operation failed. Messages are one line, meant for the
/// person behind the client, and never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The AuthID text does not parse.
    #[error("{0}")]
    AuthIdMalformed(AuthIdError),
    /// Unknown keyid or wrong secret (one answer for both).
    #[error("the AuthID is not known to this broker, or its secret is wrong")]
    AuthIdInvalid,
    /// The handle or its grant was revoked.
    #[error("this AuthID has been revoked")]
    AuthIdRevoked,
    /// The provider said `invalid_grant`: the user must log in again.
    #[error("the provider no longer accepts this login; log in again for service '{service}'")]
    ReauthRequired {
        /// The service to log in to again.
        service: String,
    },
    /// The provider is down, slow, or refusing us for now.
    #[error("the provider is unavailable right now; retry in {} s", .retry_after.as_secs())]
    ProviderUnavailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// The store cannot be reached (or a write could not be made durable).
    #[error("the broker cannot reach its store right now; retry in {} s", .retry_after.as_secs())]
    StoreUnavailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// The provider refused our app credentials or answered something unusable.
    #[error("the broker's configuration for this provider is not working: {detail}")]
    ProviderMisconfigured {
        /// What went wrong, without secrets.
        detail: String,
    },
    /// A stored record is corrupt or its master key is not configured.
    #[error("a stored record cannot be read: {detail}")]
    Corrupt {
        /// What is wrong.
        detail: String,
    },
    /// The request is wrong (unknown service, expired login, replayed state, …).
    #[error("{0}")]
    BadRequest(String),
    /// A browser step did not come from the browser that began it: a missing
    /// or foreign proof cookie, a cross-site form, a replayed form or callback.
    /// Code `bad_request`; pages answer it with 403.
    #[error("{0}")]
    Forbidden(String),
}

impl EngineError {
    /// The vocabulary code.
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::AuthIdMalformed(_) | EngineError::AuthIdInvalid => ErrorCode::AuthIdInvalid,
            EngineError::AuthIdRevoked => ErrorCode::AuthIdRevoked,
            EngineError::ReauthRequired { .. } => ErrorCode::ReauthRequired,
            EngineError::ProviderUnavailable { .. } => ErrorCode::ProviderUnavailable,
            EngineError::StoreUnavailable { .. } | EngineError::Corrupt { .. } => ErrorCode::StoreUnavailable,
            EngineError::ProviderMisconfigured { .. } => ErrorCode::ProviderMisconfigured,
            EngineError::BadRequest(_) | EngineError::Forbidden(_) => ErrorCode::BadRequest,
        }
    }

    /// How long the client should wait before retrying, where that applies.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            EngineError::ProviderUnavailable { retry_after } | EngineError::StoreUnavailable { retry_after } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    pub(crate) fn bad_request(text: impl Into<String>) -> Self {
        EngineError::BadRequest(text.into())
    }
}

/// How long to tell clients to wait after a store failure.
pub(crate) const STORE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt { detail, .. } => EngineError::Corrupt { detail },
            // NotFound and Conflict reaching here mean a record vanished or
            // changed under an operation that does not retry: tell the client
            // to try again rather than guess.
            _ => EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER },
        }
    }
}

impl From<AuthIdError> for EngineError {
    fn from(e: AuthIdError) -> Self {
        EngineError::AuthIdMalformed(e)
    }
}

/// Maps a provider failure outside the refresh path (login, device, revoke).
pub(crate) fn from_provider(e: &ProviderError, default_retry: Duration) -> EngineError {
    match e {
        ProviderError::InvalidGrant { .. } => {
            EngineError::bad_request("the provider refused the authorization code; start the login again")
        }
        ProviderError::InvalidClient { .. } | ProviderError::Unsupported(_) => {
            EngineError::ProviderMisconfigured { detail: e.to_string() }
        }
        ProviderError::RateLimited { retry_after } => {
            EngineError::ProviderUnavailable { retry_after: retry_after.unwrap_or(default_retry) }
        }
        ProviderError::Transient { .. } | ProviderError::Protocol { .. } => {
            EngineError::ProviderUnavailable { retry_after: default_retry }
        }
    }
}
