//! gRPC handlers: request -> validated domain input -> service -> response
//! (cache administration calls the cache directly: it has nothing to load).
//!
//! Handlers hold no SQL and no Redis commands. Errors become a gRPC status in
//! one place (`status.rs`); every call is timed in front of them all
//! (`rpc_metrics.rs`).

mod admin;
mod admission;
mod auth;
pub mod codec;
mod convert;
mod methods;
mod page_token;
mod products;
mod rpc_metrics;
mod status;
mod users;

use std::future::Future;

use tonic::{Response, Status};

pub use admin::CacheAdminApi;
pub use admission::AdmissionLayer;
pub use auth::{AuthLayer, Authenticator};
pub use methods::Role;
pub use page_token::PageTokens;
pub use products::ProductApi;
pub use rpc_metrics::{RpcMetricsLayer, code_name};
pub use users::UserApi;

/// A handler's answer as a response. (Every call's latency and code are
/// recorded in front of all services, by `RpcMetricsLayer`.)
async fn respond<T>(handler: impl Future<Output = Result<T, Status>>) -> Result<Response<T>, Status> {
    handler.await.map(Response::new)
}
