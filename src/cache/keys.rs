//! Cache key names. Every key starts with `<namespace>:v<SCHEMA_VERSION>`, so a
//! change to a cached type is a new prefix rather than a flush, and then names
//! its kind and the kind's epoch (see `cache::epochs`): `…:user:e<epoch>:…`.

use std::{fmt::Write, sync::Arc};

use super::{Kind, epochs::Epochs};
use crate::domain::{CategoryId, ProductId, UserId};

/// Bump when the shape of a cached value changes.
pub const SCHEMA_VERSION: u32 = 1;

/// What a key holds past its prefix, at most: a kind, an epoch, a UUID or a
/// category id (up to 64 characters) in braces, a part and a lease suffix.
const KEY_ROOM: usize = 128;
const LEASE_SUFFIX: &str = ":lease";

/// Key names at the epochs this instance knows. Clones share the epochs.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    epochs: Arc<Epochs>,
}

impl Keys {
    /// `namespace` is validated by the config: it holds no `{`/`}` that would break hash tags.
    pub fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{namespace}:v{SCHEMA_VERSION}"),
            epochs: Arc::default(),
        }
    }

    pub fn epochs_known(&self) -> &Epochs {
        &self.epochs
    }

    /// Matches every key of one kind at its current epoch (for SCAN, never
    /// KEYS). The namespace holds no glob characters, so the pattern matches
    /// exactly this prefix.
    pub fn pattern_for(&self, kind: Kind) -> String {
        format!("{}:{}:e{}:*", self.prefix, kind.label(), self.epochs.of(kind))
    }

    /// The hash of every kind's epoch.
    pub fn epochs(&self) -> String {
        format!("{}:epochs", self.prefix)
    }

    /// The entry of an entity of `kind` with id `id`, at the current epoch.
    /// The id is a hash tag, so the entry and its lease share a Cluster slot.
    pub fn entry(&self, kind: Kind, id: impl std::fmt::Display) -> String {
        self.entry_at(kind, self.epochs.of(kind), id)
    }

    fn entry_at(&self, kind: Kind, epoch: u64, id: impl std::fmt::Display) -> String {
        let mut key = self.key_buffer();
        let _ = write!(key, "{}:{}:e{epoch}:{{{id}}}", self.prefix, kind.label());
        key
    }

    /// Room for any key, allocated once: `format!` starts small and grew
    /// each key several times, a fifth of a relay's CPU in a drain.
    fn key_buffer(&self) -> String {
        String::with_capacity(self.prefix.len() + KEY_ROOM)
    }

    /// An entry and its lease at each epoch an invalidation must reach
    /// (see `Epochs::around`): leases first, all under one hash tag.
    pub fn entry_group(&self, kind: Kind, id: impl std::fmt::Display) -> Vec<String> {
        // Formatted once for all its keys (a relay batch builds thousands of groups).
        let id = id.to_string();
        let entries: Vec<String> = self
            .epochs
            .around(kind)
            .map(|epoch| self.entry_at(kind, epoch, &id))
            .collect();
        entries
            .iter()
            .map(|key| self.lease(key))
            .chain(entries.iter().cloned())
            .collect()
    }

    /// Where writes of an entity record the primary's WAL position for
    /// replica reads (see `store::replicas`). Outside the epochs, which a
    /// marker must outlive, and under the entry's hash tag.
    pub fn write_marker(&self, kind: Kind, id: impl std::fmt::Display) -> String {
        let mut key = self.key_buffer();
        let _ = write!(key, "{}:{}:lsn:{{{id}}}", self.prefix, kind.label());
        key
    }

    pub fn user(&self, id: UserId) -> String {
        self.entry(Kind::User, id)
    }

    pub fn product(&self, id: ProductId) -> String {
        self.entry(Kind::Product, id)
    }

    /// The pub/sub channel of invalidation events.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// The fill lease of an entry (or of a list, given its ids key): same hash tag.
    pub fn lease(&self, key: &str) -> String {
        let mut lease = String::with_capacity(key.len() + LEASE_SUFFIX.len());
        lease.push_str(key);
        lease.push_str(LEASE_SUFFIX);
        lease
    }

    fn list_at(&self, epoch: u64, category: &CategoryId, part: &str) -> String {
        let mut key = self.key_buffer();
        let _ = write!(key, "{}:list:e{epoch}:{{{category}}}:{part}", self.prefix);
        key
    }

    fn list_part(&self, category: &CategoryId, part: &str) -> String {
        self.list_at(self.epochs.of(Kind::List), category, part)
    }

    /// The category's ordered ids (a sorted set, score = position). Shares the hash
    /// tag `{<category>}` with `list_meta`, so both live on one Redis Cluster node.
    pub fn list_ids(&self, category: &CategoryId) -> String {
        self.list_part(category, "ids")
    }

    /// The category list's metadata (total, generation, head, chunk size).
    pub fn list_meta(&self, category: &CategoryId) -> String {
        self.list_part(category, "meta")
    }

    /// The category list's directory: where each chunk starts.
    pub fn list_dir(&self, category: &CategoryId) -> String {
        self.list_part(category, "dir")
    }

    /// A list's keys at each epoch an invalidation must reach: its leases first.
    pub fn list_group(&self, category: &CategoryId) -> Vec<String> {
        let epochs: Vec<u64> = self.epochs.around(Kind::List).collect();
        let leases = epochs.iter().map(|&e| self.lease(&self.list_at(e, category, "ids")));
        let rest = epochs
            .iter()
            .flat_map(|&e| ["ids", "meta", "dir"].map(|part| self.list_at(e, category, part)));
        leases.chain(rest).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn list_keys_share_a_hash_tag() {
        let keys = Keys::new("rt");
        let category = CategoryId::parse("books").unwrap();
        assert_eq!(keys.list_ids(&category), "rt:v1:list:e0:{books}:ids");
        assert_eq!(keys.list_meta(&category), "rt:v1:list:e0:{books}:meta");
        assert_eq!(keys.list_dir(&category), "rt:v1:list:e0:{books}:dir");
        assert_eq!(keys.lease(&keys.list_ids(&category)), "rt:v1:list:e0:{books}:ids:lease");
    }

    #[test]
    fn keys_follow_their_kinds_epoch() {
        let keys = Keys::new("rt-test.1");
        let id = UserId::parse("123e4567-e89b-12d3-a456-426614174000").unwrap();
        assert_eq!(keys.pattern_for(Kind::User), "rt-test.1:v1:user:e0:*");
        keys.epochs_known().confirm(Instant::now(), [3, 0, 7]);
        assert_eq!(keys.pattern_for(Kind::User), "rt-test.1:v1:user:e3:*");
        assert_eq!(keys.pattern_for(Kind::Product), "rt-test.1:v1:product:e0:*");
        assert_eq!(
            keys.user(id),
            "rt-test.1:v1:user:e3:{123e4567-e89b-12d3-a456-426614174000}"
        );
        assert_eq!(
            keys.list_ids(&CategoryId::parse("books").unwrap()),
            "rt-test.1:v1:list:e7:{books}:ids"
        );
    }

    #[test]
    fn a_group_holds_three_epochs_leases_first_under_one_hash_tag() {
        let keys = Keys::new("rt");
        keys.epochs_known().confirm(Instant::now(), [4, 0, 2]);
        let id = UserId::parse("123e4567-e89b-12d3-a456-426614174000").unwrap();
        let group = keys.entry_group(Kind::User, id);
        let tag = "{123e4567-e89b-12d3-a456-426614174000}";
        assert_eq!(
            group,
            [3, 4, 5]
                .map(|e| format!("rt:v1:user:e{e}:{tag}:lease"))
                .into_iter()
                .chain([3, 4, 5].map(|e| format!("rt:v1:user:e{e}:{tag}")))
                .collect::<Vec<_>>()
        );
        let list = keys.list_group(&CategoryId::parse("books").unwrap());
        assert_eq!(list.len(), 12);
        assert!(list[..3].iter().all(|key| key.ends_with(":ids:lease")));
        assert!(list.iter().all(|key| key.contains(":{books}:")));
        assert!(list.iter().any(|key| key.starts_with("rt:v1:list:e1:")));
        assert!(list.iter().any(|key| key.starts_with("rt:v1:list:e3:")));
    }
}
