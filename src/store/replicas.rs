//! Read replicas (`DATABASE_READ_URLS`): where a cache miss may read.
//!
//! A replica is behind the primary, so a miss that read it could put a row
//! older than an acknowledged write into the cache. Every write therefore
//! records, next to the keys it invalidates, a marker holding the primary's
//! WAL insert position after its commit (`write_position`, kept by
//! `Cache::invalidate`); a miss reads the markers of the ids it loads and
//! goes to a replica only if that replica has replayed past the newest one,
//! otherwise to the primary (the remote markers of memcache at Facebook).
//!
//! Markers expire after `marker_ttl`, twice `DATABASE_REPLICA_MAX_LAG_MS`,
//! and a replica is read from only while it is within that lag: so a write
//! whose marker has expired is on every replica still in use.
//!
//! A probe every `PROBE_INTERVAL` reads the primary's WAL position, then each
//! replica's replay position. A replica's position only grows, and a query's
//! snapshot is taken after the probe read it, so what the probe saw is a
//! lower bound of what a read there will see. A replica that fails a read or
//! the probe is left out until the probe reaches it again.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::PgPool;
use uuid::Uuid;

use super::{StoreError, connect_to};
use crate::config::{DatabaseConfig, ReplicaConfig, SecretUrl};

const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// How long a write's marker must live (see the module comment).
pub fn marker_ttl(config: &ReplicaConfig) -> Duration {
    config.replica_max_lag * 2
}

/// A position in PostgreSQL's write-ahead log, as a byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Higher than any real position: a replica never reaches it. A write
    /// whose position could not be read marks its keys with it, so their
    /// misses go to the primary until the marker expires.
    pub const UNREACHABLE: Lsn = Lsn(u64::MAX);

    /// Sixteen hex digits: markers compare as strings the way positions compare as numbers.
    pub fn to_marker(self) -> String {
        format!("{:016x}", self.0)
    }

    pub fn from_marker(marker: &[u8]) -> Option<Lsn> {
        let text = std::str::from_utf8(marker).ok()?;
        (text.len() == 16).then(|| u64::from_str_radix(text, 16).ok().map(Lsn))?
    }
}

/// The primary and its replicas, with what the probe last saw of each.
pub struct Database {
    primary: PgPool,
    replicas: Vec<Replica>,
    max_lag: Duration,
    /// The primary's recent positions, oldest first: (when it was asked, position).
    primary_positions: Mutex<VecDeque<(Instant, Lsn)>>,
    /// Where the next replica read starts looking (round robin).
    next: AtomicUsize,
    /// This instance's name in the outbox's hand-overs (see `outbox::hand_over`).
    instance: Uuid,
}

pub struct Replica {
    pub pool: PgPool,
    /// Its place in `DATABASE_READ_URLS`, as a metric label.
    label: String,
    seen: Mutex<Seen>,
}

/// What the probe last learned of a replica.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// How far it has replayed the primary's log.
    replayed: Option<Lsn>,
    /// The latest moment all the primary had written by then was replayed there.
    current_as_of: Option<Instant>,
    /// Whether it answered the last probe and every read since.
    answering: bool,
}

impl Database {
    /// Pools for each replica. Connections open lazily: a replica that is
    /// down at start is simply left out until the probe reaches it.
    pub fn new(database: &DatabaseConfig, config: &ReplicaConfig, primary: PgPool) -> Result<Self, sqlx::Error> {
        let replicas = config
            .read_urls
            .iter()
            .enumerate()
            .map(|(index, url)| Replica::new(database, url, index))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            primary,
            replicas,
            max_lag: config.replica_max_lag,
            primary_positions: Mutex::default(),
            next: AtomicUsize::new(0),
            instance: Uuid::new_v4(),
        })
    }

    /// This instance's name in the outbox's hand-overs (see `outbox::hand_over`).
    pub fn instance(&self) -> Uuid {
        self.instance
    }

    /// The primary: for writes, and for reads no replica may serve.
    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    /// Whether writes must record markers: replicas are configured.
    pub fn configured(&self) -> bool {
        !self.replicas.is_empty()
    }

    /// The position to mark a write's keys with, taken after its commit (or,
    /// for the relay, after the rows it carries out became visible); `None`
    /// without replicas.
    pub async fn write_position(&self) -> Option<Lsn> {
        if !self.configured() {
            return None;
        }
        match wal_position(&self.primary, Position::Written).await {
            Ok(Some(position)) => Some(position),
            _ => Some(Lsn::UNREACHABLE),
        }
    }

    /// Whether any replica may serve a read now: when none may, a miss need
    /// not read markers at all.
    pub fn any_usable(&self) -> bool {
        let now = Instant::now();
        self.replicas
            .iter()
            .any(|replica| replica.usable(now, None, self.max_lag))
    }

    /// A replica that has replayed `newest_write` (the newest marker of what
    /// is read; `None`: no marker) and is within the lag bound, taking turns
    /// among those that qualify; `None` sends the read to the primary.
    pub fn for_read(&self, newest_write: Option<Lsn>) -> Option<&Replica> {
        let count = self.replicas.len();
        if count == 0 {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| &self.replicas[(start + offset) % count])
            .find(|replica| replica.usable(now, newest_write, self.max_lag))
    }

    /// Probes until dropped.
    pub async fn follow(&self) {
        if !self.configured() {
            return;
        }
        let mut every = tokio::time::interval(PROBE_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.probe().await;
        }
    }

    /// One round: the primary's position first, then each replica's.
    async fn probe(&self) {
        let asked = Instant::now();
        if let Ok(Some(position)) = wal_position(&self.primary, Position::Written).await {
            let mut positions = self.primary_positions.lock().unwrap();
            positions.push_back((asked, position));
            // Older than the lag bound, a position can no longer make a replica usable.
            while positions.front().is_some_and(|(at, _)| at.elapsed() > self.max_lag * 2) {
                positions.pop_front();
            }
        }
        for replica in &self.replicas {
            let replayed = wal_position(&replica.pool, Position::Replayed).await;
            let mut seen = replica.seen.lock().unwrap();
            match replayed {
                Ok(Some(replayed)) => {
                    let positions = self.primary_positions.lock().unwrap();
                    let caught_up = positions
                        .iter()
                        .rev()
                        .find(|(_, position)| *position <= replayed)
                        .map(|(at, _)| *at);
                    *seen = Seen {
                        replayed: Some(replayed),
                        current_as_of: caught_up.or(seen.current_as_of),
                        answering: true,
                    };
                }
                // Down, or not a replica (promoted: its "replay" position no longer moves).
                Ok(None) | Err(_) => seen.answering = false,
            }
            let lag = seen.current_as_of.map(|at| at.elapsed().as_secs_f64());
            metrics::gauge!("readthrough_db_replica_lag_seconds", "replica" => replica.label.clone())
                .set(lag.filter(|_| seen.answering).unwrap_or(f64::NAN));
        }
    }
}

impl Replica {
    fn new(config: &DatabaseConfig, url: &SecretUrl, index: usize) -> Result<Self, sqlx::Error> {
        Ok(Self {
            pool: connect_to(config, url)?,
            label: index.to_string(),
            seen: Mutex::default(),
        })
    }

    fn usable(&self, now: Instant, newest_write: Option<Lsn>, max_lag: Duration) -> bool {
        let seen = *self.seen.lock().unwrap();
        let within_lag = seen
            .current_as_of
            .is_some_and(|at| now.saturating_duration_since(at) <= max_lag);
        let has_write = match (newest_write, seen.replayed) {
            (None, _) => true,
            (Some(write), Some(replayed)) => replayed >= write,
            (Some(_), None) => false,
        };
        seen.answering && within_lag && has_write
    }

    /// A read failed here: leave this replica out until the probe reaches it again.
    pub fn failed(&self) {
        self.seen.lock().unwrap().answering = false;
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Which WAL position to ask a server for.
#[derive(Clone, Copy)]
enum Position {
    /// The primary's: how far it has inserted records into its log. Not
    /// `pg_current_wal_lsn()`, how far it has written them out: under
    /// `synchronous_commit = off` a commit is visible before its record is
    /// written, so that position may lie before it.
    Written,
    /// A replica's: how far it has replayed (NULL on a server not in recovery).
    Replayed,
}

/// A server's WAL position, as a byte offset (`None` where PostgreSQL says NULL).
async fn wal_position(pool: &PgPool, position: Position) -> Result<Option<Lsn>, StoreError> {
    let sql = match position {
        Position::Written => "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
        Position::Replayed => "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint",
    };
    let offset: Option<i64> = sqlx::query_scalar(sql).fetch_one(pool).await?;
    Ok(offset.map(|offset| Lsn(offset as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_compare_as_positions_do() {
        let positions = [Lsn(0), Lsn(0x16_B374_D848), Lsn(0x1_0000_0000_0000), Lsn::UNREACHABLE];
        for pair in positions.windows(2) {
            assert!(pair[0].to_marker() < pair[1].to_marker(), "{pair:?}");
        }
        for position in positions {
            assert_eq!(Lsn::from_marker(position.to_marker().as_bytes()), Some(position));
        }
        assert_eq!(Lsn::from_marker(b"16/B374D848"), None);
    }
}
