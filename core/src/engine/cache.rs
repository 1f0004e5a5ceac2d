//! The per-instance access-token cache.
//!
//! Indexed by an HMAC of the whole AuthID under a random per-instance key, so
//! a lookup with a wrong secret can never hit and the map holds no AuthID.
//! Bounded in entries and age; purged by grant on revocation and on "grant
//! changed" notices, and whole when the store says notices may have been
//! lost (`Notice::Resync`). A purge also bumps an epoch, and an insert that began
//! before the latest purge is dropped, so a request racing a revocation
//! cannot put a revoked grant's token back.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
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

/// One cached token: its key and all a hit reads before it answers, in one
/// cache line (the map's buckets are this size and aligned to it), so that a
/// hit among many AuthIDs waits for one line of the map, not two, and for
/// the token itself only when it is served. The grant and the insertion
/// order live in [`Inner::by_age`], which only inserts and removals read.
#[repr(align(64))]
struct Entry {
    key: CacheKey,
    /// Shared with the requests it answers: a hit copies nothing.
    token: Arc<TokenGrant>,
    inserted_at: Timestamp,
    /// The token's expiry in Unix milliseconds, copied from it; [`NEVER`]
    /// for a token that does not expire.
    expires_ms: u64,
    /// The token's lifetime when obtained, in nanoseconds, for the
    /// half-lifetime cap; [`NEVER`] when it has none.
    lifetime_ns: u64,
}

/// [`Entry`]'s "none" for its expiry and lifetime. An expiry this far away
/// (half a billion years) or a lifetime this long (584 years) is served
/// exactly as none would be: the half-lifetime cap of a lifetime that long
/// never binds.
const NEVER: u64 = u64::MAX;

const _: () = assert!(std::mem::size_of::<Entry>() == 64);

impl Entry {
    fn expires_at(&self) -> Option<Timestamp> {
        (self.expires_ms != NEVER).then(|| Timestamp::from_unix_millis(self.expires_ms))
    }

    fn lifetime(&self) -> Option<Duration> {
        (self.lifetime_ns != NEVER).then(|| Duration::from_nanos(self.lifetime_ns))
    }
}

/// The map finds an entry by its key: hashed and compared as the key alone.
impl Borrow<CacheKey> for Entry {
    fn borrow(&self) -> &CacheKey {
        &self.key
    }
}

impl Hash for Entry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Entry {}

#[derive(Default)]
struct Inner {
    entries: HashSet<Entry, BuildHasherDefault<FirstWord>>,
    /// Every entry by when it was inserted (the key breaks ties), with its grant.
    by_age: BTreeMap<(Timestamp, CacheKey), GrantId>,
    by_grant: HashMap<GrantId, Vec<CacheKey>>,
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
        let fresh_enough = match entry.expires_at() {
            None => true,
            Some(expiry) => {
                let left = expiry.duration_since(now);
                !left.is_zero() && left >= required_validity(min_validity, entry.lifetime())
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
            let Some(((_, oldest), grant)) = inner.by_age.pop_first() else { break };
            inner.entries.remove(&oldest);
            inner.unlink(&grant, &oldest);
        }
        inner.by_age.insert((now, key), grant);
        inner.by_grant.entry(grant).or_default().push(key);
        let expires_ms = token.expires_at.map_or(NEVER, Timestamp::unix_millis);
        let lifetime_ns = lifetime.map_or(NEVER, |l| u64::try_from(l.as_nanos()).unwrap_or(NEVER));
        inner.entries.insert(Entry { key, token, inserted_at: now, expires_ms, lifetime_ns });
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
        if let Some(entry) = self.entries.take(key) {
            if let Some(grant) = self.by_age.remove(&(entry.inserted_at, entry.key)) {
                self.unlink(&grant, key);
            }
        }
    }

    /// Drops `key` from its grant's list.
    fn unlink(&mut self, grant: &GrantId, key: &CacheKey) {
        if let Some(keys) = self.by_grant.get_mut(grant) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_grant.remove(grant);
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

    /// A cache of `capacity` entries with a ten-minute ttl, keyed from `rng`.
    fn cache_of(rng: &SeqRandom, capacity: usize) -> TokenCache {
        TokenCache::new(SymmetricKey::generate(rng), capacity, Duration::from_secs(600))
    }

    fn t(s: u64) -> Timestamp {
        Timestamp::from_unix_secs(1_000_000 + s)
    }

    #[test]
    fn a_wrong_secret_never_hits() {
        let rng = SeqRandom::new(1);
        let cache = cache_of(&rng, 10);
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
        let cache = cache_of(&rng, 2);
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
        let cache = cache_of(&rng, 10);
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

    #[test]
    fn a_short_lived_token_is_served_until_half_its_lifetime_and_one_without_expiry_until_the_ttl() {
        let rng = SeqRandom::new(4);
        let cache = cache_of(&rng, 10);
        let (short, forever) = (AuthId::generate(&rng), AuthId::generate(&rng));
        let e = cache.epoch();
        // A 120 s token, asked for 300 s of validity: the cap is 60 s left.
        let ks = cache.key_for(&short);
        cache.insert(ks, GrantId::generate(&rng), token(Some(t(120))), Some(Duration::from_secs(120)), t(0), e);
        assert!(cache.get(&ks, t(60), Duration::from_secs(300)).is_some(), "60 s left of 120: half its lifetime");
        assert!(cache.get(&ks, t(61), Duration::from_secs(300)).is_none(), "59 s left is under half");
        let kf = cache.key_for(&forever);
        cache.insert(kf, GrantId::generate(&rng), token(None), None, t(0), e);
        assert!(cache.get(&kf, t(599), Duration::from_secs(300)).is_some(), "no expiry: served");
        assert!(cache.get(&kf, t(600), Duration::ZERO).is_none(), "but not past the ttl");
    }

    #[test]
    fn replacing_and_evicting_keep_the_grant_index_in_step() {
        let rng = SeqRandom::new(5);
        let cache = cache_of(&rng, 2);
        let ids: Vec<AuthId> = (0..3).map(|_| AuthId::generate(&rng)).collect();
        let (g0, g1) = (GrantId::generate(&rng), GrantId::generate(&rng));
        let e = cache.epoch();
        let k: Vec<CacheKey> = ids.iter().map(|id| cache.key_for(id)).collect();
        cache.insert(k[0], g0, token(None), None, t(0), e);
        cache.insert(k[0], g0, token(None), None, t(1), e); // replaced, not doubled
        cache.insert(k[1], g1, token(None), None, t(1), e);
        assert_eq!(cache.len(), 2);
        cache.insert(k[2], g1, token(None), None, t(2), e); // evicts k[0], the oldest
        assert!(cache.get(&k[0], t(3), Duration::ZERO).is_none());
        assert_eq!(cache.len(), 2);
        {
            let inner = cache.lock();
            assert_eq!(inner.by_age.len(), 2);
            assert!(!inner.by_grant.contains_key(&g0), "an evicted grant leaves the index");
            assert_eq!(inner.by_grant[&g1].len(), 2);
        }
        cache.purge_grant(&g1);
        assert_eq!(cache.len(), 0);
        let inner = cache.lock();
        assert!(inner.by_age.is_empty() && inner.by_grant.is_empty());
    }
}
