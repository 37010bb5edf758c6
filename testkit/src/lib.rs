//! Test support for readthrough, one file per fake or fixture: the service
//! started in-process (`app`: `spawn_app`), a database and key namespace of a
//! test's own (`sandbox`), a Redis proxy to cut (`redis_proxy`), Redis,
//! Sentinel and Redis Cluster servers of a test's own (`own_redis`), a
//! PostgreSQL of a test's own (`own_postgres`), a steady read load (`load`)
//! and the consistency checker (`checker`). The integration tests
//! (`tests/it`) and the correctness benchmark (`bench/src/bin/cache_correctness.rs`)
//! use it.

mod app;
pub mod checker;
mod load;
pub mod own_postgres;
mod own_redis;
mod redis_proxy;
mod sandbox;

pub use app::*;
pub use deadpool_redis::redis;
pub use load::*;
pub use own_redis::*;
pub use redis_proxy::*;
pub use sandbox::*;
