//! Category lists: a category's products in (name, id) order, cached in parts.
//!
//! Four keys under the hash tag `{<category>}` (one Redis Cluster slot):
//!
//! ```text
//! …:meta        ListMeta: total, generation, how many ids the head holds, chunk size
//! …:ids         sorted set: member = product id, score = position in the order
//! …:dir         ListDir: the (name, id) at every chunk start, for loading any chunk
//! …:ids:lease   lease of the head fill
//! ```
//!
//! A cold list is filled with its head (the first ids, up to the fill cap) and
//! its metadata, under the lease. A page past the head finds its positions
//! missing and loads the chunk(s) holding them: with the directory, each chunk
//! is one index range scan in PostgreSQL, so a deep page costs what page 0
//! costs. The directory is built once per generation, the first time a chunk
//! is needed.
//!
//! Every head fill draws a new random generation. Chunks and the directory are
//! written only while the metadata holds exactly the bytes their loader read
//! (compared inside Redis), so they always belong to the list the metadata
//! describes; an invalidation deletes all four keys, and nothing read before
//! it can be written back after it. A head fill whose lease belongs to a
//! retired key epoch is refused too (see `cache::epochs`).

use std::{sync::Arc, time::Duration};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Claim, Core, Filled, KeyGroup, Kind, Lease, Leases, Waited, codec, failpoint, jittered_secs};
use crate::{
    config::CacheConfig,
    domain::{CategoryId, ProductId},
};

/// What is stored under a list's metadata key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMeta {
    /// Products in the category.
    pub total: u64,
    /// Random and never 0; new at every head fill.
    pub generation: u64,
    /// Positions `0..head` were cached with the metadata.
    pub head: u64,
    /// Positions `k * chunk .. (k + 1) * chunk` are loaded together.
    pub chunk: u64,
}

impl ListMeta {
    /// The chunk that holds `position`.
    pub fn chunk_of(&self, position: u64) -> u64 {
        position / self.chunk
    }
}

/// A list's metadata as read, with its exact bytes, which guard later writes.
#[derive(Debug, Clone)]
pub struct CachedMeta {
    pub meta: ListMeta,
    bytes: Vec<u8>,
}

/// The (name, id) of the first product of every chunk, for one generation.
#[derive(Debug, Serialize, Deserialize)]
struct ListDir {
    generation: u64,
    starts: Vec<(String, uuid::Uuid)>,
}

/// A page of a category list as found in the cache.
#[derive(Debug)]
pub enum ListRead {
    /// Every id of the page, in order.
    Hit { ids: Vec<ProductId>, meta: CachedMeta },
    /// The list is cached but some chunks of the page are not: `present` holds
    /// the (position, id) pairs that are, `missing` the chunks to load.
    Partial {
        present: Vec<(u64, ProductId)>,
        missing: Vec<u64>,
        meta: CachedMeta,
    },
    /// Not cached (or cached but damaged): fill the head.
    Miss,
    /// The cache is off or Redis did not answer: read PostgreSQL only.
    Unavailable,
}

/// Category lists in the cache: reading pages, filling the head, chunks and
/// the directory, and the keys a change of the list deletes.
pub struct Lists {
    core: Arc<Core>,
    leases: Leases,
    ttl: Duration,
    compress_threshold: usize,
}

impl Lists {
    pub(super) fn new(core: Arc<Core>, leases: Leases, config: &CacheConfig) -> Self {
        Self {
            core,
            leases,
            ttl: config.list_ttl,
            compress_threshold: config.compress_threshold_bytes,
        }
    }

    /// Reads positions `start..start + len` of a category list.
    pub async fn read_list(&self, category: &CategoryId, start: u64, len: u64) -> ListRead {
        if !self.core.enabled {
            return ListRead::Unavailable;
        }
        let (ids_key, meta_key) = (self.core.keys.list_ids(category), self.core.keys.list_meta(category));
        let stop = start + len.max(1) - 1;
        let read = self.core.redis.read_list_page(&ids_key, &meta_key, start, stop).await;
        let Some(raw) = read.filter(|_| self.core.trusted(Kind::List)) else {
            self.core.outcomes(Kind::List).misses.increment(1);
            return ListRead::Unavailable;
        };
        let Some(bytes) = raw.meta else {
            self.core.outcomes(Kind::List).misses.increment(1);
            return ListRead::Miss;
        };
        let meta = match codec::decode::<ListMeta>(&bytes) {
            Ok(meta) if meta.generation != 0 && meta.chunk > 0 && meta.head <= meta.total => meta,
            outcome => return self.discard_list(category, &format!("{:?}", outcome.err())).await,
        };
        let end = (start + len).min(meta.total);
        let mut present = Vec::with_capacity(raw.members.len());
        for (member, score) in raw.members {
            let position = score as u64;
            match ProductId::parse(&member) {
                Ok(id) if (start..end).contains(&position) && score.fract() == 0.0 => present.push((position, id)),
                _ => {
                    return self
                        .discard_list(category, "a member that is not a product id at a position")
                        .await;
                }
            }
        }
        let meta = CachedMeta { meta, bytes };
        if present.len() as u64 == end.saturating_sub(start) {
            self.core.outcomes(Kind::List).hits.increment(1);
            let ids = present.into_iter().map(|(_, id)| id).collect();
            return ListRead::Hit { ids, meta };
        }
        self.core.outcomes(Kind::List).misses.increment(1);
        let mut missing = Vec::new();
        let mut expected = start;
        for position in present.iter().map(|(p, _)| *p).chain(std::iter::once(end)) {
            for gap in expected..position {
                let chunk = meta.meta.chunk_of(gap);
                if missing.last() != Some(&chunk) {
                    missing.push(chunk);
                }
            }
            expected = position + 1;
        }
        ListRead::Partial { present, missing, meta }
    }

    /// Whether the list is cached or, if not, its lease (see `Leases::claim`).
    pub async fn claim_list(&self, category: &CategoryId) -> Option<Claim<()>> {
        // The metadata is written last with the head and dropped with it.
        let lease_key = self.core.keys.lease(&self.core.keys.list_ids(category));
        Some(
            match self
                .leases
                .claim(Kind::List, &self.core.keys.list_meta(category), lease_key)
                .await?
            {
                Claim::Found(_) => Claim::Found(()),
                Claim::Leased(lease) => Claim::Leased(lease),
                Claim::Busy => Claim::Busy,
            },
        )
    }

    /// Waits for another caller's head fill of the list (see `Leases::wait`).
    pub async fn wait_for_list(&self, category: &CategoryId) -> Waited<()> {
        self.leases.wait(|| self.claim_list(category)).await
    }

    async fn discard_list(&self, category: &CategoryId, why: &str) -> ListRead {
        tracing::warn!(%category, why, "discarding a corrupt cached list");
        metrics::counter!("readthrough_cache_corrupt_total", "entity" => Kind::List.label()).increment(1);
        self.core.redis.delete(&self.list_keys(category)).await;
        self.core.outcomes(Kind::List).misses.increment(1);
        ListRead::Miss
    }

    /// Replaces the list with its first ids and new metadata (a new
    /// generation), if the lease is still held; the metadata when stored.
    pub async fn put_list_head(
        &self,
        category: &CategoryId,
        ids: &[ProductId],
        total: u64,
        chunk: u64,
        lease: &Lease,
    ) -> Filled<CachedMeta> {
        let ids_key = self.core.keys.list_ids(category);
        failpoint!(self.core, before_fill, &ids_key);
        if lease.key != self.core.keys.lease(&ids_key) {
            // Taken in an epoch retired since: what it guards is never read again.
            self.core.count_refused(Kind::List);
            return Filled::Refused;
        }
        let meta = ListMeta {
            total,
            generation: rand::rng().random_range(1..=u64::MAX),
            head: ids.len() as u64,
            chunk,
        };
        let Ok(bytes) = codec::encode(&meta, self.compress_threshold) else {
            return Filled::Refused;
        };
        let ids: Vec<String> = ids.iter().map(ProductId::to_string).collect();
        let (meta_key, dir_key) = (self.core.keys.list_meta(category), self.core.keys.list_dir(category));
        let keys = [ids_key.as_str(), &meta_key, &dir_key, &lease.key];
        let ttl = jittered_secs(self.ttl);
        match self
            .core
            .redis
            .write_list_head(keys, &lease.token, &bytes, &ids, ttl)
            .await
        {
            Some(true) => Filled::Stored(CachedMeta { meta, bytes }),
            Some(false) => {
                self.core.count_refused(Kind::List);
                Filled::Refused
            }
            None => Filled::Unanswered,
        }
    }

    /// The (name, id) at every chunk start of the list `meta` describes, if cached.
    pub async fn list_directory(&self, category: &CategoryId, meta: &CachedMeta) -> Option<Vec<(String, ProductId)>> {
        let bytes = self
            .core
            .redis
            .get_many(&[self.core.keys.list_dir(category)])
            .await?
            .pop()
            .flatten()?;
        match codec::decode::<ListDir>(&bytes) {
            Ok(dir) if dir.generation == meta.meta.generation => Some(
                dir.starts
                    .into_iter()
                    .map(|(name, id)| (name, ProductId::from_uuid(id)))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Caches the directory of the list `meta` describes, if that is still the cached list.
    pub async fn put_list_directory(&self, category: &CategoryId, meta: &CachedMeta, starts: &[(String, ProductId)]) {
        let dir = ListDir {
            generation: meta.meta.generation,
            starts: starts.iter().map(|(name, id)| (name.clone(), id.as_uuid())).collect(),
        };
        let Ok(bytes) = codec::encode(&dir, self.compress_threshold) else {
            return;
        };
        let (dir_key, meta_key) = (self.core.keys.list_dir(category), self.core.keys.list_meta(category));
        if self
            .core
            .redis
            .set_beside(&dir_key, &meta_key, &meta.bytes, &bytes)
            .await
            == Some(false)
        {
            self.core.count_refused(Kind::List);
        }
    }

    /// Caches ids at positions from `first`, if `meta` still describes the cached list.
    pub async fn put_list_chunk(&self, category: &CategoryId, meta: &CachedMeta, first: u64, ids: &[ProductId]) {
        let ids_key = self.core.keys.list_ids(category);
        failpoint!(self.core, before_fill, &ids_key);
        let ids: Vec<String> = ids.iter().map(ProductId::to_string).collect();
        let keys = [ids_key.as_str(), &self.core.keys.list_meta(category)];
        if self.core.redis.write_list_chunk(keys, &meta.bytes, first, &ids).await == Some(false) {
            self.core.count_refused(Kind::List);
        }
    }

    /// The keys to delete when a category's membership or order changes, in
    /// each epoch an instance may be reading (see `cache::epochs`).
    pub fn list_keys(&self, category: &CategoryId) -> KeyGroup {
        self.core.keys.list_group(category)
    }
}
