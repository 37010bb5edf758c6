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

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
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
    /// The send time of the confirmation applied last, so an older one never overwrites it.
    applied: Mutex<Option<Instant>>,
    origin: Instant,
}

impl Default for Epochs {
    fn default() -> Self {
        Self {
            current: Default::default(),
            confirmed_at: AtomicU64::new(0),
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
        confirmed_at != 0 && self.micros_since_origin(now) < confirmed_at + EPOCH_TRUST.as_micros() as u64
    }

    /// Records `epochs` (by `Kind`), read by a request sent at `sent`, unless
    /// a later one was recorded already; returns the kinds whose epoch changed.
    pub fn confirm(&self, sent: Instant, epochs: [u64; 3]) -> Vec<Kind> {
        let mut applied = self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if applied.is_some_and(|applied| applied > sent) {
            return Vec::new();
        }
        *applied = Some(sent);
        let changed = Kind::ALL
            .into_iter()
            .filter(|&kind| {
                self.current[kind as usize].swap(epochs[kind as usize], Ordering::AcqRel) != epochs[kind as usize]
            })
            .collect();
        for kind in Kind::ALL {
            metrics::gauge!("readthrough_cache_key_epoch", "entity" => kind.label()).set(epochs[kind as usize] as f64);
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

/// What a bump of epochs did.
#[derive(Debug, PartialEq, Eq)]
pub enum Bump {
    /// Bumped: every kind's epoch now (by `Kind`).
    Done([u64; 3]),
    /// The last bump was too recent: try again after this long.
    TooSoon(Duration),
}

impl Cache {
    /// Reads the epochs once; false when Redis did not answer.
    async fn read_epochs(&self) -> Option<Vec<Kind>> {
        let sent = Instant::now();
        let epochs = self.redis.read_epochs(&self.keys.epochs()).await?;
        Some(self.keys.epochs_known().confirm(sent, epochs))
    }

    /// Reads the epochs every `EPOCH_POLL`, forever, and calls `on_change`
    /// with each kind whose epoch moved (near caches empty themselves then).
    pub async fn follow_epochs(&self, mut on_change: impl FnMut(Kind)) {
        if !self.enabled {
            return;
        }
        loop {
            if let Some(changed) = self.read_epochs().await {
                changed.into_iter().for_each(&mut on_change);
            }
            tokio::time::sleep(EPOCH_POLL).await;
        }
    }

    /// Moves each of `kinds` to a new epoch, retiring all its cached keys.
    /// `None` when Redis did not answer.
    pub async fn bump_epochs(&self, kinds: &[Kind]) -> Option<Bump> {
        let sent = Instant::now();
        let bump = self
            .redis
            .bump_epochs(&self.keys.epochs(), EPOCH_SPACING, kinds)
            .await?;
        if let Bump::Done(epochs) = bump {
            self.keys.epochs_known().confirm(sent, epochs);
            tracing::info!(kinds = ?kinds.iter().map(|k| k.label()).collect::<Vec<_>>(), ?epochs, "retired cached keys: new key epochs");
        }
        Some(bump)
    }

    /// Reads the epochs before the first request (see `open_connections`).
    pub(super) async fn learn_epochs(&self) {
        if self.read_epochs().await.is_none() {
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
    fn invalidations_reach_the_epoch_before_and_after() {
        let epochs = Epochs::default();
        assert_eq!(epochs.around(Kind::User).collect::<Vec<_>>(), [0, 1]);
        epochs.confirm(Instant::now(), [5, 0, 0]);
        assert_eq!(epochs.around(Kind::User).collect::<Vec<_>>(), [4, 5, 6]);
    }
}
