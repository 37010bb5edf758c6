//! The shared Redis cache: key names, value encoding, fail-open Redis access,
//! fill leases, and the typed operations the services use.
//!
//! The cache knows entities and keys but nothing about gRPC or SQL: services
//! hand it values loaded from the store and ask it for values by id.
//!
//! Every fill happens under a lease (`SET NX PX` of a random token). The lease
//! makes one caller across all instances the filler of a missing key, and a
//! write deletes it together with the entry, so a fill of data read before the
//! write is refused (the stale-set race of plain cache-aside).
//!
//! Where things are:
//! - `entries.rs`: reading entries (hit, miss, corrupt), refresh ahead, fills;
//! - `leases.rs`: fill leases: taking, keeping alive, waiting for a fill;
//! - `lists.rs`: category lists as sorted sets, and their pages;
//! - `invalidation.rs`: what a write deletes, write markers, admin deletes;
//! - `events.rs`: invalidation events, published and received;
//! - `epochs.rs`: key epochs (retiring a kind, failovers, new servers);
//! - `fence.rs`: writes whose invalidation is pending (Redis unreachable);
//! - `keys.rs`: key names; `codec.rs`: value encoding; `near.rs`: the
//!   in-process near cache;
//! - `redis/`: the Redis commands (`mod.rs`), how they run: deadline,
//!   breaker, fail open (`execute.rs`), where they go: one Redis, Sentinel
//!   or a cluster (`topology.rs`), the shared connections, the circuit
//!   breaker and the Lua scripts;
//! - `failpoints.rs`: named points where tests pause the work (`failpoint!`).

pub mod codec;
mod entries;
mod epochs;
mod events;
mod failpoints;
mod fence;
mod invalidation;
pub mod keys;
mod leases;
mod lists;
pub mod near;
mod redis;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use metrics::Counter;
use rand::Rng;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    config::Config,
    domain::{CategoryId, Product, ProductId, User, UserId},
    store::replicas,
};
pub use entries::{Cached, Entries, Entry, Fill, Filled};
pub use epochs::{Bump, EPOCH_TRUST, KeyEpochs};
pub use events::{Event, EventFeed, EventName};
use failpoints::failpoint;
#[cfg(feature = "test-hooks")]
pub use failpoints::{Hook, Hooks};
pub use fence::{FENCE_POLL, FENCE_TRUST, Fence};
pub use invalidation::{INVALIDATION_SAMPLE, Invalidation, KeyGroup, NewestWrite, WriteMarks};
pub use keys::Keys;
pub use leases::{Claim, KeptLeases, Lease, Leases, Waited};
pub use lists::{CachedMeta, ListMeta, ListRead, Lists};
use redis::Purpose;
pub use redis::connections::Handle as RedisConnection;
pub use redis::{RedisClient, Topology};

/// What the cache holds, as the `entity` label of metrics names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    User,
    Product,
    List,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::User, Kind::Product, Kind::List];

    /// The kind a label names (`user`, `product`, `list`).
    pub fn parse(label: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.label() == label)
    }

    pub const fn label(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Product => "product",
            Kind::List => "list",
        }
    }
}

/// Hit and miss counters of one kind, registered once: looking a labelled
/// metric up by name on every request costs more than the lookup it counts.
struct Outcomes {
    hits: Counter,
    misses: Counter,
    near_hits: Counter,
}

impl Outcomes {
    fn of(kind: Kind) -> Self {
        Self {
            hits: metrics::counter!("readthrough_cache_hits_total", "entity" => kind.label()),
            misses: metrics::counter!("readthrough_cache_misses_total", "entity" => kind.label()),
            near_hits: metrics::counter!("readthrough_near_cache_hits_total", "entity" => kind.label()),
        }
    }
}

/// An entity the cache stores under one key per id.
pub trait Cacheable: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    type Id: Copy + Eq + std::hash::Hash + std::fmt::Display + Send + Sync + 'static;
    const KIND: Kind;
    fn id(&self) -> Self::Id;
    /// The id an outbox row or an event names.
    fn id_of(uuid: uuid::Uuid) -> Self::Id;
    fn ttl(ttls: &Ttls) -> Duration;
    /// A decoded value must belong to the key it was read from and be plausible.
    fn is_valid_for(&self, id: Self::Id) -> bool;
}

impl Cacheable for User {
    type Id = UserId;
    const KIND: Kind = Kind::User;
    fn id(&self) -> UserId {
        UserId::from_uuid(self.id)
    }
    fn id_of(uuid: uuid::Uuid) -> UserId {
        UserId::from_uuid(uuid)
    }
    fn ttl(ttls: &Ttls) -> Duration {
        ttls.user
    }
    fn is_valid_for(&self, id: UserId) -> bool {
        self.id == id.as_uuid() && self.version >= 1 && self.preferences.is_object()
    }
}

impl Cacheable for Product {
    type Id = ProductId;
    const KIND: Kind = Kind::Product;
    fn id(&self) -> ProductId {
        ProductId::from_uuid(self.id)
    }
    fn id_of(uuid: uuid::Uuid) -> ProductId {
        ProductId::from_uuid(uuid)
    }
    fn ttl(ttls: &Ttls) -> Duration {
        ttls.product
    }
    fn is_valid_for(&self, id: ProductId) -> bool {
        self.id == id.as_uuid()
            && self.version >= 1
            && self.price_cents >= 0
            && CategoryId::parse(&self.category_id).is_ok()
    }
}

#[derive(Debug, Clone)]
pub struct Ttls {
    pub user: Duration,
    pub product: Duration,
    /// How long "no such id" is cached.
    pub negative: Duration,
}

/// The shared Redis cache, as a handle for each job over one core: a
/// caller sees from the handle it uses what that work may touch.
pub struct Cache {
    pub entries: Entries,
    pub leases: Leases,
    pub lists: Lists,
    pub invalidation: Invalidation,
    pub epochs: KeyEpochs,
    core: Arc<Core>,
}

/// What every handle shares: the Redis clients, the key names (with the
/// epochs they are at), the fence, and the hit and miss counters.
struct Core {
    /// What requests use: shared connections, behind the breaker.
    redis: Arc<RedisClient>,
    /// Background work: the relay's batches, leases given back.
    background: Arc<RedisClient>,
    keys: Keys,
    fence: Fence,
    enabled: bool,
    #[cfg(feature = "test-hooks")]
    hooks: std::sync::OnceLock<Hooks>,
    /// Indexed by `Kind`.
    outcomes: [Outcomes; 3],
    /// Reads that may go to PostgreSQL at once because Redis did not answer.
    fallbacks: Arc<tokio::sync::Semaphore>,
}

impl Core {
    fn outcomes(&self, kind: Kind) -> &Outcomes {
        &self.outcomes[kind as usize]
    }

    /// A fill refused because its lease (or list generation) was gone: a write came first.
    fn count_refused(&self, kind: Kind) {
        metrics::counter!("readthrough_cache_fills_refused_total", "entity" => kind.label()).increment(1);
    }

    /// Whether values read from Redis may be used now (see `cache::epochs`).
    fn epochs_trusted(&self) -> bool {
        self.keys.epochs_known().trusted()
    }

    /// Whether what Redis holds of `kind` may be used now: the epochs are
    /// trusted and no fenced write covers the kind (see `cache::fence`).
    fn trusted(&self, kind: Kind) -> bool {
        self.epochs_trusted() && self.fence.trusts(kind)
    }
}

/// Leave to read PostgreSQL instead of an unavailable Redis (see `Cache::fallback`).
pub struct Fallback(#[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

impl Cache {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let keys = Keys::new(&config.cache.namespace);
        let topology = Topology::from_config(&config.cache)?;
        let on_connect = epochs::on_connect(keys.clone(), topology.is_cluster());
        let client = |purpose| RedisClient::new(&config.cache, &topology, purpose, on_connect.clone());
        let core = Arc::new(Core {
            redis: Arc::new(client(Purpose::Requests)?),
            background: Arc::new(client(Purpose::Background)?),
            keys,
            fence: Fence::default(),
            enabled: config.cache.enabled,
            #[cfg(feature = "test-hooks")]
            hooks: std::sync::OnceLock::new(),
            outcomes: Kind::ALL.map(Outcomes::of),
            fallbacks: Arc::new(tokio::sync::Semaphore::new(config.cache.fallback_limit as usize)),
        });
        let leases = Leases::new(core.clone(), config.cache.lease);
        Ok(Self {
            entries: Entries::new(core.clone(), leases.clone(), &config.cache),
            lists: Lists::new(core.clone(), leases.clone(), &config.cache),
            leases,
            invalidation: Invalidation::new(core.clone(), replicas::marker_ttl(&config.replicas)),
            epochs: KeyEpochs::new(core.clone()),
            core,
        })
    }

    /// Leave for a read that found Redis unavailable to go to PostgreSQL:
    /// one of `DATABASE_FALLBACK_LIMIT`, waited for at most a Redis deadline
    /// (no longer than the read would have waited for Redis), or `None`, and
    /// the caller is turned away (UNAVAILABLE), so that a Redis outage cannot
    /// send the whole read load to PostgreSQL. The wait lets a short burst
    /// (a breaker opening for a moment) through at PostgreSQL's pace. With
    /// the cache switched off, PostgreSQL is the read path itself and is not
    /// limited here.
    pub async fn fallback(&self) -> Option<Fallback> {
        let core = &self.core;
        if !core.enabled {
            return Some(Fallback(None));
        }
        let waited = tokio::time::timeout(core.redis.timeout(), core.fallbacks.clone().acquire_owned()).await;
        match waited {
            Ok(Ok(permit)) => Some(Fallback(Some(permit))),
            // Timed out (or closed, which it never is).
            _ => {
                metrics::counter!("readthrough_db_fallbacks_shed_total").increment(1);
                None
            }
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.core.keys
    }

    /// Whether reads can be answered from Redis now: the cache is on, a
    /// connection is up, the breaker lets commands through, and the key
    /// epochs are known.
    pub fn can_serve(&self) -> bool {
        let core = &self.core;
        core.enabled && core.redis.connected() > 0 && core.redis.breaker_closed() && core.epochs_trusted()
    }

    /// What this instance knows of fenced writes (see `cache::fence`).
    pub fn fence(&self) -> &Fence {
        &self.core.fence
    }

    /// How many of the shared Redis connections are up.
    pub fn connections_up(&self) -> usize {
        self.core.redis.connected()
    }

    /// Opens the Redis connections (see `RedisClient::open_connections`).
    /// Then reads the key epochs, without which no value read is used.
    pub async fn open_connections(&self) {
        if self.core.enabled {
            self.core.redis.open_connections().await;
            self.core.background.open_connections().await;
            self.epochs.learn().await;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ttl` ±10 %, in whole seconds (at least 1), so entries filled together do not expire together.
fn jittered_secs(ttl: Duration) -> u64 {
    let factor = rand::rng().random_range(0.9..=1.1);
    (ttl.as_secs_f64() * factor).round().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let secs = jittered_secs(Duration::from_secs(3600));
            assert!((3240..=3960).contains(&secs), "{secs}");
        }
        assert_eq!(jittered_secs(Duration::from_millis(10)), 1);
    }
}
