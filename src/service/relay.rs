//! The outbox relay: makes every recorded invalidation happen, even when the
//! writer died or Redis was unreachable right after the commit.
//!
//! Triggers record each change to users and products in `cache_outbox`, inside
//! the writing transaction, and NOTIFY. Every instance runs this relay: woken
//! by the notification (or every `POLL_INTERVAL`), it claims rows with
//! `FOR UPDATE SKIP LOCKED` and deletes them, deletes their keys and publishes
//! their events in one Redis round trip, and commits only once Redis confirmed.
//!
//! The relay never gets in the way of reads: its Redis work goes over a
//! connection of its own, outside the breaker, under a deadline sized to
//! the batch. Batches are bounded in rows and bytes and coalesced (each key
//! group deleted once, one event per entity). A batch that misses its
//! deadline is not retried whole: the next claim takes half as many rows, so
//! the backlog always shrinks while Redis answers at all; success doubles
//! the claim again, up to `BATCH`. A relay whose batch failed hands it over
//! to the other relays at once (they may reach Redis; a writer may be
//! waiting for it) and waits a poll interval before it tries again.
//!
//! A backlog too large to carry out key by key in time (a bulk change in
//! SQL; what piled up while Redis was unreachable) is retired instead: when
//! a kind has at least `RETIRE_ROWS` rows waiting and the oldest is older
//! than `OUTBOX_RETIRE_AFTER_MS`, its key epoch is bumped, and once no
//! instance reads the old epoch (`EPOCH_TRUST`) every row of the kind
//! committed before the bump is deleted at once. A TRUNCATE names no rows:
//! it is retired the same way, whatever its size.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::{
    cache::{Bump, Cache, EPOCH_TRUST, Event, EventName, KeyGroup, Kind, WriteMarks},
    domain::{CategoryId, Product, ProductId, User, UserId},
    store::{
        StoreError,
        outbox::{self, OutboxRow, Taken},
        replicas::{Database, Lsn},
    },
};

/// The relay's lag bound when notifications are lost, and its retry interval while Redis is down.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Rows younger than this are left to the writer that recorded them, which
/// invalidates right after its commit and then deletes its rows (unless it
/// hands them over: see `outbox::HANDOVER`).
const WRITER_GRACE: Duration = Duration::from_millis(200);
/// Most rows per claim: one query, one Redis round trip (coalesced), one delete.
const BATCH: i64 = 2000;
/// Most bytes of keys and events one batch sends.
const BATCH_BYTES: usize = 1 << 20;
/// A kind with fewer rows waiting is carried out key by key however old they are.
const RETIRE_ROWS: i64 = 10_000;
/// How often a drain looks for backlogs to retire (two index lookups).
const OVERDUE_LOOK: Duration = Duration::from_millis(250);

/// Runs until the task is dropped.
pub async fn run(cache: Arc<Cache>, database: Arc<Database>, retire_after: Duration) {
    let mut relay = Relay {
        cache,
        database,
        retire_after,
        batch: BATCH,
    };
    let me = relay.database.instance();
    let mut listener: Option<PgListener> = None;
    let mut grace = WRITER_GRACE;
    loop {
        match relay.drain(grace).await {
            Ok(Drained::Empty) => {}
            Ok(Drained::RedisFailed) => {
                // Whatever this relay took is back in the outbox: the other
                // relays, which may reach Redis, take it now (a writer may
                // be waiting), while this one keeps its hands off for a
                // poll interval and the notifications meanwhile.
                if let Err(error) = outbox::hand_over(relay.database.primary(), me).await {
                    tracing::debug!(%error, "could not hand a failed batch over");
                }
                tokio::time::sleep(POLL_INTERVAL).await;
                if let Some(notifications) = listener.as_mut() {
                    while notifications.next_buffered().is_some() {}
                }
            }
            Err(error) => tracing::warn!(%error, "outbox relay could not read the outbox"),
        }
        if listener.is_none() {
            listener = listen(relay.database.primary()).await;
        }
        grace = match listener.as_mut() {
            Some(notifications) => match next_wake(notifications, me).await {
                Ok(grace) => grace,
                Err(_) => {
                    listener = None;
                    WRITER_GRACE
                }
            },
            None => {
                tokio::time::sleep(POLL_INTERVAL).await;
                WRITER_GRACE
            }
        };
    }
}

/// Waits for rows to take, and returns the grace to take them with: at once
/// (no grace) when another instance hands rows over, since a writer waits
/// for them; `WRITER_GRACE` after a write's notification, the writer's own
/// turn to carry out its rows; or `POLL_INTERVAL` without any notification.
async fn next_wake(notifications: &mut PgListener, me: Uuid) -> Result<Duration, sqlx::Error> {
    let mut until = tokio::time::Instant::now() + POLL_INTERVAL;
    let mut notified = false;
    loop {
        let Ok(notification) = tokio::time::timeout_at(until, notifications.recv()).await else {
            return Ok(WRITER_GRACE);
        };
        if outbox::handed_over_by_another(notification?.payload(), me) {
            return Ok(Duration::ZERO);
        }
        if !notified {
            // One drain serves every notification until the grace is over.
            notified = true;
            until = tokio::time::Instant::now() + WRITER_GRACE;
        }
    }
}

async fn listen(pool: &sqlx::PgPool) -> Option<PgListener> {
    let mut listener = PgListener::connect_with(pool).await.ok()?;
    listener.listen(outbox::CHANNEL).await.ok()?;
    Some(listener)
}

/// How a drain ended.
enum Drained {
    /// No row is left that it may take.
    Empty,
    /// Redis did not confirm a batch (or a retirement's bump).
    RedisFailed,
}

struct Relay {
    cache: Arc<Cache>,
    database: Arc<Database>,
    retire_after: Duration,
    /// Rows the next claim takes (see the module comment).
    batch: i64,
}

impl Relay {
    /// Processes rows at least `grace` old until none are left or Redis fails.
    async fn drain(&mut self, grace: Duration) -> Result<Drained, StoreError> {
        let pool = self.database.primary();
        // Where the next take starts (see `outbox::take`): past the rows
        // this pass has taken. Rows left behind (held by another relay, or
        // committed late with a lower id) are found by the next pass.
        let mut after = 0;
        // Whether the last take was full and its first row older than the
        // retire age: only then can a kind be overdue (and worth the look).
        let mut backlog = false;
        let mut looked_overdue: Option<Instant> = None;
        loop {
            if backlog && looked_overdue.is_none_or(|at| at.elapsed() >= OVERDUE_LOOK) {
                looked_overdue = Some(Instant::now());
                let overdue = outbox::overdue(pool, self.retire_after, RETIRE_ROWS).await?;
                if !overdue.is_empty() {
                    if !self.retire(&overdue, &[]).await? {
                        return Ok(Drained::RedisFailed);
                    }
                    after = 0;
                    continue;
                }
            }
            let mut tx = pool.begin().await?;
            // A commit lost in a crash brings its rows back, to be carried
            // out again: no batch waits for its WAL flush.
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await?;
            let Taken { rows, oldest_age } = outbox::take(&mut tx, self.batch, grace, after).await?;
            let full = rows.len() as i64 == self.batch;
            backlog = full && oldest_age >= self.retire_after;
            let Some(last) = rows.last() else {
                if after == 0 {
                    return Ok(Drained::Empty);
                }
                // The end of a pass: start the next from the beginning.
                after = 0;
                continue;
            };
            let last = last.id;
            let truncations: Vec<(&OutboxRow, EventName)> = rows
                .iter()
                .map(|row| (row, EventName::parse(&row.event)))
                .filter(|(_, name)| name.is_truncation())
                .collect();
            if !truncations.is_empty() {
                let truncated: Vec<&str> = truncations.iter().map(|(row, _)| row.entity.as_str()).collect();
                let events: Vec<Event> = truncations
                    .iter()
                    .map(|(row, name)| Event {
                        event: *name,
                        id: row.entity_id,
                        categories: Vec::new(),
                    })
                    .collect();
                let entities: Vec<String> = truncated.iter().map(|e| e.to_string()).collect();
                drop(tx);
                if !self.retire(&entities, &events).await? {
                    return Ok(Drained::RedisFailed);
                }
                after = 0;
                continue;
            }
            let fitting = within_bytes(&self.cache, &rows);
            if fitting < rows.len() {
                // Too many bytes: the rows go back, and the next take is smaller.
                drop(tx);
                self.batch = fitting as i64;
                continue;
            }
            // Taken after the claim: the rows' writes are committed, so at or before it.
            let position = self.database.write_position().await;
            if carry_out_batch(&self.cache, &invalidations(&self.cache, &rows, position)).await {
                tx.commit().await?;
                metrics::counter!("readthrough_outbox_relayed_total").increment(rows.len() as u64);
                self.batch = (self.batch * 2).min(BATCH);
                after = if full { last } else { 0 };
                continue;
            }
            // The rows stay (the transaction rolls back), and the next claim takes fewer.
            drop(tx);
            self.batch = (self.batch / 2).max(1);
            return Ok(Drained::RedisFailed);
        }
    }

    /// Retires every cached key of `entities` with a key epoch bump, then,
    /// once no instance reads the old epoch, publishes `events` (one
    /// `<entity>.retired` each when none are given) and deletes every row of
    /// them committed before the bump. False when the bump could not be made
    /// now (too soon after the last, or Redis unreachable).
    async fn retire(&self, entities: &[String], events: &[Event]) -> Result<bool, StoreError> {
        let pool = self.database.primary();
        let finished = outbox::finished_before_now(pool).await?;
        // Taken after the snapshot: at or after every write the bump retires.
        let position = self.database.write_position().await;
        let kinds = retired_kinds(entities);
        match self.cache.epochs.retire_written(&kinds, position).await {
            Some(Bump::Done(epochs)) => {
                tracing::info!(entities = ?entities, ?epochs, "outbox backlog retired with new key epochs");
            }
            Some(Bump::TooSoon(_)) | None => return Ok(false),
        }
        tokio::time::sleep(EPOCH_TRUST).await;
        let retired: Vec<Event> = entities
            .iter()
            .filter_map(|entity| Kind::parse(entity))
            .map(|kind| Event {
                event: EventName::retired(kind),
                id: Uuid::nil(),
                categories: Vec::new(),
            })
            .collect();
        self.cache
            .invalidation
            .publish(if events.is_empty() { &retired } else { events })
            .await;
        let entities: Vec<&str> = entities.iter().map(String::as_str).collect();
        let removed = outbox::remove_covered(pool, &entities, &finished).await?;
        metrics::counter!("readthrough_outbox_relayed_total").increment(removed);
        Ok(true)
    }
}

/// The kinds whose keys a change to `entities` may leave stale.
pub(super) fn retired_kinds(entities: &[String]) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|kind| match kind {
            Kind::User => entities.iter().any(|e| e == "user"),
            Kind::Product | Kind::List => entities.iter().any(|e| e == "product"),
        })
        .collect()
}

/// How many rows from the start of `rows` fit in `BATCH_BYTES` with their
/// keys and events (at least one).
fn within_bytes(cache: &Cache, rows: &[OutboxRow]) -> usize {
    // Every entity's key is as long: ids are UUIDs.
    let key = cache.keys().entry(Kind::User, Uuid::nil()).len();
    let mut bytes = 0;
    let fitting = rows
        .iter()
        .take_while(|row| {
            bytes += row_bytes(key, row);
            bytes <= BATCH_BYTES
        })
        .count();
    fitting.max(1)
}

/// About what carrying out `row` sends: its keys of length `key` (each once
/// per epoch an instance may read) and its event.
fn row_bytes(key: usize, row: &OutboxRow) -> usize {
    let per_group = 6 * (key + 8);
    per_group * (1 + row.categories.len()) + 128 + row.categories.iter().map(String::len).sum::<usize>()
}

/// What a batch of outbox rows asks for.
#[derive(Debug, Default, PartialEq)]
pub struct Invalidations {
    /// Each group of keys once.
    pub groups: Vec<KeyGroup>,
    /// When replicas are read, the position of the writes, recorded under
    /// the write marker of each entity written (see `store::replicas`).
    pub marks: Option<(Lsn, Vec<String>)>,
    /// One event per entity: its last row's, with the categories of all its rows.
    pub events: Vec<Event>,
}

/// Coalesces a batch of outbox rows into the invalidations they ask for:
/// each entity's keys, marker and event once, each category's list once.
/// A TRUNCATE's row names no keys: the relay retires its kinds instead.
/// `position`: see `Invalidations::marks`.
pub fn invalidations(cache: &Cache, rows: &[OutboxRow], position: Option<Lsn>) -> Invalidations {
    let mut planned = Invalidations {
        marks: position.map(|position| (position, Vec::new())),
        ..Invalidations::default()
    };
    let mut event_of: HashMap<(Kind, Uuid), usize> = HashMap::with_capacity(rows.len());
    let mut lists: HashSet<&str> = HashSet::new();
    for row in rows {
        let kind = match Kind::parse(&row.entity) {
            Some(kind @ (Kind::User | Kind::Product)) => kind,
            // Lists are not rows: no trigger records them.
            Some(Kind::List) | None => {
                tracing::warn!(
                    entity = row.entity,
                    id = row.id,
                    "ignoring an outbox row of an unknown entity"
                );
                continue;
            }
        };
        let name = EventName::parse(&row.event);
        if name.is_truncation() {
            continue;
        }
        // A category written by hand that is not a valid id has no cached list.
        for category in &row.categories {
            if lists.insert(category)
                && let Ok(category) = CategoryId::parse(category)
            {
                planned.groups.push(cache.lists.list_keys(&category));
            }
        }
        match event_of.entry((kind, row.entity_id)) {
            Entry::Occupied(index) => {
                let event = &mut planned.events[*index.get()];
                event.event = name;
                for category in &row.categories {
                    if !event.categories.contains(category) {
                        event.categories.push(category.clone());
                    }
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(planned.events.len());
                let (user, product) = (UserId::from_uuid(row.entity_id), ProductId::from_uuid(row.entity_id));
                planned.groups.push(match kind {
                    Kind::User => cache.invalidation.entity_keys::<User>(user),
                    _ => cache.invalidation.entity_keys::<Product>(product),
                });
                if let Some((_, marked)) = &mut planned.marks {
                    marked.push(match kind {
                        Kind::User => cache.invalidation.write_marker::<User>(user),
                        _ => cache.invalidation.write_marker::<Product>(product),
                    });
                }
                planned.events.push(Event {
                    event: name,
                    id: row.entity_id,
                    categories: row.categories.clone(),
                });
            }
        }
    }
    planned
}

/// Carries out a writer's own `planned` invalidation: the write markers,
/// key groups and events in one round trip on the shared connections. True
/// when Redis confirmed all of it.
pub async fn carry_out(cache: &Cache, planned: &Invalidations) -> bool {
    cache
        .invalidation
        .invalidate(&planned.groups, marks(planned), &planned.events)
        .await
}

/// `carry_out` for a batch (the relay's, a seed's), on the background
/// connection, within a deadline sized to it.
pub async fn carry_out_batch(cache: &Cache, planned: &Invalidations) -> bool {
    cache
        .invalidation
        .invalidate_batch(&planned.groups, marks(planned), &planned.events)
        .await
}

fn marks(planned: &Invalidations) -> Option<WriteMarks<'_>> {
    planned.marks.as_ref().map(|(position, keys)| WriteMarks {
        keys,
        position: *position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn row(id: i64, entity: &str, entity_id: u128, categories: &[&str], event: &str) -> OutboxRow {
        OutboxRow {
            id,
            entity: entity.to_string(),
            entity_id: Uuid::from_u128(entity_id),
            categories: categories.iter().map(ToString::to_string).collect(),
            event: event.to_string(),
        }
    }

    #[tokio::test]
    async fn a_batch_becomes_distinct_key_groups_and_one_event_per_entity() {
        // Creating a cache connects nothing.
        let cache = Cache::new(&Config::from_env()).unwrap();
        let rows = [
            row(1, "user", 7, &[], "user.created"),
            row(2, "user", 7, &[], "user.updated"),
            row(3, "user", 7, &[], "user.updated"),
            row(4, "product", 9, &["books"], "product.created"),
            row(5, "product", 9, &["books", "games"], "product.moved"),
            row(6, "product", 10, &["books"], "product.deleted"),
        ];
        let Invalidations {
            mut groups,
            marks,
            events,
        } = invalidations(&cache, &rows, Some(Lsn::UNREACHABLE));
        let (position, mut marked) = marks.unwrap();
        assert_eq!(position, Lsn::UNREACHABLE, "the position given");
        groups.sort();
        marked.sort();
        let mut expected_marked = vec![
            cache
                .invalidation
                .write_marker::<User>(UserId::from_uuid(Uuid::from_u128(7))),
            cache
                .invalidation
                .write_marker::<Product>(ProductId::from_uuid(Uuid::from_u128(9))),
            cache
                .invalidation
                .write_marker::<Product>(ProductId::from_uuid(Uuid::from_u128(10))),
        ];
        expected_marked.sort();
        assert_eq!(marked, expected_marked, "each written entity's marker once");

        let books = CategoryId::parse("books").unwrap();
        let games = CategoryId::parse("games").unwrap();
        let mut expected = vec![
            cache
                .invalidation
                .entity_keys::<User>(UserId::from_uuid(Uuid::from_u128(7))),
            cache
                .invalidation
                .entity_keys::<Product>(ProductId::from_uuid(Uuid::from_u128(9))),
            cache
                .invalidation
                .entity_keys::<Product>(ProductId::from_uuid(Uuid::from_u128(10))),
            cache.lists.list_keys(&books),
            cache.lists.list_keys(&games),
        ];
        expected.sort();
        assert_eq!(groups, expected, "each key group once");
        assert_eq!(
            events,
            [
                Event {
                    event: EventName::UserUpdated,
                    id: Uuid::from_u128(7),
                    categories: vec![],
                },
                Event {
                    event: EventName::ProductMoved,
                    id: Uuid::from_u128(9),
                    categories: vec!["books".into(), "games".into()],
                },
                Event {
                    event: EventName::ProductDeleted,
                    id: Uuid::from_u128(10),
                    categories: vec!["books".into()],
                },
            ],
            "one event per entity: its last row's, with every category"
        );
    }

    #[tokio::test]
    async fn a_truncate_names_no_keys_and_an_unknown_entity_is_ignored() {
        let cache = Cache::new(&Config::from_env()).unwrap();
        let rows = [
            row(1, "product", 0, &[], "product.truncated"),
            row(2, "order", 5, &[], "order.created"),
            row(3, "user", 0, &[], "user.truncated"),
        ];
        assert_eq!(invalidations(&cache, &rows, None), Invalidations::default());
    }

    #[test]
    fn a_products_change_retires_products_and_lists() {
        assert_eq!(retired_kinds(&["product".into()]), [Kind::Product, Kind::List]);
        assert_eq!(retired_kinds(&["user".into()]), [Kind::User]);
        assert_eq!(retired_kinds(&["user".into(), "product".into()]), Kind::ALL);
    }
}
