//! Integration tests: the real service, started in-process on port 0, against
//! real PostgreSQL and Redis, driven through its gRPC clients.

mod bad_input;
mod cli;
mod concurrency;
mod deployment;
mod fail_open;
mod helpers;
mod invalidation;
mod products;
mod users;
