//! gRPC handlers: request -> validated domain input -> service -> response
//! (cache administration calls the cache directly: it has nothing to load).
//!
//! Handlers hold no SQL and no Redis commands. Errors become a gRPC status in
//! one place (`status.rs`); every call is timed per method (`observe`).

mod admin;
mod admission;
mod auth;
pub mod codec;
mod convert;
mod page_token;
mod products;
mod status;
mod users;

use std::{cell::RefCell, collections::HashMap, future::Future, time::Instant};

use metrics::Histogram;
use tonic::{Response, Status};
use tracing::Instrument;

pub use admin::CacheAdminApi;
pub use admission::AdmissionLayer;
pub use auth::{Access, AuthLayer, Authenticator, Role, required_access};
pub use page_token::PageTokens;
pub use products::ProductApi;
pub use users::UserApi;

/// Runs one RPC inside a tracing span (at debug level: at info, creating a
/// span per call costs more than a cache hit's own work) and records its
/// latency and status code.
async fn observe<T>(
    method: &'static str,
    handler: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = handler.instrument(tracing::debug_span!("rpc", method)).await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    rpc_duration(method, code).record(started.elapsed().as_secs_f64());
    result.map(Response::new)
}

/// The latency histogram of a method and code, looked up by name once per
/// thread rather than on every call.
fn rpc_duration(method: &'static str, code: tonic::Code) -> Histogram {
    thread_local! {
        static HANDLES: RefCell<HashMap<(&'static str, i32), Histogram>> = RefCell::new(HashMap::new());
    }
    HANDLES.with_borrow_mut(|handles| {
        handles
            .entry((method, code as i32))
            .or_insert_with(|| {
                metrics::histogram!("readthrough_rpc_duration_seconds", "method" => method, "code" => code_label(code))
            })
            .clone()
    })
}

/// The `code` label: the name of the `tonic::Code` variant, without formatting one per call.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
