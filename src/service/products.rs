//! Products and category lists: read through the cache, written to
//! PostgreSQL, then every affected entry and list invalidated.

use std::sync::Arc;

use super::{
    ServiceError, invalidate_written,
    lists::{IdPage, Lists},
    read_through::ReadThrough,
};
use crate::{
    cache::{Cache, near::NearCache},
    domain::{CategoryId, Cursor, NewProduct, PageRequest, PageStart, Product, ProductId, ProductPatch},
    store::replicas::Database,
    store::{outbox::OutboxRow, products},
};

/// One page of a category, how many products the category has, and where
/// the next page starts (`None` on the last page).
#[derive(Debug)]
pub struct ProductPage {
    pub products: Vec<Product>,
    pub total: u64,
    pub next: Option<Cursor>,
}

#[derive(Clone)]
pub struct Products {
    database: Arc<Database>,
    cache: Arc<Cache>,
    reads: Arc<ReadThrough<Product>>,
    lists: Arc<Lists>,
}

impl Products {
    pub fn new(
        database: Arc<Database>,
        cache: Arc<Cache>,
        near: Option<NearCache<ProductId, Option<Product>>>,
        list_cache_max_ids: u32,
        list_chunk_ids: u32,
    ) -> Self {
        Self {
            reads: ReadThrough::new(database.clone(), cache.clone(), near),
            lists: Arc::new(Lists::new(
                database.primary().clone(),
                cache.clone(),
                list_cache_max_ids,
                list_chunk_ids,
            )),
            database,
            cache,
        }
    }

    /// Drops a product from the near cache (its invalidation event arrived).
    pub fn forget(&self, id: uuid::Uuid) {
        self.reads.forget([ProductId::from_uuid(id)]);
    }

    /// Drops every product from the near cache (the table was truncated).
    pub fn forget_all(&self) {
        self.reads.forget_all();
    }

    /// Whether invalidation events are being received (see `cache::near`).
    pub fn listening(&self, listening: bool) {
        self.reads.listening(listening);
    }

    fn forget_written(&self, rows: &[OutboxRow]) {
        self.reads
            .forget(rows.iter().map(|row| ProductId::from_uuid(row.entity_id)));
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
        self.reads.get_many(ids).await
    }

    /// A page of a category in (name, id) order.
    pub async fn list(&self, category: &CategoryId, request: &PageRequest) -> Result<ProductPage, ServiceError> {
        let page = self.lists.page(category, request).await?;
        // A product deleted since its list was read is skipped rather than failing the page.
        let found = self.get_many(&page.ids).await?;
        let last = found.iter().rposition(Option::is_some);
        let next = page.more.then(|| {
            let after = match request.start() {
                PageStart::After(cursor) => cursor.key.clone(),
                PageStart::Position(_) => None,
            };
            next_cursor(&page, last.and_then(|i| found[i].as_ref()), last, after)
        });
        Ok(ProductPage {
            products: found.into_iter().flatten().collect(),
            total: page.total,
            next,
        })
    }

    /// Caches the head of a category's list (for `warm`); its ids.
    pub async fn warm_list(&self, category: &CategoryId) -> Result<Vec<ProductId>, ServiceError> {
        self.lists.warm(category).await
    }

    /// The ids of the `limit` most recently modified products.
    pub async fn recent_ids(&self, limit: u32) -> Result<Vec<ProductId>, ServiceError> {
        Ok(products::recent_ids(self.database.primary(), i64::from(limit)).await?)
    }

    pub async fn create(&self, new: NewProduct) -> Result<Product, ServiceError> {
        let written = products::insert(self.database.primary(), &new).await?;
        invalidate_written(&self.database, &self.cache, written, |rows| self.forget_written(rows)).await
    }

    /// The outbox row names the old and the new category when the product's
    /// place in them changes (name or category); otherwise only the product's
    /// entry is invalidated and its list stays cached.
    pub async fn update(&self, patch: ProductPatch) -> Result<Product, ServiceError> {
        let id = patch.id;
        let written = products::update(self.database.primary(), &patch)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("product {id}")))?;
        invalidate_written(&self.database, &self.cache, written, |rows| self.forget_written(rows)).await
    }

    pub async fn delete(&self, id: ProductId) -> Result<(), ServiceError> {
        let written = products::delete(self.database.primary(), id)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("product {id}")))?;
        invalidate_written(&self.database, &self.cache, written, |rows| self.forget_written(rows)).await
    }
}

/// Where the page after `page` starts: after its last product that still
/// exists (`last`, at index `last_index`), or, when none does, after the
/// previous page's last item (`after`) at the position past this page.
fn next_cursor(
    page: &IdPage,
    last: Option<&Product>,
    last_index: Option<usize>,
    after: Option<(String, ProductId)>,
) -> Cursor {
    let key = match last {
        Some(product) => Some((product.name.clone(), ProductId::from_uuid(product.id))),
        None => after,
    };
    match page.placed {
        Some((generation, first)) => Cursor {
            generation,
            position: first + last_index.map_or(page.ids.len() as u64, |i| i as u64 + 1),
            key,
        },
        None => Cursor {
            generation: 0,
            position: 0,
            key,
        },
    }
}
