//! Cache-aside reads, shared by users and products.
//!
//! A lookup of several ids costs one MGET, one query for all misses and one
//! pipelined guarded fill. A single missing id (the hot-key case) is loaded
//! once per process (single flight) and once across instances: the caller
//! that takes the key's lease loads and fills it (the lease kept alive for as
//! long as the load runs), the others poll for the fill, taking the lease over
//! if its holder lets go without filling (see `cache::leases`).

use std::{collections::HashMap, future::Future, sync::Arc, time::Instant};

use sqlx::PgPool;
use tracing::{Instrument, Span};

use super::{
    ServiceError,
    single_flight::{FLIGHT_ATTEMPTS, Fresh, Joined, SingleFlight},
};
use crate::{
    cache::{Cache, Cacheable, Cached, Claim, Fill, Filled, Lease, NewestWrite, Waited, near::NearCache},
    domain::{Product, User},
    store::replicas::Database,
    store::{self, StoreError},
};

/// An entity the read-through can load from PostgreSQL by ids.
pub trait Loadable: Cacheable {
    /// The rows with these ids; absent ids are simply not returned.
    fn load(pool: &PgPool, ids: &[Self::Id]) -> impl Future<Output = Result<Vec<Self>, StoreError>> + Send;
}

impl Loadable for User {
    fn load(pool: &PgPool, ids: &[Self::Id]) -> impl Future<Output = Result<Vec<Self>, StoreError>> + Send {
        store::users::get_many(pool, ids)
    }
}

impl Loadable for Product {
    fn load(pool: &PgPool, ids: &[Self::Id]) -> impl Future<Output = Result<Vec<Self>, StoreError>> + Send {
        store::products::get_many(pool, ids)
    }
}

pub struct ReadThrough<E: Loadable> {
    database: Arc<Database>,
    cache: Arc<Cache>,
    flights: SingleFlight<E::Id, Option<E>>,
    /// In front of Redis when configured (see `cache::near`).
    near: Option<NearCache<E::Id, Option<E>>>,
}

impl<E: Loadable> ReadThrough<E> {
    pub fn new(database: Arc<Database>, cache: Arc<Cache>, near: Option<NearCache<E::Id, Option<E>>>) -> Arc<Self> {
        Arc::new(Self {
            database,
            cache,
            flights: SingleFlight::new(),
            near,
        })
    }

    /// The entity for each id, in order; `None` where no such entity exists.
    pub async fn get_many(self: &Arc<Self>, ids: &[E::Id]) -> Result<Vec<Option<E>>, ServiceError> {
        // The cache outcome, for traces: `cache.outcome` is hit, miss, or
        // unavailable (Redis did not answer, or the cache is off); a miss
        // may add `cache.lease_wait` (another caller was loading it) and
        // `cache.fill` (stored, or refused: a write took the lease first, or
        // Redis did not answer).
        let span = tracing::debug_span!(
            "cache.read",
            entity = E::KIND.label(),
            ids = ids.len(),
            cache.outcome = tracing::field::Empty,
            cache.lease_wait = tracing::field::Empty,
            cache.fill = tracing::field::Empty,
        );
        self.get_many_near(ids).instrument(span).await
    }

    async fn get_many_near(self: &Arc<Self>, ids: &[E::Id]) -> Result<Vec<Option<E>>, ServiceError> {
        let Some(near) = &self.near else {
            return self.get_many_shared(ids).await;
        };
        let epoch = near.epoch();
        let mut found = Vec::with_capacity(ids.len());
        // Where in `ids` the near cache knew nothing (it may know "no such id").
        let mut unknown = Vec::new();
        for (position, id) in ids.iter().enumerate() {
            match near.get(id) {
                Some(known) => found.push(known),
                None => {
                    found.push(None);
                    unknown.push(position);
                }
            }
        }
        self.cache
            .entries
            .count_near_hits::<E>((ids.len() - unknown.len()) as u64);
        if unknown.is_empty() {
            note("cache.outcome", "near_hit");
            return Ok(found);
        }
        let missing: Vec<E::Id> = unknown.iter().map(|&position| ids[position]).collect();
        let loaded = self.get_many_shared(&missing).await?;
        for (position, value) in unknown.into_iter().zip(loaded) {
            near.insert(ids[position], value.clone(), epoch);
            found[position] = value;
        }
        Ok(found)
    }

    /// Drops these ids from the near cache: after a write's
    /// invalidation, before the write returns, or when its event arrives.
    pub fn forget(&self, ids: impl IntoIterator<Item = E::Id>) {
        if let Some(near) = &self.near {
            for id in ids {
                near.invalidate(&id);
            }
        }
    }

    /// Empties the near cache.
    pub fn forget_all(&self) {
        if let Some(near) = &self.near {
            near.invalidate_all();
        }
    }

    /// Whether invalidation events are being received (see `cache::near`).
    pub fn listening(&self, listening: bool) {
        match (&self.near, listening) {
            (Some(near), true) => near.resume(),
            (Some(near), false) => near.pause(),
            (None, _) => {}
        }
    }

    /// The entity for each id from the shared cache (Redis) and PostgreSQL.
    ///
    /// The hit path is kept small: what a miss needs runs in a boxed future of
    /// its own, so that a hit does not carry (and move around) its state.
    async fn get_many_shared(self: &Arc<Self>, ids: &[E::Id]) -> Result<Vec<Option<E>>, ServiceError> {
        let Some(cached) = self.cache.entries.get_many::<E>(ids).await else {
            // Cache off or Redis unavailable: PostgreSQL answers (within the
            // fallback limit), nothing is filled.
            note("cache.outcome", "unavailable");
            let _fallback = self.cache.fallback().await.ok_or(ServiceError::FallbackLimit)?;
            return Box::pin(self.read_uncached(ids)).await;
        };
        let mut found = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for (&id, entry) in ids.iter().zip(cached) {
            match entry {
                Cached::Hit { value, refresh } => {
                    if refresh {
                        self.refresh(id);
                    }
                    found.push(value);
                }
                Cached::Miss => {
                    missing.push(id);
                    found.push(None);
                }
            }
        }
        let outcome = if missing.is_empty() { "hit" } else { "miss" };
        note("cache.outcome", outcome);
        if missing.is_empty() {
            return Ok(found);
        }
        Box::pin(self.fill_missing(ids, found, missing)).await
    }

    async fn read_uncached(self: &Arc<Self>, ids: &[E::Id]) -> Result<Vec<Option<E>>, ServiceError> {
        match ids {
            [id] => Ok(vec![self.load_one(*id, false).await?]),
            _ => Ok(self.load_and_fill(ids, &[]).await?.value),
        }
    }

    /// Loads the `missing` ids and puts them in their places in `found`.
    async fn fill_missing(
        self: &Arc<Self>,
        ids: &[E::Id],
        mut found: Vec<Option<E>>,
        missing: Vec<E::Id>,
    ) -> Result<Vec<Option<E>>, ServiceError> {
        let loaded = match missing.as_slice() {
            [id] => vec![self.load_one(*id, true).await?],
            _ => {
                let leases = self.cache.leases.acquire_leases::<E>(&missing).await;
                self.load_and_fill(&missing, &leases).await?.value
            }
        };
        let loaded: HashMap<E::Id, Option<E>> = missing.into_iter().zip(loaded).collect();
        for (slot, id) in found.iter_mut().zip(ids) {
            if let Some(value) = loaded.get(id) {
                *slot = value.clone();
            }
        }
        Ok(found)
    }

    /// One missing id: single flight in this process and, when the cache is
    /// usable, a lease across instances.
    async fn load_one(self: &Arc<Self>, id: E::Id, cache_usable: bool) -> Result<Option<E>, ServiceError> {
        let arrived = Instant::now();
        // Set only when this caller led a flight whose load failed.
        let mut own_error = None;
        for _ in 0..FLIGHT_ATTEMPTS {
            let this = self.clone();
            let error_slot = &mut own_error;
            let load = async move {
                let loaded = if cache_usable {
                    this.load_one_once(id).await
                } else {
                    this.load_and_fill(&[id], &[]).await.map(single)
                };
                loaded.map_err(|error| *error_slot = Some(error)).ok()
            };
            match self.flights.run(id, arrived, load).await {
                Joined::Loaded(value) => return Ok(value),
                Joined::Failed => match own_error.take() {
                    // Our own load failed: report it. Loading again would double
                    // what a failing database costs (a statement timeout, a pool
                    // that cannot connect) before the caller hears of it.
                    Some(error) => return Err(error),
                    // The shared load failed: read once more below, to report our own error.
                    None => break,
                },
                // The shared result predates this caller: the fill it made is
                // usually there now; if not, the next flight serves this caller.
                Joined::Missed if cache_usable => {
                    if let Some(Cached::Hit { value, .. }) =
                        self.cache.entries.get_many::<E>(&[id]).await.and_then(|mut c| c.pop())
                    {
                        return Ok(value);
                    }
                }
                Joined::Missed => {}
            }
        }
        Ok(self.load_and_fill(&[id], &[]).await.map(single)?.value)
    }

    async fn load_one_once(&self, id: E::Id) -> Result<Fresh<Option<E>>, ServiceError> {
        let looked = Instant::now();
        let lease = match self.cache.leases.get_or_lease::<E>(id).await {
            // Filled since this caller's miss (by the flight before, or another instance).
            Some(Claim::Found(value)) => return Ok(Fresh { value, as_of: looked }),
            Some(Claim::Leased(lease)) => Some(lease),
            // Redis did not answer: read without filling.
            None => None,
            Some(Claim::Busy) => {
                metrics::counter!("readthrough_cache_lease_waits_total", "entity" => E::KIND.label()).increment(1);
                note("cache.lease_wait", true);
                match self.cache.leases.wait_for_fill::<E>(id).await {
                    Waited::Filled(value, as_of) => return Ok(Fresh { value, as_of }),
                    Waited::Leased(lease) => Some(lease),
                    Waited::GaveUp => None,
                }
            }
        };
        self.load_and_fill(&[id], &[lease]).await.map(single)
    }

    /// Loads `ids` in one query and fills those whose lease is held (`leases`
    /// matches `ids` by position; an empty slice fills nothing). Absent ids are
    /// cached as absent (negative caching). The leases are kept alive while the
    /// query runs, and given back if it fails or this future is dropped.
    ///
    /// The values are current as of the read's start, or as of the fill when
    /// every lease was still held then (no write came between lease and fill).
    async fn load_and_fill(
        &self,
        ids: &[E::Id],
        leases: &[Option<Lease>],
    ) -> Result<Fresh<Vec<Option<E>>>, ServiceError> {
        let kept = self.cache.leases.keep(leases.iter().flatten());
        let started = Instant::now();
        let loaded = self.load(ids).await?;
        let load_time = started.elapsed();
        let by_id: HashMap<E::Id, E> = loaded.into_iter().map(|value| (value.id(), value)).collect();
        let values: Vec<Option<E>> = ids.iter().map(|id| by_id.get(id).cloned()).collect();
        let fills: Vec<Fill<'_, E>> = ids
            .iter()
            .zip(&values)
            .zip(leases)
            .filter_map(|((&id, value), lease)| {
                Some(Fill {
                    id,
                    value: value.as_ref(),
                    lease: lease.as_ref()?,
                })
            })
            .collect();
        let fill_sent = Instant::now();
        let filled = self.cache.entries.fill(&fills, load_time).await;
        kept.settle(&filled);
        let stored = filled == Filled::Stored(());
        if !fills.is_empty() {
            note("cache.fill", if stored { "stored" } else { "refused" });
        }
        let all_filled = stored && !fills.is_empty() && fills.len() == ids.len();
        let as_of = if all_filled { fill_sent } else { started };
        Ok(Fresh { value: values, as_of })
    }

    /// Reads `ids` from a replica that has every write to them (see
    /// `store::replicas`), or else from the primary. A replica that fails is
    /// left out, and the primary answers instead.
    async fn load(&self, ids: &[E::Id]) -> Result<Vec<E>, ServiceError> {
        let replica = if self.database.any_usable() {
            match self.cache.invalidation.newest_write::<E>(ids).await {
                NewestWrite::Unknown => None,
                NewestWrite::Unmarked => self.database.for_read(None),
                NewestWrite::At(position) => self.database.for_read(Some(position)),
            }
        } else {
            None
        };
        if let Some(replica) = replica {
            match E::load(&replica.pool, ids).await {
                Ok(rows) => {
                    count_read("replica");
                    return Ok(rows);
                }
                Err(error) => {
                    tracing::warn!(%error, replica = replica.label(), "replica read failed; reading the primary");
                    metrics::counter!("readthrough_db_replica_read_failures_total", "replica" => replica.label().to_owned())
                        .increment(1);
                    replica.failed();
                }
            }
        }
        count_read("primary");
        Ok(E::load(self.database.primary(), ids).await?)
    }

    /// Refresh ahead: reload a hot entry in the background before it expires.
    /// The lease makes one caller across all instances do it.
    fn refresh(self: &Arc<Self>, id: E::Id) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(lease) = this.cache.leases.acquire_leases::<E>(&[id]).await.pop().flatten() {
                metrics::counter!("readthrough_cache_refreshes_total", "entity" => E::KIND.label()).increment(1);
                let _ = this.load_and_fill(&[id], &[Some(lease)]).await;
            }
        });
    }
}

/// Records a cache outcome on the current `cache.read` span. The level
/// check keeps a hit from looking up a span no one records.
fn note(field: &str, value: impl tracing::Value) {
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        Span::current().record(field, value);
    }
}

/// A load of missed entities, by the server that answered it.
fn count_read(server: &'static str) {
    metrics::counter!("readthrough_db_miss_reads_total", "server" => server).increment(1);
}

/// The one value of a single-id load.
fn single<E>(fresh: Fresh<Vec<Option<E>>>) -> Fresh<Option<E>> {
    Fresh {
        value: fresh.value.into_iter().next().flatten(),
        as_of: fresh.as_of,
    }
}
