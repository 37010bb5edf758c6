//! Products and category lists: read through the cache, written to
//! PostgreSQL, then every affected entry and list invalidated.

use std::{sync::Arc, time::Instant};

use sqlx::PgPool;

use super::{
    ServiceError, invalidate_written,
    read_through::ReadThrough,
    single_flight::{Fresh, SingleFlight},
};
use crate::{
    cache::{Cache, ListLookup},
    domain::{CategoryId, NewProduct, PageRequest, Product, ProductId, ProductPatch},
    store::products,
};

/// One page of a category, and how many products the category has.
#[derive(Debug)]
pub struct ProductPage {
    pub products: Vec<Product>,
    pub total: u64,
}

/// The cached head of a category list and the category's total.
type ListHead = (Vec<ProductId>, u64);

#[derive(Clone)]
pub struct Products {
    pool: PgPool,
    cache: Arc<Cache>,
    reads: Arc<ReadThrough<Product>>,
    /// Concurrent cold pages of one category share one list load.
    list_loads: Arc<SingleFlight<CategoryId, Option<ListHead>>>,
    /// How many ids of a category one list fill loads and caches.
    list_cache_max_ids: u64,
}

impl Products {
    pub fn new(pool: PgPool, cache: Arc<Cache>, list_cache_max_ids: u32) -> Self {
        Self {
            reads: ReadThrough::new(pool.clone(), cache.clone()),
            list_loads: Arc::new(SingleFlight::new()),
            pool,
            cache,
            list_cache_max_ids: u64::from(list_cache_max_ids),
        }
    }

    pub async fn get(&self, id: ProductId) -> Result<Product, ServiceError> {
        self.get_many(&[id])
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| ServiceError::NotFound(format!("product {id}")))
    }

    /// The product for each id, in order; `None` where no such product exists.
    pub async fn get_many(&self, ids: &[ProductId]) -> Result<Vec<Option<Product>>, ServiceError> {
        Ok(self.reads.get_many(ids).await?)
    }

    /// A page of a category in (name, id) order.
    pub async fn list(&self, category: &CategoryId, page: PageRequest) -> Result<ProductPage, ServiceError> {
        let (offset, limit) = (page.offset(), u64::from(page.size()));
        let (ids, total) = match self.cache.get_list_page(category, offset, limit).await {
            ListLookup::Hit { ids, meta } => (ids, meta.total),
            ListLookup::Beyond { meta } => (
                products::list_ids(&self.pool, category, offset, limit).await?,
                meta.total,
            ),
            ListLookup::Miss => self.fill_list(category, offset, limit).await?,
            ListLookup::Unavailable => (
                products::list_ids(&self.pool, category, offset, limit).await?,
                products::count_in_category(&self.pool, category).await?,
            ),
        };
        // A product deleted since its list was read is skipped rather than failing the page.
        let products = self.get_many(&ids).await?.into_iter().flatten().collect();
        Ok(ProductPage { products, total })
    }

    /// Loads the first `list_cache_max_ids` ids of the category (one index-only
    /// scan, bounded however large the category) and caches them with the
    /// total, under the list's lease. Concurrent callers share one load.
    pub async fn refill_list(&self, category: &CategoryId) -> Result<ListHead, ServiceError> {
        let load = async {
            match self.load_list_head(category).await {
                Ok(fresh) => Fresh {
                    value: Some(fresh.value),
                    as_of: fresh.as_of,
                },
                Err(_) => Fresh {
                    value: None,
                    as_of: Instant::now(),
                },
            }
        };
        match self.list_loads.run(category.clone(), load).await {
            Some(Some(head)) => Ok(head),
            // The shared load failed or predates this caller: load alone.
            _ => Ok(self.load_list_head(category).await?.value),
        }
    }

    /// The list's head, current as of the read's start, or of the fill when the lease held.
    async fn load_list_head(&self, category: &CategoryId) -> Result<Fresh<ListHead>, ServiceError> {
        let lease = self.cache.acquire_list_lease(category).await;
        let started = Instant::now();
        let head = products::list_ids(&self.pool, category, 0, self.list_cache_max_ids).await?;
        let total = if (head.len() as u64) < self.list_cache_max_ids {
            head.len() as u64
        } else {
            products::count_in_category(&self.pool, category).await?
        };
        let fill_sent = Instant::now();
        let filled = match lease {
            Some(lease) => self.cache.put_list(category, &head, total, &lease).await,
            None => false,
        };
        let as_of = if filled { fill_sent } else { started };
        Ok(Fresh {
            value: (head, total),
            as_of,
        })
    }

    /// Refills the list and returns the ids of the requested page.
    async fn fill_list(&self, category: &CategoryId, offset: u64, limit: u64) -> Result<ListHead, ServiceError> {
        let (head, total) = self.refill_list(category).await?;
        let end = (offset + limit).min(total);
        let ids = if end > head.len() as u64 {
            // The page reaches past the cached head.
            products::list_ids(&self.pool, category, offset, limit).await?
        } else {
            head[offset.min(end) as usize..end as usize].to_vec()
        };
        Ok((ids, total))
    }

    /// The ids of the `limit` most recently modified products.
    pub async fn recent_ids(&self, limit: u32) -> Result<Vec<ProductId>, ServiceError> {
        Ok(products::recent_ids(&self.pool, i64::from(limit)).await?)
    }

    pub async fn create(&self, new: NewProduct) -> Result<Product, ServiceError> {
        let written = products::insert(&self.pool, &new).await?;
        Ok(invalidate_written(&self.pool, &self.cache, written).await)
    }

    /// The outbox row names the old and the new category: any change can move
    /// the product within its list (name) or between lists (category).
    pub async fn update(&self, patch: ProductPatch) -> Result<Product, ServiceError> {
        let id = patch.id;
        let written = products::update(&self.pool, &patch)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("product {id}")))?;
        Ok(invalidate_written(&self.pool, &self.cache, written).await)
    }

    pub async fn delete(&self, id: ProductId) -> Result<(), ServiceError> {
        let written = products::delete(&self.pool, id)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("product {id}")))?;
        invalidate_written(&self.pool, &self.cache, written).await;
        Ok(())
    }
}
