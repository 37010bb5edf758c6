//! The `cache_outbox` table: invalidations recorded by triggers in the writing
//! transaction, claimed by relays with `FOR UPDATE SKIP LOCKED` so that
//! instances share the work without doing a row twice at once.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{StoreError, timed};

/// The channel the triggers notify after each change.
pub const CHANNEL: &str = "cache_outbox";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    /// `user` or `product`.
    pub entity: String,
    pub entity_id: Uuid,
    /// Product categories whose lists the change affects.
    pub categories: Vec<String>,
    /// e.g. `user.updated`, `product.price.changed`.
    pub event: String,
}

/// A committed write's result, and the outbox rows its triggers recorded.
#[derive(Debug)]
pub struct Written<T> {
    pub value: T,
    pub outbox: Vec<OutboxRow>,
}

/// How a write finds the outbox rows it recorded: by its transaction id,
/// through `cache_outbox_xact_id_idx`, however long the outbox is.
pub const RECORDED: &str =
    "SELECT id, entity, entity_id, categories, event FROM cache_outbox WHERE xact_id = pg_current_xact_id()";

/// The outbox rows the current transaction's writes recorded (by their triggers).
pub async fn recorded(tx: &mut Transaction<'_, Postgres>) -> Result<Vec<OutboxRow>, StoreError> {
    let rows = sqlx::query_as::<_, OutboxRow>(RECORDED).fetch_all(&mut **tx).await?;
    Ok(rows)
}

/// Deletes rows whose invalidation the writer carried out itself.
pub async fn confirm(pool: &PgPool, ids: &[i64]) -> Result<(), StoreError> {
    let _timed = timed("outbox.confirm");
    sqlx::query("DELETE FROM cache_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Locks up to `limit` rows at least `min_age` old, oldest first, skipping rows
/// another relay holds. Younger rows are left to the writer that recorded them.
pub async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
    min_age: std::time::Duration,
) -> Result<Vec<OutboxRow>, StoreError> {
    let _timed = timed("outbox.claim");
    let rows = sqlx::query_as::<_, OutboxRow>(
        "SELECT id, entity, entity_id, categories, event FROM cache_outbox \
         WHERE created_at < clock_timestamp() - $2 * interval '1 millisecond' \
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(min_age.as_millis() as f64)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// Deletes processed rows (in the transaction that claimed them).
pub async fn remove(tx: &mut Transaction<'_, Postgres>, ids: &[i64]) -> Result<(), StoreError> {
    let _timed = timed("outbox.remove");
    sqlx::query("DELETE FROM cache_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
