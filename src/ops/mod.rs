//! Operator commands beyond serving: `seed` (demo data) and `warm` (pre-fill the cache).

pub mod health;
mod seed;
mod warm;

pub use seed::{SeedOptions, SeedReport, demo_product_id, demo_user_id, seed};
pub use warm::{WarmOptions, WarmReport, warm};
