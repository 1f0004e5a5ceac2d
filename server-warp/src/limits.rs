//! Rate limits (token buckets per AuthID keyid and per client address) and a
//! growing back-off on failed AuthID secrets. Time is passed in, so the
//! tests drive it.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use latchkey_core::KeyId;

use crate::config::LimitsConfig;

/// Buckets kept at most before idle (full) ones are dropped.
const MAX_TRACKED: usize = 100_000;
/// Failures of one keyid allowed before back-off starts.
const FREE_FAILURES: u32 = 5;
/// The longest back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(900);
/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Token buckets: `per_minute` requests, refilled evenly, bursts up to `per_minute`.
struct Buckets<K> {
    capacity: f64,
    per_sec: f64,
    map: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq> Buckets<K> {
    fn new(per_minute: u32) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Buckets { capacity, per_sec: capacity / 60.0, map: Mutex::default() }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut map = lock(&self.map);
        if map.len() >= MAX_TRACKED {
            let (capacity, per_sec) = (self.capacity, self.per_sec);
            map.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < capacity
            });
        }
        let (tokens, at) = map.entry(key).or_insert((self.capacity, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_sec).min(self.capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            // Whole seconds, rounded up: Retry-After never says "retry now" too early.
            let wait = ((1.0 - *tokens) / self.per_sec).ceil().clamp(1.0, 60.0);
            Err(Duration::from_secs_f64(wait))
        }
    }
}

struct Failures {
    count: u32,
    last: Instant,
}

/// What the token and hand-off routes are limited by.
pub struct Limiter {
    per_keyid: Buckets<KeyId>,
    per_address: Buckets<IpAddr>,
    fetch_per_address: Buckets<IpAddr>,
    /// Failed secrets per (keyid, client address): a keyid is public, so
    /// whoever sends wrong secrets for it backs off alone; its owner, at
    /// another address, never waits for them.
    failures: Mutex<HashMap<(KeyId, IpAddr), Failures>>,
    /// How many entries `failures` holds, readable without its lock: the
    /// common case (no failed secrets anywhere) takes no lock at all.
    failing: AtomicUsize,
}

impl Limiter {
    /// Limits as configured.
    pub fn new(config: &LimitsConfig) -> Self {
        Limiter {
            per_keyid: Buckets::new(config.token_requests_per_minute_per_keyid),
            per_address: Buckets::new(config.token_requests_per_minute_per_address),
            fetch_per_address: Buckets::new(config.fetch_requests_per_minute_per_address),
            failures: Mutex::default(),
            failing: AtomicUsize::new(0),
        }
    }

    /// A token request, before its AuthID is checked: counted per address,
    /// and refused while this address is backing off after failed secrets
    /// for this keyid. The per-keyid bucket is charged only once the secret
    /// proved right ([`Limiter::authenticated`]), so strangers who know a
    /// keyid cannot spend its owner's allowance.
    pub fn token_request(&self, keyid: Option<KeyId>, address: IpAddr, now: Instant) -> Result<(), Duration> {
        self.per_address.take(address, now)?;
        if let Some(keyid) = keyid {
            self.backoff(&(keyid, address), now)?;
        }
        Ok(())
    }

    /// A token request whose AuthID was right: counted against its keyid.
    pub fn authenticated(&self, keyid: KeyId, now: Instant) -> Result<(), Duration> {
        self.per_keyid.take(keyid, now)
    }

    /// A hand-off or device poll from `address`.
    pub fn fetch_request(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        self.fetch_per_address.take(address, now)
    }

    fn backoff(&self, key: &(KeyId, IpAddr), now: Instant) -> Result<(), Duration> {
        if self.failing.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let failures = lock(&self.failures);
        let Some(f) = failures.get(key) else { return Ok(()) };
        if f.count <= FREE_FAILURES || now.saturating_duration_since(f.last) >= FAILURE_MEMORY {
            return Ok(());
        }
        let wait = Duration::from_secs(1u64 << (f.count - FREE_FAILURES).min(20)).min(MAX_BACKOFF);
        let until = f.last + wait;
        if now < until { Err(until - now) } else { Ok(()) }
    }

    /// A request from `address` presented a wrong secret for this keyid (or an
    /// unknown keyid); answers whether this failure engages the back-off.
    pub fn failed_secret(&self, keyid: KeyId, address: IpAddr, now: Instant) -> bool {
        let mut failures = lock(&self.failures);
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, f| now.saturating_duration_since(f.last) < FAILURE_MEMORY);
        }
        let f = failures.entry((keyid, address)).or_insert(Failures { count: 0, last: now });
        if now.saturating_duration_since(f.last) >= FAILURE_MEMORY {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        let engaged = f.count == FREE_FAILURES + 1;
        self.failing.store(failures.len(), Ordering::Release);
        engaged
    }

    /// A request with this keyid from `address` succeeded: that address's
    /// failures for it are forgotten.
    pub fn succeeded(&self, keyid: &KeyId, address: IpAddr) {
        if self.failing.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut failures = lock(&self.failures);
        failures.remove(&(*keyid, address));
        self.failing.store(failures.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_refill_evenly() {
        let limiter = Limiter::new(&LimitsConfig {
            token_requests_per_minute_per_keyid: 3,
            token_requests_per_minute_per_address: 1000,
            fetch_requests_per_minute_per_address: 2,
        });
        let t0 = Instant::now();
        let key = KeyId::from_bytes([1; 16]);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert!(
                limiter.token_request(Some(key), addr, t0).is_ok(),
                "before the secret is checked: per address only"
            );
        }
        for _ in 0..3 {
            assert!(limiter.authenticated(key, t0).is_ok());
        }
        let wait = limiter.authenticated(key, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20), "one token every 20 s at 3/min");
        assert!(limiter.authenticated(KeyId::from_bytes([2; 16]), t0).is_ok(), "per keyid");
        assert!(limiter.authenticated(key, t0 + Duration::from_secs(20)).is_ok(), "refilled");
        assert!(limiter.fetch_request(addr, t0).is_ok() && limiter.fetch_request(addr, t0).is_ok());
        assert!(limiter.fetch_request(addr, t0).is_err());
        assert!(limiter.fetch_request("192.0.2.2".parse().unwrap(), t0).is_ok(), "per address");
    }

    #[test]
    fn failed_secrets_back_off_growing_and_success_resets() {
        let limiter = Limiter::new(&LimitsConfig::default());
        let t0 = Instant::now();
        let key = KeyId::from_bytes([3; 16]);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert!(!limiter.failed_secret(key, addr, t0));
        }
        assert!(limiter.token_request(Some(key), addr, t0).is_ok(), "five failures are free");
        assert!(limiter.failed_secret(key, addr, t0), "the sixth engages the back-off");
        assert_eq!(limiter.token_request(Some(key), addr, t0).unwrap_err(), Duration::from_secs(2));
        assert!(!limiter.failed_secret(key, addr, t0), "engaged once, not again");
        assert_eq!(limiter.token_request(Some(key), addr, t0).unwrap_err(), Duration::from_secs(4), "growing");
        assert!(limiter.token_request(Some(key), addr, t0 + Duration::from_secs(4)).is_ok());
        for _ in 0..30 {
            let _ = limiter.failed_secret(key, addr, t0);
        }
        assert_eq!(limiter.token_request(Some(key), addr, t0).unwrap_err(), MAX_BACKOFF, "capped");
        limiter.succeeded(&key, addr);
        assert!(limiter.token_request(Some(key), addr, t0).is_ok());
        for _ in 0..6 {
            let _ = limiter.failed_secret(key, addr, t0);
        }
        assert!(limiter.token_request(Some(key), addr, t0).is_err(), "failures after a reset count again");
        let owner: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(limiter.token_request(Some(key), owner, t0).is_ok(), "another address never waits for them");
    }
}
