//! readthrough: a gRPC data service that keeps users and products in
//! PostgreSQL and serves reads through a shared Redis cache.
//!
//! How the modules fit, from the wire inwards:
//!
//! - [`api`]: gRPC handlers. Parse requests into domain types, call a service,
//!   turn the result or error into a response or status.
//! - [`service`]: read-through and write-then-invalidate, per entity.
//! - [`cache`]: key names, the value codec, fail-open Redis access.
//! - [`store`]: PostgreSQL queries (sqlx) and migrations.
//! - [`domain`]: entities and validated input types; depends on nothing above.
//! - [`app`]: wiring: pools, services, health, reflection, graceful shutdown.
//! - [`config`], [`telemetry`], [`ops`]: settings, logs and metrics, and the
//!   operator commands `seed` and `warm`.
//! - [`tls`]: the gRPC listener's certificates, and the one rustls crypto provider.
//! - [`listener`]: every listener's bounds on connections.

// Nested async fns (handler, service, read-through, cache, Redis) exceed the default depth.
#![recursion_limit = "256"]

pub mod api;
pub mod app;
pub mod cache;
pub mod config;
pub mod domain;
pub mod listener;
pub mod ops;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tls;

/// The servers' code, generated from `client/proto/readthrough/v1/*.proto`
/// (clients: the `readthrough-client` crate).
pub mod proto {
    tonic::include_proto!("readthrough.v1");

    /// Served by gRPC reflection, so grpcurl can list and describe the services.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("readthrough_descriptor");
}
