//! Users: read through the cache, written to PostgreSQL, then invalidated.

use std::sync::Arc;

use super::{ServiceError, invalidate_written, read_through::ReadThrough};
use crate::{
    cache::{Cache, near::NearCache},
    domain::{NewUser, User, UserId, UserPatch},
    store::replicas::Database,
    store::{outbox::OutboxRow, users},
};

#[derive(Clone)]
pub struct Users {
    database: Arc<Database>,
    cache: Arc<Cache>,
    reads: Arc<ReadThrough<User>>,
}

impl Users {
    pub fn new(database: Arc<Database>, cache: Arc<Cache>, near: Option<NearCache<UserId, Option<User>>>) -> Self {
        Self {
            reads: ReadThrough::new(database.clone(), cache.clone(), near),
            database,
            cache,
        }
    }

    /// Drops a user from the near cache (its invalidation event arrived).
    pub fn forget(&self, id: uuid::Uuid) {
        self.reads.forget([UserId::from_uuid(id)]);
    }

    /// Drops every user from the near cache (the table was truncated).
    pub fn forget_all(&self) {
        self.reads.forget_all();
    }

    /// Whether invalidation events are being received (see `cache::near`).
    pub fn listening(&self, listening: bool) {
        self.reads.listening(listening);
    }

    fn forget_written(&self, rows: &[OutboxRow]) {
        self.reads
            .forget(rows.iter().map(|row| UserId::from_uuid(row.entity_id)));
    }

    pub async fn get(&self, id: UserId) -> Result<User, ServiceError> {
        self.get_many(&[id])
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| ServiceError::NotFound(format!("user {id}")))
    }

    /// The user for each id, in order; `None` where no such user exists.
    pub async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<User>>, ServiceError> {
        self.reads.get_many(ids).await
    }

    /// The ids of the `limit` most recently modified users.
    pub async fn recent_ids(&self, limit: u32) -> Result<Vec<UserId>, ServiceError> {
        Ok(users::recent_ids(self.database.primary(), i64::from(limit)).await?)
    }

    pub async fn create(&self, new: NewUser) -> Result<User, ServiceError> {
        let written = users::insert(self.database.primary(), &new).await?;
        invalidate_written(&self.database, &self.cache, written, |rows| self.forget_written(rows)).await
    }

    pub async fn update(&self, patch: UserPatch) -> Result<User, ServiceError> {
        let id = patch.id;
        let written = users::update(self.database.primary(), &patch)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("user {id}")))?;
        invalidate_written(&self.database, &self.cache, written, |rows| self.forget_written(rows)).await
    }

    pub async fn delete(&self, id: UserId) -> Result<(), ServiceError> {
        let written = users::delete(self.database.primary(), id)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("user {id}")))?;
        invalidate_written(&self.database, &self.cache, written, |rows| self.forget_written(rows)).await
    }
}
