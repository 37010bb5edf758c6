//! The Lua scripts the cache runs inside Redis, each in a file of its own.
//!
//! They are sent by `EVALSHA`: a call carries the script's SHA-1, not its
//! text. Every new connection loads them first (`SCRIPT LOAD`); a server
//! that has lost them since (a restart or failover behind the same
//! connection, `SCRIPT FLUSH`) answers NOSCRIPT, and the call loads them and
//! runs again (see `cache::redis`).

use std::sync::LazyLock;

use deadpool_redis::redis::{self, Cmd};

pub struct Script {
    text: &'static str,
    sha: String,
}

impl Script {
    fn new(text: &'static str) -> Self {
        Self {
            text,
            sha: redis::Script::new(text).get_hash().to_string(),
        }
    }

    /// `EVALSHA` of this script with `keys` keys: add the keys, then the arguments.
    pub fn call(&self, keys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys);
        cmd
    }

    /// `SCRIPT LOAD` of this script.
    pub fn load(&self) -> Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.text);
        cmd
    }
}

macro_rules! scripts {
    ($($(#[$doc:meta])* $name:ident = $file:literal;)*) => {
        $(
            $(#[$doc])*
            pub static $name: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!($file)));
        )*
        /// Every script, for loading them on a new connection.
        pub fn all() -> Vec<&'static Script> {
            vec![$(&*$name),*]
        }
    };
}

scripts! {
    /// Stores a value only while the caller still holds the entry's fill
    /// lease, then releases the lease. A write deletes the lease together
    /// with the entry, so a reader that loaded the row before the write
    /// cannot cache the old version. KEYS: entry, lease. ARGV: token, value,
    /// ttl seconds.
    GUARDED_SET = "guarded_set.lua";

    /// Writes a category list's head: its first ids (score = position), its
    /// metadata, and drops any directory, while the caller holds the list's
    /// lease. KEYS: ids, meta, dir, lease. ARGV: token, meta, ttl seconds,
    /// then the ids in order.
    GUARDED_LIST_HEAD = "guarded_list_head.lua";

    /// Adds ids to a category list at positions from `first`, only while its
    /// metadata is still exactly what the caller read (the same generation).
    /// The ids key takes the metadata's remaining time to live if it has
    /// none of its own. KEYS: ids, meta. ARGV: meta, first position, then the
    /// ids in order.
    GUARDED_LIST_CHUNK = "guarded_list_chunk.lua";

    /// Sets a value only while another key holds exactly the expected bytes,
    /// with that key's remaining time to live. KEYS: target, guard. ARGV:
    /// expected, value.
    GUARDED_SET_BESIDE = "guarded_set_beside.lua";

    /// Moves each kind named to a new epoch (see `cache::epochs` and the
    /// script's own comment for its arguments and answer).
    BUMP_EPOCHS = "bump_epochs.lua";

    /// Records a write's WAL position in its marker unless the marker holds
    /// a later one already (the relay may carry out an older write after a
    /// newer one's writer did). Positions are fixed-width hex, so they
    /// compare as strings. KEYS: marker. ARGV: position, ttl ms.
    MARK_WRITE = "mark_write.lua";

    /// Deletes a lease only if it is still the caller's. KEYS: lease. ARGV: token.
    RELEASE = "release.lua";

    /// Reads a key or, when it is missing, takes its lease, in one step: no
    /// fill can land between a miss and the lease taken after it (which
    /// would load the value a second time). KEYS: key, lease. ARGV: token,
    /// ms. Returns {1, value}, {2} when leased, {0} when another holds the lease.
    GET_OR_LEASE = "get_or_lease.lua";

    /// Extends a lease only if it is still the caller's. KEYS: lease. ARGV: token, ms.
    EXTEND = "extend.lua";
}
