//! Category lists: which product ids a page holds, read through the cache.
//!
//! A page by number reads its positions from the cached list (see
//! `cache::lists`); what is missing is loaded: the head of a cold list (at
//! most `max_ids` ids and the category's count, in one statement), or the chunks a deep page needs (one index range scan each, from
//! the directory). No path reads past the rows it returns with an OFFSET,
//! except page numbers while the cache is unavailable.
//!
//! A page after a token is read by position while the cached list is still the
//! generation the token was issued for, and otherwise from PostgreSQL with a
//! keyset range scan after the token's (name, id): exact however the list
//! changed in between, and the same cost at any depth.

use std::{sync::Arc, time::Instant};

use sqlx::PgPool;

use super::{
    ServiceError,
    single_flight::{FLIGHT_ATTEMPTS, Fresh, Joined, SingleFlight},
};
use crate::{
    cache::{Cache, CachedMeta, Claim, Filled, Lease, ListRead, Waited},
    domain::{CategoryId, Cursor, PageRequest, PageStart, ProductId},
    store::products::{self, RangeStart},
};

/// The ids of one page of a category, and what the next page's token needs.
#[derive(Debug)]
pub struct IdPage {
    pub ids: Vec<ProductId>,
    /// Products in the category.
    pub total: u64,
    /// The cached list's generation and the position of `ids[0]`, when the
    /// page was read by position from a cached list.
    pub placed: Option<(u64, u64)>,
    /// More products follow this page.
    pub more: bool,
}

/// A freshly loaded list head: the first ids and the category's total.
#[derive(Debug, Clone)]
struct Head {
    ids: Arc<Vec<ProductId>>,
    total: u64,
    /// Set when the head was cached (a new generation).
    meta: Option<CachedMeta>,
}

/// What a head load found.
#[derive(Debug, Clone)]
enum HeadLoad {
    Loaded(Head),
    /// Another instance held the lease and its fill arrived: read the cache again.
    FilledElsewhere,
}

type Directory = Arc<Vec<(String, ProductId)>>;
type Chunk = Arc<Vec<ProductId>>;

pub struct Lists {
    pool: PgPool,
    cache: Arc<Cache>,
    /// Cold pages of one category share one head load.
    heads: SingleFlight<CategoryId, HeadLoad>,
    /// Keyed by category and generation: a result is valid for as long as its
    /// generation is cached, whenever it was read.
    directories: SingleFlight<(CategoryId, u64), Directory>,
    chunks: SingleFlight<(CategoryId, u64, u64), Chunk>,
    /// How many ids one fill loads at most: the head, and the cap on a chunk.
    max_ids: u64,
    /// Ids per chunk past the head.
    chunk: u64,
}

impl Lists {
    pub fn new(pool: PgPool, cache: Arc<Cache>, max_ids: u32, chunk: u32) -> Self {
        let chunk = u64::from(chunk).min(u64::from(max_ids)).max(1);
        Self {
            pool,
            cache,
            heads: SingleFlight::new(),
            directories: SingleFlight::new(),
            chunks: SingleFlight::new(),
            // The head ends on a chunk boundary, so chunks past it line up.
            max_ids: u64::from(max_ids) / chunk * chunk,
            chunk,
        }
    }

    /// The ids of the page `request` asks for.
    pub async fn page(&self, category: &CategoryId, request: &PageRequest) -> Result<IdPage, ServiceError> {
        let size = u64::from(request.size());
        match request.start() {
            PageStart::Position(position) => self.at(category, *position, size).await,
            PageStart::After(cursor) => self.after(category, cursor, size).await,
        }
    }

    /// Caches the head of a category's list (for `warm`); its ids.
    pub async fn warm(&self, category: &CategoryId) -> Result<Vec<ProductId>, ServiceError> {
        match self.load_head(category).await? {
            HeadLoad::Loaded(head) => Ok(head.ids.to_vec()),
            HeadLoad::FilledElsewhere => Ok(self.at(category, 0, self.max_ids.max(1)).await?.ids),
        }
    }

    /// The page at `position`.
    async fn at(&self, category: &CategoryId, position: u64, size: u64) -> Result<IdPage, ServiceError> {
        let read = self.cache.lists.read_list(category, position, size).await;
        if let Some(page) = self.read_cached(category, position, size, read).await? {
            return Ok(page);
        }
        // Cold: load the head, then take the page from it (and its chunks).
        match self.load_head(category).await? {
            HeadLoad::Loaded(head) => self.read_head_page(category, position, size, head).await,
            HeadLoad::FilledElsewhere => {
                let read = self.cache.lists.read_list(category, position, size).await;
                match self.read_cached(category, position, size, read).await? {
                    Some(page) => Ok(page),
                    None => self.uncached(category, position, size).await,
                }
            }
        }
    }

    /// The page from what the cache holds, loading the chunks it lacks;
    /// `None` when the list is not cached.
    async fn read_cached(
        &self,
        category: &CategoryId,
        position: u64,
        size: u64,
        read: ListRead,
    ) -> Result<Option<IdPage>, ServiceError> {
        let (ids, meta) = match read {
            ListRead::Hit { ids, meta } => (ids, meta),
            ListRead::Partial { present, missing, meta } => {
                let loaded = self.load_chunks(category, &meta, &missing).await?;
                let end = position.saturating_add(size).min(meta.meta.total);
                let ids = merge(position, end, &present, &loaded, meta.meta.chunk);
                (ids, meta)
            }
            ListRead::Miss => return Ok(None),
            ListRead::Unavailable => return self.uncached(category, position, size).await.map(Some),
        };
        let more = position.saturating_add(ids.len() as u64) < meta.meta.total;
        Ok(Some(IdPage {
            ids,
            total: meta.meta.total,
            placed: Some((meta.meta.generation, position)),
            more,
        }))
    }

    /// The page from a head just loaded: its slice of the head, and past the
    /// head (when the head was cached) the chunks holding the rest.
    async fn read_head_page(
        &self,
        category: &CategoryId,
        position: u64,
        size: u64,
        head: Head,
    ) -> Result<IdPage, ServiceError> {
        let end = position.saturating_add(size).min(head.total);
        let cached = head.ids.len() as u64;
        let Some(meta) = head.meta else {
            // Not cached (another fill won, or Redis failed): the head serves pages inside it.
            return if end <= cached {
                Ok(IdPage {
                    ids: head.ids[position.min(end) as usize..end as usize].to_vec(),
                    total: head.total,
                    placed: None,
                    more: end < head.total,
                })
            } else {
                self.uncached(category, position, size).await
            };
        };
        let present: Vec<(u64, ProductId)> = (position..end.min(cached)).map(|p| (p, head.ids[p as usize])).collect();
        let mut missing: Vec<u64> = (position.max(cached)..end).map(|p| meta.meta.chunk_of(p)).collect();
        missing.dedup();
        let loaded = self.load_chunks(category, &meta, &missing).await?;
        let ids = merge(position, end, &present, &loaded, meta.meta.chunk);
        Ok(IdPage {
            more: position.saturating_add(ids.len() as u64) < head.total,
            ids,
            total: head.total,
            placed: Some((meta.meta.generation, position)),
        })
    }

    /// The page after a token's cursor.
    async fn after(&self, category: &CategoryId, cursor: &Cursor, size: u64) -> Result<IdPage, ServiceError> {
        // A cursor from a keyset page (generation 0) has no position to read by.
        let mut current = None;
        if cursor.generation != 0 {
            let read = self.cache.lists.read_list(category, cursor.position, size).await;
            if let ListRead::Hit { meta, .. } | ListRead::Partial { meta, .. } = &read {
                current = Some(meta.meta);
                if meta.meta.generation == cursor.generation {
                    // The list has not changed since the token: read it by position.
                    if let Some(page) = self.read_cached(category, cursor.position, size, read).await? {
                        return Ok(page);
                    }
                }
            }
        }
        let Some((name, id)) = &cursor.key else {
            // Only when every product of the previous page was deleted while it
            // was read: continue from its position in the list as it is now.
            return self.at(category, cursor.position, size).await;
        };
        let mut rows = products::list_range(&self.pool, category, RangeStart::After(name, *id), size + 1).await?;
        let more = rows.len() as u64 > size;
        rows.truncate(size as usize);
        let total = match current {
            Some(meta) => meta.total,
            None => self.total(category).await?,
        };
        Ok(IdPage {
            ids: rows.into_iter().map(|(id, _)| id).collect(),
            total,
            placed: None,
            more,
        })
    }

    /// The category's total: from the cached list, caching it if it is not.
    async fn total(&self, category: &CategoryId) -> Result<u64, ServiceError> {
        match self.load_head(category).await? {
            HeadLoad::Loaded(head) => Ok(head.total),
            HeadLoad::FilledElsewhere => Ok(self.at(category, 0, 1).await?.total),
        }
    }

    /// A page by number with the cache unavailable: PostgreSQL alone.
    async fn uncached(&self, category: &CategoryId, position: u64, size: u64) -> Result<IdPage, ServiceError> {
        let _fallback = self.cache.fallback().await.ok_or(ServiceError::FallbackLimit)?;
        let ids = products::list_at_offset(&self.pool, category, position, size).await?;
        let total = products::count_in_category(&self.pool, category).await?;
        Ok(IdPage {
            more: position.saturating_add(ids.len() as u64) < total,
            ids,
            total,
            placed: None,
        })
    }

    /// Loads (and caches, under the list's lease) the first `max_ids` ids and
    /// the total. Concurrent callers in this process share one load; when
    /// another instance holds the lease, this waits for its fill instead.
    async fn load_head(&self, category: &CategoryId) -> Result<HeadLoad, ServiceError> {
        let arrived = Instant::now();
        for _ in 0..FLIGHT_ATTEMPTS {
            let load = async { self.load_head_once(category).await.ok() };
            match self.heads.run(category.clone(), arrived, load).await {
                Joined::Loaded(head) => return Ok(head),
                // The shared load failed: load alone below, to report our own error.
                Joined::Failed => break,
                // The shared load predates this caller: its fill is usually
                // there now; if not, the next flight serves this caller.
                Joined::Missed => {
                    if let ListRead::Hit { .. } | ListRead::Partial { .. } =
                        self.cache.lists.read_list(category, 0, 1).await
                    {
                        return Ok(HeadLoad::FilledElsewhere);
                    }
                }
            }
        }
        Ok(HeadLoad::Loaded(self.read_head(category, None).await?.value))
    }

    async fn load_head_once(&self, category: &CategoryId) -> Result<Fresh<HeadLoad>, ServiceError> {
        let looked = Instant::now();
        let filled_elsewhere = Ok(Fresh {
            value: HeadLoad::FilledElsewhere,
            as_of: looked,
        });
        let lease = match self.cache.lists.claim_list(category).await {
            Some(Claim::Found(())) => return filled_elsewhere,
            Some(Claim::Leased(lease)) => Some(lease),
            // Redis did not answer: read without filling.
            None => None,
            Some(Claim::Busy) => match self.cache.lists.wait_for_list(category).await {
                Waited::Filled((), _) => return filled_elsewhere,
                Waited::Leased(lease) => Some(lease),
                Waited::GaveUp => None,
            },
        };
        let fresh = self.read_head(category, lease).await?;
        Ok(Fresh {
            value: HeadLoad::Loaded(fresh.value),
            as_of: fresh.as_of,
        })
    }

    /// Reads the head from PostgreSQL and, holding `lease`, caches it. Current
    /// as of the read's start, or of the fill when it was stored.
    async fn read_head(&self, category: &CategoryId, lease: Option<Lease>) -> Result<Fresh<Head>, ServiceError> {
        // Kept alive for a big category's scan, count and write; given back if dropped.
        let kept = self.cache.leases.keep(&lease);
        let started = Instant::now();
        let (ids, total) = products::list_head(&self.pool, category, self.max_ids).await?;
        let fill_sent = Instant::now();
        let filled = match &lease {
            Some(lease) => {
                self.cache
                    .lists
                    .put_list_head(category, &ids, total, self.chunk, lease)
                    .await
            }
            None => Filled::Refused,
        };
        kept.settle(&filled);
        let meta = match filled {
            Filled::Stored(meta) => Some(meta),
            Filled::Refused | Filled::Unanswered => None,
        };
        Ok(Fresh {
            as_of: if meta.is_some() { fill_sent } else { started },
            value: Head {
                ids: Arc::new(ids),
                total,
                meta,
            },
        })
    }

    /// Loads the given chunks of the list `meta` describes, caching each;
    /// returns each chunk's first position and ids.
    async fn load_chunks(
        &self,
        category: &CategoryId,
        meta: &CachedMeta,
        chunks: &[u64],
    ) -> Result<Vec<(u64, Arc<Vec<ProductId>>)>, ServiceError> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let directory = self.directory(category, meta).await?;
        let mut loaded = Vec::with_capacity(chunks.len());
        for &chunk in chunks {
            let Some((name, id)) = directory.get(chunk as usize) else {
                continue; // past the end of the list
            };
            let load = async {
                let ids = products::list_range(&self.pool, category, RangeStart::At(name, *id), meta.meta.chunk)
                    .await
                    .ok()
                    .map(|rows| Arc::new(rows.into_iter().map(|(id, _)| id).collect::<Vec<_>>()));
                if let Some(ids) = &ids {
                    self.cache
                        .lists
                        .put_list_chunk(category, meta, chunk * meta.meta.chunk, ids)
                        .await;
                }
                ids.map(|ids| Fresh {
                    value: ids,
                    as_of: Instant::now(),
                })
            };
            let key = (category.clone(), meta.meta.generation, chunk);
            let ids = match self.chunks.run(key, Instant::now(), load).await {
                Joined::Loaded(ids) => ids,
                // Failed or cancelled: this caller reads the range itself.
                Joined::Failed | Joined::Missed => {
                    let rows =
                        products::list_range(&self.pool, category, RangeStart::At(name, *id), meta.meta.chunk).await?;
                    Arc::new(rows.into_iter().map(|(id, _)| id).collect())
                }
            };
            loaded.push((chunk * meta.meta.chunk, ids));
        }
        Ok(loaded)
    }

    /// The directory of the list `meta` describes: from the cache, or built
    /// (one pass over the category's index entries) and cached.
    async fn directory(&self, category: &CategoryId, meta: &CachedMeta) -> Result<Directory, ServiceError> {
        if let Some(starts) = self.cache.lists.list_directory(category, meta).await {
            return Ok(Arc::new(starts));
        }
        let load = async {
            let starts = products::list_directory(&self.pool, category, meta.meta.chunk)
                .await
                .ok()
                .map(Arc::new);
            if let Some(starts) = &starts {
                self.cache.lists.put_list_directory(category, meta, starts).await;
            }
            starts.map(|starts| Fresh {
                value: starts,
                as_of: Instant::now(),
            })
        };
        let key = (category.clone(), meta.meta.generation);
        match self.directories.run(key, Instant::now(), load).await {
            Joined::Loaded(starts) => Ok(starts),
            Joined::Failed | Joined::Missed => Ok(Arc::new(
                products::list_directory(&self.pool, category, meta.meta.chunk).await?,
            )),
        }
    }
}

/// The ids at positions `start..end`, from the (position, id) pairs the cache
/// had and the chunks loaded since (`(first position, ids)`).
fn merge(
    start: u64,
    end: u64,
    present: &[(u64, ProductId)],
    loaded: &[(u64, Arc<Vec<ProductId>>)],
    chunk: u64,
) -> Vec<ProductId> {
    let mut present = present.iter().peekable();
    (start..end)
        .filter_map(|position| {
            if let Some((_, id)) = present.next_if(|(p, _)| *p == position) {
                return Some(*id);
            }
            let first = position / chunk * chunk;
            loaded
                .iter()
                .find(|(at, _)| *at == first)
                .and_then(|(_, ids)| ids.get((position - first) as usize).copied())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> ProductId {
        ProductId::from_uuid(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn merge_takes_cached_positions_and_fills_the_rest_from_chunks() {
        let present = [(8, id(8)), (9, id(9))];
        let loaded = [(10, Arc::new(vec![id(10), id(11), id(12), id(13), id(14)]))];
        assert_eq!(
            merge(8, 13, &present, &loaded, 5),
            vec![id(8), id(9), id(10), id(11), id(12)]
        );
    }

    #[test]
    fn merge_skips_positions_nobody_has() {
        let loaded = [(0, Arc::new(vec![id(0), id(1)]))];
        assert_eq!(merge(0, 4, &[], &loaded, 4), vec![id(0), id(1)]);
    }
}
