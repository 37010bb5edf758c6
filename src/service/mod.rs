//! The read-through and write-invalidate logic for each entity, free of gRPC.
//!
//! Reads: cache, then PostgreSQL for what the cache lacks, then fill the cache.
//! Writes: PostgreSQL first, then delete every cache key the write affects,
//! before returning, so the writer's next read never sees the old value.

mod lists;
mod products;
mod read_through;
pub mod relay;
mod single_flight;
mod users;
mod written;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use sqlx::PgPool;

pub use products::{ProductPage, Products};
pub use users::Users;

use crate::{
    cache::{Cache, EventFeed, Kind, near::NearCache},
    config::Config,
    domain::ValidationError,
    store::{self, StoreError, replicas::Database},
};
use written::invalidate_written;

/// How often the gauges of pools and the outbox are set.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Both services over one database pool and one cache.
#[derive(Clone)]
pub struct Services {
    pub users: Users,
    pub products: Products,
    pub cache: Arc<Cache>,
    pub database: Arc<Database>,
    /// Keeps the cache's key epochs, the fence and what is known of the
    /// replicas current while any clone lives.
    _followers: Arc<[AbortOnDrop; 3]>,
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Services {
    /// Connects to PostgreSQL and Redis; works while Redis is down (its
    /// connections are retried in the background). Every command that uses
    /// the cache (serve, seed, warm) follows the key epochs from here on:
    /// without them it could use no value read and confirm no invalidation.
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let cache = Cache::new(config).context("the Redis settings")?;
        let pool = store::connect(&config.database)
            .await
            .context("connecting to PostgreSQL")?;
        let database = Arc::new(Database::new(&config.database, &config.replicas, pool)?);
        let cache = Arc::new(cache);
        let users = Users::new(database.clone(), cache.clone(), near_cache(config));
        let products = Products::new(
            database.clone(),
            cache.clone(),
            near_cache(config),
            config.cache.list_cache_max_ids,
            config.cache.list_chunk_ids,
        );
        // What the near cache holds of a kind may be stale once its epoch
        // moved (it was read in the old one) or its writes were fenced.
        let forget = {
            let (users, products) = (users.clone(), products.clone());
            move |kind| match kind {
                Kind::User => users.forget_all(),
                Kind::Product => products.forget_all(),
                Kind::List => {}
            }
        };
        cache.fence().on_raise(forget.clone());
        if config.cache.enabled {
            follow_epochs_in(&cache, database.primary(), &config.cache.namespace, forget).await;
        }
        cache.open_connections().await;
        let epochs = tokio::spawn({
            let cache = cache.clone();
            async move { cache.epochs.follow().await }
        });
        if config.cache.enabled {
            written::check_fence(&cache, database.primary()).await;
        }
        let fence = tokio::spawn({
            let (cache, database) = (cache.clone(), database.clone());
            async move { written::follow_fence(&cache, database.primary()).await }
        });
        let probe = tokio::spawn({
            let database = database.clone();
            async move { database.follow().await }
        });
        Ok(Self {
            users,
            products,
            cache,
            database,
            _followers: Arc::new([
                AbortOnDrop(epochs.abort_handle()),
                AbortOnDrop(fence.abort_handle()),
                AbortOnDrop(probe.abort_handle()),
            ]),
        })
    }

    /// The primary database, for writes and what must see them.
    pub fn pool(&self) -> &PgPool {
        self.database.primary()
    }

    /// Sets the gauges of what the dependencies hold, every `GAUGE_INTERVAL`,
    /// until the task is dropped: the database pool's connections in use and
    /// idle, the Redis connections up, and the outbox backlog.
    pub async fn report_gauges(&self) {
        let mut every = tokio::time::interval(GAUGE_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let pool = self.pool();
            let (size, idle) = (pool.size(), pool.num_idle() as u32);
            metrics::gauge!("readthrough_db_pool_connections", "state" => "in_use")
                .set(size.saturating_sub(idle) as f64);
            metrics::gauge!("readthrough_db_pool_connections", "state" => "idle").set(idle as f64);
            metrics::gauge!("readthrough_redis_connections_up").set(self.cache.connections_up() as f64);
            if let Ok((rows, oldest_seconds)) = store::outbox_backlog(pool).await {
                metrics::gauge!("readthrough_outbox_backlog_rows").set(rows as f64);
                metrics::gauge!("readthrough_outbox_oldest_seconds").set(oldest_seconds);
            }
        }
    }

    /// Acts on what the invalidation event subscription delivers: near caches
    /// drop the entities events name, and drop everything (and pause) while
    /// events may be missed.
    pub fn on_event(&self, feed: &EventFeed) {
        match feed {
            EventFeed::Subscribed => {
                self.users.listening(true);
                self.products.listening(true);
            }
            EventFeed::Lost => {
                self.users.listening(false);
                self.products.listening(false);
            }
            EventFeed::Event(event) => {
                match (event.event.entity(), event.event.covers_every_entity()) {
                    (Some(Kind::User), false) => self.users.forget(event.id),
                    (Some(Kind::Product), false) => self.products.forget(event.id),
                    (Some(Kind::User), true) => self.users.forget_all(),
                    (Some(Kind::Product), true) => self.products.forget_all(),
                    // Another service's event on the shared channel: nothing cached here.
                    (Some(Kind::List) | None, _) => {}
                }
            }
        }
    }
}

/// Starts the cache's key epochs from the highest recorded in PostgreSQL
/// (see `store::epochs`), and records each rise there from now on, besides
/// calling `forget` with the kind.
async fn follow_epochs_in(
    cache: &Arc<Cache>,
    pool: &PgPool,
    namespace: &str,
    forget: impl Fn(Kind) + Send + Sync + 'static,
) {
    let epochs = cache.keys().epochs_known();
    match store::epochs::highest(pool, namespace).await {
        Ok(highest) => {
            for (label, epoch) in highest {
                if let Some(kind) = Kind::parse(&label) {
                    epochs.raise(kind, epoch.max(0) as u64);
                }
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read the key epochs recorded in PostgreSQL"),
    }
    let (keys, pool, namespace) = (cache.keys().clone(), pool.clone(), namespace.to_string());
    epochs.on_change(move |kind| {
        forget(kind);
        let (pool, namespace, epoch) = (pool.clone(), namespace.clone(), keys.epochs_known().of(kind));
        tokio::spawn(async move {
            if let Err(error) = store::epochs::raise(&pool, &namespace, kind.label(), epoch as i64).await {
                tracing::warn!(%error, "cannot record a key epoch in PostgreSQL");
            }
        });
    });
}

/// A near cache for one entity kind, when configured.
fn near_cache<K, V>(config: &Config) -> Option<NearCache<K, V>>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    config
        .cache
        .near_cache_enabled
        .then(|| NearCache::new(config.cache.near_cache_capacity, config.cache.near_cache_ttl))
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    #[error("version is {actual}, not the expected {expected}")]
    VersionMismatch { expected: i64, actual: i64 },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("database unavailable")]
    Unavailable(#[source] StoreError),
    /// Redis is unavailable and `DATABASE_FALLBACK_LIMIT` reads fall back to PostgreSQL already.
    #[error("cache unavailable and the database fallback is at its limit")]
    FallbackLimit,
    #[error("transaction aborted by the database (a conflict); retry")]
    Aborted(#[source] StoreError),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl ServiceError {
    /// Maps a store error, naming `what` (e.g. "user 8c0e...") when it is absent.
    fn from_store(error: StoreError, what: impl FnOnce() -> String) -> Self {
        match error {
            StoreError::NotFound => Self::NotFound(what()),
            StoreError::AlreadyExists(what) => Self::AlreadyExists(what),
            StoreError::VersionMismatch { expected, actual } => Self::VersionMismatch { expected, actual },
            StoreError::Invalid(invalid) => Self::Invalid(invalid),
            error @ StoreError::Unavailable(_) => Self::Unavailable(error),
            error @ StoreError::Aborted(_) => Self::Aborted(error),
            error @ StoreError::Other(_) => Self::Internal(error),
        }
    }
}

impl From<StoreError> for ServiceError {
    /// For errors where "not found" cannot happen or has no better name.
    fn from(error: StoreError) -> Self {
        Self::from_store(error, || "entity".to_string())
    }
}
