//! Pause points for the concurrency tests, compiled only with the
//! `test-hooks` feature (the integration tests turn it on; a release build
//! has none of this).
//!
//! A test awaits its own future at a point of the cache's work (to hold a
//! fill until a write has passed, say), or turns the leases off to show
//! the stale-set race they prevent.

use std::{future::Future, pin::Pin, sync::Arc};

use super::Cache;

/// A hook awaited at a point of the cache's work, given the key concerned.
pub type Hook = Arc<dyn Fn(&str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Hooks {
    /// Awaited after a fill's database read and before the fill is written.
    pub before_fill: Option<Hook>,
    /// Awaited before a write's invalidation.
    pub before_invalidate: Option<Hook>,
    /// Fills ignore leases: only for the test that shows the stale-set race.
    pub unguarded_fills: bool,
}

impl Cache {
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    pub(super) async fn before_fill(&self, key: &str) {
        if let Some(hook) = &self.hooks.before_fill {
            hook(key).await;
        }
    }

    pub(super) async fn before_invalidate(&self, key: &str) {
        if let Some(hook) = &self.hooks.before_invalidate {
            hook(key).await;
        }
    }

    pub(super) fn unguarded_fills(&self) -> bool {
        self.hooks.unguarded_fills
    }
}
