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
//! Redis replicates asynchronously, so a server that takes over from
//! another (a replica promoted by Sentinel, by a cluster, or by hand behind
//! the same address) may lack the last acknowledged writes: `DEL`s of
//! entries that are stale now, or the latest bump itself. And a Redis
//! restarted empty has lost every bump. So:
//! - every new connection asks the server whether it has recorded its own
//!   identity (its run id and replication id) in the epochs hash; one that
//!   has not is new to its data, and every kind is retired by a bump above
//!   the highest epochs this instance has seen (once, however many
//!   instances notice; the bump records the identity). Until the bump is
//!   done the instance reads nothing from Redis. A connection reaches a new
//!   server only by being made again, so nothing is read from a new server
//!   before it is checked;
//! - on a Redis Cluster, a master serving slots that was not one before (as
//!   any node sees it) retires every kind the same way;
//! - an epoch lower than one seen (a lost bump) is answered with a bump
//!   above the highest seen, and until it is done nothing read is used:
//!   instances must not read and invalidate different epochs. The highest
//!   epochs seen are also kept in PostgreSQL (`store::epochs`), and an
//!   instance starts from them: one that starts after a Redis restart
//!   retires the keys above them, as those running do, not at epoch 0.

use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    Core, Keys, Kind,
    redis::{
        self as client, EpochBump, EpochsRead, RedisClient,
        connections::{Connected, Handle},
    },
};
use crate::store::replicas::Lsn;

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
pub struct Epochs {
    /// Indexed by `Kind`.
    current: [AtomicU64; 3],
    /// Indexed by `Kind`: the WAL position of the newest write a bump of the
    /// kind retired (0: none), which a replica must have replayed before a
    /// miss of the kind may read it.
    positions: [AtomicU64; 3],
    /// When the read that confirmed `current` was sent, in µs since `origin` (0: never).
    confirmed_at: AtomicU64,
    /// Set while a retirement is pending: nothing read from Redis is used.
    held: AtomicBool,
    /// The retirement pending, numbered so that one noticed meanwhile is not
    /// cleared by the bump made for an earlier one.
    pending: Mutex<Option<(u64, Retirement)>>,
    holds: AtomicU64,
    /// The send time of the confirmation applied last, so an older one never overwrites it.
    applied: Mutex<Option<Instant>>,
    origin: Instant,
    /// Told of each kind whose epoch moved (near caches empty themselves).
    on_change: OnceLock<Box<dyn Fn(Kind) + Send + Sync>>,
}

impl std::fmt::Debug for Epochs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epochs")
            .field("current", &Kind::ALL.map(|kind| self.of(kind)))
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Default for Epochs {
    fn default() -> Self {
        Self {
            current: Default::default(),
            positions: Default::default(),
            confirmed_at: AtomicU64::new(0),
            held: AtomicBool::new(false),
            pending: Mutex::new(None),
            holds: AtomicU64::new(0),
            applied: Mutex::new(None),
            origin: Instant::now(),
            on_change: OnceLock::new(),
        }
    }
}

impl Epochs {
    pub fn of(&self, kind: Kind) -> u64 {
        self.current[kind as usize].load(Ordering::Acquire)
    }

    /// The newest write a bump of `kind` retired, if a bump recorded one.
    pub fn position(&self, kind: Kind) -> Option<Lsn> {
        match self.positions[kind as usize].load(Ordering::Acquire) {
            0 => None,
            position => Some(Lsn(position)),
        }
    }

    /// Whether a retirement is pending (see the module comment).
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Uses nothing read from Redis until `why` is dealt with by a bump.
    fn hold(&self, why: Retirement) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Any bump above the epochs seen makes up for lost ones: keep a pending reason.
        if pending.is_none() || !matches!(why, Retirement::BumpsLost) {
            *pending = Some((self.holds.fetch_add(1, Ordering::AcqRel), why));
        }
        self.held.store(true, Ordering::Release);
    }

    fn pending(&self) -> Option<(u64, Retirement)> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The bump for retirement `number` is done: use what Redis holds again,
    /// unless another retirement was noticed meanwhile.
    fn retired(&self, number: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if pending.as_ref().is_some_and(|(pending, _)| *pending == number) {
            *pending = None;
            self.held.store(false, Ordering::Release);
        }
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

    /// Starts `kind` at `epoch` at least: the highest any instance has
    /// recorded (see `store::epochs`). Nothing is trusted until Redis confirms.
    pub fn raise(&self, kind: Kind, epoch: u64) {
        self.current[kind as usize].fetch_max(epoch, Ordering::AcqRel);
    }

    /// Calls `on_change` with each kind whose epoch moves from now on.
    pub fn on_change(&self, on_change: impl Fn(Kind) + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(on_change));
    }

    /// Records `epochs` (by `Kind`), read by a request sent at `sent`, unless
    /// a later one was recorded already; returns the kinds whose epoch
    /// changed. An epoch never goes back (see the module comment).
    pub fn confirm(&self, sent: Instant, epochs: [u64; 3]) -> Vec<Kind> {
        self.confirm_read(
            sent,
            EpochsRead {
                epochs,
                positions: [None; 3],
            },
        )
    }

    /// `confirm`, with the positions of the newest writes bumps retired.
    fn confirm_read(&self, sent: Instant, read: EpochsRead) -> Vec<Kind> {
        for (position, read) in self.positions.iter().zip(read.positions) {
            position.fetch_max(read.map_or(0, |lsn| lsn.0), Ordering::AcqRel);
        }
        let mut applied = self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if applied.is_some_and(|applied| applied > sent) {
            return Vec::new();
        }
        *applied = Some(sent);
        let changed: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|&kind| {
                let epoch = read.epochs[kind as usize];
                self.current[kind as usize].fetch_max(epoch, Ordering::AcqRel) < epoch
            })
            .collect();
        for kind in Kind::ALL {
            metrics::gauge!("readthrough_cache_key_epoch", "entity" => kind.label()).set(self.of(kind) as f64);
        }
        // At least 1 µs: 0 means "never confirmed".
        self.confirmed_at
            .store(self.micros_since_origin(sent).max(1), Ordering::Release);
        drop(applied);
        if let Some(on_change) = self.on_change.get() {
            changed.iter().copied().for_each(on_change);
        }
        changed
    }

    /// Checks a new connection's server (see the module comment): one that
    /// has not recorded its identity is retired, right here if the bump may
    /// be made now, else by the follower, holding meanwhile. A server that
    /// says it is a replica fails the connection (it is made again, to the
    /// primary); one that refuses the check otherwise (an ACL that denies
    /// the epochs) is held, its values never used.
    async fn check_server(&self, key: &str, connection: &mut Handle) -> Result<(), String> {
        let sent = Instant::now();
        let floors = self.floors(&Kind::ALL);
        let bump = EpochBump {
            key,
            spacing: EPOCH_SPACING,
            floors: &floors,
            reason: Some(SERVER),
            position: None,
        };
        let checked = match bump.on(connection).await {
            Err(error) if client::is_read_only(&error) => return Err(error.to_string()),
            Err(error) => {
                tracing::warn!(%error, "cannot check which Redis server this is: nothing read from it is used");
                self.hold(Retirement::NewServer);
                return Ok(());
            }
            Ok(checked) => checked,
        };
        match checked {
            Some(Bump::Done(epochs)) => {
                // Against what was known when the check was sent: a bump on
                // another connection may have overtaken it since, and what
                // that bump confirmed is no sign of lost bumps.
                if floors.iter().any(|&(kind, floor)| epochs[kind as usize] < floor) {
                    self.hold(Retirement::BumpsLost);
                }
                self.confirm(sent, epochs);
            }
            _ => {
                tracing::warn!("a Redis server new to its data (a failover or a restart): retiring every key");
                self.hold(Retirement::NewServer);
            }
        }
        Ok(())
    }

    fn micros_since_origin(&self, instant: Instant) -> u64 {
        instant.saturating_duration_since(self.origin).as_micros() as u64
    }
}

/// The bump reason that stands for the server's own identity (see `scripts::BUMP_EPOCHS`).
const SERVER: &str = "server";

/// Why the follower retires every kind.
#[derive(Debug, Clone)]
enum Retirement {
    /// The epochs in Redis went back (a lost bump, a Redis restarted empty).
    BumpsLost,
    /// A new master serves slots; the reason the bump script records.
    Failover(String),
    /// A server that has not recorded its identity (see `check_server`).
    NewServer,
}

impl Retirement {
    /// What the bump records so that it is made once, however many instances notice.
    fn reason(&self) -> Option<&str> {
        match self {
            // Any bump above the epochs seen makes up for lost ones.
            Retirement::BumpsLost => None,
            Retirement::Failover(reason) => Some(reason),
            Retirement::NewServer => Some(SERVER),
        }
    }
}

/// Run on every new connection (see `connections::Connected`): loads the
/// scripts and, but on a cluster (whose failovers the follower notices),
/// checks the server (see `Epochs::check_server`).
pub(super) fn on_connect(keys: Keys, cluster: bool) -> Connected {
    Arc::new(move |mut connection| {
        let keys = keys.clone();
        Box::pin(async move {
            client::load_scripts(&mut connection)
                .await
                .map_err(|error| error.to_string())?;
            if !cluster {
                keys.epochs_known()
                    .check_server(&keys.epochs(), &mut connection)
                    .await?;
            }
            Ok(())
        })
    })
}

/// What a bump of epochs did.
#[derive(Debug, PartialEq, Eq)]
pub enum Bump {
    /// Bumped: every kind's epoch now (by `Kind`).
    Done([u64; 3]),
    /// The last bump was too recent: try again after this long.
    TooSoon(Duration),
}

/// Keeps this instance's key epochs: reads them, follows failovers, and
/// bumps them to retire every cached key of a kind.
pub struct KeyEpochs {
    core: Arc<Core>,
}

impl KeyEpochs {
    pub(super) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// Reads the epochs once; `None` when Redis did not answer. Epochs behind
    /// the known ones hold the instance until a bump above them is done.
    async fn read_epochs(&self) -> Option<()> {
        let known = self.core.keys.epochs_known();
        let mut sent = Instant::now();
        let mut read = self.core.redis.read_epochs(&self.core.keys.epochs()).await?;
        if known.behind(read.epochs) {
            // A read that a bump overtook (on another connection) looks
            // behind too; the bump is done by now, so a second look sees it.
            sent = Instant::now();
            read = self.core.redis.read_epochs(&self.core.keys.epochs()).await?;
            if known.behind(read.epochs) && !known.held() {
                tracing::warn!("the key epochs went back (a failover or a restart lost bumps): retiring every key");
                known.hold(Retirement::BumpsLost);
            }
        }
        known.confirm_read(sent, read);
        Some(())
    }

    /// Reads the epochs every `EPOCH_POLL`, forever, and makes the bump a
    /// pending retirement asks for (see the module comment).
    pub async fn follow(&self) {
        if !self.core.enabled {
            return;
        }
        let known = self.core.keys.epochs_known();
        let mut owners: Option<Vec<String>> = None;
        loop {
            self.read_epochs().await;
            if let Some(now) = self.core.redis.slot_owners().await {
                let promoted = owners
                    .as_ref()
                    .and_then(|before| now.iter().find(|owner| !before.contains(owner)));
                if let Some(promoted) = promoted {
                    tracing::warn!(master = %promoted, "a new master serves slots (a failover): retiring every key");
                    known.hold(Retirement::Failover(format!("failover:{promoted}")));
                }
                owners = Some(now);
            }
            if let Some((number, retirement)) = known.pending()
                && let Some(Bump::Done(_)) = self
                    .bump_on(&self.core.redis, &Kind::ALL, retirement.reason(), None)
                    .await
            {
                known.retired(number);
            }
            tokio::time::sleep(EPOCH_POLL).await;
        }
    }

    /// Moves each of `kinds` to a new epoch, retiring all its cached keys.
    /// `None` when Redis did not answer.
    pub async fn bump(&self, kinds: &[Kind]) -> Option<Bump> {
        self.bump_on(&self.core.redis, kinds, None, None).await
    }

    /// `bump` for the outbox relay, on its own connection: `position`
    /// is the newest write the bump retires (when replicas are read).
    pub async fn retire_written(&self, kinds: &[Kind], position: Option<Lsn>) -> Option<Bump> {
        self.bump_on(&self.core.background, kinds, None, position).await
    }

    async fn bump_on(
        &self,
        client: &RedisClient,
        kinds: &[Kind],
        reason: Option<&str>,
        position: Option<Lsn>,
    ) -> Option<Bump> {
        let sent = Instant::now();
        let known = self.core.keys.epochs_known();
        let floors = known.floors(kinds);
        let key = self.core.keys.epochs();
        let bump = EpochBump {
            key: &key,
            spacing: EPOCH_SPACING,
            floors: &floors,
            reason,
            position,
        };
        let outcome = client.bump_epochs(&bump).await?;
        if let Bump::Done(epochs) = outcome {
            let mut positions = [None; 3];
            for kind in kinds {
                positions[*kind as usize] = position;
            }
            known.confirm_read(sent, EpochsRead { epochs, positions });
            tracing::info!(kinds = ?kinds.iter().map(|k| k.label()).collect::<Vec<_>>(), ?epochs, reason, "retired cached keys: new key epochs");
        }
        Some(outcome)
    }

    /// Reads the epochs before the first request (see `open_connections`).
    pub(super) async fn learn(&self) {
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
