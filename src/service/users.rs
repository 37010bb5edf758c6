//! Users: read through the cache, written to PostgreSQL, then invalidated.

use std::sync::Arc;

use sqlx::PgPool;

use super::{ServiceError, read_through};
use crate::{
    cache::Cache,
    domain::{NewUser, User, UserId, UserPatch},
    store::users,
};

#[derive(Clone)]
pub struct Users {
    pool: PgPool,
    cache: Arc<Cache>,
}

impl Users {
    pub fn new(pool: PgPool, cache: Arc<Cache>) -> Self {
        Self { pool, cache }
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
        let pool = &self.pool;
        Ok(read_through(&self.cache, ids, |missing| async move {
            users::get_many(pool, &missing).await
        })
        .await?)
    }

    /// The ids of the `limit` most recently modified users.
    pub async fn recent_ids(&self, limit: u32) -> Result<Vec<UserId>, ServiceError> {
        Ok(users::recent_ids(&self.pool, i64::from(limit)).await?)
    }

    pub async fn create(&self, new: NewUser) -> Result<User, ServiceError> {
        // A fresh id has nothing cached, so there is nothing to invalidate.
        Ok(users::insert(&self.pool, &new).await?)
    }

    pub async fn update(&self, patch: UserPatch) -> Result<User, ServiceError> {
        let id = patch.id;
        let user = users::update(&self.pool, &patch)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("user {id}")))?;
        self.cache.invalidate(&[self.cache.keys().user(id)]).await;
        Ok(user)
    }

    pub async fn delete(&self, id: UserId) -> Result<(), ServiceError> {
        users::delete(&self.pool, id)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("user {id}")))?;
        self.cache.invalidate(&[self.cache.keys().user(id)]).await;
        Ok(())
    }
}
