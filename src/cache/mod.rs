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

mod breaker;
pub mod codec;
mod connections;
mod epochs;
pub mod keys;
mod leases;
mod lists;
pub mod near;
mod redis;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use metrics::Counter;
use rand::Rng;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    config::Config,
    domain::{CategoryId, Product, ProductId, User, UserId},
    store::replicas::{self, Lsn},
    telemetry::Throttle,
};
pub use connections::Handle as RedisConnection;
pub use epochs::{Bump, EPOCH_TRUST};
pub use keys::Keys;
pub use leases::{Claim, KeptLeases, Lease, Waited};
pub use lists::{CachedMeta, ListMeta, ListRead};
pub use redis::RedisClient;
use redis::{Delivery, GuardedFill};

/// How often an invalidation is tried before it is given up (and logged).
const INVALIDATION_ATTEMPTS: u32 = 3;
const INVALIDATION_BACKOFF: Duration = Duration::from_millis(20);
/// How many of the keys a group invalidation deleted it names in its answer.
pub const INVALIDATION_SAMPLE: usize = 100;
/// Refresh ahead (XFetch) treats a load as taking at least this long, so that a hot
/// key is refreshed some tens of milliseconds before it expires, not at the last instant.
const REFRESH_MIN_DELTA_MS: f64 = 50.0;
/// At most one log line per interval about rows that cannot be cached.
const UNCACHEABLE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// At most one log line per interval about invalidations left to the relay:
/// while Redis is down every write and every relay round has one.
const INVALIDATION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the cache holds, as the `entity` label of metrics names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub list: Duration,
    /// How long "no such id" is cached.
    pub negative: Duration,
}

/// A hook awaited at a point of the cache's work, given the key concerned.
pub type Hook = Arc<dyn Fn(&str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Points where tests pause or delay the cache, and the switch that shows what
/// leases prevent. Production uses `Hooks::default()`.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Awaited after a fill's database read and before the fill is written.
    pub before_fill: Option<Hook>,
    /// Awaited before a write's invalidation.
    pub before_invalidate: Option<Hook>,
    /// Fills ignore leases: only for the test that shows the stale-set race.
    pub unguarded_fills: bool,
}

/// What the event subscription delivers (see `Cache::receive_events`).
#[derive(Debug)]
pub enum EventFeed {
    /// Subscribed (again): every event from now on arrives.
    Subscribed,
    /// The subscription dropped: events may be missed until `Subscribed`.
    Lost,
    Event(Event),
}

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

/// Keys deleted together by one DEL: an entry and its lease, or a list's keys.
/// They share a hash tag (one Redis Cluster slot), and one command deletes
/// them at once, so no fill can land between the deletion of an entry and
/// that of its lease.
pub type KeyGroup = Vec<String>;

/// A write's WAL position, to record under the written entities' markers
/// (see `store::replicas`).
#[derive(Debug, Clone, Copy)]
pub struct WriteMarks<'a> {
    /// `Keys::write_marker` of each written entity.
    pub keys: &'a [String],
    pub position: Lsn,
}

/// An invalidation, as published to every instance on `<namespace>:v1:events`
/// (JSON, so that other services can read it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// e.g. `user.updated`, `product.price.changed`, `product.moved`.
    pub event: String,
    pub id: uuid::Uuid,
    /// Product categories whose lists changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

pub struct Cache {
    redis: Arc<RedisClient>,
    keys: Keys,
    ttls: Ttls,
    lease_ttl: Duration,
    write_marker_ttl: Duration,
    compress_threshold: usize,
    enabled: bool,
    refresh_ahead: bool,
    hooks: Hooks,
    /// Indexed by `Kind`.
    outcomes: [Outcomes; 3],
    uncacheable_log: Throttle,
    invalidation_log: Throttle,
    /// Reads that may go to PostgreSQL at once because Redis did not answer.
    fallbacks: Arc<tokio::sync::Semaphore>,
}

/// Leave to read PostgreSQL instead of an unavailable Redis (see `Cache::fallback`).
pub struct Fallback(#[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

impl Cache {
    pub fn new(config: &Config, hooks: Hooks) -> anyhow::Result<Self> {
        Ok(Self {
            redis: Arc::new(RedisClient::new(config)?),
            keys: Keys::new(&config.cache_namespace),
            ttls: Ttls {
                user: Duration::from_secs(config.user_ttl_secs),
                product: Duration::from_secs(config.product_ttl_secs),
                list: Duration::from_secs(config.list_ttl_secs),
                negative: Duration::from_secs(config.negative_ttl_secs),
            },
            lease_ttl: Duration::from_millis(config.cache_lease_ms),
            write_marker_ttl: replicas::marker_ttl(config),
            compress_threshold: config.compress_threshold_bytes,
            enabled: config.cache_enabled,
            refresh_ahead: config.refresh_ahead,
            hooks,
            outcomes: Kind::ALL.map(Outcomes::of),
            uncacheable_log: Throttle::default(),
            invalidation_log: Throttle::default(),
            fallbacks: Arc::new(tokio::sync::Semaphore::new(config.database_fallback_limit as usize)),
        })
    }

    fn outcomes(&self, kind: Kind) -> &Outcomes {
        &self.outcomes[kind as usize]
    }

    /// Lookups the near cache answered (see `cache::near`).
    pub fn count_near_hits<E: Cacheable>(&self, hits: u64) {
        if hits > 0 {
            self.outcomes(E::KIND).near_hits.increment(hits);
        }
    }

    /// A fill refused because its lease (or list generation) was gone: a write came first.
    fn count_refused(&self, kind: Kind) {
        metrics::counter!("readthrough_cache_fills_refused_total", "entity" => kind.label()).increment(1);
    }

    /// Leave for a read that found Redis unavailable to go to PostgreSQL, or
    /// `None` when `DATABASE_FALLBACK_LIMIT` such reads are running already:
    /// then the caller is turned away (UNAVAILABLE), so that a Redis outage
    /// cannot send the whole read load to PostgreSQL. With the cache switched
    /// off, PostgreSQL is the read path itself and is not limited here.
    pub fn fallback(&self) -> Option<Fallback> {
        if !self.enabled {
            return Some(Fallback(None));
        }
        match self.fallbacks.clone().try_acquire_owned() {
            Ok(permit) => Some(Fallback(Some(permit))),
            Err(_) => {
                metrics::counter!("readthrough_db_fallbacks_shed_total").increment(1);
                None
            }
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether reads can be answered from Redis now: the cache is on, a
    /// connection is up, the breaker lets commands through, and the key
    /// epochs are known.
    pub fn can_serve(&self) -> bool {
        self.enabled && self.redis.connected() > 0 && self.redis.breaker_closed() && self.epochs_trusted()
    }

    /// How many of the shared Redis connections are up.
    pub fn connections_up(&self) -> usize {
        self.redis.connected()
    }

    /// Looks up each id. `None` when the cache is off or Redis did not answer:
    /// then the caller reads PostgreSQL and fills nothing. Undecodable entries
    /// are deleted and reported as misses, so the fill repairs them.
    pub async fn get_many<E: Cacheable>(&self, ids: &[E::Id]) -> Option<Vec<Cached<E>>> {
        if !self.enabled {
            return None;
        }
        let keys: Vec<String> = ids.iter().map(|&id| self.keys.entry(E::KIND, id)).collect();
        let Some(raw) = self.redis.get_many(&keys).await.filter(|_| self.epochs_trusted()) else {
            self.outcomes(E::KIND).misses.increment(ids.len() as u64);
            return None;
        };
        let now = now_ms();
        let mut corrupt = Vec::new();
        let found: Vec<Cached<E>> = ids
            .iter()
            .zip(raw)
            .zip(&keys)
            .map(
                |((&id, bytes), key)| match bytes.map(|b| self.decode_entry::<E>(&b, id)) {
                    None => Cached::Miss,
                    Some(Some(entry)) => Cached::Hit {
                        refresh: entry.value.is_some() && self.refresh_due(&entry, now),
                        value: entry.value,
                    },
                    Some(None) => {
                        corrupt.push(key.clone());
                        Cached::Miss
                    }
                },
            )
            .collect();
        if !corrupt.is_empty() {
            tracing::warn!(keys = ?corrupt, "discarding corrupt cache entries");
            metrics::counter!("readthrough_cache_corrupt_total", "entity" => E::KIND.label())
                .increment(corrupt.len() as u64);
            self.redis.delete(&corrupt).await;
        }
        let hits = found.iter().filter(|c| matches!(c, Cached::Hit { .. })).count() as u64;
        let outcomes = self.outcomes(E::KIND);
        outcomes.hits.increment(hits);
        if hits < ids.len() as u64 {
            outcomes.misses.increment(ids.len() as u64 - hits);
        }
        Some(found)
    }

    fn decode_entry<E: Cacheable>(&self, bytes: &[u8], id: E::Id) -> Option<Entry<E>> {
        let entry = codec::decode::<Entry<E>>(bytes).ok()?;
        entry
            .value
            .as_ref()
            .is_none_or(|value| value.is_valid_for(id))
            .then_some(entry)
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
    /// True when every value was stored.
    pub async fn fill<E: Cacheable>(&self, fills: &[(E::Id, Option<&E>, &Lease)], load_time: Duration) -> bool {
        if fills.is_empty() {
            return true;
        }
        let keys: Vec<String> = fills.iter().map(|(id, _, _)| self.keys.entry(E::KIND, *id)).collect();
        if let Some(hook) = &self.hooks.before_fill {
            hook(&keys[0]).await;
        }
        let now = now_ms();
        let load_ms = load_time.as_millis().min(u128::from(u32::MAX)) as u32;
        let mut guarded = Vec::with_capacity(fills.len());
        let mut invalid = Vec::new();
        for ((id, value, lease), key) in fills.iter().zip(&keys) {
            if lease.key != self.keys.lease(key) {
                // Taken in an epoch retired since: what it guards is never read again.
                self.count_refused(E::KIND);
                continue;
            }
            if value.is_some_and(|value| !value.is_valid_for(*id)) {
                invalid.push(*lease);
                continue;
            }
            let ttl = match value {
                Some(_) => E::ttl(&self.ttls),
                None => self.ttls.negative,
            };
            let ttl_secs = jittered_secs(ttl);
            let entry = Entry {
                value: *value,
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
        if self.hooks.unguarded_fills {
            let plain: Vec<(String, Vec<u8>, u64)> = guarded
                .into_iter()
                .map(|f| (f.key.to_string(), f.value, f.ttl_secs))
                .collect();
            return self.redis.set_many(&plain).await.is_some();
        }
        let Some(stored) = self.redis.fill_guarded(&guarded).await else {
            return false;
        };
        let refused = stored.iter().filter(|s| !**s).count();
        for _ in 0..refused {
            self.count_refused(E::KIND);
        }
        refused == 0 && stored.len() == fills.len()
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
        self.release(leases).await;
    }

    /// The keys to delete when an entity changes: its fill leases, then its
    /// entries, in each epoch an instance may be reading (see `cache::epochs`).
    pub fn entity_keys<E: Cacheable>(&self, id: E::Id) -> KeyGroup {
        self.keys.entry_group(E::KIND, id)
    }

    /// Where writes of this entity record their WAL position (see `store::replicas`).
    pub fn write_marker<E: Cacheable>(&self, id: E::Id) -> String {
        self.keys.write_marker(E::KIND, id)
    }

    /// The newest write position marked for any of `ids` (`Some(None)`: no
    /// marker), or `None` when the cache is off or Redis did not answer: then
    /// nothing is known, and only the primary may be read.
    pub async fn newest_write<E: Cacheable>(&self, ids: &[E::Id]) -> Option<Option<Lsn>> {
        if !self.enabled {
            return None;
        }
        let keys: Vec<String> = ids.iter().map(|&id| self.write_marker::<E>(id)).collect();
        let markers = self.redis.get_many(&keys).await?;
        // A marker that does not parse is treated as one no replica has reached.
        Some(
            markers
                .iter()
                .flatten()
                .map(|marker| Lsn::from_marker(marker).unwrap_or(Lsn::UNREACHABLE))
                .max(),
        )
    }

    /// Whether values read from Redis may be used now (see `cache::epochs`).
    fn epochs_trusted(&self) -> bool {
        self.keys.epochs_known().trusted()
    }

    /// Records `marks` (when replicas are read), deletes each group of keys
    /// with one command and publishes `events`, all in one round trip,
    /// retrying a few times; returns whether Redis confirmed it. A marker is
    /// set before the keys it guards are deleted, so a miss that finds them
    /// gone finds it. Events are delivered at least once.
    pub async fn invalidate(&self, groups: &[KeyGroup], marks: Option<WriteMarks<'_>>, events: &[Event]) -> bool {
        if let (Some(hook), Some(first)) = (&self.hooks.before_invalidate, groups.first().and_then(|g| g.last())) {
            hook(first).await;
        }
        let messages: Vec<Vec<u8>> = events.iter().filter_map(|e| serde_json::to_vec(e).ok()).collect();
        for attempt in 1..=INVALIDATION_ATTEMPTS {
            // Done only if the epochs it deleted in were still trusted when Redis confirmed it.
            if self
                .redis
                .delete_and_publish(groups, marks, self.write_marker_ttl, &self.keys.events(), &messages)
                .await
                .is_some()
                && self.epochs_trusted()
            {
                for event in events {
                    metrics::counter!("readthrough_events_published_total", "event" => event_label(&event.event))
                        .increment(1);
                }
                return true;
            }
            // With the breaker open a retry would be skipped too: leave it to the relay now.
            if attempt < INVALIDATION_ATTEMPTS && self.redis.breaker_closed() {
                tokio::time::sleep(INVALIDATION_BACKOFF * attempt).await;
            } else {
                break;
            }
        }
        metrics::counter!("readthrough_invalidation_failures_total").increment(1);
        if let Some(held_back) = self.invalidation_log.pass(INVALIDATION_LOG_INTERVAL) {
            tracing::warn!(
                keys = groups.len(),
                held_back,
                "invalidation failed; the outbox relay will retry it"
            );
        }
        false
    }

    /// Operator invalidation of known keys: the ones of `keys` that exist,
    /// deleted unless `dry_run`. `None` when Redis did not answer. Works with
    /// the cache disabled too: entries left in Redis are still worth deleting.
    pub async fn invalidate_keys(&self, keys: &[String], dry_run: bool) -> Option<Vec<String>> {
        let present = if dry_run {
            self.redis.exists_each(keys).await?
        } else {
            self.redis.unlink_each(keys).await?
        };
        Some(
            keys.iter()
                .zip(present)
                .filter(|(_, present)| *present)
                .map(|(key, _)| key.clone())
                .collect(),
        )
    }

    /// How many keys `kinds` hold at their current epochs (what bumping them
    /// retires), found with SCAN in batches, and the first
    /// `INVALIDATION_SAMPLE` of them. `None` when Redis stopped answering.
    pub async fn count_keys(&self, kinds: &[Kind]) -> Option<(u64, Vec<String>)> {
        let mut count = 0u64;
        let mut sample = Vec::new();
        for &kind in kinds {
            self.redis
                .scan_matching(&self.keys.pattern_for(kind), |batch| {
                    count += batch.len() as u64;
                    let room = INVALIDATION_SAMPLE.saturating_sub(sample.len());
                    sample.extend(batch.into_iter().take(room));
                })
                .await?;
        }
        Some((count, sample))
    }

    /// Receives every instance's invalidation events, forever, counting them;
    /// also says when the subscription is up and when it dropped.
    pub async fn receive_events(&self, mut on: impl FnMut(EventFeed)) {
        self.redis
            .subscribe(&self.keys.events(), |delivery| match delivery {
                Delivery::Subscribed => on(EventFeed::Subscribed),
                Delivery::Lost => on(EventFeed::Lost),
                Delivery::Message(payload) => match serde_json::from_slice::<Event>(payload) {
                    Ok(event) => {
                        metrics::counter!("readthrough_events_received_total", "event" => event_label(&event.event))
                            .increment(1);
                        on(EventFeed::Event(event));
                    }
                    Err(error) => tracing::warn!(%error, "ignoring a malformed invalidation event"),
                },
            })
            .await;
    }

    /// Opens the Redis connections (see `RedisClient::open_connections`).
    /// Then reads the key epochs, without which no value read is used.
    pub async fn open_connections(&self) {
        if self.enabled {
            self.redis.open_connections().await;
            self.learn_epochs().await;
        }
    }
}

/// The event names the triggers record (see the migrations).
const EVENT_NAMES: &[&str] = &[
    "user.created",
    "user.updated",
    "user.deleted",
    "user.truncated",
    "product.created",
    "product.updated",
    "product.price.changed",
    "product.moved",
    "product.deleted",
    "product.truncated",
];

/// The `event` label of an event metric: a known name, or `other`, so that
/// whatever else is published on the shared channel cannot add series.
fn event_label(name: &str) -> &'static str {
    EVENT_NAMES
        .iter()
        .find(|known| **known == name)
        .copied()
        .unwrap_or("other")
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
    fn event_labels_are_known_names_or_other() {
        assert_eq!(event_label("product.price.changed"), "product.price.changed");
        assert_eq!(event_label("user.truncated"), "user.truncated");
        assert_eq!(event_label("x".repeat(100).as_str()), "other");
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let secs = jittered_secs(Duration::from_secs(3600));
            assert!((3240..=3960).contains(&secs), "{secs}");
        }
        assert_eq!(jittered_secs(Duration::from_millis(10)), 1);
    }
}
