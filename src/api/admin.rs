//! `readthrough.v1.CacheAdminService`: operator invalidation of cached keys:
//! one entity or list by deleting its keys, a whole kind by a new key epoch.
//!
//! Talks to the cache directly (there is nothing to read from PostgreSQL) and
//! holds no Redis commands itself. Unlike reads, these calls do not fail open:
//! when Redis does not answer they are UNAVAILABLE, never a pretended success.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{respond, status::cache_unavailable};
use crate::{
    cache::{Bump, Cache, EPOCH_TRUST, Kind},
    domain::{CategoryId, Product, ProductId, User, UserId, ValidationError},
    proto::{self, cache_admin_service_server::CacheAdminService},
};

pub struct CacheAdminApi {
    cache: Arc<Cache>,
    /// Held by the `InvalidateAll` in progress: one per instance at a time, so
    /// a loop of calls cannot multiply the load on Redis (a dry run walks the
    /// keyspace).
    invalidating_all: tokio::sync::Mutex<()>,
}

impl CacheAdminApi {
    pub fn new(cache: Arc<Cache>) -> Self {
        Self {
            cache,
            invalidating_all: tokio::sync::Mutex::new(()),
        }
    }

    /// Deletes (or, dry, finds) the given keys and answers with the ones that existed.
    async fn invalidate(
        &self,
        what: &str,
        keys: &[String],
        dry_run: bool,
    ) -> Result<proto::InvalidateResponse, Status> {
        let found = self
            .cache
            .invalidation
            .invalidate_keys(keys, dry_run)
            .await
            .ok_or_else(cache_unavailable)?;
        if !dry_run {
            tracing::info!(what, count = found.len(), "invalidated cache keys");
        }
        Ok(proto::InvalidateResponse {
            count: found.len() as i64,
            keys: found,
            dry_run,
        })
    }
}

#[tonic::async_trait]
impl CacheAdminService for CacheAdminApi {
    async fn invalidate_user(
        &self,
        request: Request<proto::InvalidateUserRequest>,
    ) -> Result<Response<proto::InvalidateResponse>, Status> {
        respond(async {
            let request = request.into_inner();
            let id = UserId::parse(&request.id)?;
            let keys = self.cache.invalidation.entity_keys::<User>(id);
            self.invalidate(&format!("user {id}"), &keys, request.dry_run).await
        })
        .await
    }

    async fn invalidate_product(
        &self,
        request: Request<proto::InvalidateProductRequest>,
    ) -> Result<Response<proto::InvalidateResponse>, Status> {
        respond(async {
            let request = request.into_inner();
            let id = ProductId::parse(&request.id)?;
            let keys = self.cache.invalidation.entity_keys::<Product>(id);
            self.invalidate(&format!("product {id}"), &keys, request.dry_run).await
        })
        .await
    }

    async fn invalidate_category(
        &self,
        request: Request<proto::InvalidateCategoryRequest>,
    ) -> Result<Response<proto::InvalidateResponse>, Status> {
        respond(async {
            let request = request.into_inner();
            let category = CategoryId::parse(&request.category_id)?;
            let keys = self.cache.lists.list_keys(&category);
            self.invalidate(&format!("category {category}"), &keys, request.dry_run)
                .await
        })
        .await
    }

    async fn invalidate_all(
        &self,
        request: Request<proto::InvalidateAllRequest>,
    ) -> Result<Response<proto::InvalidateAllResponse>, Status> {
        respond(async {
            let request = request.into_inner();
            let kinds = match request.entity.as_str() {
                "" => Kind::ALL.to_vec(),
                label => vec![Kind::parse(label).ok_or_else(|| {
                    ValidationError::new("entity", "must be \"\", \"user\", \"product\" or \"list\"")
                })?],
            };
            // Whatever it is doing ends with the call, at the server's deadline
            // (REQUEST_TIMEOUT_MS): a bump made by then stays made.
            let _running = self.invalidating_all.try_lock().map_err(|_| {
                Status::aborted("an InvalidateAll is already running on this instance; retry when it has ended")
            })?;
            let (count, keys) = if request.dry_run {
                self.cache
                    .invalidation
                    .count_keys(&kinds)
                    .await
                    .ok_or_else(cache_unavailable)?
            } else {
                self.retire(&kinds).await?;
                (0, Vec::new())
            };
            let epochs = self.cache.keys().epochs_known();
            Ok(proto::InvalidateAllResponse {
                epochs: Kind::ALL
                    .into_iter()
                    .map(|kind| (kind.label().to_string(), epochs.of(kind)))
                    .collect(),
                count: i64::try_from(count).unwrap_or(i64::MAX),
                keys,
                dry_run: request.dry_run,
            })
        })
        .await
    }
}

impl CacheAdminApi {
    /// Bumps the epochs of `kinds` (waiting for the spacing between bumps),
    /// then waits until no instance reads the old ones.
    async fn retire(&self, kinds: &[Kind]) -> Result<(), Status> {
        loop {
            match self.cache.epochs.bump(kinds).await.ok_or_else(cache_unavailable)? {
                Bump::Done(_) => break,
                Bump::TooSoon(wait) => tokio::time::sleep(wait).await,
            }
        }
        tokio::time::sleep(EPOCH_TRUST).await;
        Ok(())
    }
}
