//! The near cache: an optional, bounded, in-process cache of entities in front
//! of Redis (moka), for the hottest keys. Off by default (`NEAR_CACHE_ENABLED`).
//!
//! It is kept right by the invalidation events every instance receives, and
//! bounded in time by a short TTL (`NEAR_CACHE_TTL_MS`):
//!
//! - a write on this instance drops its keys here before the write returns;
//! - a write on another instance drops them when its event arrives (a
//!   pub/sub message, about a millisecond; measured in docs/benchmarks.md);
//! - when the event subscription drops, everything is dropped and nothing is
//!   added until it is back (and everything is dropped again then, since
//!   events may have been missed in between).
//!
//! So a read on another instance may see the value a write replaced for as
//! long as its event takes to arrive; if the event is lost without the
//! subscription noticing, for at most the TTL.
//!
//! A value read from Redis or PostgreSQL just before an invalidation must not
//! be stored just after it: every invalidation bumps an epoch, and a value is
//! stored only if the epoch did not move since its read began.

use std::{
    hash::Hash,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use moka::sync::Cache as Moka;

pub struct NearCache<K, V> {
    entries: Moka<K, V>,
    epoch: AtomicU64,
    /// Events are being received (see the module comment).
    listening: AtomicBool,
}

/// The epoch at the start of a read, to hand back to `insert`.
#[derive(Debug, Clone, Copy)]
pub struct Epoch(u64);

impl<K, V> NearCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            entries: Moka::builder().max_capacity(capacity).time_to_live(ttl).build(),
            epoch: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.entries.get(key)
    }

    /// Call before reading what may be stored with `insert`.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// Stores `value` unless an invalidation came since `read_began`, or events are not being received.
    pub fn insert(&self, key: K, value: V, read_began: Epoch) {
        if !self.listening.load(Ordering::Acquire) {
            return;
        }
        if self.epoch.load(Ordering::Acquire) != read_began.0 {
            return;
        }
        self.entries.insert(key.clone(), value);
        // An invalidation between the check and the insert bumped the epoch
        // before dropping its entry: undo the insert then.
        if self.epoch.load(Ordering::Acquire) != read_began.0 {
            self.entries.invalidate(&key);
        }
    }

    pub fn invalidate(&self, key: &K) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate(key);
    }

    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }

    /// Events are flowing again (or for the first time): drop what may have
    /// missed its invalidation, and start storing.
    pub fn resume(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
        self.listening.store(true, Ordering::Release);
    }

    /// Events stopped: drop everything and store nothing until `resume`.
    pub fn pause(&self) {
        self.listening.store(false, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near() -> NearCache<u32, &'static str> {
        let near = NearCache::new(100, Duration::from_secs(60));
        near.resume();
        near
    }

    #[test]
    fn stores_and_forgets() {
        let near = near();
        let epoch = near.epoch();
        near.insert(1, "one", epoch);
        assert_eq!(near.get(&1), Some("one"));
        near.invalidate(&1);
        assert_eq!(near.get(&1), None);
    }

    #[test]
    fn a_value_read_before_an_invalidation_is_not_stored() {
        let near = near();
        let epoch = near.epoch();
        near.invalidate(&1);
        near.insert(1, "old", epoch);
        assert_eq!(near.get(&1), None);
    }

    #[test]
    fn nothing_is_stored_while_events_are_not_received() {
        let near = near();
        near.insert(1, "one", near.epoch());
        near.pause();
        assert_eq!(near.get(&1), None, "pausing drops everything");
        near.insert(2, "two", near.epoch());
        assert_eq!(near.get(&2), None);
        near.resume();
        near.insert(3, "three", near.epoch());
        assert_eq!(near.get(&3), Some("three"));
    }
}
