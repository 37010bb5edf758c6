//! The one place where errors become gRPC statuses.
//!
//! Anything a caller can cause maps to a specific code; only faults of our own
//! become INTERNAL, and those are logged with their cause chain.

use tonic::Status;

use crate::{domain::ValidationError, service::ServiceError};

impl From<ValidationError> for Status {
    fn from(error: ValidationError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::NotFound(_) => Status::not_found(error.to_string()),
            ServiceError::AlreadyExists(_) => Status::already_exists(error.to_string()),
            ServiceError::VersionMismatch { .. } | ServiceError::Aborted(_) => Status::aborted(error.to_string()),
            ServiceError::Invalid(invalid) => invalid.into(),
            // Shed on purpose, counted in readthrough_db_fallbacks_shed_total: no log line each.
            ServiceError::FallbackLimit => {
                Status::unavailable("cache unavailable and the database fallback is at its limit; retry with backoff")
            }
            ServiceError::Unavailable(ref cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                Status::unavailable("database unavailable; try again later")
            }
            ServiceError::Internal(ref cause) => {
                tracing::error!(error = ?cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// An operation that needs Redis (cache administration) when Redis did not answer.
pub(super) fn cache_unavailable() -> Status {
    Status::unavailable("cache unavailable")
}
