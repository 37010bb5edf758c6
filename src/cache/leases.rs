//! Fill leases: one caller across all instances loads a missing key.
//!
//! A lease is `SET NX PX` of a random token next to the key (same hash tag).
//! Its holder loads the value and fills it with a script that stores only
//! while the lease is still its own; a write deletes the lease with the entry,
//! so a value read before the write is never stored after it.
//!
//! While a load runs its leases are kept alive (extended every third of the
//! lease time), so a slow database does not let the lease lapse and the fill
//! be refused; when the load ends without filling (it failed, or its caller
//! went away) they are given back at once, so nobody waits them out. Callers
//! that find a key leased wait for the fill, and take the lease over when its
//! holder lets go without filling.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::AbortHandle;

use super::{Cacheable, Core, Filled, Kind, RedisClient, entries::decode_entry, redis::Lookup};

/// Polling a key another caller is filling: first interval, doubled up to the cap.
pub(super) const WAIT_FIRST_POLL: Duration = Duration::from_millis(2);
pub(super) const WAIT_MAX_POLL: Duration = Duration::from_millis(20);
/// The longest a caller waits for another's fill while that one still holds
/// (and keeps alive) the lease; past it the caller reads without filling.
pub(super) const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// A lease on a key: while it is held, only its holder fills the key.
#[derive(Debug, Clone)]
pub struct Lease {
    pub(super) key: String,
    pub(super) token: String,
}

/// What one look at a missing key found.
#[derive(Debug)]
pub enum Claim<T> {
    /// It is cached (now).
    Found(T),
    /// Still missing; the caller holds its lease now.
    Leased(Lease),
    /// Still missing; another caller holds its lease.
    Busy,
}

/// How waiting for another caller's fill ended.
#[derive(Debug)]
pub enum Waited<T> {
    /// The fill came: what was found, and the instant before the read that found it.
    Filled(T, Instant),
    /// The holder let go without filling; this caller holds the lease now.
    Leased(Lease),
    /// Redis stopped answering, or `WAIT_LIMIT` passed.
    GaveUp,
}

/// Leases taken for one load: kept alive while this lives, and given back
/// when it is dropped unless `settle` says a fill consumed them.
pub struct KeptLeases {
    redis: Arc<RedisClient>,
    leases: Vec<(String, String)>,
    keep_alive: Option<AbortHandle>,
    /// The lease time: how long giving them back is worth trying.
    ttl: Duration,
}

/// How often giving leases back is tried again while Redis does not answer.
const RELEASE_RETRY: Duration = Duration::from_millis(50);

impl KeptLeases {
    /// The fill ran: it consumed the leases (or found them taken by a
    /// write), unless Redis did not answer it; then they are given back.
    pub fn settle<T>(mut self, filled: &Filled<T>) {
        if !matches!(filled, Filled::Unanswered) {
            self.leases.clear();
        }
    }
}

impl Drop for KeptLeases {
    fn drop(&mut self) {
        if let Some(task) = self.keep_alive.take() {
            task.abort();
        }
        if self.leases.is_empty() {
            return;
        }
        // Dropped mid-load (failed or cancelled, or its fill was skipped):
        // give the leases back, so that others need not wait them out; while
        // Redis does not answer, until they would have expired anyway.
        let (redis, leases, ttl) = (self.redis.clone(), std::mem::take(&mut self.leases), self.ttl);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let give_up = tokio::time::Instant::now() + ttl;
                while redis.release_leases(&leases).await.is_none() && tokio::time::Instant::now() < give_up {
                    tokio::time::sleep(RELEASE_RETRY).await;
                }
            });
        }
    }
}

/// Fill leases: taking them, keeping them alive, giving them back, and
/// waiting for another caller's fill.
#[derive(Clone)]
pub struct Leases {
    core: Arc<Core>,
    ttl: Duration,
}

impl Leases {
    pub(super) fn new(core: Arc<Core>, ttl: Duration) -> Self {
        Self { core, ttl }
    }

    /// Tries to take the fill lease of each id; `Some` where this caller got it.
    pub async fn acquire_leases<E: Cacheable>(&self, ids: &[E::Id]) -> Vec<Option<Lease>> {
        let lease_keys: Vec<String> = ids
            .iter()
            .map(|&id| self.core.keys.lease(&self.core.keys.entry(E::KIND, id)))
            .collect();
        self.acquire(lease_keys).await
    }

    pub(super) async fn acquire(&self, lease_keys: Vec<String>) -> Vec<Option<Lease>> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        match self.core.redis.acquire_leases(&lease_keys, &token, self.ttl).await {
            Some(acquired) => lease_keys
                .into_iter()
                .zip(acquired)
                .map(|(key, got)| {
                    got.then(|| Lease {
                        key,
                        token: token.clone(),
                    })
                })
                .collect(),
            None => lease_keys.iter().map(|_| None).collect(),
        }
    }

    /// Keeps `leases` alive for as long as the returned guard lives.
    pub fn keep<'a>(&self, leases: impl IntoIterator<Item = &'a Lease>) -> KeptLeases {
        let leases: Vec<(String, String)> = leases
            .into_iter()
            .map(|lease| (lease.key.clone(), lease.token.clone()))
            .collect();
        let keep_alive = (!leases.is_empty()).then(|| {
            let (redis, held, ttl) = (self.core.redis.clone(), leases.clone(), self.ttl);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    if redis
                        .extend_leases(&held, ttl)
                        .await
                        .is_some_and(|extended| !extended.contains(&true))
                    {
                        return; // every lease was taken by a write or filled
                    }
                }
            })
            .abort_handle()
        });
        KeptLeases {
            // Outside the breaker: a lease must go back even when requests skip Redis.
            redis: self.core.background.clone(),
            leases,
            keep_alive,
            ttl: self.ttl,
        }
    }

    /// Gives leases back (if they are still the caller's), so waiters need
    /// not wait them out: outside the breaker, which may skip requests'
    /// calls while Redis answers.
    pub(super) async fn release(&self, leases: &[&Lease]) {
        let leases: Vec<(String, String)> = leases
            .iter()
            .map(|lease| (lease.key.clone(), lease.token.clone()))
            .collect();
        self.core.background.release_leases(&leases).await;
    }

    /// The cached value of `id` or, when it is missing, its lease if nobody
    /// holds it: in one step, so no fill lands between the miss and the lease.
    /// `None` when Redis did not answer.
    pub async fn get_or_lease<E: Cacheable>(&self, id: E::Id) -> Option<Claim<Option<E>>> {
        let key = self.core.keys.entry(E::KIND, id);
        let lease_key = self.core.keys.lease(&key);
        Some(match self.claim(E::KIND, &key, lease_key).await? {
            Claim::Found(bytes) => match decode_entry::<E>(&bytes, id) {
                Some(entry) => Claim::Found(entry.value),
                None => {
                    // Corrupt: delete it, so the next attempt takes the lease.
                    self.core.redis.delete(&[key]).await;
                    Claim::Busy
                }
            },
            Claim::Leased(lease) => Claim::Leased(lease),
            Claim::Busy => Claim::Busy,
        })
    }

    /// `key`'s raw value, or else the lease `lease_key`. A value found while
    /// what Redis holds of `kind` is not trusted counts as Redis not
    /// answering (`None`).
    pub(super) async fn claim(&self, kind: Kind, key: &str, lease_key: String) -> Option<Claim<Vec<u8>>> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        Some(
            match self.core.redis.get_or_lease(key, &lease_key, &token, self.ttl).await? {
                Lookup::Found(_) if !self.core.trusted(kind) => return None,
                Lookup::Found(bytes) => Claim::Found(bytes),
                Lookup::Leased => Claim::Leased(Lease { key: lease_key, token }),
                Lookup::Busy => Claim::Busy,
            },
        )
    }

    /// Waits for another caller's fill of `id` (see `Cache::wait`).
    pub async fn wait_for_fill<E: Cacheable>(&self, id: E::Id) -> Waited<Option<E>> {
        self.wait(|| self.get_or_lease::<E>(id)).await
    }

    /// Polls `attempt` at short, capped intervals until it finds the value or
    /// takes the lease (its holder let go without filling), for at most `WAIT_LIMIT`.
    pub(super) async fn wait<T, F>(&self, attempt: impl Fn() -> F) -> Waited<T>
    where
        F: Future<Output = Option<Claim<T>>>,
    {
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        let mut interval = WAIT_FIRST_POLL;
        while tokio::time::Instant::now() + interval < deadline {
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(WAIT_MAX_POLL);
            let read_at = Instant::now();
            match attempt().await {
                None => return Waited::GaveUp,
                Some(Claim::Found(found)) => return Waited::Filled(found, read_at),
                Some(Claim::Leased(lease)) => return Waited::Leased(lease),
                Some(Claim::Busy) => {}
            }
        }
        Waited::GaveUp
    }
}
