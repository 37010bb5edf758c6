//! Failpoints: named points in the cache's work where a concurrency test may
//! pause (to hold a fill until a write has passed, say). `failpoint!` marks
//! a point in one line; the hooks exist only with the `test-hooks` feature
//! (the integration tests turn it on), so a release build has none of this.

/// Awaits the test's hook for the failpoint `$point` (a field of `Hooks`),
/// given the key concerned.
macro_rules! failpoint {
    ($cache:expr, $point:ident, $key:expr) => {{
        #[cfg(feature = "test-hooks")]
        if let Some(hook) = $cache.hooks.get().and_then(|hooks| hooks.$point.as_ref()) {
            hook($key).await;
        }
    }};
}
pub(crate) use failpoint;

#[cfg(feature = "test-hooks")]
pub use hooks::{Hook, Hooks};

#[cfg(feature = "test-hooks")]
mod hooks {
    use std::{future::Future, pin::Pin, sync::Arc};

    use crate::cache::Cache;

    /// A hook awaited at a failpoint, given the key concerned.
    pub type Hook = Arc<dyn Fn(&str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

    /// Every failpoint, and the hook a test set for it.
    #[derive(Clone, Default)]
    pub struct Hooks {
        /// After a fill's database read, before the fill is written.
        pub before_fill: Option<Hook>,
        /// Before a write's invalidation.
        pub before_invalidate: Option<Hook>,
    }

    impl Cache {
        /// Sets the hooks, before the cache is first used; once.
        pub fn set_hooks(&self, hooks: Hooks) {
            assert!(self.core.hooks.set(hooks).is_ok(), "the hooks are set once");
        }
    }
}
