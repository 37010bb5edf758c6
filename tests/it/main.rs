//! Integration tests: the real service, started in-process on port 0, against
//! real PostgreSQL and Redis, driven through `readthrough-client` (the typed
//! client, or its raw stubs for requests the typed client would not send).

mod acknowledged;
mod admin;
mod auth;
mod bad_input;
mod chaos;
mod cli;
mod client;
mod cluster;
mod concurrency;
mod connections;
mod consistency;
mod dashboard;
mod deployment;
mod epochs;
mod fail_open;
mod failover;
mod failures;
mod hostile;
mod hot_path;
mod invalidation;
mod limits;
mod postgres_outage;
mod products;
mod relay;
mod replicas;
mod roles;
mod stampede;
mod telemetry;
mod tls;
mod users;
