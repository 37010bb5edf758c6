//! Invalidation: the keys a write deletes, the write markers for replica
//! reads, the deletes and events of a write in one round trip, and the
//! operator's invalidation of known keys and counts of a kind's keys.

use std::{collections::HashMap, sync::Arc, time::Duration};

use super::{Cacheable, Core, Event, Kind, failpoint};
use crate::{store::replicas::Lsn, telemetry::Throttle};

/// How often an invalidation is tried before it is given up (and logged).
const INVALIDATION_ATTEMPTS: u32 = 3;
const INVALIDATION_BACKOFF: Duration = Duration::from_millis(20);
/// How many of the keys a group invalidation deleted it names in its answer.
pub const INVALIDATION_SAMPLE: usize = 100;

/// At most one log line per interval about invalidations left to the relay:
/// while Redis is down every write and every relay round has one.
const INVALIDATION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The least deadline of a relay batch: it may wait behind requests' commands.
const RELAY_DEADLINE: Duration = Duration::from_millis(250);
/// What each command of a relay batch adds to its deadline.
const RELAY_COMMAND_BUDGET: Duration = Duration::from_micros(20);

/// Keys deleted together by one DEL: an entry and its lease, or a list's keys.
/// They share a hash tag (one Redis Cluster slot), and one command deletes
/// them at once, so no fill can land between the deletion of an entry and
/// that of its lease.
pub type KeyGroup = Vec<String>;

/// A write's WAL position, to record under the written entities' markers
/// (see `store::replicas`).
#[derive(Debug, Clone, Copy)]
pub struct WriteMarks<'a> {
    /// `Keys::write_marker` of each written entity.
    pub keys: &'a [String],
    pub position: Lsn,
}

/// The newest write marked for the ids a miss loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewestWrite {
    /// The cache is off or Redis did not answer: nothing is known, so only
    /// the primary may be read.
    Unknown,
    /// No marker: no write to them within the markers' lifetime.
    Unmarked,
    /// A replica must have replayed this far.
    At(Lsn),
}

/// What writes delete and mark, their events, and the operator's
/// invalidations and key counts.
pub struct Invalidation {
    core: Arc<Core>,
    write_marker_ttl: Duration,
    log: Throttle,
}

impl Invalidation {
    pub(super) fn new(core: Arc<Core>, write_marker_ttl: Duration) -> Self {
        Self {
            core,
            write_marker_ttl,
            log: Throttle::default(),
        }
    }

    /// The keys to delete when an entity changes: its fill leases, then its
    /// entries, in each epoch an instance may be reading (see `cache::epochs`).
    pub fn entity_keys<E: Cacheable>(&self, id: E::Id) -> KeyGroup {
        self.core.keys.entry_group(E::KIND, id)
    }

    /// Where writes of this entity record their WAL position (see `store::replicas`).
    pub fn write_marker<E: Cacheable>(&self, id: E::Id) -> String {
        self.core.keys.write_marker(E::KIND, id)
    }

    /// The newest write marked for any of `ids` (see `store::replicas`), or
    /// retired with their kind's last key epoch bump.
    pub async fn newest_write<E: Cacheable>(&self, ids: &[E::Id]) -> NewestWrite {
        if !self.core.enabled {
            return NewestWrite::Unknown;
        }
        let keys: Vec<String> = ids.iter().map(|&id| self.write_marker::<E>(id)).collect();
        let Some(markers) = self.core.redis.get_many(&keys).await else {
            return NewestWrite::Unknown;
        };
        // A marker that does not parse is treated as one no replica has reached.
        markers
            .iter()
            .flatten()
            .map(|marker| Lsn::from_marker(marker).unwrap_or(Lsn::UNREACHABLE))
            .chain(self.core.keys.epochs_known().position(E::KIND))
            .max()
            .map_or(NewestWrite::Unmarked, NewestWrite::At)
    }

    /// Records `marks` (when replicas are read), deletes each group of keys
    /// with one command and publishes `events`, all in one round trip,
    /// retrying a few times; returns whether Redis confirmed it. A marker is
    /// set before the keys it guards are deleted, so a miss that finds them
    /// gone finds it. Events are delivered at least once.
    pub async fn invalidate(&self, groups: &[KeyGroup], marks: Option<WriteMarks<'_>>, events: &[Event]) -> bool {
        failpoint!(
            self.core,
            before_invalidate,
            groups.first().and_then(|g| g.last()).map_or("", String::as_str)
        );
        let messages = encode_events(events);
        for attempt in 1..=INVALIDATION_ATTEMPTS {
            // Done only if the epochs it deleted in were still trusted when Redis confirmed it.
            if self
                .core
                .redis
                .delete_and_publish(
                    groups,
                    marks,
                    self.write_marker_ttl,
                    &self.core.keys.events(),
                    &messages,
                    self.core.redis.timeout(),
                )
                .await
                .is_some()
                && self.core.epochs_trusted()
            {
                count_published(events);
                return true;
            }
            // With the breaker open a retry would be skipped too: leave it to the relay now.
            if attempt < INVALIDATION_ATTEMPTS && self.core.redis.breaker_closed() {
                tokio::time::sleep(INVALIDATION_BACKOFF * attempt).await;
            } else {
                break;
            }
        }
        metrics::counter!("readthrough_invalidation_failures_total").increment(1);
        if let Some(held_back) = self.log.pass(INVALIDATION_LOG_INTERVAL) {
            tracing::warn!(
                keys = groups.len(),
                held_back,
                "invalidation failed; the outbox relay will retry it"
            );
        }
        false
    }

    /// `invalidate` for the outbox relay: once, on its own connection, outside
    /// the breaker, within a deadline sized to the batch (`RELAY_DEADLINE`
    /// plus `RELAY_COMMAND_BUDGET` a command), its events published only if
    /// someone subscribes (see `RedisClient::delete_and_ask_subscribed`);
    /// whether Redis confirmed it.
    pub async fn invalidate_batch(&self, groups: &[KeyGroup], marks: Option<WriteMarks<'_>>, events: &[Event]) -> bool {
        let commands = groups.len() + marks.map_or(0, |marks| marks.keys.len()) + events.len();
        let deadline = self.batch_deadline(commands);
        let started = tokio::time::Instant::now();
        let channel = self.core.keys.events();
        let Some(subscribed) = self
            .core
            .background
            .delete_and_ask_subscribed(groups, marks, self.write_marker_ttl, &channel, deadline)
            .await
        else {
            return false;
        };
        if subscribed && !events.is_empty() {
            let left = deadline.saturating_sub(started.elapsed());
            if self
                .core
                .background
                .publish(&channel, &encode_events(events), left)
                .await
                .is_none()
            {
                return false;
            }
            count_published(events);
        }
        self.core.epochs_trusted()
    }

    /// Publishes `events` alone, on the background connection (a retirement's).
    pub async fn publish(&self, events: &[Event]) -> bool {
        let deadline = self.batch_deadline(events.len());
        let published = self
            .core
            .background
            .publish(&self.core.keys.events(), &encode_events(events), deadline)
            .await
            .is_some();
        if published {
            count_published(events);
        }
        published
    }

    /// `RELAY_DEADLINE` plus `RELAY_COMMAND_BUDGET` a command.
    fn batch_deadline(&self, commands: usize) -> Duration {
        self.core.redis.timeout().max(RELAY_DEADLINE) + RELAY_COMMAND_BUDGET * commands as u32
    }

    /// Operator invalidation of known keys: the ones of `keys` that exist,
    /// deleted unless `dry_run`. `None` when Redis did not answer. Works with
    /// the cache disabled too: entries left in Redis are still worth deleting.
    pub async fn invalidate_keys(&self, keys: &[String], dry_run: bool) -> Option<Vec<String>> {
        let present = if dry_run {
            self.core.redis.exists_each(keys).await?
        } else {
            self.core.redis.unlink_each(keys).await?
        };
        Some(
            keys.iter()
                .zip(present)
                .filter(|(_, present)| *present)
                .map(|(key, _)| key.clone())
                .collect(),
        )
    }

    /// How many keys `kinds` hold at their current epochs (what bumping them
    /// retires), found with SCAN in batches, and the first
    /// `INVALIDATION_SAMPLE` of them. `None` when Redis stopped answering.
    pub async fn count_keys(&self, kinds: &[Kind]) -> Option<(u64, Vec<String>)> {
        let mut count = 0u64;
        let mut sample = Vec::new();
        for &kind in kinds {
            self.core
                .redis
                .scan_matching(&self.core.keys.pattern_for(kind), |batch| {
                    count += batch.len() as u64;
                    let room = INVALIDATION_SAMPLE.saturating_sub(sample.len());
                    sample.extend(batch.into_iter().take(room));
                })
                .await?;
        }
        Some((count, sample))
    }
}

fn encode_events(events: &[Event]) -> Vec<Vec<u8>> {
    events.iter().filter_map(|e| serde_json::to_vec(e).ok()).collect()
}

fn count_published(events: &[Event]) {
    // One counter update per name, not per event: a relay batch publishes thousands.
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for event in events {
        *counts.entry(event.event.as_str()).or_default() += 1;
    }
    for (name, count) in counts {
        metrics::counter!("readthrough_events_published_total", "event" => name).increment(count);
    }
}
