//! The per-instance access-token cache.
//!
//! Indexed by an HMAC of the whole AuthID under a random per-instance key, so
//! a lookup with a wrong secret can never hit and the map holds no AuthID.
//! Bounded in entries and age; purged by grant on revocation and on "grant
//! changed" notices, and whole when the store says notices may have been
//! lost (`Notice::Resync`). A purge also bumps an epoch, and an insert that began
//! before the latest purge is dropped, so a request racing a revocation
//! cannot put a revoked grant's token back.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::authid::AuthId;
use crate::keys::{KeyedMac, SymmetricKey};
use crate::records::GrantId;
use crate::time::Timestamp;

use super::TokenGrant;
use super::decide::required_validity;

/// The cache's key for one AuthID.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct CacheKey([u8; 32]);

/// A key hashes to its first eight bytes: it is an HMAC under the cache's
/// random key, so no client can choose AuthIDs whose keys collide — the
/// flooding that a keyed hash (std's SipHash) defends against — and the key
/// is not hashed a second time on every request.
impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
    }
}

/// Hands on the one word a [`CacheKey`] writes.
#[derive(Default)]
struct FirstWord(u64);

impl Hasher for FirstWord {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is called (by `CacheKey`); any other input is folded in.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = word;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct Entry {
    grant: GrantId,
    /// Shared with the requests it answers: a hit copies nothing.
    token: Arc<TokenGrant>,
    /// The token's lifetime when obtained, for the half-lifetime cap.
    lifetime: Option<Duration>,
    inserted_at: Timestamp,
    seq: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<CacheKey, Entry, BuildHasherDefault<FirstWord>>,
    by_age: BTreeMap<(Timestamp, u64), CacheKey>,
    by_grant: HashMap<GrantId, Vec<CacheKey>>,
    seq: u64,
    epoch: u64,
}

pub(crate) struct TokenCache {
    key: KeyedMac,
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl TokenCache {
    pub(crate) fn new(key: SymmetricKey, capacity: usize, ttl: Duration) -> Self {
        TokenCache { key: KeyedMac::new(&key), capacity: capacity.max(1), ttl, inner: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn key_for(&self, authid: &AuthId) -> CacheKey {
        CacheKey(self.key.of(&[authid.keyid().as_bytes(), authid.secret().expose_secret()]))
    }

    /// The purge epoch; pass it back to [`TokenCache::insert`].
    #[cfg(test)]
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// A cached token with at least the required validity left.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &CacheKey, now: Timestamp, min_validity: Duration) -> Option<Arc<TokenGrant>> {
        self.lookup(key, now, min_validity).ok()
    }

    /// [`TokenCache::get`] and, on a miss, the purge epoch to pass back to
    /// [`TokenCache::insert`]: one lock for the hit path.
    /// A hit shares the cached token: nothing is copied or allocated.
    pub(crate) fn lookup(
        &self,
        key: &CacheKey,
        now: Timestamp,
        min_validity: Duration,
    ) -> Result<Arc<TokenGrant>, u64> {
        let inner = self.lock();
        Self::fresh(&inner, key, now, self.ttl, min_validity).ok_or(inner.epoch)
    }

    fn fresh(
        inner: &Inner,
        key: &CacheKey,
        now: Timestamp,
        ttl: Duration,
        min_validity: Duration,
    ) -> Option<Arc<TokenGrant>> {
        let entry = inner.entries.get(key)?;
        if now.duration_since(entry.inserted_at) >= ttl {
            return None;
        }
        let fresh_enough = match entry.token.expires_at {
            None => true,
            Some(expiry) => {
                let left = expiry.duration_since(now);
                !left.is_zero() && left >= required_validity(min_validity, entry.lifetime)
            }
        };
        fresh_enough.then(|| Arc::clone(&entry.token))
    }

    /// Caches a token unless a purge happened since `epoch` was read.
    pub(crate) fn insert(
        &self,
        key: CacheKey,
        grant: GrantId,
        token: Arc<TokenGrant>,
        lifetime: Option<Duration>,
        now: Timestamp,
        epoch: u64,
    ) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        inner.remove(&key);
        while inner.entries.len() >= self.capacity {
            let Some((_, oldest)) = inner.by_age.pop_first() else { break };
            inner.remove(&oldest);
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.by_age.insert((now, seq), key);
        inner.by_grant.entry(grant).or_default().push(key);
        inner.entries.insert(key, Entry { grant, token, lifetime, inserted_at: now, seq });
    }

    /// Drops every entry of a grant, and fences off inserts already under way.
    pub(crate) fn purge_grant(&self, grant: &GrantId) {
        let mut inner = self.lock();
        inner.epoch += 1;
        for key in inner.by_grant.remove(grant).unwrap_or_default() {
            inner.remove(&key);
        }
    }

    /// Drops every entry, and fences off inserts already under way.
    pub(crate) fn purge_all(&self) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.entries.clear();
        inner.by_age.clear();
        inner.by_grant.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Inner {
    fn remove(&mut self, key: &CacheKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_age.remove(&(entry.inserted_at, entry.seq));
            if let Some(keys) = self.by_grant.get_mut(&entry.grant) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_grant.remove(&entry.grant);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SeqRandom;
    use secrecy::SecretString;

    fn token(expires: Option<Timestamp>) -> Arc<TokenGrant> {
        Arc::new(TokenGrant {
            access_token: SecretString::from("a".to_owned()),
            expires_at: expires,
            service: "svc".into(),
            scopes: vec![],
            token_type: None,
            refresh_deadline: None,
        })
    }

    fn t(s: u64) -> Timestamp {
        Timestamp::from_unix_secs(1_000_000 + s)
    }

    #[test]
    fn a_wrong_secret_never_hits() {
        let rng = SeqRandom::new(1);
        let cache = TokenCache::new(SymmetricKey::generate(&rng), 10, Duration::from_secs(600));
        let id = AuthId::generate(&rng);
        let mut forged = *id.secret().expose_secret();
        forged[0] ^= 1;
        let forged = AuthId::new(id.keyid(), crate::authid::AuthIdSecret::from_bytes(forged));
        let epoch = cache.epoch();
        cache.insert(cache.key_for(&id), GrantId::generate(&rng), token(Some(t(3600))), None, t(0), epoch);
        assert!(cache.get(&cache.key_for(&id), t(1), Duration::ZERO).is_some());
        assert!(cache.get(&cache.key_for(&forged), t(1), Duration::ZERO).is_none());
    }

    #[test]
    fn entries_expire_by_ttl_and_validity_and_capacity_evicts_the_oldest() {
        let rng = SeqRandom::new(2);
        let cache = TokenCache::new(SymmetricKey::generate(&rng), 2, Duration::from_secs(600));
        let ids: Vec<AuthId> = (0..3).map(|_| AuthId::generate(&rng)).collect();
        let grant = GrantId::generate(&rng);
        for (i, id) in ids.iter().enumerate() {
            let e = cache.epoch();
            cache.insert(
                cache.key_for(id),
                grant,
                token(Some(t(3600))),
                Some(Duration::from_secs(3600)),
                t(i as u64),
                e,
            );
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&cache.key_for(&ids[0]), t(5), Duration::ZERO).is_none(), "oldest evicted");
        let k = cache.key_for(&ids[2]);
        assert!(cache.get(&k, t(5), Duration::from_secs(300)).is_some());
        assert!(cache.get(&k, t(3400), Duration::from_secs(300)).is_none(), "not enough validity left");
        assert!(cache.get(&k, t(602), Duration::ZERO).is_none(), "older than the ttl");
    }

    #[test]
    fn purge_drops_the_grant_and_fences_inserts_that_started_before() {
        let rng = SeqRandom::new(3);
        let cache = TokenCache::new(SymmetricKey::generate(&rng), 10, Duration::from_secs(600));
        let (a, b) = (AuthId::generate(&rng), AuthId::generate(&rng));
        let (ga, gb) = (GrantId::generate(&rng), GrantId::generate(&rng));
        let e = cache.epoch();
        cache.insert(cache.key_for(&a), ga, token(None), None, t(0), e);
        cache.insert(cache.key_for(&b), gb, token(None), None, t(0), e);
        let stale_epoch = cache.epoch();
        cache.purge_grant(&ga);
        assert!(cache.get(&cache.key_for(&a), t(1), Duration::ZERO).is_none());
        assert!(cache.get(&cache.key_for(&b), t(1), Duration::ZERO).is_some(), "other grants stay");
        cache.insert(cache.key_for(&a), ga, token(None), None, t(1), stale_epoch);
        assert!(cache.get(&cache.key_for(&a), t(1), Duration::ZERO).is_none(), "a racing insert is dropped");
    }
}
