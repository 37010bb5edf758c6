//! The outbox relay: makes every recorded invalidation happen, even when the
//! writer died or Redis was unreachable right after the commit.
//!
//! Triggers record each change to users and products in `cache_outbox`, inside
//! the writing transaction, and NOTIFY. Every instance runs this relay: woken
//! by the notification (or every `POLL_INTERVAL`), it claims rows with
//! `FOR UPDATE SKIP LOCKED`, deletes their keys and publishes their events in
//! one Redis round trip, and deletes the rows only once Redis confirmed. While
//! Redis is down the rows stay, and are retried every `POLL_INTERVAL`. A
//! TRUNCATE names no rows: it retires its kinds' keys with a new key epoch.

use std::{
    collections::{BTreeSet, HashMap, hash_map::Entry},
    sync::Arc,
    time::Duration,
};

use sqlx::{PgPool, postgres::PgListener};
use uuid::Uuid;

use crate::{
    cache::{Bump, Cache, Event, KeyGroup, Kind, WriteMarks},
    domain::{CategoryId, Product, ProductId, User, UserId},
    store::{
        StoreError,
        outbox::{self, OutboxRow},
        replicas::{Lsn, Replicas},
    },
};

/// The relay's lag bound when notifications are lost, and its retry interval while Redis is down.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Rows younger than this are left to the writer that recorded them, which
/// invalidates right after its commit and then deletes its rows.
const WRITER_GRACE: Duration = Duration::from_millis(200);
/// Rows per claim: one query, one Redis round trip (coalesced), one delete.
const BATCH: i64 = 2000;

/// Runs until the task is dropped.
pub async fn run(cache: Arc<Cache>, replicas: Arc<Replicas>) {
    let mut listener: Option<PgListener> = None;
    loop {
        if let Err(error) = drain(&cache, &replicas).await {
            tracing::warn!(%error, "outbox relay could not read the outbox");
        }
        if listener.is_none() {
            listener = listen(replicas.primary()).await;
        }
        match listener.as_mut() {
            Some(notifications) => match tokio::time::timeout(POLL_INTERVAL, notifications.recv()).await {
                Ok(Ok(_)) => {
                    // Give the writer its grace; one drain then serves every notification so far.
                    tokio::time::sleep(WRITER_GRACE).await;
                    while notifications.next_buffered().is_some() {}
                }
                Ok(Err(_)) => listener = None,
                Err(_) => {}
            },
            None => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = PgListener::connect_with(pool).await.ok()?;
    listener.listen(outbox::CHANNEL).await.ok()?;
    Some(listener)
}

/// Processes rows until the outbox is empty or Redis fails; returns how many were done.
async fn drain(cache: &Cache, replicas: &Replicas) -> Result<usize, StoreError> {
    let mut done = 0;
    loop {
        let mut tx = replicas.primary().begin().await?;
        let rows = outbox::claim(&mut tx, BATCH, WRITER_GRACE).await?;
        if rows.is_empty() {
            return Ok(done);
        }
        // Taken after the claim: the rows' writes are committed, so at or before it.
        let position = replicas.write_position().await;
        if !carry_out(cache, &invalidations(cache, &rows), position).await {
            // Redis unreachable: the rows stay (the transaction rolls back) for the next round.
            return Ok(done);
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        outbox::remove(&mut tx, &ids).await?;
        tx.commit().await?;
        done += rows.len();
        metrics::counter!("readthrough_outbox_relayed_total").increment(rows.len() as u64);
    }
}

/// What a batch of outbox rows asks for.
#[derive(Debug, Default, PartialEq)]
pub struct Invalidations {
    /// Each group of keys once.
    pub groups: Vec<KeyGroup>,
    /// The write marker of each entity written (see `store::replicas`).
    pub marked: Vec<String>,
    /// One event per entity: its last row's, with the categories of all its rows.
    pub events: Vec<Event>,
    /// Kinds every key of which is retired (a new key epoch): after a
    /// TRUNCATE, which names no rows.
    pub retired: Vec<Kind>,
}

/// Coalesces a batch of outbox rows into the invalidations they ask for.
pub fn invalidations(cache: &Cache, rows: &[OutboxRow]) -> Invalidations {
    let mut groups = BTreeSet::new();
    let mut marked = BTreeSet::new();
    let mut retired = Vec::new();
    let mut events: Vec<Event> = Vec::new();
    let mut event_of: HashMap<(&str, Uuid), usize> = HashMap::new();
    for row in rows {
        let truncated = row.event.ends_with(".truncated");
        match (Kind::parse(&row.entity), truncated) {
            (Some(Kind::User), false) => {
                let id = UserId::from_uuid(row.entity_id);
                groups.insert(cache.entity_keys::<User>(id));
                marked.insert(cache.write_marker::<User>(id));
            }
            (Some(Kind::Product), false) => {
                let id = ProductId::from_uuid(row.entity_id);
                groups.insert(cache.entity_keys::<Product>(id));
                marked.insert(cache.write_marker::<Product>(id));
                // A category written by hand that is not a valid id has no cached list.
                for category in row.categories.iter().filter_map(|c| CategoryId::parse(c).ok()) {
                    groups.insert(cache.list_keys(&category));
                }
            }
            (Some(Kind::User), true) => retired.push(Kind::User),
            (Some(Kind::Product), true) => retired.extend([Kind::Product, Kind::List]),
            // Lists are not rows: no trigger records them.
            (Some(Kind::List) | None, _) => {
                tracing::warn!(
                    entity = row.entity,
                    id = row.id,
                    "ignoring an outbox row of an unknown entity"
                );
                continue;
            }
        }
        match event_of.entry((row.entity.as_str(), row.entity_id)) {
            Entry::Occupied(index) => {
                let event = &mut events[*index.get()];
                event.event.clone_from(&row.event);
                for category in &row.categories {
                    if !event.categories.contains(category) {
                        event.categories.push(category.clone());
                    }
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(events.len());
                events.push(Event {
                    event: row.event.clone(),
                    id: row.entity_id,
                    categories: row.categories.clone(),
                });
            }
        }
    }
    Invalidations {
        groups: groups.into_iter().collect(),
        marked: marked.into_iter().collect(),
        events,
        retired: Kind::ALL.into_iter().filter(|kind| retired.contains(kind)).collect(),
    }
}

/// Carries out `planned`: the epoch bump first, then the write markers (at
/// `position`, when replicas are read), key groups and events in one round
/// trip. True when Redis confirmed all of it; a bump refused as too soon
/// after the last one is tried again with the rows in a later round.
pub async fn carry_out(cache: &Cache, planned: &Invalidations, position: Option<Lsn>) -> bool {
    if !planned.retired.is_empty() && !matches!(cache.bump_epochs(&planned.retired).await, Some(Bump::Done(_))) {
        return false;
    }
    let marks = position.map(|position| WriteMarks {
        keys: &planned.marked,
        position,
    });
    cache.invalidate(&planned.groups, marks, &planned.events).await
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
            groups,
            marked,
            events,
            retired,
        } = invalidations(&cache, &rows);
        assert!(retired.is_empty());
        let mut expected_marked = vec![
            cache.write_marker::<User>(UserId::from_uuid(Uuid::from_u128(7))),
            cache.write_marker::<Product>(ProductId::from_uuid(Uuid::from_u128(9))),
            cache.write_marker::<Product>(ProductId::from_uuid(Uuid::from_u128(10))),
        ];
        expected_marked.sort();
        assert_eq!(marked, expected_marked, "each written entity's marker once");

        let books = CategoryId::parse("books").unwrap();
        let games = CategoryId::parse("games").unwrap();
        let mut expected = vec![
            cache.entity_keys::<User>(UserId::from_uuid(Uuid::from_u128(7))),
            cache.entity_keys::<Product>(ProductId::from_uuid(Uuid::from_u128(9))),
            cache.entity_keys::<Product>(ProductId::from_uuid(Uuid::from_u128(10))),
            cache.list_keys(&books),
            cache.list_keys(&games),
        ];
        expected.sort();
        assert_eq!(groups, expected, "each key group once");
        assert_eq!(
            events,
            [
                Event {
                    event: "user.updated".into(),
                    id: Uuid::from_u128(7),
                    categories: vec![],
                },
                Event {
                    event: "product.moved".into(),
                    id: Uuid::from_u128(9),
                    categories: vec!["books".into(), "games".into()],
                },
                Event {
                    event: "product.deleted".into(),
                    id: Uuid::from_u128(10),
                    categories: vec!["books".into()],
                },
            ],
            "one event per entity: its last row's, with every category"
        );
    }

    #[tokio::test]
    async fn a_truncate_retires_its_kinds_and_an_unknown_entity_is_ignored() {
        let cache = Cache::new(&Config::from_env()).unwrap();
        let rows = [
            row(1, "product", 0, &[], "product.truncated"),
            row(2, "order", 5, &[], "order.created"),
            row(3, "user", 0, &[], "user.truncated"),
        ];
        let planned = invalidations(&cache, &rows);
        assert_eq!(planned.retired, Kind::ALL);
        assert!(planned.groups.is_empty(), "{:?}", planned.groups);
        let events: Vec<&str> = planned.events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(events, ["product.truncated", "user.truncated"]);
    }
}
