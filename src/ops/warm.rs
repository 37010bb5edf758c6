//! Pre-populates the cache so the first requests after a deploy or a flush are hits.

use crate::{
    domain::{CategoryId, ProductId},
    service::{Products, ServiceError, Users},
};

/// Ids per read-through batch: one MGET, one query, one pipelined fill each.
const BATCH: usize = 100;

#[derive(Debug, Clone, Default)]
pub struct WarmOptions {
    /// Categories whose lists (and the products in them) to cache.
    pub categories: Vec<CategoryId>,
    /// How many of the most recently modified users to cache.
    pub recent_users: u32,
    /// How many of the most recently modified products to cache.
    pub recent_products: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmReport {
    pub lists: u64,
    pub users: u64,
    pub products: u64,
}

pub async fn warm(
    users_service: &Users,
    products_service: &Products,
    options: &WarmOptions,
) -> Result<WarmReport, ServiceError> {
    let mut report = WarmReport::default();
    for category in &options.categories {
        let ids = products_service.warm_list(category).await?;
        report.lists += 1;
        report.products += warm_products(products_service, &ids).await?;
    }
    if options.recent_users > 0 {
        let ids = users_service.recent_ids(options.recent_users).await?;
        for chunk in ids.chunks(BATCH) {
            report.users += users_service.get_many(chunk).await?.iter().flatten().count() as u64;
        }
    }
    if options.recent_products > 0 {
        let ids = products_service.recent_ids(options.recent_products).await?;
        report.products += warm_products(products_service, &ids).await?;
    }
    Ok(report)
}

async fn warm_products(service: &Products, ids: &[ProductId]) -> Result<u64, ServiceError> {
    let mut warmed = 0;
    for chunk in ids.chunks(BATCH) {
        warmed += service.get_many(chunk).await?.iter().flatten().count() as u64;
    }
    Ok(warmed)
}
