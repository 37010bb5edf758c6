//! `cache_key_epochs`: the highest key epoch of each kind any instance has
//! seen, per cache namespace, kept beside the copy in Redis so that it
//! outlives a Redis restarted empty (see `cache::epochs`).

use sqlx::PgPool;

use super::{StoreError, timed};

/// The highest epoch recorded for each kind of `namespace`: (kind, epoch).
pub async fn highest(pool: &PgPool, namespace: &str) -> Result<Vec<(String, i64)>, StoreError> {
    let _timed = timed("epochs.highest");
    let epochs = sqlx::query_as("SELECT kind, epoch FROM cache_key_epochs WHERE namespace = $1")
        .bind(namespace)
        .fetch_all(pool)
        .await?;
    Ok(epochs)
}

/// Records that `kind` of `namespace` reached `epoch` (never lowering it).
pub async fn raise(pool: &PgPool, namespace: &str, kind: &str, epoch: i64) -> Result<(), StoreError> {
    let _timed = timed("epochs.raise");
    sqlx::query(
        "INSERT INTO cache_key_epochs (namespace, kind, epoch) VALUES ($1, $2, $3) \
         ON CONFLICT (namespace, kind) DO UPDATE SET epoch = GREATEST(cache_key_epochs.epoch, EXCLUDED.epoch)",
    )
    .bind(namespace)
    .bind(kind)
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(())
}
