//! Per-key GCRA rate limiting (governor): overrides, an optional global cap, bounded memory.
//!
//! # Memory bound
//!
//! At most `MAX_TRACKED_KEYS` = 50,000 rate-limit keys are held, over all quotas (threads
//! racing past the check at the same instant can add one key each). A key is evicted only once
//! its bucket has fully refilled, so eviction never hands an active user a fresh bucket; while
//! the table is full, requests from *new* keys get 429 with `Retry-After: 1` (fail closed) and
//! tracked users keep their buckets. Each key takes one 49-byte hash-table slot (33-byte key,
//! 8-byte GCRA state, padding, a control byte) in tables kept at most 7/8 full: measured
//! 64 bytes per key, so about 3.1 MiB for a full table (2-core machine); hash-table growth
//! rounding can double that, so the bound is about 6.2 MiB, inside the 16 MiB RSS budget. A periodic sweep evicts refilled keys and gives
//! the memory back once the table is mostly empty. At the default quota (5/s, burst 10) a key
//! is held at most ~2.2 s after its last request, so fewer than ~22,000 new keys per second
//! cannot fill the table.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use governor::NotUntil;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use uuid::Uuid;

use crate::config::{Quota, RateKeyKind, RateLimitConfig, SharedFallback};
use crate::error::Error;
use crate::shared::SharedState;

/// Most keys (over all quotas) tracked at once; a new key beyond it is refused.
pub const MAX_TRACKED_KEYS: usize = 50_000;

/// Past this many tracked keys, a new key triggers an inline eviction (rate-limited by
/// [`INLINE_SWEEP_EVERY`]), so the background sweep is not the only thing between a flood
/// and refusals. Below it the hot path never looks at the table size beyond one atomic load.
const SWEEP_AT: usize = MAX_TRACKED_KEYS / 8 * 7;

/// Inline sweeps are O(tracked keys) (~1 ms at the cap); when the table is full of *active*
/// keys a sweep frees nothing, so at most one per interval keeps a flood from turning every
/// request into a full scan.
const INLINE_SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Who a request is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub user: Uuid,
    pub sub_user: Option<Uuid>,
}

impl RateKey {
    /// Builds the key for the configured kind: with `User`, every sub-user shares the user's bucket.
    pub fn new(kind: &RateKeyKind, user: Uuid, sub_user: Option<Uuid>) -> Self {
        let sub_user = match kind {
            RateKeyKind::User => None,
            RateKeyKind::UserAndSubUser => sub_user,
        };
        Self { user, sub_user }
    }
}

/// The outcome of one check, carrying what the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `RateLimit-Limit` (the key's burst) and `RateLimit-Remaining` (cells still admissible now).
    Allowed { limit: u32, remaining: u32 },
    /// `Retry-After` in whole seconds, rounded up, at least 1.
    Limited { limit: u32, retry_after_secs: u64 },
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This process's limiter (no `[shared]`).
    Local,
    /// The bucket every replica shares, in Redis.
    Shared,
    /// `[shared]` is configured but Redis did not answer: this process's
    /// limiter, with the same numbers (`shared.on_unavailable = "local"`).
    LocalFallback,
}

/// The stage: one decision for `key`, from the shared bucket when `[shared]`
/// is configured and Redis answers, else from this process's limiter (or
/// 503 `shared_state_unavailable` when `shared.on_unavailable = "reject"`).
pub async fn admit(
    shared: Option<&SharedState>,
    local: &dyn RateLimiter,
    cfg: &RateLimitConfig,
    key: RateKey,
) -> Result<(Decision, Source), Error> {
    let Some(shared) = shared else {
        return Ok((local.check(key), Source::Local));
    };
    let quota = cfg.overrides.get(&key.user).copied().unwrap_or(cfg.default);
    let answer = shared
        .rate(
            key.user,
            key.sub_user,
            quota.burst.get(),
            quota.per_second.get(),
            cfg.global_per_second.map(|g| g.get()),
        )
        .await;
    match answer {
        Ok(a) if a.allowed => Ok((
            Decision::Allowed {
                limit: a.limit,
                remaining: a.remaining,
            },
            Source::Shared,
        )),
        Ok(a) => Ok((
            Decision::Limited {
                limit: a.limit,
                retry_after_secs: a.retry_after_secs,
            },
            Source::Shared,
        )),
        Err(_) => match shared.fallback() {
            SharedFallback::Local => Ok((local.check(key), Source::LocalFallback)),
            SharedFallback::Reject => Err(Error::SharedStateUnavailable),
        },
    }
}

/// Small interface so a shared backend (Redis) can be added later without touching the pipeline.
pub trait RateLimiter: Send + Sync {
    /// Spends one cell of `key`'s bucket (and of the global cap) if it can.
    fn check(&self, key: RateKey) -> Decision;
    /// Keys currently holding state (for metrics and tests).
    fn tracked_keys(&self) -> usize;
    /// Housekeeping the app runs every few seconds (a shared backend may have none).
    fn sweep(&self) {}
}

/// In-process limiter: one keyed GCRA table for the default quota, one per override user, and
/// an optional unkeyed global bucket.
pub struct LocalLimiter<C: Clock = DefaultClock> {
    default: Bucket<C>,
    /// Overrides are few and configured, so a table each keeps the lookup a plain map hit.
    overrides: HashMap<Uuid, Bucket<C>>,
    global: Option<GlobalBucket<C>>,
    /// Keys in all tables together; the number MAX_TRACKED_KEYS bounds. Never below the true
    /// count: tables increment it under the shard lock that inserts, and subtract what they evict.
    tracked: Arc<AtomicUsize>,
    /// Nanoseconds since `origin` of the last sweep; the CAS on it elects one inline sweeper.
    last_sweep: AtomicU64,
    clock: C,
    origin: C::Instant,
}

type GlobalBucket<C> =
    governor::RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One quota's keyed limiter, plus a handle on its table so `check` can ask "is this key new?".
struct Bucket<C: Clock> {
    limiter: governor::RateLimiter<RateKey, KeyTable, C, StateInformationMiddleware>,
    keys: Arc<DashMapStateStore<RateKey>>,
    /// The quota's burst, reported as `RateLimit-Limit`.
    limit: u32,
}

impl<C: Clock + Clone> Bucket<C> {
    fn new(quota: &Quota, tracked: &Arc<AtomicUsize>, clock: C) -> Self {
        let keys = Arc::new(DashMapStateStore::default());
        let table = KeyTable {
            keys: Arc::clone(&keys),
            tracked: Arc::clone(tracked),
        };
        let limiter = governor::RateLimiter::new(gcra_quota(quota), table, clock);
        Self {
            limiter,
            keys,
            limit: quota.burst.get(),
        }
    }
}

fn gcra_quota(quota: &Quota) -> governor::Quota {
    governor::Quota::per_second(quota.per_second).allow_burst(quota.burst)
}

/// governor's DashMap store, shared with [`Bucket`] (governor keeps its store private) and
/// counting inserts and evictions into the limiter-wide `tracked`.
struct KeyTable {
    keys: Arc<DashMapStateStore<RateKey>>,
    tracked: Arc<AtomicUsize>,
}

impl StateStore for KeyTable {
    type Key = RateKey;

    fn measure_and_replace<T, F, E>(&self, key: &RateKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // Same shape as governor's DashMap store: a read lock for known keys, the entry API
        // (shard write lock) only for a new one.
        if let Some(state) = self.keys.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = self.keys.entry(*key).or_insert_with(|| {
            self.tracked.fetch_add(1, Ordering::Relaxed);
            InMemoryState::default()
        });
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<RateKey> for KeyTable {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut evicted = 0;
        self.keys.retain(|_, state| {
            // governor's own rule: a key whose theoretical arrival time is at or before
            // `drop_below` is indistinguishable from a fresh bucket, so dropping it changes nothing.
            let keep = stored_tat(state).is_some_and(|tat| tat > drop_below);
            if !keep {
                evicted += 1;
            }
            keep
        });
        self.tracked.fetch_sub(evicted, Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.keys.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Reads a bucket's theoretical arrival time. governor exposes no getter, but a closure that
/// returns `Err` leaves the state untouched (the `StateStore` contract), so this only reads.
fn stored_tat(state: &InMemoryState) -> Option<Nanos> {
    state
        .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        .err()
        .flatten()
}

impl LocalLimiter {
    /// A limiter on the real (quanta) clock.
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self::with_clock(cfg, DefaultClock::default())
    }
}

impl<C: Clock + Clone> LocalLimiter<C> {
    /// A limiter on `clock` (tests pass governor's `FakeRelativeClock`).
    pub fn with_clock(cfg: &RateLimitConfig, clock: C) -> Self {
        let tracked = Arc::new(AtomicUsize::new(0));
        let default = Bucket::new(&cfg.default, &tracked, clock.clone());
        let overrides = cfg
            .overrides
            .iter()
            .map(|(user, quota)| (*user, Bucket::new(quota, &tracked, clock.clone())))
            .collect();
        // The global bucket's burst equals its rate: one second's worth, no more.
        let global = cfg.global_per_second.map(|per_second| {
            governor::RateLimiter::direct_with_clock(
                governor::Quota::per_second(per_second),
                clock.clone(),
            )
        });
        let origin = clock.now();
        Self {
            default,
            overrides,
            global,
            tracked,
            last_sweep: AtomicU64::new(0),
            clock,
            origin,
        }
    }

    /// Evicts every key whose bucket has fully refilled, and gives memory back after a flood.
    /// The app calls this every few seconds from a background task.
    pub fn sweep_refilled(&self) {
        self.last_sweep
            .store(self.elapsed_nanos(), Ordering::Relaxed);
        for bucket in self.buckets() {
            bucket.limiter.retain_recent();
            // Tables keep their peak capacity; shrink only when mostly empty, as it rehashes.
            if bucket.keys.capacity() > 4 * bucket.keys.len().max(1024) {
                bucket.limiter.shrink_to_fit();
            }
        }
    }

    fn buckets(&self) -> impl Iterator<Item = &Bucket<C>> {
        std::iter::once(&self.default).chain(self.overrides.values())
    }

    fn bucket_for(&self, user: &Uuid) -> &Bucket<C> {
        // Skips hashing the id when no overrides are configured (the usual case).
        if self.overrides.is_empty() {
            return &self.default;
        }
        self.overrides.get(user).unwrap_or(&self.default)
    }

    /// Called for a key not yet tracked while the table is past `SWEEP_AT`: evicts refilled
    /// keys (at most once per `INLINE_SWEEP_EVERY`, by one thread), then says whether the key
    /// may be added. Refusing when full is failing closed: tracked users keep their buckets.
    fn make_room(&self) -> bool {
        let now = self.elapsed_nanos();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= INLINE_SWEEP_EVERY.as_nanos() as u64
            && self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            for bucket in self.buckets() {
                bucket.limiter.retain_recent();
            }
        }
        self.tracked.load(Ordering::Relaxed) < MAX_TRACKED_KEYS
    }

    fn elapsed_nanos(&self) -> u64 {
        self.clock.now().duration_since(self.origin).as_u64()
    }

    fn limited(&self, limit: u32, not_until: &NotUntil<C::Instant>) -> Decision {
        Decision::Limited {
            limit,
            retry_after_secs: ceil_secs(not_until.wait_time_from(self.clock.now())),
        }
    }
}

impl<C> RateLimiter for LocalLimiter<C>
where
    C: Clock + Clone + Send + Sync,
{
    fn sweep(&self) {
        self.sweep_refilled();
    }

    fn check(&self, key: RateKey) -> Decision {
        let bucket = self.bucket_for(&key.user);
        // One atomic load on the hot path; the "is this key new?" lookup only near the bound.
        if self.tracked.load(Ordering::Relaxed) >= SWEEP_AT
            && !bucket.keys.contains_key(&key)
            && !self.make_room()
        {
            return Decision::Limited {
                limit: bucket.limit,
                retry_after_secs: 1,
            };
        }
        let remaining = match bucket.limiter.check_key(&key) {
            Ok(snapshot) => snapshot.remaining_burst_capacity(),
            Err(not_until) => return self.limited(bucket.limit, &not_until),
        };
        // Checked after the key so a user over their own limit does not drain the shared cap.
        // If the global cap refuses, the key's cell is already spent (governor cannot peek):
        // the user is charged one cell for a request that was not forwarded, never more than
        // one per request sent, so their own limit still holds; they are only refused sooner
        // while the vendor-wide cap is saturated.
        if let Some(global) = &self.global
            && let Err(not_until) = global.check()
        {
            return self.limited(bucket.limit, &not_until);
        }
        Decision::Allowed {
            limit: bucket.limit,
            remaining,
        }
    }

    fn tracked_keys(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }
}

/// Summary only: the tables can hold 100k entries.
impl<C: Clock> fmt::Debug for LocalLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("limit", &self.default.limit)
            .field("overrides", &self.overrides.len())
            .field("global", &self.global.is_some())
            .field("tracked_keys", &self.tracked.load(Ordering::Relaxed))
            .finish()
    }
}

/// Whole seconds for `Retry-After`: rounded up so a client that waits that long is admitted,
/// and at least 1 because `Retry-After: 0` invites an immediate retry.
fn ceil_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("test quota is non-zero")
    }

    fn quota(per_second: u32, burst: u32) -> Quota {
        Quota {
            per_second: nz(per_second),
            burst: nz(burst),
        }
    }

    fn cfg(per_second: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            default: quota(per_second, burst),
            key: RateKeyKind::User,
            global_per_second: None,
            overrides: HashMap::new(),
        }
    }

    fn user(n: u128) -> RateKey {
        RateKey::new(&RateKeyKind::User, Uuid::from_u128(n), None)
    }

    fn limiter(cfg: &RateLimitConfig) -> (LocalLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (LocalLimiter::with_clock(cfg, clock.clone()), clock)
    }

    fn is_allowed(d: Decision) -> bool {
        matches!(d, Decision::Allowed { .. })
    }

    #[test]
    fn burst_then_refill() {
        let (lim, clock) = limiter(&cfg(1, 2));
        let k = user(1);
        assert_eq!(
            lim.check(k),
            Decision::Allowed {
                limit: 2,
                remaining: 1
            }
        );
        assert_eq!(
            lim.check(k),
            Decision::Allowed {
                limit: 2,
                remaining: 0
            }
        );
        assert_eq!(
            lim.check(k),
            Decision::Limited {
                limit: 2,
                retry_after_secs: 1
            }
        );
        clock.advance(Duration::from_secs(1));
        assert!(is_allowed(lim.check(k)));
        assert!(!is_allowed(lim.check(k)));
    }

    #[test]
    fn ceil_secs_rounds_up_to_at_least_one() {
        assert_eq!(ceil_secs(Duration::ZERO), 1);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(7)), 7);
    }

    #[test]
    fn retry_after_comes_from_the_bucket() {
        let (lim, clock) = limiter(&cfg(1, 1));
        let k = user(1);
        assert!(is_allowed(lim.check(k)));
        // Full interval left: exactly 1 s.
        assert_eq!(
            lim.check(k),
            Decision::Limited {
                limit: 1,
                retry_after_secs: 1
            }
        );
        // 700 ms left: rounded up to 1, not down to 0.
        clock.advance(Duration::from_millis(300));
        assert_eq!(
            lim.check(k),
            Decision::Limited {
                limit: 1,
                retry_after_secs: 1
            }
        );
        clock.advance(Duration::from_millis(700));
        assert!(is_allowed(lim.check(k)));
    }

    #[test]
    fn remaining_counts_down() {
        let (lim, _clock) = limiter(&cfg(5, 10));
        let k = user(1);
        for expected in (0..10).rev() {
            assert_eq!(
                lim.check(k),
                Decision::Allowed {
                    limit: 10,
                    remaining: expected
                }
            );
        }
        assert!(!is_allowed(lim.check(k)));
    }

    #[test]
    fn override_raises_one_users_limit_only() {
        let mut c = cfg(1, 2);
        c.overrides.insert(Uuid::from_u128(7), quota(1, 5));
        let (lim, _clock) = limiter(&c);
        let vip = user(7);
        let other = user(8);
        assert_eq!(
            lim.check(vip),
            Decision::Allowed {
                limit: 5,
                remaining: 4
            }
        );
        for _ in 0..4 {
            assert!(is_allowed(lim.check(vip)));
        }
        assert!(!is_allowed(lim.check(vip)));
        assert_eq!(
            lim.check(other),
            Decision::Allowed {
                limit: 2,
                remaining: 1
            }
        );
        assert!(is_allowed(lim.check(other)));
        assert!(!is_allowed(lim.check(other)));
    }

    #[test]
    fn key_kind_decides_whether_sub_users_share_a_bucket() {
        let u = Uuid::from_u128(1);
        let (a, b) = (Some(Uuid::from_u128(2)), Some(Uuid::from_u128(3)));

        let mut c = cfg(1, 1);
        c.key = RateKeyKind::UserAndSubUser;
        let (lim, _clock) = limiter(&c);
        assert!(is_allowed(lim.check(RateKey::new(&c.key, u, a))));
        assert!(is_allowed(lim.check(RateKey::new(&c.key, u, b))));
        assert!(is_allowed(lim.check(RateKey::new(&c.key, u, None))));
        assert!(!is_allowed(lim.check(RateKey::new(&c.key, u, a))));

        let c = cfg(1, 1);
        let (lim, _clock) = limiter(&c);
        assert_eq!(RateKey::new(&c.key, u, a), RateKey::new(&c.key, u, b));
        assert!(is_allowed(lim.check(RateKey::new(&c.key, u, a))));
        assert!(!is_allowed(lim.check(RateKey::new(&c.key, u, b))));
        assert_eq!(lim.tracked_keys(), 1);
    }

    #[test]
    fn global_cap_limits_the_sum_across_users() {
        let mut c = cfg(10, 10);
        c.global_per_second = Some(nz(3));
        let (lim, clock) = limiter(&c);
        // Each user is far under their own limit; the fourth request overall is refused.
        for n in 0..3 {
            assert!(is_allowed(lim.check(user(n))));
        }
        assert_eq!(
            lim.check(user(3)),
            Decision::Limited {
                limit: 10,
                retry_after_secs: 1
            }
        );
        // One global cell back after 1/3 s.
        clock.advance(Duration::from_millis(334));
        assert!(is_allowed(lim.check(user(4))));
        assert!(!is_allowed(lim.check(user(5))));
    }

    #[test]
    fn sweep_evicts_only_refilled_keys() {
        let (lim, clock) = limiter(&cfg(1, 2));
        let k = user(1);
        assert!(is_allowed(lim.check(k)));
        assert!(is_allowed(lim.check(k)));
        lim.sweep();
        assert_eq!(lim.tracked_keys(), 1);
        assert!(!is_allowed(lim.check(k)), "bucket survived the sweep");

        // Refilled at 2 s; governor evicts once the TAT is one emission interval in the past
        // (conservative), so before 3 s the key stays.
        clock.advance(Duration::from_millis(2900));
        lim.sweep();
        assert_eq!(lim.tracked_keys(), 1);
        clock.advance(Duration::from_millis(100));
        lim.sweep();
        assert_eq!(lim.tracked_keys(), 0);
        assert_eq!(
            lim.check(k),
            Decision::Allowed {
                limit: 2,
                remaining: 1
            }
        );
    }

    /// A flood of one-shot ids at 100k/s with the default quota: inline sweeps keep up, so
    /// nobody is refused and the table stays under the bound.
    #[test]
    fn flood_with_short_lived_keys_stays_bounded() {
        let (lim, clock) = limiter(&cfg(5, 10));
        let mut refused = 0;
        for n in 0..200_000u128 {
            clock.advance(Duration::from_micros(10));
            if !is_allowed(lim.check(user(n))) {
                refused += 1;
            }
            assert!(lim.tracked_keys() <= MAX_TRACKED_KEYS);
        }
        assert_eq!(refused, 0);
    }

    /// Keys that live longer than the flood fill the table: new ids are refused (fail closed)
    /// while a user tracked before the flood keeps their partly spent bucket.
    #[test]
    fn flood_with_long_lived_keys_fails_closed_and_keeps_tracked_users() {
        let (lim, clock) = limiter(&cfg(1, 5));
        let old = user(u128::MAX);
        for _ in 0..5 {
            assert!(is_allowed(lim.check(old)));
        }
        let mut refused = 0;
        for n in 0..200_000u128 {
            clock.advance(Duration::from_micros(10));
            match lim.check(user(n)) {
                Decision::Allowed { .. } => {}
                Decision::Limited {
                    retry_after_secs, ..
                } => {
                    assert_eq!(retry_after_secs, 1);
                    refused += 1;
                }
            }
            assert!(lim.tracked_keys() <= MAX_TRACKED_KEYS);
        }
        assert!(refused > 0);
        // 2 s of flood refilled exactly 2 of the old user's cells; a fresh bucket would give 5.
        assert!(is_allowed(lim.check(old)));
        assert!(is_allowed(lim.check(old)));
        assert!(!is_allowed(lim.check(old)));

        // Once the flood's buckets have refilled, a sweep frees the table for new users.
        clock.advance(Duration::from_secs(3));
        lim.sweep();
        assert!(lim.tracked_keys() < SWEEP_AT);
        assert!(is_allowed(lim.check(user(u128::MAX - 1))));
    }

    /// Threads racing past the bound can overshoot it by at most one key each.
    #[test]
    fn concurrent_flood_overshoots_by_at_most_one_key_per_thread() {
        const THREADS: u128 = 4;
        let (lim, _clock) = limiter(&cfg(5, 10));
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let lim = &lim;
                s.spawn(move || {
                    for n in 0..40_000u128 {
                        lim.check(user(t << 64 | n));
                    }
                });
            }
        });
        assert!(lim.tracked_keys() >= MAX_TRACKED_KEYS);
        assert!(lim.tracked_keys() <= MAX_TRACKED_KEYS + THREADS as usize);
    }

    #[test]
    fn frozen_clock_flood_refuses_new_keys_at_the_bound() {
        let (lim, _clock) = limiter(&cfg(5, 10));
        for n in 0..(MAX_TRACKED_KEYS as u128 + 10) {
            lim.check(user(n));
        }
        assert_eq!(lim.tracked_keys(), MAX_TRACKED_KEYS);
        assert_eq!(
            lim.check(user(u128::MAX)),
            Decision::Limited {
                limit: 10,
                retry_after_secs: 1
            }
        );
        // A tracked key is still served from its own bucket.
        assert_eq!(
            lim.check(user(0)),
            Decision::Allowed {
                limit: 10,
                remaining: 8
            }
        );
    }
}
