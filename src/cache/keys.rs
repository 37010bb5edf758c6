//! Cache key names. Every key starts with `<namespace>:v<SCHEMA_VERSION>`, so a
//! change to a cached type is a new prefix rather than a flush.

use crate::domain::{CategoryId, ProductId, UserId};

/// Bump when the shape of a cached value changes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `namespace` is validated by the config: it holds no `{`/`}` that would break hash tags.
    pub fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{namespace}:v{SCHEMA_VERSION}"),
        }
    }

    /// Matches every key of this namespace and schema version (for SCAN, never KEYS).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }

    /// Matches every key of one entity (`user`, `product`, `list`), or of the
    /// whole namespace for `None`; `None` for an unknown entity, so a typo never
    /// widens to everything. The namespace holds no glob characters, so the
    /// pattern matches exactly this prefix.
    pub fn pattern_for(&self, entity: Option<&str>) -> Option<String> {
        match entity {
            None => Some(self.pattern()),
            Some(entity @ ("user" | "product" | "list")) => Some(format!("{}:{entity}:*", self.prefix)),
            Some(_) => None,
        }
    }

    /// Matches the fill leases among the keys `pattern_for(entity)` matches.
    pub fn lease_pattern_for(&self, entity: Option<&str>) -> Option<String> {
        self.pattern_for(entity).map(|pattern| format!("{pattern}:lease"))
    }

    /// A user's entry. The id is a hash tag, so the entry and its lease share a Cluster slot.
    pub fn user(&self, id: UserId) -> String {
        format!("{}:user:{{{id}}}", self.prefix)
    }

    pub fn product(&self, id: ProductId) -> String {
        format!("{}:product:{{{id}}}", self.prefix)
    }

    /// The pub/sub channel of invalidation events.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// The fill lease of an entry (or of a list, given its ids key): same hash tag.
    pub fn lease(&self, key: &str) -> String {
        format!("{key}:lease")
    }

    /// The category's ordered ids (a sorted set, score = position). Shares the hash
    /// tag `{<category>}` with `list_meta`, so both live on one Redis Cluster node.
    pub fn list_ids(&self, category: &CategoryId) -> String {
        format!("{}:list:{{{category}}}:ids", self.prefix)
    }

    /// The category list's metadata (total, generation, head, chunk size).
    pub fn list_meta(&self, category: &CategoryId) -> String {
        format!("{}:list:{{{category}}}:meta", self.prefix)
    }

    /// The category list's directory: where each chunk starts.
    pub fn list_dir(&self, category: &CategoryId) -> String {
        format!("{}:list:{{{category}}}:dir", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keys_share_a_hash_tag() {
        let keys = Keys::new("rt");
        let category = CategoryId::parse("books").unwrap();
        assert_eq!(keys.list_ids(&category), "rt:v1:list:{books}:ids");
        assert_eq!(keys.list_meta(&category), "rt:v1:list:{books}:meta");
        assert_eq!(keys.list_dir(&category), "rt:v1:list:{books}:dir");
        assert_eq!(keys.lease(&keys.list_ids(&category)), "rt:v1:list:{books}:ids:lease");
    }

    #[test]
    fn patterns_cover_one_entity_or_the_namespace() {
        let keys = Keys::new("rt-test.1");
        assert_eq!(keys.pattern_for(None).as_deref(), Some("rt-test.1:v1:*"));
        assert_eq!(keys.pattern_for(Some("user")).as_deref(), Some("rt-test.1:v1:user:*"));
        assert_eq!(
            keys.pattern_for(Some("product")).as_deref(),
            Some("rt-test.1:v1:product:*")
        );
        assert_eq!(keys.pattern_for(Some("list")).as_deref(), Some("rt-test.1:v1:list:*"));
        assert_eq!(keys.pattern_for(Some("")), None);
        assert_eq!(keys.pattern_for(Some("users")), None);
        assert_eq!(
            keys.lease_pattern_for(Some("user")).as_deref(),
            Some("rt-test.1:v1:user:*:lease")
        );
    }

    #[test]
    fn entries_and_their_leases_share_a_hash_tag() {
        let keys = Keys::new("rt");
        let id = UserId::parse("123e4567-e89b-12d3-a456-426614174000").unwrap();
        assert_eq!(keys.user(id), "rt:v1:user:{123e4567-e89b-12d3-a456-426614174000}");
        assert_eq!(
            keys.lease(&keys.user(id)),
            "rt:v1:user:{123e4567-e89b-12d3-a456-426614174000}:lease"
        );
    }
}
