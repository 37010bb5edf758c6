//! Key epochs: every key of a kind (user, product, list) carries its kind's
//! epoch, `…:user:e<epoch>:{id}`. Retiring every cached key of a kind
//! (`InvalidateAll`, a TRUNCATE) bumps the epoch instead of walking the
//! keyspace: one command, whatever the size of the cache. The old keys are
//! never read again and expire with their TTL.
//!
//! The epochs live in one Redis hash, `<namespace>:v1:epochs`; every instance
//! reads it every `EPOCH_POLL`. An instance may lag a bump by up to a poll, so
//! what it does with the epoch it knows is bounded:
//! - a value read from Redis is used only if the epochs were confirmed less
//!   than `EPOCH_TRUST` before it arrived; otherwise the read counts as Redis
//!   not answering (the request goes to PostgreSQL);
//! - bumps are at least `EPOCH_SPACING` (> `EPOCH_TRUST`) apart, so while an
//!   instance trusts epoch `e` the current one is `e` or `e + 1`;
//! - an invalidation deletes the keys of the epochs before, at and after the
//!   one it knows, and counts as done only if the epochs were still trusted
//!   when Redis confirmed it; so a write reaches whichever epoch any instance
//!   reads.
//!
//! A bump is visible at once in the instance that made it; `EPOCH_TRUST`
//! after it, no instance reads the old epoch.
//!
//! Redis replicates asynchronously, so a replica promoted after its master
//! failed may lack the master's last writes: `DEL`s of entries that are
//! stale now, or the latest bump itself. So epochs never go back: an epoch
//! lower than one seen (a lost bump, or a Redis restarted empty) is answered
//! with a bump above the highest seen. And on a Redis Cluster, a master
//! serving slots that was not one before (a promoted replica) retires every
//! kind: from the moment an instance notices it until the bump is done, it
//! reads nothing from Redis. Every instance notices the same failover; the
//! bump script acts on it once.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{Cache, Kind};

/// How often an instance reads the epochs.
const EPOCH_POLL: Duration = Duration::from_millis(200);
/// How long after it was read (the read sent) an instance acts on an epoch.
pub const EPOCH_TRUST: Duration = Duration::from_secs(1);
/// The least time between two bumps, enforced by the bump script.
const EPOCH_SPACING: Duration = Duration::from_secs(2);
const _: () = assert!(
    EPOCH_SPACING.as_millis() > EPOCH_TRUST.as_millis() && EPOCH_POLL.as_millis() * 2 < EPOCH_TRUST.as_millis()
);

/// The epoch of each kind as this instance last read it, and when.
#[derive(Debug)]
pub struct Epochs {
    /// Indexed by `Kind`.
    current: [AtomicU64; 3],
    /// When the read that confirmed `current` was sent, in µs since `origin` (0: never).
    confirmed_at: AtomicU64,
    /// Set while a failover's bump is pending: nothing read from Redis is used.
    held: AtomicBool,
    /// The send time of the confirmation applied last, so an older one never overwrites it.
    applied: Mutex<Option<Instant>>,
    origin: Instant,
}

impl Default for Epochs {
    fn default() -> Self {
        Self {
            current: Default::default(),
            confirmed_at: AtomicU64::new(0),
            held: AtomicBool::new(false),
            applied: Mutex::new(None),
            origin: Instant::now(),
        }
    }
}

impl Epochs {
    pub fn of(&self, kind: Kind) -> u64 {
        self.current[kind as usize].load(Ordering::Acquire)
    }

    /// The epochs an invalidation of `kind` deletes: the one before, this one, the next.
    pub fn around(&self, kind: Kind) -> impl Iterator<Item = u64> {
        let epoch = self.of(kind);
        epoch.saturating_sub(1)..=epoch + 1
    }

    /// Whether values read from Redis now may be used (see the module comment).
    pub fn trusted(&self) -> bool {
        self.trusted_at(Instant::now())
    }

    fn trusted_at(&self, now: Instant) -> bool {
        let confirmed_at = self.confirmed_at.load(Ordering::Acquire);
        confirmed_at != 0
            && !self.held.load(Ordering::Acquire)
            && self.micros_since_origin(now) < confirmed_at + EPOCH_TRUST.as_micros() as u64
    }

    /// Whether `epochs`, as read from Redis, are behind what this instance
    /// knows for any kind: bumps were lost.
    pub fn behind(&self, epochs: [u64; 3]) -> bool {
        Kind::ALL.into_iter().any(|kind| epochs[kind as usize] < self.of(kind))
    }

    /// The epochs a bump must go beyond: the highest this instance knows.
    fn floors(&self, kinds: &[Kind]) -> Vec<(Kind, u64)> {
        kinds.iter().map(|&kind| (kind, self.of(kind))).collect()
    }

    /// Records `epochs` (by `Kind`), read by a request sent at `sent`, unless
    /// a later one was recorded already; returns the kinds whose epoch
    /// changed. An epoch never goes back (see the module comment).
    pub fn confirm(&self, sent: Instant, epochs: [u64; 3]) -> Vec<Kind> {
        let mut applied = self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if applied.is_some_and(|applied| applied > sent) {
            return Vec::new();
        }
        *applied = Some(sent);
        let changed = Kind::ALL
            .into_iter()
            .filter(|&kind| {
                let epoch = epochs[kind as usize];
                self.current[kind as usize].fetch_max(epoch, Ordering::AcqRel) < epoch
            })
            .collect();
        for kind in Kind::ALL {
            metrics::gauge!("readthrough_cache_key_epoch", "entity" => kind.label()).set(self.of(kind) as f64);
        }
        // At least 1 µs: 0 means "never confirmed".
        self.confirmed_at
            .store(self.micros_since_origin(sent).max(1), Ordering::Release);
        changed
    }

    fn micros_since_origin(&self, instant: Instant) -> u64 {
        instant.saturating_duration_since(self.origin).as_micros() as u64
    }
}

/// Why the follower retires every kind.
enum Retirement {
    /// The epochs in Redis went back (a lost bump, a Redis restarted empty).
    BumpsLost,
    /// A new master serves slots; the reason the bump script records.
    Failover(String),
}

/// What a bump of epochs did.
#[derive(Debug, PartialEq, Eq)]
pub enum Bump {
    /// Bumped: every kind's epoch now (by `Kind`).
    Done([u64; 3]),
    /// The last bump was too recent: try again after this long.
    TooSoon(Duration),
}

impl Cache {
    /// Reads the epochs once; `None` when Redis did not answer. Epochs behind
    /// the known ones set `lost`.
    async fn read_epochs(&self, lost: &mut bool) -> Option<Vec<Kind>> {
        let sent = Instant::now();
        let epochs = self.redis.read_epochs(&self.keys.epochs()).await?;
        let known = self.keys.epochs_known();
        *lost |= known.behind(epochs);
        Some(known.confirm(sent, epochs))
    }

    /// Reads the epochs every `EPOCH_POLL`, forever, and calls `on_change`
    /// with each kind whose epoch moved (near caches empty themselves then).
    /// Retires every kind when bumps were lost or a cluster failed over.
    pub async fn follow_epochs(&self, mut on_change: impl FnMut(Kind)) {
        if !self.enabled {
            return;
        }
        let known = self.keys.epochs_known();
        let mut owners: Option<Vec<String>> = None;
        // Why every kind must be retired, until it is.
        let mut retire: Option<Retirement> = None;
        loop {
            let mut lost = false;
            if let Some(changed) = self.read_epochs(&mut lost).await {
                changed.into_iter().for_each(&mut on_change);
            }
            if lost && retire.is_none() {
                tracing::warn!("the key epochs went back (a failover or a restart lost bumps): retiring every key");
                retire = Some(Retirement::BumpsLost);
            }
            if let Some(now) = self.redis.slot_owners().await {
                let promoted = owners
                    .as_ref()
                    .and_then(|before| now.iter().find(|owner| !before.contains(owner)));
                if let Some(promoted) = promoted {
                    tracing::warn!(master = %promoted, "a new master serves slots (a failover): retiring every key");
                    known.held.store(true, Ordering::Release);
                    retire = Some(Retirement::Failover(format!("failover:{promoted}")));
                }
                owners = Some(now);
            }
            if let Some(retirement) = &retire {
                let reason = match retirement {
                    // Any bump above the epochs seen makes up for lost ones.
                    Retirement::BumpsLost => None,
                    // Acted on once, however many instances notice it.
                    Retirement::Failover(reason) => Some(reason.as_str()),
                };
                if let Some(Bump::Done(_)) = self.bump(&Kind::ALL, reason).await {
                    Kind::ALL.into_iter().for_each(&mut on_change);
                    known.held.store(false, Ordering::Release);
                    retire = None;
                }
            }
            tokio::time::sleep(EPOCH_POLL).await;
        }
    }

    /// Moves each of `kinds` to a new epoch, retiring all its cached keys.
    /// `None` when Redis did not answer.
    pub async fn bump_epochs(&self, kinds: &[Kind]) -> Option<Bump> {
        self.bump(kinds, None).await
    }

    async fn bump(&self, kinds: &[Kind], reason: Option<&str>) -> Option<Bump> {
        let sent = Instant::now();
        let floors = self.keys.epochs_known().floors(kinds);
        let bump = self
            .redis
            .bump_epochs(&self.keys.epochs(), EPOCH_SPACING, &floors, reason)
            .await?;
        if let Bump::Done(epochs) = bump {
            self.keys.epochs_known().confirm(sent, epochs);
            tracing::info!(kinds = ?kinds.iter().map(|k| k.label()).collect::<Vec<_>>(), ?epochs, reason, "retired cached keys: new key epochs");
        }
        Some(bump)
    }

    /// Reads the epochs before the first request (see `open_connections`).
    pub(super) async fn learn_epochs(&self) {
        if self.read_epochs(&mut false).await.is_none() {
            tracing::warn!("cannot read the key epochs yet: reads skip Redis until they are known");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_untrusted_until_confirmed_and_after_the_trust_lapses() {
        let epochs = Epochs::default();
        assert!(!epochs.trusted());
        assert_eq!(epochs.confirm(Instant::now(), [0, 0, 0]), []);
        assert!(epochs.trusted());
        let later = Instant::now() + EPOCH_TRUST;
        assert!(!epochs.trusted_at(later));
    }

    #[test]
    fn an_older_read_never_overwrites_a_newer_one() {
        let epochs = Epochs::default();
        let (older, newer) = (Instant::now(), Instant::now() + Duration::from_millis(1));
        assert_eq!(
            epochs.confirm(newer, [1, 2, 3]),
            [Kind::User, Kind::Product, Kind::List]
        );
        assert_eq!(epochs.confirm(older, [0, 0, 0]), []);
        assert_eq!([Kind::User, Kind::Product, Kind::List].map(|k| epochs.of(k)), [1, 2, 3]);
    }

    #[test]
    fn epochs_never_go_back_and_a_lower_one_is_noticed() {
        let epochs = Epochs::default();
        epochs.confirm(Instant::now(), [4, 2, 7]);
        assert!(epochs.behind([4, 1, 7]));
        assert!(!epochs.behind([5, 2, 7]));
        assert_eq!(epochs.confirm(Instant::now(), [4, 1, 8]), [Kind::List]);
        assert_eq!(Kind::ALL.map(|k| epochs.of(k)), [4, 2, 8]);
        assert_eq!(
            epochs.floors(&Kind::ALL),
            [(Kind::User, 4), (Kind::Product, 2), (Kind::List, 8)]
        );
    }

    #[test]
    fn invalidations_reach_the_epoch_before_and_after() {
        let epochs = Epochs::default();
        assert_eq!(epochs.around(Kind::User).collect::<Vec<_>>(), [0, 1]);
        epochs.confirm(Instant::now(), [5, 0, 0]);
        assert_eq!(epochs.around(Kind::User).collect::<Vec<_>>(), [4, 5, 6]);
    }
}
