//! Rate limits (token buckets per AuthID keyid and per client address) and a
//! growing back-off on failed AuthID secrets. Time is passed in, so the
//! tests drive it.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use latchkey_core::KeyId;

use crate::config::{Cidr, LimitsConfig};

/// Entries one limiter map keeps at most; past that the oldest is forgotten.
const MAX_TRACKED: usize = 100_000;
/// Keyids whose token buckets are kept at most. Only a keyid whose secret
/// proved right gets a bucket, so this map grows with the broker's own
/// users, not with what strangers send, and refilled buckets are forgotten
/// as new ones come ([`Buckets::take`]), so it holds the users of about the
/// last minute: sized so that even a broker with more users active in a
/// minute than [`MAX_TRACKED`] keeps every spent bucket (each shard holds a
/// sixteenth, and the fullest shard fills first). Full, it takes about
/// 125 MB.
const MAX_KEYIDS: usize = 1_000_000;
/// Each map is split in this many independently locked shards, so requests
/// from different clients rarely wait for one another.
const SHARDS: usize = 16;
/// Failures of one keyid allowed before back-off starts.
const FREE_FAILURES: u32 = 5;
/// The longest back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(900);
/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The client's address: the peer, or — only when the peer is a trusted
/// proxy — the last address in `X-Forwarded-For` that is not one.
/// `forwarded` is every `X-Forwarded-For` line in the order received (a
/// proxy may add its own line rather than extend the last one): they are
/// one list, walked from the right. A hop that is not an address stops the
/// walk at the last trusted hop.
pub fn client_address<'a>(
    peer: Option<SocketAddr>,
    forwarded: impl IntoIterator<Item = &'a str>,
    proxies: &[Cidr],
) -> IpAddr {
    let peer = peer.map(|p| p.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let trusted = |ip: IpAddr| proxies.iter().any(|c| c.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let lines: Vec<&str> = forwarded.into_iter().collect();
    let mut client = peer;
    for hop in lines.iter().rev().flat_map(|line| line.rsplit(',')) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if trusted(ip) => client = ip,
            Ok(ip) => return ip,
            Err(_) => return client,
        }
    }
    client
}

/// What a client address is limited as: an IPv4 address, or the /64 an
/// IPv6 address is in (one subscriber's allocation, which a client can walk
/// through freely). An IPv4-mapped IPv6 address counts as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKey {
    /// One IPv4 address.
    V4([u8; 4]),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl AddressKey {
    /// The key `ip` is limited under.
    pub fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.octets()),
                None => AddressKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// A map that holds at most `capacity` entries and, when full, forgets the
/// one that has waited longest in its queue (inserted longest ago, or moved
/// to the back longest ago by [`Bounded::sweep`]): O(1) per insertion
/// (amortised), never a scan of the whole map under the lock.
struct Bounded<K, V> {
    map: HashMap<K, V, BuildHasherDefault<Carried>>,
    /// Keys in insertion order, but for those [`Bounded::sweep`] moved to
    /// the back; may hold keys already removed (skipped when evicting or
    /// sweeping, and dropped when the queue is rebuilt).
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Hash + Eq + Copy, V> Bounded<K, V> {
    fn new(capacity: usize) -> Self {
        Bounded { map: HashMap::default(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// The value for `key`, and whether it was inserted now. One hash
    /// lookup when `key` is there (every request after a client's first),
    /// two only when a full map makes room for it.
    fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> (&mut V, bool) {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            while self.map.len() >= self.capacity {
                match self.order.pop_front() {
                    Some(oldest) => {
                        self.map.remove(&oldest);
                    }
                    None => break,
                }
            }
        }
        if self.order.len() >= 2 * self.capacity {
            // Removed keys pile up in the queue; rebuilding it now and
            // then keeps it bounded (amortised O(1): it grows only by
            // insertions).
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
        match self.map.entry(key) {
            Entry::Occupied(e) => (e.into_mut(), false),
            Entry::Vacant(e) => {
                self.order.push_back(key);
                (e.insert(make()), true)
            }
        }
    }

    /// Looks at the `steps` keys longest in the queue: forgets each whose
    /// value `idle` says carries nothing, and moves the others to the back.
    fn sweep(&mut self, steps: usize, idle: impl Fn(&V) -> bool) {
        for _ in 0..steps {
            let Some(key) = self.order.pop_front() else { return };
            match self.map.get(&key) {
                None => {}
                Some(value) if idle(value) => {
                    self.map.remove(&key);
                }
                Some(_) => self.order.push_back(key),
            }
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key)
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A key with its hash, computed once per request: [`Sharded`] picks the
/// shard by it, and the shard's table reuses it instead of hashing again.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Hashed<K> {
    hash: u64,
    key: K,
}

impl<K> Hash for Hashed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hasher of [`Bounded`]'s table: a [`Hashed`] key hashes to the hash
/// it carries. (Any other key is folded in byte by byte, as the tests' plain
/// keys are.)
#[derive(Default)]
struct Carried(u64);

impl Hasher for Carried {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// [`Bounded`] maps in independently locked shards. Keys are hashed once,
/// with SipHash under a random key (clients choose addresses and keyids, so
/// they must not be able to aim many at one shard or one probe sequence).
struct Sharded<K, V> {
    shards: Vec<Mutex<Bounded<Hashed<K>, V>>>,
    hasher: RandomState,
}

impl<K: Hash + Eq + Copy, V> Sharded<K, V> {
    fn new(capacity: usize) -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::new(Bounded::new(capacity / SHARDS))).collect(),
            hasher: RandomState::new(),
        }
    }

    /// The shard `key` is in, locked, and the key with its hash. A shard's
    /// table indexes by the hash's low bits and tags entries with its top
    /// seven, so the shard is picked by bits in between: every key of a
    /// shard shares them, and they matter to neither.
    fn shard(&self, key: K) -> (MutexGuard<'_, Bounded<Hashed<K>, V>>, Hashed<K>) {
        let hash = self.hasher.hash_one(key);
        (lock(&self.shards[(hash >> 32) as usize % SHARDS]), Hashed { hash, key })
    }
}

/// Token buckets: `per_minute` requests, refilled evenly, bursts up to `per_minute`.
struct Buckets<K> {
    capacity: f64,
    per_sec: f64,
    map: Sharded<K, (f64, Instant)>,
}

impl<K: Hash + Eq + Copy> Buckets<K> {
    fn new(per_minute: u32, tracked: usize) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Buckets { capacity, per_sec: capacity / 60.0, map: Sharded::new(tracked) }
    }

    /// Takes one token, or says how long until one is there. A bucket's
    /// time never goes back: requests read the clock before they wait for
    /// the shard, so they may arrive out of order, and one that read it
    /// earlier refills nothing (it must not move the bucket's time back, or
    /// the next request would be credited that interval a second time).
    ///
    /// A client new to the map also has the map look at two of the buckets
    /// in it longest and forget those that have refilled: a full bucket is
    /// what a client the map does not know gets, so forgetting it loses
    /// nothing, and the map holds the clients of about the last minute (a
    /// bucket refills in at most 60 s), not every client since start.
    fn take(&self, key: K, now: Instant) -> Result<(), Duration> {
        let (mut shard, key) = self.map.shard(key);
        let ((tokens, at), inserted) = shard.get_or_insert_with(key, || (self.capacity, now));
        *tokens = (*tokens + self.refill(*at, now)).min(self.capacity);
        *at = (*at).max(now);
        let taken = if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            // Whole seconds, rounded up: Retry-After never says "retry now" too early.
            let wait = ((1.0 - *tokens) / self.per_sec).ceil().clamp(1.0, 60.0);
            Err(Duration::from_secs_f64(wait))
        };
        if inserted {
            shard.sweep(2, |&(tokens, at)| tokens + self.refill(at, now) >= self.capacity);
        }
        taken
    }

    /// Tokens a bucket last charged `at` has gained by `now`.
    fn refill(&self, at: Instant, now: Instant) -> f64 {
        now.saturating_duration_since(at).as_secs_f64() * self.per_sec
    }
}

struct Failures {
    count: u32,
    last: Instant,
}

/// What the token and hand-off routes are limited by.
pub struct Limiter {
    per_keyid: Buckets<KeyId>,
    per_address: Buckets<AddressKey>,
    fetch_per_address: Buckets<AddressKey>,
    creations_per_address: Buckets<AddressKey>,
    user_codes_per_address: Buckets<AddressKey>,
    /// Failed secrets per (keyid, client address): a keyid is public, so
    /// whoever sends wrong secrets for it backs off alone; its owner, at
    /// another address, never waits for them.
    failures: Sharded<(KeyId, AddressKey), Failures>,
    /// How many entries `failures` holds, readable without its lock: the
    /// common case (no failed secrets anywhere) takes no lock at all.
    failing: AtomicUsize,
}

impl Limiter {
    /// Limits as configured.
    pub fn new(config: &LimitsConfig) -> Self {
        Limiter {
            per_keyid: Buckets::new(config.token_requests_per_minute_per_keyid, MAX_KEYIDS),
            per_address: Buckets::new(config.token_requests_per_minute_per_address, MAX_TRACKED),
            fetch_per_address: Buckets::new(config.fetch_requests_per_minute_per_address, MAX_TRACKED),
            creations_per_address: Buckets::new(config.record_creations_per_minute_per_address, MAX_TRACKED),
            user_codes_per_address: Buckets::new(config.user_code_attempts_per_minute_per_address, MAX_TRACKED),
            failures: Sharded::new(MAX_TRACKED),
            failing: AtomicUsize::new(0),
        }
    }

    /// A token request, before its AuthID is checked: counted per address.
    /// Whether the address backs off for the keyid is
    /// [`Limiter::backing_off`]'s to say; the per-keyid bucket is charged
    /// only once the secret proved right ([`Limiter::authenticated`]), so
    /// strangers who know a keyid cannot spend its owner's allowance.
    pub fn token_request(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        self.per_address.take(AddressKey::of(address), now)
    }

    /// A token request whose AuthID was right: counted against its keyid.
    /// `now` may be older than a charge already made (read before a slow
    /// refresh): it then refills nothing.
    pub fn authenticated(&self, keyid: KeyId, now: Instant) -> Result<(), Duration> {
        self.per_keyid.take(keyid, now)
    }

    /// A hand-off or device poll from `address`.
    pub fn fetch_request(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        self.fetch_per_address.take(AddressKey::of(address), now)
    }

    /// A request from `address` that would store a record before anyone
    /// authenticated (a login, a hand-off, a device code): counted per
    /// address, so nobody fills the store from one place.
    pub fn record_creation(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        self.creations_per_address.take(AddressKey::of(address), now)
    }

    /// A device user code typed in from `address`, right or wrong: counted
    /// per address, so codes cannot be guessed at speed.
    pub fn user_code_attempt(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        self.user_codes_per_address.take(AddressKey::of(address), now)
    }

    /// Whether `address` is backing off after wrong secrets for `keyid`,
    /// and for how long. The caller checks the secret before it refuses: a
    /// right secret is served whatever others sent.
    pub fn backing_off(&self, keyid: KeyId, address: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.failing.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let (failures, key) = self.failures.shard((keyid, AddressKey::of(address)));
        let Some(f) = failures.get(&key) else { return Ok(()) };
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
        let (mut failures, key) = self.failures.shard((keyid, AddressKey::of(address)));
        let before = failures.len();
        let (f, _) = failures.get_or_insert_with(key, || Failures { count: 0, last: now });
        if now.saturating_duration_since(f.last) >= FAILURE_MEMORY {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        let engaged = f.count == FREE_FAILURES + 1;
        let grown = failures.len() > before;
        drop(failures);
        if grown {
            self.failing.fetch_add(1, Ordering::AcqRel);
        }
        engaged
    }

    /// A request with this keyid from `address` succeeded: that address's
    /// failures for it are forgotten.
    pub fn succeeded(&self, keyid: &KeyId, address: IpAddr) {
        if self.failing.load(Ordering::Acquire) == 0 {
            return;
        }
        let (mut failures, key) = self.failures.shard((*keyid, AddressKey::of(address)));
        if failures.remove(&key).is_some() {
            drop(failures);
            self.failing.fetch_sub(1, Ordering::AcqRel);
        }
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
            ..LimitsConfig::default()
        });
        let t0 = Instant::now();
        let key = KeyId::from_bytes([1; 16]);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert!(
                limiter.token_request(addr, t0).is_ok() && limiter.backing_off(key, addr, t0).is_ok(),
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
        assert!(limiter.backing_off(key, addr, t0).is_ok(), "five failures are free");
        assert!(limiter.failed_secret(key, addr, t0), "the sixth engages the back-off");
        assert_eq!(limiter.backing_off(key, addr, t0).unwrap_err(), Duration::from_secs(2));
        assert!(!limiter.failed_secret(key, addr, t0), "engaged once, not again");
        assert_eq!(limiter.backing_off(key, addr, t0).unwrap_err(), Duration::from_secs(4), "growing");
        assert!(limiter.backing_off(key, addr, t0 + Duration::from_secs(4)).is_ok());
        for _ in 0..30 {
            let _ = limiter.failed_secret(key, addr, t0);
        }
        assert_eq!(limiter.backing_off(key, addr, t0).unwrap_err(), MAX_BACKOFF, "capped");
        limiter.succeeded(&key, addr);
        assert!(limiter.backing_off(key, addr, t0).is_ok());
        for _ in 0..6 {
            let _ = limiter.failed_secret(key, addr, t0);
        }
        assert!(limiter.backing_off(key, addr, t0).is_err(), "failures after a reset count again");
        let owner: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(limiter.backing_off(key, owner, t0).is_ok(), "another address never waits for them");
    }

    #[test]
    fn ipv6_clients_are_limited_per_64_and_mapped_ipv4_as_ipv4() {
        let limiter =
            Limiter::new(&LimitsConfig { record_creations_per_minute_per_address: 2, ..LimitsConfig::default() });
        let t0 = Instant::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(limiter.record_creation(ip("2001:db8:1:2::1"), t0).is_ok());
        assert!(limiter.record_creation(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), t0).is_ok());
        assert!(limiter.record_creation(ip("2001:db8:1:2::77"), t0).is_err(), "one /64, one allowance");
        assert!(limiter.record_creation(ip("2001:db8:1:3::1"), t0).is_ok(), "the next /64 is another client");
        assert!(limiter.record_creation(ip("::ffff:192.0.2.7"), t0).is_ok());
        assert!(limiter.record_creation(ip("192.0.2.7"), t0).is_ok());
        assert!(limiter.record_creation(ip("192.0.2.7"), t0).is_err(), "a mapped IPv4 address is that address");
        assert!(limiter.record_creation(ip("192.0.2.8"), t0).is_ok(), "IPv4 per address");
        assert_eq!(AddressKey::of(ip("2001:db8:1:2::1")), AddressKey::V6Prefix(0x2001_0db8_0001_0002));
    }

    #[test]
    fn user_codes_and_record_creations_have_their_own_allowances() {
        let limiter = Limiter::new(&LimitsConfig {
            record_creations_per_minute_per_address: 3,
            user_code_attempts_per_minute_per_address: 2,
            ..LimitsConfig::default()
        });
        let (t0, addr) = (Instant::now(), "198.51.100.4".parse().unwrap());
        let created = (0..10).filter(|_| limiter.record_creation(addr, t0).is_ok()).count();
        let guessed = (0..10).filter(|_| limiter.user_code_attempt(addr, t0).is_ok()).count();
        assert_eq!((created, guessed), (3, 2));
        assert!(limiter.fetch_request(addr, t0).is_ok() && limiter.token_request(addr, t0).is_ok(), "apart");
        assert_eq!(limiter.user_code_attempt(addr, t0 + Duration::from_secs(30)), Ok(()), "refilled: 2/min");
    }

    #[test]
    fn a_full_map_forgets_its_oldest_entry_in_constant_time() {
        let mut map: Bounded<u32, u32> = Bounded::new(3);
        for k in 0..3 {
            *map.get_or_insert_with(k, || 0).0 += 1;
        }
        map.remove(&1);
        *map.get_or_insert_with(3, || 0).0 += 1;
        assert_eq!(map.len(), 3, "room freed by a removal is used first");
        *map.get_or_insert_with(4, || 0).0 += 1;
        assert_eq!(map.len(), 3);
        assert!(map.get(&0).is_none(), "the oldest went");
        assert!(map.get(&2).is_some() && map.get(&3).is_some() && map.get(&4).is_some());
        for k in 5..10_000 {
            map.get_or_insert_with(k, || 0);
            map.remove(&k);
        }
        assert!(map.order.len() <= 2 * map.capacity + 1, "the queue stays bounded: {}", map.order.len());
    }

    #[test]
    fn a_request_that_read_the_clock_earlier_refills_nothing_twice() {
        let buckets: Buckets<u8> = Buckets::new(60, MAX_TRACKED);
        let t0 = Instant::now();
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!((0..100).filter(|_| buckets.take(1, t0).is_ok()).count(), 60, "the burst");
        assert!(buckets.take(1, t10).is_ok(), "ten seconds refilled ten tokens: nine left");
        assert!(buckets.take(1, t0).is_ok(), "a late request that read the clock at t0: eight left");
        // Had the late request moved the bucket's time back to t0, these
        // would be credited the same ten seconds again: eighteen would pass.
        assert_eq!((0..100).filter(|_| buckets.take(1, t10).is_ok()).count(), 8);
    }

    #[test]
    fn keyids_crafted_for_one_shard_do_not_evict_a_back_off_sooner() {
        // A guesser backing off for one keyid sends wrong secrets for other
        // keyids it chose so that, with the shard picked by an unkeyed hash
        // (as it once was), all of them share its record's shard: a shard
        // holds a sixteenth of the entries, so its own record would be
        // evicted after 6,250 failures instead of 100,000. Under the
        // limiter's random key they spread over every shard.
        let limiter = Limiter::new(&LimitsConfig::default());
        let t0 = Instant::now();
        let (target, guesser) = (KeyId::from_bytes([7; 16]), "203.0.113.9".parse::<IpAddr>().unwrap());
        for _ in 0..=FREE_FAILURES {
            limiter.failed_secret(target, guesser, t0);
        }
        assert!(limiter.backing_off(target, guesser, t0).is_err());
        let unkeyed_shard = |keyid: KeyId| {
            let mut hasher = std::hash::DefaultHasher::new();
            (keyid, AddressKey::of(guesser)).hash(&mut hasher);
            hasher.finish() as usize % SHARDS
        };
        let aimed = unkeyed_shard(target);
        let crafted = (0u64..)
            .map(|i| KeyId::from_bytes(std::array::from_fn(|b| (i >> (8 * (b % 8))) as u8)))
            .filter(|&keyid| keyid != target && unkeyed_shard(keyid) == aimed)
            .take(MAX_TRACKED / SHARDS);
        for keyid in crafted {
            limiter.failed_secret(keyid, guesser, t0);
        }
        assert!(limiter.backing_off(target, guesser, t0).is_err(), "the guesser still backs off");
    }

    #[test]
    fn keys_hashed_once_spread_over_every_shard_and_are_found_again() {
        let buckets: Buckets<KeyId> = Buckets::new(2, MAX_TRACKED);
        let t0 = Instant::now();
        let keyids: Vec<KeyId> =
            (0..1000u32).map(|i| KeyId::from_bytes(std::array::from_fn(|b| (i >> (8 * (b % 4))) as u8))).collect();
        for keyid in &keyids {
            assert!(buckets.take(*keyid, t0).is_ok());
        }
        let sizes: Vec<usize> = buckets.map.shards.iter().map(|s| lock(s).len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 1000);
        assert!(sizes.iter().all(|&n| n > 20), "every shard holds some keys: {sizes:?}");
        for keyid in &keyids {
            assert!(buckets.take(*keyid, t0).is_ok(), "the second token of the burst");
            assert!(buckets.take(*keyid, t0).is_err(), "each key's own bucket, found again, is empty");
        }
    }

    #[test]
    fn refilled_buckets_are_forgotten_as_new_clients_come_and_spent_ones_are_not() {
        // One request a minute per keyid: a bucket is spent by its first
        // request and full again 60 s later.
        let limits = LimitsConfig { token_requests_per_minute_per_keyid: 1, ..LimitsConfig::default() };
        let limiter = Limiter::new(&limits);
        let held = || -> usize { limiter.per_keyid.map.shards.iter().map(|s| lock(s).len()).sum() };
        let keyid = |i: u32| KeyId::from_bytes(std::array::from_fn(|b| (i >> (8 * (b % 4))) as u8));
        let t0 = Instant::now();
        for i in 0..2_000 {
            assert!(limiter.authenticated(keyid(i), t0).is_ok());
        }
        // 59 s on, no bucket has refilled: new clients forget none.
        for i in 2_000..4_000 {
            assert!(limiter.authenticated(keyid(i), t0 + Duration::from_secs(59)).is_ok());
        }
        assert_eq!(held(), 4_000);
        // 60 s on, the first 2,000 have refilled and go as new clients come
        // (each looks at two buckets of its shard, so 6,000 new clients look
        // at every bucket there was at least once, whatever the shards got);
        // the second 2,000 and the newest, still spent, stay.
        let later = t0 + Duration::from_secs(60);
        for i in 4_000..10_000 {
            assert!(limiter.authenticated(keyid(i), later).is_ok());
        }
        assert_eq!(held(), 8_000, "the refilled buckets are forgotten, the spent ones kept");
        for i in [2_000, 3_999, 4_000, 9_999] {
            assert!(limiter.authenticated(keyid(i), later).is_err(), "keyid {i}'s spent bucket was forgotten");
        }
        // A forgotten keyid comes back to the full bucket it had.
        assert!(limiter.authenticated(keyid(0), later).is_ok());
        assert!(limiter.authenticated(keyid(0), later).is_err());
    }

    #[test]
    fn a_broker_with_more_users_than_an_address_map_holds_keeps_every_users_bucket() {
        // One request a minute per keyid: each of these keyids spends its
        // bucket at once, and a bucket forgotten would come back full.
        let limits = LimitsConfig { token_requests_per_minute_per_keyid: 1, ..LimitsConfig::default() };
        let limiter = Limiter::new(&limits);
        let t0 = Instant::now();
        let users = MAX_TRACKED as u32 + 20_000;
        let keyid = |i: u32| KeyId::from_bytes(std::array::from_fn(|b| (i >> (8 * (b % 4))) as u8));
        for i in 0..users {
            assert!(limiter.authenticated(keyid(i), t0).is_ok());
        }
        for i in [0, 1, users / 2, users - 1] {
            assert!(limiter.authenticated(keyid(i), t0).is_err(), "user {i}'s spent bucket was forgotten");
        }
    }

    #[test]
    fn failures_counted_in_the_fast_path_match_the_map_through_eviction() {
        let limiter = Limiter::new(&LimitsConfig::default());
        let t0 = Instant::now();
        let key = KeyId::from_bytes([9; 16]);
        for i in 0..(MAX_TRACKED as u32 + 5_000) {
            let addr = IpAddr::from((i + 1).to_be_bytes());
            limiter.failed_secret(key, addr, t0);
        }
        let held: usize = limiter.failures.shards.iter().map(|s| lock(s).len()).sum();
        assert_eq!(limiter.failing.load(Ordering::Acquire), held);
        assert!(held <= MAX_TRACKED, "{held}");
    }
}
