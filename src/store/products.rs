//! The `products` table, and category lists in (name, id) order.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{StoreError, check_version, commit, outbox::Written, timed};
use crate::domain::{CategoryId, NewProduct, Product, ProductId, ProductPatch, ValidationError};

/// Loads the products with these ids in one query; absent ids are simply not returned.
pub async fn get_many(pool: &PgPool, ids: &[ProductId]) -> Result<Vec<Product>, StoreError> {
    let _timed = timed("product.get_many");
    let ids: Vec<Uuid> = ids.iter().map(ProductId::as_uuid).collect();
    let products = sqlx::query_as::<_, Product>("SELECT * FROM products WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(products)
}

pub async fn insert(pool: &PgPool, new: &NewProduct) -> Result<Written<Product>, StoreError> {
    let _timed = timed("product.insert");
    let mut tx = pool.begin().await?;
    let product = sqlx::query_as::<_, Product>(
        "INSERT INTO products (id, category_id, name, description, price_cents, currency) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(new.category_id.as_str())
    .bind(new.name.as_str())
    .bind(new.description.as_str())
    .bind(new.price_cents.get())
    .bind(new.currency.as_str())
    .fetch_one(&mut *tx)
    .await?;
    commit(tx, product).await
}

/// Applies `patch` if the version precondition holds; the row is locked while checked.
pub async fn update(pool: &PgPool, patch: &ProductPatch) -> Result<Written<Product>, StoreError> {
    let _timed = timed("product.update");
    let mut tx = pool.begin().await?;
    lock_checked(&mut tx, patch.id, patch.expected_version.get()).await?;
    let product = sqlx::query_as::<_, Product>(
        "UPDATE products SET category_id = COALESCE($2, category_id), name = COALESCE($3, name), \
         description = COALESCE($4, description), price_cents = COALESCE($5, price_cents), \
         currency = COALESCE($6, currency), version = version + 1, updated_at = now() \
         WHERE id = $1 RETURNING *",
    )
    .bind(patch.id.as_uuid())
    .bind(patch.category_id.as_ref().map(|c| c.as_str()))
    .bind(patch.name.as_ref().map(|n| n.as_str()))
    .bind(patch.description.as_ref().map(|d| d.as_str()))
    .bind(patch.price_cents.map(|p| p.get()))
    .bind(patch.currency.as_ref().map(|c| c.as_str()))
    .fetch_one(&mut *tx)
    .await?;
    commit(tx, product).await
}

pub async fn delete(pool: &PgPool, id: ProductId) -> Result<Written<()>, StoreError> {
    let _timed = timed("product.delete");
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("DELETE FROM products WHERE id = $1")
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    commit(tx, ()).await
}

/// The first `limit` ids of a category in list order, and how many products
/// it has, from one statement and so one snapshot: a product deleted while
/// the list loads is gone from both or from neither.
pub async fn list_head(pool: &PgPool, category: &CategoryId, limit: u64) -> Result<(Vec<ProductId>, u64), StoreError> {
    let _timed = timed("product.list_head");
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT id, (SELECT count(*) FROM products WHERE category_id = $1) \
         FROM products WHERE category_id = $1 ORDER BY name, id LIMIT $2",
    )
    .bind(category.as_str())
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    // No rows: the same snapshot counts none either.
    let total = rows.first().map_or(0, |(_, total)| *total as u64);
    Ok((
        rows.into_iter().map(|(id, _)| ProductId::from_uuid(id)).collect(),
        total,
    ))
}

/// Where a range of a category starts, in (name, id) order.
#[derive(Debug, Clone, Copy)]
pub enum RangeStart<'a> {
    /// At this (name, id), included: the start of a chunk.
    At(&'a str, ProductId),
    /// Right after this (name, id): the next page after a page token.
    After(&'a str, ProductId),
}

/// Up to `limit` ids of a category from `from`, in list order, with their
/// names: one index range scan, however deep (never an OFFSET).
pub async fn list_range(
    pool: &PgPool,
    category: &CategoryId,
    from: RangeStart<'_>,
    limit: u64,
) -> Result<Vec<(ProductId, String)>, StoreError> {
    let _timed = timed("product.list_range");
    let (sql, name, id) = match from {
        RangeStart::At(name, id) => (
            "SELECT id, name FROM products WHERE category_id = $1 AND (name, id) >= ($2, $3) \
             ORDER BY name, id LIMIT $4",
            name,
            id,
        ),
        RangeStart::After(name, id) => (
            "SELECT id, name FROM products WHERE category_id = $1 AND (name, id) > ($2, $3) \
             ORDER BY name, id LIMIT $4",
            name,
            id,
        ),
    };
    let rows: Vec<(Uuid, String)> = sqlx::query_as(sql)
        .bind(category.as_str())
        .bind(name)
        .bind(id.as_uuid())
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name)| (ProductId::from_uuid(id), name))
        .collect())
}

/// The (name, id) at positions 0, `every`, 2 × `every`, ... of a category: one
/// pass over the category's index entries (an index-only scan), returning
/// only those rows. A cached list's directory, from which any chunk loads with
/// `list_range`.
pub async fn list_directory(
    pool: &PgPool,
    category: &CategoryId,
    every: u64,
) -> Result<Vec<(String, ProductId)>, StoreError> {
    let _timed = timed("product.list_directory");
    let rows: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT name, id FROM ( \
           SELECT name, id, row_number() OVER (ORDER BY name, id) - 1 AS position \
           FROM products WHERE category_id = $1 \
         ) AS ranked WHERE position % $2 = 0 ORDER BY position",
    )
    .bind(category.as_str())
    .bind(every as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, id)| (name, ProductId::from_uuid(id)))
        .collect())
}

/// The ids of a category from position `offset`: an OFFSET scan, whose cost
/// grows with the depth. Only for page numbers while the cache is unavailable.
pub async fn list_at_offset(
    pool: &PgPool,
    category: &CategoryId,
    offset: u64,
    limit: u64,
) -> Result<Vec<ProductId>, StoreError> {
    let _timed = timed("product.list_offset");
    // Bounded well below by the page request and the page token; checked all the same.
    let offset = i64::try_from(offset).map_err(|_| ValidationError::new("page", "is past the end of any list"))?;
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM products WHERE category_id = $1 ORDER BY name, id OFFSET $2 LIMIT $3")
            .bind(category.as_str())
            .bind(offset)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?;
    Ok(ids.into_iter().map(ProductId::from_uuid).collect())
}

pub async fn count_in_category(pool: &PgPool, category: &CategoryId) -> Result<u64, StoreError> {
    let _timed = timed("product.count_in_category");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM products WHERE category_id = $1")
        .bind(category.as_str())
        .fetch_one(pool)
        .await?;
    Ok(total as u64)
}

/// The ids of the `limit` most recently modified products (for warming the cache).
pub async fn recent_ids(pool: &PgPool, limit: i64) -> Result<Vec<ProductId>, StoreError> {
    let _timed = timed("product.recent_ids");
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM products ORDER BY updated_at DESC LIMIT $1")
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(ids.into_iter().map(ProductId::from_uuid).collect())
}

/// Locks the row and checks the version precondition (`None`: unconditional).
async fn lock_checked(
    tx: &mut Transaction<'_, Postgres>,
    id: ProductId,
    expected: Option<i64>,
) -> Result<(), StoreError> {
    let version: Option<i64> = sqlx::query_scalar("SELECT version FROM products WHERE id = $1 FOR UPDATE")
        .bind(id.as_uuid())
        .fetch_optional(&mut **tx)
        .await?;
    check_version(version, expected)
}
