//! Products and category lists: read through the cache, written to
//! PostgreSQL, then every affected entry and list invalidated.

use std::sync::Arc;

use sqlx::PgPool;

use super::{ServiceError, read_through};
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

#[derive(Clone)]
pub struct Products {
    pool: PgPool,
    cache: Arc<Cache>,
    /// How many ids of a category one list fill loads and caches.
    list_cache_max_ids: u64,
}

impl Products {
    pub fn new(pool: PgPool, cache: Arc<Cache>, list_cache_max_ids: u32) -> Self {
        Self {
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
        let pool = &self.pool;
        Ok(read_through(&self.cache, ids, |missing| async move {
            products::get_many(pool, &missing).await
        })
        .await?)
    }

    /// A page of a category in (name, id) order.
    pub async fn list(
        &self,
        category: &CategoryId,
        page: PageRequest,
    ) -> Result<ProductPage, ServiceError> {
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
    /// scan, bounded however large the category) and caches them with the total.
    pub async fn refill_list(
        &self,
        category: &CategoryId,
    ) -> Result<(Vec<ProductId>, u64), ServiceError> {
        let head = products::list_ids(&self.pool, category, 0, self.list_cache_max_ids).await?;
        let total = if (head.len() as u64) < self.list_cache_max_ids {
            head.len() as u64
        } else {
            products::count_in_category(&self.pool, category).await?
        };
        self.cache.put_list(category, &head, total).await;
        Ok((head, total))
    }

    /// Refills the list and returns the ids of the requested page.
    async fn fill_list(
        &self,
        category: &CategoryId,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<ProductId>, u64), ServiceError> {
        let (head, total) = self.refill_list(category).await?;
        let end = offset + limit;
        let ids = if end.min(total) > head.len() as u64 {
            // The page reaches past the cached head.
            products::list_ids(&self.pool, category, offset, limit).await?
        } else {
            head[offset.min(end.min(total)) as usize..end.min(total) as usize].to_vec()
        };
        Ok((ids, total))
    }

    /// The ids of the `limit` most recently modified products.
    pub async fn recent_ids(&self, limit: u32) -> Result<Vec<ProductId>, ServiceError> {
        Ok(products::recent_ids(&self.pool, i64::from(limit)).await?)
    }

    pub async fn create(&self, new: NewProduct) -> Result<Product, ServiceError> {
        let product = products::insert(&self.pool, &new).await?;
        self.cache
            .invalidate(&self.list_keys(&new.category_id))
            .await;
        Ok(product)
    }

    pub async fn update(&self, patch: ProductPatch) -> Result<Product, ServiceError> {
        let id = patch.id;
        let (old_category, product) = products::update(&self.pool, &patch)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("product {id}")))?;
        // Any change can move the product within its list (name) or between lists (category).
        let mut keys = vec![self.cache.keys().product(id)];
        keys.extend(self.list_keys(&old_category));
        if product.category_id != old_category.as_str() {
            keys.extend(self.list_keys(&CategoryId::parse(&product.category_id)?));
        }
        self.cache.invalidate(&keys).await;
        Ok(product)
    }

    pub async fn delete(&self, id: ProductId) -> Result<(), ServiceError> {
        let category = products::delete(&self.pool, id)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("product {id}")))?;
        let mut keys = vec![self.cache.keys().product(id)];
        keys.extend(self.list_keys(&category));
        self.cache.invalidate(&keys).await;
        Ok(())
    }

    fn list_keys(&self, category: &CategoryId) -> [String; 2] {
        let keys = self.cache.keys();
        [keys.list_ids(category), keys.list_meta(category)]
    }
}
