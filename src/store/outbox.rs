//! The `cache_outbox` table: invalidations recorded by triggers in the writing
//! transaction, claimed by relays with `FOR UPDATE SKIP LOCKED` so that
//! instances share the work without doing a row twice at once.
//!
//! Every statement on the outbox is sent unprepared (`persistent(false)`), so
//! PostgreSQL plans it for the outbox as it is at that moment. The outbox is
//! empty most of the time; a prepared statement's cached generic plan, made
//! then, kept its sequential scans when a bulk change left a million rows:
//! a take of 2,000 rows went from 10 ms to seconds, and so did every write's
//! lookup of its own rows. Planning costs about a tenth of a millisecond.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction, postgres::types::PgInterval};
use uuid::Uuid;

use super::{StoreError, timed};

/// The channel the triggers notify after each change.
pub const CHANNEL: &str = "cache_outbox";

/// How a payload on `CHANNEL` starts when an instance could not carry out
/// rows itself: `handover <instance>`. The other instances' relays then take
/// rows at once, without the writer's grace. Its own relay does not: it
/// would most likely fail the same way, holding the rows meanwhile.
const HANDOVER: &str = "handover ";

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
    let rows = sqlx::query_as::<_, OutboxRow>(RECORDED)
        .persistent(false)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows)
}

/// Deletes rows whose invalidation the writer carried out itself.
pub async fn confirm(pool: &PgPool, ids: &[i64]) -> Result<(), StoreError> {
    let _timed = timed("outbox.confirm");
    sqlx::query("DELETE FROM cache_outbox WHERE id = ANY($1)")
        .persistent(false)
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Rows a relay took (see `take`).
#[derive(Debug, Default)]
pub struct Taken {
    /// Oldest first.
    pub rows: Vec<OutboxRow>,
    /// How long the oldest of them has waited.
    pub oldest_age: Duration,
}

/// Takes up to `limit` rows at least `min_age` old with ids above `after`,
/// oldest first, skipping rows another relay holds, and deletes them in
/// `tx`: committed once their invalidation is confirmed, rolled back (the
/// rows back) otherwise. One statement instead of a claim and a delete by
/// id, which cost most of a batch's time; the delete finds the claimed rows
/// by their physical address rather than through the index again. Younger
/// rows are left to the writer that recorded them.
///
/// `after` lets a relay go through a long backlog without walking, on every
/// take, the index entries of the rows it deleted before (they stay until
/// a vacuum): a drain of a million rows otherwise spends ever longer
/// reaching the first live row.
pub async fn take(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
    min_age: Duration,
    after: i64,
) -> Result<Taken, StoreError> {
    #[derive(sqlx::FromRow)]
    struct TakenRow {
        #[sqlx(flatten)]
        row: OutboxRow,
        age: PgInterval,
    }
    let _timed = timed("outbox.take");
    let mut taken = sqlx::query_as::<_, TakenRow>(
        // `now()`, the transaction's start, which the take begins: read
        // once, where `clock_timestamp()` was read (and an age converted
        // through `numeric`) for every row.
        "DELETE FROM cache_outbox WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM cache_outbox \
             WHERE id > $3 AND created_at < now() - $2 * interval '1 millisecond' \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
         RETURNING id, entity, entity_id, categories, event, now() - created_at AS age",
    )
    .persistent(false)
    .bind(limit)
    .bind(min_age.as_millis() as f64)
    .bind(after)
    .fetch_all(&mut **tx)
    .await?;
    // `= ANY(ARRAY(…))`, not `IN (…)`: `IN` may be planned as a join over
    // the whole table. RETURNING keeps no order; events go out in the order
    // of the writes.
    taken.sort_unstable_by_key(|taken| taken.row.id);
    // Days and microseconds only: `now() - created_at` has no months.
    let oldest_age = taken.first().map_or(0, |taken| {
        i64::from(taken.age.days) * 86_400_000_000 + taken.age.microseconds
    });
    Ok(Taken {
        rows: taken.into_iter().map(|taken| taken.row).collect(),
        oldest_age: Duration::from_micros(oldest_age.max(0) as u64),
    })
}

/// Asks the relays of every instance but `from` to take rows at once (see `HANDOVER`).
pub async fn hand_over(pool: &PgPool, from: Uuid) -> Result<(), StoreError> {
    let _timed = timed("outbox.hand_over");
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(format!("{HANDOVER}{from}"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Whether `payload` (on `CHANNEL`) hands rows over from an instance other than `me`.
pub fn handed_over_by_another(payload: &str, me: Uuid) -> bool {
    payload
        .strip_prefix(HANDOVER)
        .and_then(|from| from.parse::<Uuid>().ok())
        .is_some_and(|from| from != me)
}

/// How many of the rows `ids` are still waiting.
pub async fn pending(pool: &PgPool, ids: &[i64]) -> Result<i64, StoreError> {
    let _timed = timed("outbox.pending");
    let count = sqlx::query_scalar("SELECT count(*) FROM cache_outbox WHERE id = ANY($1)")
        .persistent(false)
        .bind(ids)
        .fetch_one(pool)
        .await?;
    Ok(count)
}

/// Fences the rows `ids` that are still waiting; how many it fenced.
pub async fn fence(pool: &PgPool, ids: &[i64]) -> Result<u64, StoreError> {
    let _timed = timed("outbox.fence");
    let fenced = sqlx::query("UPDATE cache_outbox SET fenced_at = clock_timestamp() WHERE id = ANY($1)")
        .persistent(false)
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(fenced.rows_affected())
}

/// Fences the rows `ids` if, for each of `entities`, a fence older than
/// `standing` stands already: then every instance has known it for a while,
/// and keeps distrusting the kind past this commit (the old fence row is
/// locked until then, so no relay removes it in between). Whether it did.
pub async fn join_fence(pool: &PgPool, ids: &[i64], entities: &[&str], standing: Duration) -> Result<bool, StoreError> {
    let _timed = timed("outbox.join_fence");
    let mut tx = pool.begin().await?;
    for entity in entities {
        let old: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM cache_outbox WHERE entity = $1 AND fenced_at IS NOT NULL \
             AND fenced_at < clock_timestamp() - $2 * interval '1 millisecond' LIMIT 1 FOR SHARE",
        )
        .persistent(false)
        .bind(entity)
        .bind(standing.as_millis() as f64)
        .fetch_optional(&mut *tx)
        .await?;
        if old.is_none() {
            return Ok(false);
        }
    }
    sqlx::query("UPDATE cache_outbox SET fenced_at = clock_timestamp() WHERE id = ANY($1)")
        .persistent(false)
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// The entities that have fenced rows: one probe of the partial index per
/// kind. (A `DISTINCT` over the table turned into a sequential scan of a
/// million-row backlog whenever the statistics lagged.)
pub async fn fenced(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    let _timed = timed("outbox.fenced");
    let entities = sqlx::query_scalar(
        "SELECT entity FROM (VALUES ('user'), ('product')) AS kinds (entity) \
         WHERE EXISTS (SELECT 1 FROM cache_outbox o WHERE o.entity = kinds.entity AND o.fenced_at IS NOT NULL)",
    )
    .persistent(false)
    .fetch_all(pool)
    .await?;
    Ok(entities)
}

/// The entities whose oldest waiting row is older than `age` and that have
/// at least `rows` rows waiting: backlogs to retire rather than carry out
/// key by key. Each is two index lookups, however long the outbox.
pub async fn overdue(pool: &PgPool, age: Duration, rows: i64) -> Result<Vec<String>, StoreError> {
    let _timed = timed("outbox.overdue");
    let entities = sqlx::query_scalar(
        "SELECT entity FROM (VALUES ('user'), ('product')) AS kinds (entity) \
         WHERE (SELECT created_at FROM cache_outbox o WHERE o.entity = kinds.entity ORDER BY id LIMIT 1) \
               < clock_timestamp() - $1 * interval '1 millisecond' \
           AND (SELECT count(*) FROM (SELECT 1 FROM cache_outbox o WHERE o.entity = kinds.entity LIMIT $2) AS waiting) >= $2",
    )
    .persistent(false)
    .bind(age.as_millis() as f64)
    .bind(rows)
    .fetch_all(pool)
    .await?;
    Ok(entities)
}

/// A point after which every transaction that has finished by now is
/// behind: rows whose transaction id is below it were committed (or rolled
/// back) before this call.
pub async fn finished_before_now(pool: &PgPool) -> Result<String, StoreError> {
    let _timed = timed("outbox.snapshot");
    let xmin = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        .fetch_one(pool)
        .await?;
    Ok(xmin)
}

/// Deletes the rows of `entities` whose transactions finished before
/// `finished` (see `finished_before_now`): a key epoch bump made after that
/// point covers them. Returns how many.
pub async fn remove_covered(pool: &PgPool, entities: &[&str], finished: &str) -> Result<u64, StoreError> {
    let _timed = timed("outbox.remove_covered");
    let removed = sqlx::query("DELETE FROM cache_outbox WHERE entity = ANY($1) AND xact_id < $2::xid8")
        .persistent(false)
        .bind(entities)
        .bind(finished)
        .execute(pool)
        .await?;
    Ok(removed.rows_affected())
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::{HANDOVER, handed_over_by_another};

    #[test]
    fn a_relay_answers_hand_overs_from_other_instances_only() {
        let (me, other) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(handed_over_by_another(&format!("{HANDOVER}{other}"), me));
        assert!(!handed_over_by_another(&format!("{HANDOVER}{me}"), me));
        assert!(!handed_over_by_another("user", me), "a write's own notification");
        assert!(!handed_over_by_another(HANDOVER, me));
    }
}
