//! What a write does between its commit and its acknowledgement: its
//! invalidation done, by itself or by any instance's outbox relay, or else
//! fenced, so that no instance trusts what Redis holds of its kinds until
//! it is done (see `cache::fence`). Writes stay available without Redis;
//! no read contradicts one once it is acknowledged.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use super::{ServiceError, relay};
use crate::{
    cache::{Cache, FENCE_POLL, FENCE_TRUST, Kind},
    store::replicas::Database,
    store::{StoreError, outbox},
    telemetry::Throttle,
};

/// How long a writer that could not reach Redis waits for a relay to carry
/// out its rows, before it fences them.
const HANDOVER_WAIT: Duration = Duration::from_millis(500);
/// How often it looks whether they are done.
const HANDOVER_POLL: Duration = Duration::from_millis(5);
/// How long a fence check may take; past it, it counts as unanswered. Well
/// under `FENCE_TRUST - FENCE_POLL`, so that slow checks keep the trust.
const FENCE_CHECK_TIMEOUT: Duration = Duration::from_millis(300);
/// At most one log line per interval about fenced writes.
const FENCE_LOG_INTERVAL: Duration = Duration::from_secs(10);

static FENCE_LOG: std::sync::LazyLock<Throttle> = std::sync::LazyLock::new(Throttle::default);

/// After a committed write: delete the keys its outbox rows name and publish
/// their events, then drop them from this instance's near cache (`forget`).
/// When Redis confirmed, the rows are done with (deleted in the
/// background). Otherwise the rows are handed over to the relays, and
/// fenced if none carries them out in time. UNAVAILABLE only when
/// PostgreSQL fails in between, so that the write's outcome is unknown to
/// its caller rather than contradicted by a read.
pub(super) async fn invalidate_written<T>(
    database: &Database,
    cache: &Cache,
    written: outbox::Written<T>,
    forget: impl FnOnce(&[outbox::OutboxRow]),
) -> Result<T, ServiceError> {
    let position = database.write_position().await;
    let confirmed = relay::carry_out(cache, &relay::invalidations(cache, &written.outbox, position)).await;
    forget(&written.outbox);
    if written.outbox.is_empty() {
        return Ok(written.value);
    }
    let pool = database.primary();
    let ids: Vec<i64> = written.outbox.iter().map(|row| row.id).collect();
    if confirmed {
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Err(error) = outbox::confirm(&pool, &ids).await {
                tracing::debug!(%error, "outbox rows left to the relay");
            }
        });
        return Ok(written.value);
    }
    let mut entities: Vec<&str> = written.outbox.iter().map(|row| row.entity.as_str()).collect();
    entities.sort_unstable();
    entities.dedup();
    hand_over(pool, database.instance(), &ids, &entities)
        .await
        .map_err(ServiceError::Unavailable)?;
    Ok(written.value)
}

/// Hands rows `ids` (of `entities`) over to the other instances' relays, waiting until one
/// carried them out, or else fences them and waits until every instance
/// knows (`FENCE_TRUST` and a poll). Joins a fence that stands already
/// without waiting: every instance distrusts those kinds by now.
async fn hand_over(pool: &PgPool, from: Uuid, ids: &[i64], entities: &[&str]) -> Result<(), StoreError> {
    if outbox::join_fence(pool, ids, entities, FENCE_TRUST + FENCE_POLL).await? {
        metrics::counter!("readthrough_writes_fenced_total").increment(1);
        return Ok(());
    }
    outbox::hand_over(pool, from).await?;
    if done_within(pool, ids, HANDOVER_WAIT).await? {
        metrics::counter!("readthrough_writes_handed_over_total").increment(1);
        return Ok(());
    }
    if outbox::fence(pool, ids).await? == 0 {
        // A relay finished between the last look and the fence.
        metrics::counter!("readthrough_writes_handed_over_total").increment(1);
        return Ok(());
    }
    metrics::counter!("readthrough_writes_fenced_total").increment(1);
    if let Some(held_back) = FENCE_LOG.pass(FENCE_LOG_INTERVAL) {
        tracing::warn!(
            entities = ?entities,
            held_back,
            "no instance could invalidate a write: fenced; Redis is not trusted for these kinds until it is done"
        );
    }
    // Every instance has seen the fence, or stopped trusting Redis, by then;
    // sooner if a relay carries the rows out meanwhile.
    done_within(pool, ids, FENCE_TRUST + FENCE_POLL).await?;
    Ok(())
}

/// Whether the rows `ids` are all gone (carried out) within `limit`.
async fn done_within(pool: &PgPool, ids: &[i64], limit: Duration) -> Result<bool, StoreError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if outbox::pending(pool, ids).await? == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() + HANDOVER_POLL > deadline {
            return Ok(false);
        }
        tokio::time::sleep(HANDOVER_POLL).await;
    }
}

/// Checks for fenced rows every `FENCE_POLL`, forever.
pub(super) async fn follow_fence(cache: &Cache, pool: &PgPool) {
    let mut every = tokio::time::interval(FENCE_POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        check_fence(cache, pool).await;
    }
}

/// One look for fenced rows. A look PostgreSQL did not answer in time
/// leaves the last answer standing (see `cache::fence`).
pub(super) async fn check_fence(cache: &Cache, pool: &PgPool) {
    let sent = Instant::now();
    match tokio::time::timeout(FENCE_CHECK_TIMEOUT, outbox::fenced(pool)).await {
        Ok(Ok(entities)) => {
            let kinds: Vec<Kind> = relay::retired_kinds(&entities);
            cache.fence().confirm(sent, Some(&kinds));
        }
        Ok(Err(StoreError::Unavailable(_))) | Err(_) => cache.fence().confirm(sent, None),
        Ok(Err(error)) => tracing::warn!(%error, "cannot look for fenced writes"),
    }
}
