//! The shared Redis cache: key names, value encoding, fail-open Redis access,
//! and the typed operations the services use.
//!
//! The cache knows entities and keys but nothing about gRPC or SQL: services
//! hand it values loaded from the store and ask it for values by id.

pub mod codec;
pub mod keys;
mod redis;

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    config::Config,
    domain::{CategoryId, Product, ProductId, User, UserId},
};
pub use keys::Keys;
pub use redis::RedisClient;

/// How often an invalidation is tried before it is given up (and logged).
const INVALIDATION_ATTEMPTS: u32 = 3;
const INVALIDATION_BACKOFF: Duration = Duration::from_millis(20);

/// An entity the cache stores under one key per id.
pub trait Cacheable: Serialize + DeserializeOwned {
    type Id: Copy + Eq + std::hash::Hash;
    /// The `entity` label of metrics.
    const ENTITY: &'static str;
    fn key(keys: &Keys, id: Self::Id) -> String;
    fn id(&self) -> Self::Id;
    fn ttl(ttls: &Ttls) -> Duration;
    /// A decoded value must belong to the key it was read from and be plausible.
    fn is_valid_for(&self, id: Self::Id) -> bool;
}

impl Cacheable for User {
    type Id = UserId;
    const ENTITY: &'static str = "user";
    fn key(keys: &Keys, id: UserId) -> String {
        keys.user(id)
    }
    fn id(&self) -> UserId {
        UserId::from_uuid(self.id)
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
    const ENTITY: &'static str = "product";
    fn key(keys: &Keys, id: ProductId) -> String {
        keys.product(id)
    }
    fn id(&self) -> ProductId {
        ProductId::from_uuid(self.id)
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
}

/// What a category list's metadata key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMeta {
    /// Products in the category.
    pub total: u64,
    /// How many of them, from the first, the ids key holds.
    pub cached: u64,
}

/// A page of a category read from the cache.
#[derive(Debug)]
pub enum ListLookup {
    /// The page's ids in order, and the metadata.
    Hit { ids: Vec<ProductId>, meta: ListMeta },
    /// The list is cached but this page lies past its cached ids.
    Beyond { meta: ListMeta },
    /// Not cached (or cached but damaged): load and fill.
    Miss,
    /// The cache is off or Redis did not answer: read only the page from PostgreSQL.
    Unavailable,
}

pub struct Cache {
    redis: RedisClient,
    keys: Keys,
    ttls: Ttls,
    compress_threshold: usize,
    enabled: bool,
}

impl Cache {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            redis: RedisClient::new(config)?,
            keys: Keys::new(&config.cache_namespace),
            ttls: Ttls {
                user: Duration::from_secs(config.user_ttl_secs),
                product: Duration::from_secs(config.product_ttl_secs),
                list: Duration::from_secs(config.list_ttl_secs),
            },
            compress_threshold: config.compress_threshold_bytes,
            enabled: config.cache_enabled,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Looks up each id; `None` at a position is a miss (absent, undecodable, or
    /// Redis unavailable). Undecodable entries are deleted so the fill repairs them.
    pub async fn get_many<E: Cacheable>(&self, ids: &[E::Id]) -> Vec<Option<E>> {
        if !self.enabled || ids.is_empty() {
            return ids.iter().map(|_| None).collect();
        }
        let keys: Vec<String> = ids.iter().map(|&id| E::key(&self.keys, id)).collect();
        let Some(raw) = self.redis.get_many(&keys).await else {
            metrics::counter!("readthrough_cache_misses_total", "entity" => E::ENTITY)
                .increment(ids.len() as u64);
            return ids.iter().map(|_| None).collect();
        };
        let mut corrupt = Vec::new();
        let values: Vec<Option<E>> = ids
            .iter()
            .zip(raw)
            .zip(&keys)
            .map(|((&id, bytes), key)| {
                let bytes = bytes?;
                match codec::decode::<E>(&bytes) {
                    Ok(value) if value.is_valid_for(id) => Some(value),
                    outcome => {
                        let why = outcome
                            .err()
                            .map_or_else(|| "belongs to another id".to_string(), |e| e.to_string());
                        tracing::warn!(key, why, "discarding corrupt cache entry");
                        corrupt.push(key.clone());
                        None
                    }
                }
            })
            .collect();
        if !corrupt.is_empty() {
            metrics::counter!("readthrough_cache_corrupt_total", "entity" => E::ENTITY)
                .increment(corrupt.len() as u64);
            self.redis.delete(&corrupt).await;
        }
        let hits = values.iter().filter(|v| v.is_some()).count() as u64;
        metrics::counter!("readthrough_cache_hits_total", "entity" => E::ENTITY).increment(hits);
        metrics::counter!("readthrough_cache_misses_total", "entity" => E::ENTITY)
            .increment(ids.len() as u64 - hits);
        values
    }

    /// Stores values just loaded from PostgreSQL, each with its entity's TTL (jittered).
    pub async fn put_many<E: Cacheable>(&self, values: &[E]) {
        if !self.enabled || values.is_empty() {
            return;
        }
        let entries: Vec<(String, Vec<u8>, u64)> = values
            .iter()
            .filter_map(|value| match codec::encode(value, self.compress_threshold) {
                Ok(bytes) => Some((E::key(&self.keys, value.id()), bytes, jittered_secs(E::ttl(&self.ttls)))),
                Err(error) => {
                    tracing::error!(%error, entity = E::ENTITY, "cannot encode value for the cache");
                    None
                }
            })
            .collect();
        self.redis.set_many(&entries).await;
    }

    /// Reads positions `offset..offset + limit` of a category list.
    pub async fn get_list_page(
        &self,
        category: &CategoryId,
        offset: u64,
        limit: u64,
    ) -> ListLookup {
        if !self.enabled {
            return ListLookup::Unavailable;
        }
        let ids_key = self.keys.list_ids(category);
        let meta_key = self.keys.list_meta(category);
        let stop = offset + limit - 1;
        let Some(raw) = self
            .redis
            .read_list_page(&ids_key, &meta_key, offset, stop)
            .await
        else {
            metrics::counter!("readthrough_cache_misses_total", "entity" => "list").increment(1);
            return ListLookup::Unavailable;
        };
        let Some(meta_bytes) = raw.meta else {
            return list_miss();
        };
        let meta = match codec::decode::<ListMeta>(&meta_bytes) {
            Ok(meta) if meta.cached <= meta.total => meta,
            outcome => {
                tracing::warn!(key = meta_key, error = ?outcome.err(), "discarding corrupt list metadata");
                metrics::counter!("readthrough_cache_corrupt_total", "entity" => "list")
                    .increment(1);
                self.redis.delete(&[ids_key, meta_key]).await;
                return list_miss();
            }
        };
        // A page is served from the cache only when every id it needs is cached.
        let page_end = (offset + limit).min(meta.total);
        if page_end > meta.cached {
            metrics::counter!("readthrough_cache_misses_total", "entity" => "list").increment(1);
            return ListLookup::Beyond { meta };
        }
        let expected = page_end.saturating_sub(offset) as usize;
        let ids: Option<Vec<ProductId>> =
            raw.ids.iter().map(|id| ProductId::parse(id).ok()).collect();
        match ids {
            Some(ids) if ids.len() == expected => {
                metrics::counter!("readthrough_cache_hits_total", "entity" => "list").increment(1);
                ListLookup::Hit { ids, meta }
            }
            // Evicted ids with surviving metadata, or garbage members: rebuild the list.
            _ => {
                metrics::counter!("readthrough_cache_corrupt_total", "entity" => "list")
                    .increment(1);
                self.redis.delete(&[ids_key, meta_key]).await;
                list_miss()
            }
        }
    }

    /// Stores the first `ids.len()` ids of a category in order, with the category's total.
    pub async fn put_list(&self, category: &CategoryId, ids: &[ProductId], total: u64) {
        if !self.enabled {
            return;
        }
        let meta = ListMeta {
            total,
            cached: ids.len() as u64,
        };
        let Ok(meta_bytes) = codec::encode(&meta, self.compress_threshold) else {
            return;
        };
        let ids: Vec<String> = ids.iter().map(ProductId::to_string).collect();
        let ttl = jittered_secs(self.ttls.list);
        self.redis
            .write_list(
                &self.keys.list_ids(category),
                &self.keys.list_meta(category),
                &ids,
                &meta_bytes,
                ttl,
            )
            .await;
    }

    /// Deletes `keys`, retrying a few times; returns whether Redis confirmed it.
    ///
    /// Called after a write has committed. When every attempt fails the entries
    /// stay until their TTL runs out: the caller logs that risk.
    pub async fn invalidate(&self, keys: &[String]) -> bool {
        for attempt in 1..=INVALIDATION_ATTEMPTS {
            if self.redis.delete(keys).await.is_some() {
                return true;
            }
            if attempt < INVALIDATION_ATTEMPTS {
                tokio::time::sleep(INVALIDATION_BACKOFF * attempt).await;
            }
        }
        metrics::counter!("readthrough_invalidation_failures_total").increment(1);
        tracing::error!(
            ?keys,
            "invalidation failed; entries may be stale until their TTL expires"
        );
        false
    }

    pub async fn ping(&self) -> bool {
        self.redis.ping().await
    }
}

fn list_miss() -> ListLookup {
    metrics::counter!("readthrough_cache_misses_total", "entity" => "list").increment(1);
    ListLookup::Miss
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
