//! Entries: reading an entity's entry (a hit, a miss, a corrupt entry
//! repaired), refresh ahead (XFetch), and filling an entry under its lease.

use std::{sync::Arc, time::Duration};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Cacheable, Core, Kind, Lease, Leases, Ttls, codec, failpoint, jittered_secs, now_ms, redis::GuardedFill};
use crate::{config::CacheConfig, telemetry::Throttle};

/// Refresh ahead (XFetch) treats a load as taking at least this long, so that a hot
/// key is refreshed some tens of milliseconds before it expires, not at the last instant.
const REFRESH_MIN_DELTA_MS: f64 = 50.0;
/// At most one log line per interval about rows that cannot be cached.
const UNCACHEABLE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What is stored under an entity's key.
#[derive(Debug, Serialize, Deserialize)]
pub struct Entry<E> {
    /// `None` caches "no such id" (negative caching).
    pub value: Option<E>,
    /// How long the database read took, in ms (XFetch's delta).
    pub load_ms: u32,
    /// When the entry expires, in ms since the Unix epoch (XFetch's expiry).
    pub expires_at_ms: u64,
}

/// What PostgreSQL returned for a leased id, to store under its lease.
pub struct Fill<'a, E: Cacheable> {
    pub id: E::Id,
    /// `None`: no such id (cached as such).
    pub value: Option<&'a E>,
    pub lease: &'a Lease,
}

/// How a fill under leases went.
#[derive(Debug, Clone, PartialEq)]
pub enum Filled<T = ()> {
    /// Every value was stored (and every lease consumed).
    Stored(T),
    /// Not all: a write took a lease first, or a value was not stored.
    Refused,
    /// Redis did not answer (or the breaker skipped it): the leases may
    /// still be held, and are given back (see `KeptLeases::settle`).
    Unanswered,
}

/// One key's state in the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached<E> {
    Miss,
    /// `value` is `None` when the cache knows the id does not exist.
    Hit {
        value: Option<E>,
        refresh: bool,
    },
}

/// Reading and filling entities' entries: hits and misses, refresh ahead,
/// fills under leases.
pub struct Entries {
    core: Arc<Core>,
    leases: Leases,
    ttls: Ttls,
    compress_threshold: usize,
    refresh_ahead: bool,
    uncacheable_log: Throttle,
}

impl Entries {
    pub(super) fn new(core: Arc<Core>, leases: Leases, config: &CacheConfig) -> Self {
        Self {
            core,
            leases,
            ttls: Ttls {
                user: config.user_ttl,
                product: config.product_ttl,
                negative: config.negative_ttl,
            },
            compress_threshold: config.compress_threshold_bytes,
            refresh_ahead: config.refresh_ahead,
            uncacheable_log: Throttle::default(),
        }
    }

    /// Lookups the near cache answered (see `cache::near`).
    pub fn count_near_hits<E: Cacheable>(&self, hits: u64) {
        if hits > 0 {
            self.core.outcomes(E::KIND).near_hits.increment(hits);
        }
    }

    /// Looks up each id. `None` when the cache is off or Redis did not answer:
    /// then the caller reads PostgreSQL and fills nothing. Undecodable entries
    /// are deleted and reported as misses, so the fill repairs them.
    pub async fn get_many<E: Cacheable>(&self, ids: &[E::Id]) -> Option<Vec<Cached<E>>> {
        if !self.core.enabled {
            return None;
        }
        let keys: Vec<String> = ids.iter().map(|&id| self.core.keys.entry(E::KIND, id)).collect();
        let Some(raw) = self
            .core
            .redis
            .get_many(&keys)
            .await
            .filter(|_| self.core.trusted(E::KIND))
        else {
            self.core.outcomes(E::KIND).misses.increment(ids.len() as u64);
            return None;
        };
        let now = now_ms();
        let mut corrupt = Vec::new();
        let found: Vec<Cached<E>> = ids
            .iter()
            .zip(raw)
            .zip(&keys)
            .map(|((&id, bytes), key)| match bytes.map(|b| decode_entry::<E>(&b, id)) {
                None => Cached::Miss,
                Some(Some(entry)) => Cached::Hit {
                    refresh: entry.value.is_some() && self.refresh_due(&entry, now),
                    value: entry.value,
                },
                Some(None) => {
                    corrupt.push(key.clone());
                    Cached::Miss
                }
            })
            .collect();
        if !corrupt.is_empty() {
            tracing::warn!(keys = ?corrupt, "discarding corrupt cache entries");
            metrics::counter!("readthrough_cache_corrupt_total", "entity" => E::KIND.label())
                .increment(corrupt.len() as u64);
            self.core.redis.delete(&corrupt).await;
        }
        let hits = found.iter().filter(|c| matches!(c, Cached::Hit { .. })).count() as u64;
        let outcomes = self.core.outcomes(E::KIND);
        outcomes.hits.increment(hits);
        if hits < ids.len() as u64 {
            outcomes.misses.increment(ids.len() as u64 - hits);
        }
        Some(found)
    }

    /// XFetch: refresh early with a probability that rises as expiry nears and
    /// with how long the value takes to load, so one caller of a hot key
    /// refreshes it before it expires instead of all of them missing together.
    fn refresh_due<E>(&self, entry: &Entry<E>, now_ms: u64) -> bool {
        if !self.refresh_ahead {
            return false;
        }
        let delta = f64::from(entry.load_ms).max(REFRESH_MIN_DELTA_MS);
        let draw: f64 = rand::rng().random_range(f64::EPSILON..1.0);
        now_ms as f64 - delta * draw.ln() >= entry.expires_at_ms as f64
    }

    /// Stores what PostgreSQL returned for leased ids (`None`: no such id), each
    /// only if its lease is still held. `load_time` is how long the read took.
    pub async fn fill<E: Cacheable>(&self, fills: &[Fill<'_, E>], load_time: Duration) -> Filled {
        if fills.is_empty() {
            return Filled::Stored(());
        }
        let keys: Vec<String> = fills
            .iter()
            .map(|fill| self.core.keys.entry(E::KIND, fill.id))
            .collect();
        failpoint!(self.core, before_fill, &keys[0]);
        let now = now_ms();
        let load_ms = load_time.as_millis().min(u128::from(u32::MAX)) as u32;
        let mut guarded = Vec::with_capacity(fills.len());
        let mut invalid = Vec::new();
        for (&Fill { id, value, lease }, key) in fills.iter().zip(&keys) {
            if lease.key != self.core.keys.lease(key) {
                // Taken in an epoch retired since: what it guards is never read again.
                self.core.count_refused(E::KIND);
                continue;
            }
            if value.is_some_and(|value| !value.is_valid_for(id)) {
                invalid.push(lease);
                continue;
            }
            let ttl = match value {
                Some(_) => E::ttl(&self.ttls),
                None => self.ttls.negative,
            };
            let ttl_secs = jittered_secs(ttl);
            let entry = Entry {
                value,
                load_ms,
                expires_at_ms: now + ttl_secs * 1000,
            };
            match codec::encode(&entry, self.compress_threshold) {
                Ok(bytes) => guarded.push(GuardedFill {
                    key,
                    lease_key: &lease.key,
                    token: &lease.token,
                    value: bytes,
                    ttl_secs,
                }),
                Err(error) => tracing::error!(%error, entity = E::KIND.label(), "cannot encode value for the cache"),
            }
        }
        if !invalid.is_empty() {
            self.refuse_invalid(E::KIND, &invalid).await;
        }
        let Some(stored) = self.core.redis.fill_guarded(&guarded).await else {
            return Filled::Unanswered;
        };
        let refused = stored.iter().filter(|s| !**s).count();
        for _ in 0..refused {
            self.core.count_refused(E::KIND);
        }
        if refused == 0 && stored.len() == fills.len() {
            Filled::Stored(())
        } else {
            Filled::Refused
        }
    }

    /// A row the cache would judge corrupt on its way out (written by hand,
    /// past what validation allows) is served but never stored: stored, it
    /// would be read, discarded and filled again on every read.
    async fn refuse_invalid(&self, kind: Kind, leases: &[&Lease]) {
        metrics::counter!("readthrough_cache_uncacheable_total", "entity" => kind.label())
            .increment(leases.len() as u64);
        if let Some(held_back) = self.uncacheable_log.pass(UNCACHEABLE_LOG_INTERVAL) {
            tracing::warn!(
                entity = kind.label(),
                held_back,
                "a row fails validation; serving it uncached (fix it in the database)"
            );
        }
        self.leases.release(leases).await;
    }
}

/// An entry as read from Redis, if it decodes and belongs to `id`.
pub(super) fn decode_entry<E: Cacheable>(bytes: &[u8], id: E::Id) -> Option<Entry<E>> {
    let entry = codec::decode::<Entry<E>>(bytes).ok()?;
    entry
        .value
        .as_ref()
        .is_none_or(|value| value.is_valid_for(id))
        .then_some(entry)
}
