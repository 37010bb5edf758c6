//! The `users` table.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{StoreError, check_version, commit, outbox::Written, timed};
use crate::domain::{NewUser, User, UserId, UserPatch};

/// Loads the users with these ids in one query; absent ids are simply not returned.
pub async fn get_many(pool: &PgPool, ids: &[UserId]) -> Result<Vec<User>, StoreError> {
    let _timed = timed("user.get_many");
    let ids: Vec<Uuid> = ids.iter().map(UserId::as_uuid).collect();
    let users = sqlx::query_as::<_, User>("SELECT * FROM users WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(users)
}

pub async fn insert(pool: &PgPool, new: &NewUser) -> Result<Written<User>, StoreError> {
    let _timed = timed("user.insert");
    let mut tx = pool.begin().await?;
    let user = sqlx::query_as::<_, User>("INSERT INTO users (id, email, preferences) VALUES ($1, $2, $3) RETURNING *")
        .bind(Uuid::new_v4())
        .bind(new.email.as_str())
        .bind(new.preferences.as_json())
        .fetch_one(&mut *tx)
        .await
        .map_err(email_conflict)?;
    commit(tx, user).await
}

/// Applies `patch` if the version precondition holds; the row is locked while checked.
pub async fn update(pool: &PgPool, patch: &UserPatch) -> Result<Written<User>, StoreError> {
    let _timed = timed("user.update");
    let mut tx = pool.begin().await?;
    lock_checked(&mut tx, patch.id, patch.expected_version.get()).await?;
    let user = sqlx::query_as::<_, User>(
        "UPDATE users SET email = COALESCE($2, email), preferences = COALESCE($3, preferences), \
         version = version + 1, last_modified = now() WHERE id = $1 RETURNING *",
    )
    .bind(patch.id.as_uuid())
    .bind(patch.email.as_ref().map(|e| e.as_str()))
    .bind(patch.preferences.as_ref().map(|p| p.as_json()))
    .fetch_one(&mut *tx)
    .await
    .map_err(email_conflict)?;
    commit(tx, user).await
}

pub async fn delete(pool: &PgPool, id: UserId) -> Result<Written<()>, StoreError> {
    let _timed = timed("user.delete");
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    commit(tx, ()).await
}

/// The ids of the `limit` most recently modified users (for warming the cache).
pub async fn recent_ids(pool: &PgPool, limit: i64) -> Result<Vec<UserId>, StoreError> {
    let _timed = timed("user.recent_ids");
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM users ORDER BY last_modified DESC LIMIT $1")
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(ids.into_iter().map(UserId::from_uuid).collect())
}

/// Locks the row and checks the version precondition (`None`: unconditional).
async fn lock_checked(tx: &mut Transaction<'_, Postgres>, id: UserId, expected: Option<i64>) -> Result<(), StoreError> {
    let version: Option<i64> = sqlx::query_scalar("SELECT version FROM users WHERE id = $1 FOR UPDATE")
        .bind(id.as_uuid())
        .fetch_optional(&mut **tx)
        .await?;
    check_version(version, expected)
}

fn email_conflict(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.constraint() == Some("users_email_lower_key") => {
            StoreError::AlreadyExists("a user with this email")
        }
        _ => error.into(),
    }
}
