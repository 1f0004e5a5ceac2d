//! The sans-I/O decisions of the refresh path: pure functions of
//! `(now, record, event)`, tested without a store, a provider or a runtime.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::catalogue::ProviderSpec;
use crate::provider::TokenResponse;
use crate::records::{GrantPayload, GrantState};
use crate::time::Timestamp;

/// What to do with a token request, given the grant as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDecision {
    /// The stored access token is good enough: answer it.
    Serve,
    /// Obtain a fresh access token from the provider.
    Refresh,
    /// The grant needs a new login.
    ReauthRequired,
    /// The grant is revoked.
    Revoked,
}

/// How much validity an access token must have left to be handed out:
/// the client's `min_validity`, capped at half the token's own lifetime so a
/// provider with 60-second tokens does not cause a refresh on every request.
pub fn required_validity(min_validity: Duration, lifetime: Option<Duration>) -> Duration {
    match lifetime {
        Some(lifetime) => min_validity.min(lifetime / 2),
        None => min_validity,
    }
}

/// Time left on the payload's access token; `None` if it has none,
/// `Some(Duration::MAX)` if it never expires.
pub fn remaining(now: Timestamp, payload: &GrantPayload) -> Option<Duration> {
    payload.access_token.as_ref()?;
    Some(match payload.access_expires_at {
        None => Duration::MAX,
        Some(expiry) => expiry.duration_since(now),
    })
}

/// Decides whether a stored grant can answer a token request as it is.
pub fn decide(now: Timestamp, state: GrantState, payload: &GrantPayload, min_validity: Duration) -> TokenDecision {
    match state {
        GrantState::Revoked => return TokenDecision::Revoked,
        GrantState::ReauthRequired => return TokenDecision::ReauthRequired,
        GrantState::Active => {}
    }
    let left = remaining(now, payload);
    let lifetime = payload.access_expires_at.map(|expiry| expiry.duration_since(payload.refreshed_at));
    match left {
        Some(left) if !left.is_zero() && left >= required_validity(min_validity, lifetime) => TokenDecision::Serve,
        // Without a refresh token a still-valid access token is all there is.
        Some(left) if !left.is_zero() && payload.refresh_token.is_none() => TokenDecision::Serve,
        _ if payload.refresh_token.is_none() => TokenDecision::ReauthRequired,
        _ => TokenDecision::Refresh,
    }
}

/// Whether the stored access token may be served while the provider is
/// failing: any validity left at all will do.
pub fn usable_while_provider_down(now: Timestamp, payload: &GrantPayload) -> bool {
    remaining(now, payload).is_some_and(|left| !left.is_zero())
}

/// The payload after a successful refresh, and whether the provider rotated
/// the refresh token (a new one that must be stored before answering).
pub fn apply_refresh(now: Timestamp, old: &GrantPayload, response: TokenResponse) -> (GrantPayload, bool) {
    let rotated = match (&response.refresh_token, &old.refresh_token) {
        (Some(new), Some(old)) => new.expose_secret() != old.expose_secret(),
        (Some(_), None) => true,
        (None, _) => false,
    };
    let mut extra = old.extra.clone();
    for (key, value) in response.extra {
        match extra.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => extra.push((key, value)),
        }
    }
    let payload = GrantPayload {
        refresh_token: response.refresh_token.or_else(|| old.refresh_token.clone()),
        access_token: Some(response.access_token),
        access_expires_at: response.expires_in.map(|d| now.saturating_add(d)),
        refreshed_at: now,
        scopes: response.scopes.unwrap_or_else(|| old.scopes.clone()),
        account_id: response.account_id.or_else(|| old.account_id.clone()),
        token_type: response.token_type.or_else(|| old.token_type.clone()),
        extra,
    };
    (payload, rotated)
}

/// The payload of a brand-new grant from a code exchange.
pub fn initial_payload(now: Timestamp, response: TokenResponse, scopes: &[String]) -> GrantPayload {
    GrantPayload {
        refresh_token: response.refresh_token,
        access_token: Some(response.access_token),
        access_expires_at: response.expires_in.map(|d| now.saturating_add(d)),
        refreshed_at: now,
        scopes: response.scopes.unwrap_or_else(|| scopes.to_vec()),
        account_id: response.account_id,
        token_type: response.token_type,
        extra: response.extra,
    }
}

/// Whether the stored refresh token is still the one a refresh used, i.e.
/// nobody else refreshed (and rotated) in between.
pub fn same_refresh_token(a: Option<&SecretString>, b: Option<&SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        (None, None) => true,
        _ => false,
    }
}

/// By when the grant must be refreshed again before the provider forgets it.
pub fn refresh_deadline(payload: &GrantPayload, provider: &ProviderSpec) -> Option<Timestamp> {
    payload.refresh_token.as_ref()?;
    provider.refresh_idle_lifetime.map(|idle| payload.refreshed_at.saturating_add(idle))
}

/// When to retry after a transient provider failure, with jitter in [½, 1]
/// of the exponential step so many clients do not retry in lockstep.
pub fn backoff(base: Duration, attempt: u32, jitter: u8) -> Duration {
    let step = base.saturating_mul(1u32 << attempt.min(10));
    step / 2 + step.mul_f64(f64::from(jitter) / 255.0 / 2.0)
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before letting one probe through.
    pub cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy { failure_threshold: 5, cool_down: Duration::from_secs(30) }
    }
}

/// The state of a per-provider circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; counting consecutive failures.
    Closed {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// Requests are refused until `until`.
    Open {
        /// End of the cool-down.
        until: Timestamp,
    },
    /// One probe request is in flight; others are refused.
    HalfOpen,
}

/// Stops a dead provider from being hammered: opens after repeated failures,
/// lets one probe through after a cool-down, closes on its success.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    policy: BreakerPolicy,
    state: BreakerState,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy) -> Self {
        CircuitBreaker { policy, state: BreakerState::Closed { failures: 0 } }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// May a request go to the provider now? `Err(retry_after)` if not.
    pub fn permit(&mut self, now: Timestamp) -> Result<(), Duration> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                Ok(())
            }
            BreakerState::Open { until } => Err(until.duration_since(now).max(Duration::from_secs(1))),
            BreakerState::HalfOpen => Err(Duration::from_secs(1)),
        }
    }

    /// The provider answered (whatever it said, it is alive).
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// The provider failed transiently.
    pub fn on_failure(&mut self, now: Timestamp) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.policy.failure_threshold => {
                BreakerState::Closed { failures: failures + 1 }
            }
            _ => BreakerState::Open { until: now.saturating_add(self.policy.cool_down) },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_unix_secs(1_000_000 + secs)
    }

    fn payload(expires: Option<u64>, refreshed: u64, refresh: bool) -> GrantPayload {
        GrantPayload {
            refresh_token: refresh.then(|| SecretString::from("r1".to_owned())),
            access_token: Some(SecretString::from("a1".to_owned())),
            access_expires_at: expires.map(t),
            refreshed_at: t(refreshed),
            scopes: vec!["s".into()],
            account_id: None,
            token_type: None,
            extra: vec![],
        }
    }

    #[test]
    fn decisions_follow_validity_state_and_refresh_token() {
        use TokenDecision::*;
        let five_min = Duration::from_secs(300);
        // (now, expiry, refreshed, has refresh token, state, min validity) → decision
        let cases = [
            (0, Some(3600), 0, true, GrantState::Active, five_min, Serve),
            (3299, Some(3600), 0, true, GrantState::Active, five_min, Serve),
            (3301, Some(3600), 0, true, GrantState::Active, five_min, Refresh),
            (3600, Some(3600), 0, true, GrantState::Active, Duration::ZERO, Refresh),
            (0, Some(3600), 0, true, GrantState::Active, Duration::from_secs(4000), Serve), // capped at half: 1800
            (1801, Some(3600), 0, true, GrantState::Active, Duration::from_secs(4000), Refresh),
            (0, Some(60), 0, true, GrantState::Active, five_min, Serve), // 60 s tokens: need 30 s, not 300
            (29, Some(60), 0, true, GrantState::Active, five_min, Serve),
            (31, Some(60), 0, true, GrantState::Active, five_min, Refresh),
            (999_999, None, 0, false, GrantState::Active, five_min, Serve), // never expires
            (3500, Some(3600), 0, false, GrantState::Active, five_min, Serve), // nothing better to give
            (3600, Some(3600), 0, false, GrantState::Active, five_min, ReauthRequired),
            (0, Some(3600), 0, true, GrantState::ReauthRequired, five_min, ReauthRequired),
            (0, Some(3600), 0, true, GrantState::Revoked, five_min, Revoked),
        ];
        for (now, exp, refreshed, refresh, state, min, want) in cases {
            let p = payload(exp, refreshed, refresh);
            assert_eq!(decide(t(now), state, &p, min), want, "now={now} exp={exp:?} min={min:?}");
        }
        let mut no_access = payload(Some(3600), 0, true);
        no_access.access_token = None;
        assert_eq!(decide(t(0), GrantState::Active, &no_access, five_min), Refresh);
    }

    #[test]
    fn refresh_keeps_the_old_refresh_token_unless_rotated() {
        let old = payload(Some(3600), 0, true);
        let response = |refresh: Option<&str>| TokenResponse {
            access_token: SecretString::from("a2".to_owned()),
            refresh_token: refresh.map(|r| SecretString::from(r.to_owned())),
            expires_in: Some(Duration::from_secs(600)),
            scopes: None,
            token_type: Some("Bearer".into()),
            account_id: None,
            extra: vec![("hostname".into(), "eapi".into())],
        };
        let (p, rotated) = apply_refresh(t(100), &old, response(None));
        assert!(!rotated);
        assert_eq!(p.refresh_token.as_ref().unwrap().expose_secret(), "r1");
        assert_eq!(p.access_token.as_ref().unwrap().expose_secret(), "a2");
        assert_eq!((p.access_expires_at, p.refreshed_at, p.scopes.clone()), (Some(t(700)), t(100), vec!["s".into()]));
        assert_eq!(p.extra, vec![("hostname".to_owned(), "eapi".to_owned())]);
        let (_, rotated) = apply_refresh(t(100), &old, response(Some("r1")));
        assert!(!rotated, "the same refresh token again is no rotation");
        let (p, rotated) = apply_refresh(t(100), &old, response(Some("r2")));
        assert!(rotated);
        assert_eq!(p.refresh_token.unwrap().expose_secret(), "r2");
    }

    #[test]
    fn refresh_deadline_follows_idle_lifetime_and_last_refresh() {
        let mut spec = ProviderSpec::new("microsoft");
        assert_eq!(refresh_deadline(&payload(Some(10), 50, true), &spec), None);
        spec.refresh_idle_lifetime = Some(Duration::from_secs(90 * 86_400));
        assert_eq!(refresh_deadline(&payload(Some(10), 50, true), &spec), Some(t(50 + 90 * 86_400)));
        assert_eq!(refresh_deadline(&payload(None, 50, false), &spec), None, "nothing to keep alive");
    }

    #[test]
    fn breaker_opens_after_threshold_and_half_opens_after_cool_down() {
        let mut b = CircuitBreaker::new(BreakerPolicy { failure_threshold: 3, cool_down: Duration::from_secs(30) });
        for _ in 0..2 {
            assert!(b.permit(t(0)).is_ok());
            b.on_failure(t(0));
        }
        assert_eq!(b.state(), BreakerState::Closed { failures: 2 });
        b.on_failure(t(0));
        assert_eq!(b.state(), BreakerState::Open { until: t(30) });
        assert_eq!(b.permit(t(10)), Err(Duration::from_secs(20)));
        assert!(b.permit(t(30)).is_ok(), "one probe after the cool-down");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.permit(t(30)).is_err(), "only one probe at a time");
        b.on_failure(t(31));
        assert_eq!(b.state(), BreakerState::Open { until: t(61) });
        assert!(b.permit(t(61)).is_ok());
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        b.on_failure(t(62));
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 }, "success resets the count");
    }

    #[test]
    fn backoff_grows_and_stays_within_jitter_bounds() {
        let base = Duration::from_millis(200);
        assert_eq!(backoff(base, 0, 0), Duration::from_millis(100));
        assert_eq!(backoff(base, 0, 255), Duration::from_millis(200));
        assert_eq!(backoff(base, 2, 0), Duration::from_millis(400));
        assert!(backoff(base, 2, 128) > Duration::from_millis(600));
        assert_eq!(backoff(base, 40, 255), backoff(base, 10, 255), "capped");
    }
}
