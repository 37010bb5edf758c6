//! PostgreSQL access through sqlx, one file per entity.
//!
//! Every query is counted under a stable name in `readthrough_db_queries_total`,
//! so the share of reads that reach the database is visible next to the cache's hit rate.

pub mod epochs;
pub mod outbox;
pub mod products;
pub mod replicas;
pub mod users;

use std::time::Instant;

use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions, Postgres},
};

use crate::{
    config::{DatabaseConfig, SecretUrl},
    domain::ValidationError,
};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    #[error("version is {actual}, not the expected {expected}")]
    VersionMismatch { expected: i64, actual: i64 },
    /// The database rejected a value that passed validation (a constraint we did not foresee).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A serialization failure or deadlock: the transaction may simply be retried.
    #[error("transaction aborted: {0}")]
    Aborted(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        let sqlstate = sqlstate(&error);
        match (error, sqlstate.as_deref()) {
            (sqlx::Error::RowNotFound, _) => Self::NotFound,
            (
                error
                @ (sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_)),
                _,
            ) => Self::Unavailable(error),
            // serialization_failure, deadlock_detected
            (error, Some("40001" | "40P01")) => Self::Aborted(error),
            // query_canceled (statement_timeout), admin_shutdown, too_many_connections
            (error, Some("57014" | "57P01" | "53300")) => Self::Unavailable(error),
            // Class 22, data exception: a value PostgreSQL cannot take, i.e.
            // bad input. The caller gets our words; the log, PostgreSQL's.
            (error, Some(code)) if code.starts_with("22") => {
                tracing::info!(%error, sqlstate = code, "the database refused a value");
                Self::Invalid(ValidationError::new("request", refused_value(code)))
            }
            (other, _) => Self::Other(other),
        }
    }
}

/// The SQLSTATE of an error PostgreSQL reported.
fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error.as_database_error()?.code().map(|code| code.into_owned())
}

/// What a class-22 SQLSTATE (data exception) says about the value, in the
/// service's own words: PostgreSQL's message may quote the value, name
/// internals, or change between versions.
fn refused_value(sqlstate: &str) -> &'static str {
    match sqlstate {
        "22001" => "a value is longer than the database can store",
        "22003" => "a number is out of the range the database can store",
        "22021" | "22P05" => "a text holds a character the database cannot store (such as NUL)",
        "22P02" | "22007" | "22008" => "a value is not in a form the database accepts",
        "22023" | "22030" | "22032" => "a JSON value the database cannot store",
        _ => "a value the database cannot store",
    }
}

/// Opens a pool of at most `max_connections`; every statement on it is
/// cancelled past `DATABASE_STATEMENT_TIMEOUT_MS`. TLS is as `sslmode` (and
/// `sslrootcert`) in `DATABASE_URL` say.
///
/// A query waits at most `DATABASE_ACQUIRE_TIMEOUT_MS` for a connection: sqlx
/// keeps reconnecting to a server that refuses connections until then, so
/// while PostgreSQL is down a call fails after that long (UNAVAILABLE), and
/// once it is back the next acquire connects again.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = pool_options(config, &config.url)?;
    pool.connect_with(options).await
}

/// A pool like `connect`'s for a read replica, which connects when first used.
fn connect_to(config: &DatabaseConfig, url: &SecretUrl) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = pool_options(config, url)?;
    Ok(pool.connect_lazy_with(options))
}

fn pool_options(config: &DatabaseConfig, url: &SecretUrl) -> Result<(PgPoolOptions, PgConnectOptions), sqlx::Error> {
    let options = config
        .options_for(url)?
        .options([("statement_timeout", config.statement_timeout.as_millis().to_string())]);
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout);
    Ok((pool, options))
}

/// Whether PostgreSQL answers a query (within the pool's acquire timeout).
pub async fn answers(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// Creates the database if it does not exist, then applies pending migrations.
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<()> {
    let options = config.connect_options()?;
    // Unnamed, it is the user's (PostgreSQL's default).
    let name = options.get_database().unwrap_or(options.get_username()).to_string();
    // The server's maintenance database, to look for (and create) ours.
    let mut server = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut server)
        .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        // An identifier cannot be a bind parameter; `quoted` escapes it.
        let create = sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}"));
        match sqlx::raw_sql(create).execute(&mut server).await {
            Ok(_) => tracing::info!(database = name, "created the database"),
            // duplicate_database: another instance created it meanwhile.
            Err(error) if sqlstate(&error).as_deref() == Some("42P04") => {}
            Err(error) => return Err(error.into()),
        }
    }
    server.close().await?;
    let pool = connect(config).await?;
    MIGRATOR.run(&pool).await?;
    grant_service_role(&pool, &config.service_role).await?;
    pool.close().await;
    Ok(())
}

/// Grants `role`, if it exists, what `serve` needs and no more: read,
/// insert, update and delete the rows of the service's tables (the page
/// token keys read only) and use their sequences; nothing of the migrations
/// table, no DDL. Run after every migration, so tables added later are
/// covered. `role` is a plain identifier (`config::parse_role`).
async fn grant_service_role(pool: &PgPool, role: &str) -> anyhow::Result<()> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(pool)
        .await?;
    if !exists {
        tracing::info!(
            role,
            "no such role to grant the service's privileges to: serve connects as the owner"
        );
        return Ok(());
    }
    // An identifier cannot be a bind parameter; `role` holds only [A-Za-z0-9_].
    let grants = sqlx::AssertSqlSafe(format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO \"{role}\";
         REVOKE ALL ON _sqlx_migrations FROM \"{role}\";
         REVOKE INSERT, UPDATE, DELETE ON page_token_keys FROM \"{role}\";
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO \"{role}\";"
    ));
    sqlx::raw_sql(grants).execute(pool).await?;
    tracing::info!(role, "granted the service role its privileges");
    Ok(())
}

/// Counts a query under its stable name and, when dropped (at the end of
/// the function that runs it, waiting for a connection included), records
/// how long it took; in a trace, it is the query's span.
#[must_use = "the query is timed until this is dropped"]
struct Timed {
    query: &'static str,
    started: Instant,
    /// The query's span in a trace: it closes when this is dropped.
    _span: tracing::Span,
}

fn timed(query: &'static str) -> Timed {
    metrics::counter!("readthrough_db_queries_total", "query" => query).increment(1);
    Timed {
        query,
        started: Instant::now(),
        _span: tracing::debug_span!(
            "postgres",
            otel.kind = "client",
            db.system = "postgresql",
            db.operation = query
        ),
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        crate::telemetry::histogram("readthrough_db_duration_seconds", "query", self.query)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// Rows waiting in the outbox, and the age of the oldest in seconds: how far
/// the relay is behind. The rows are the span of their ids, read from the
/// primary key's two ends, so the cost does not grow with the backlog; rows
/// that went out of order (their writer invalidated them itself) make it an
/// upper bound.
pub async fn outbox_backlog(pool: &PgPool) -> Result<(i64, f64), StoreError> {
    let (rows, oldest): (Option<i64>, Option<f64>) = sqlx::query_as(
        "SELECT (SELECT max(id) FROM cache_outbox) - oldest.id + 1, \
                extract(epoch FROM clock_timestamp() - oldest.created_at)::float8 \
         FROM (SELECT id, created_at FROM cache_outbox ORDER BY id LIMIT 1) AS oldest",
    )
    // Planned for the outbox as it is now (see `outbox`).
    .persistent(false)
    .fetch_optional(pool)
    .await?
    .unwrap_or((Some(0), Some(0.0)));
    Ok((rows.unwrap_or(0), oldest.unwrap_or(0.0)))
}

/// The MAC keys of page tokens, newest first (see `api::page_token`).
pub async fn page_token_keys(pool: &PgPool) -> Result<Vec<Vec<u8>>, StoreError> {
    let _timed = timed("page_token_keys");
    let keys = sqlx::query_scalar("SELECT key FROM page_token_keys ORDER BY created_at DESC, id DESC")
        .fetch_all(pool)
        .await?;
    Ok(keys)
}

/// Checks a locked row's version against a write's precondition (`None`: unconditional).
fn check_version(found: Option<i64>, expected: Option<i64>) -> Result<(), StoreError> {
    match (found, expected) {
        (None, _) => Err(StoreError::NotFound),
        (Some(actual), Some(expected)) if actual != expected => Err(StoreError::VersionMismatch { expected, actual }),
        _ => Ok(()),
    }
}

/// Commits a write, returning its value with the outbox rows its triggers recorded.
async fn commit<T>(mut tx: sqlx::Transaction<'_, Postgres>, value: T) -> Result<outbox::Written<T>, StoreError> {
    let outbox = outbox::recorded(&mut tx).await?;
    tx.commit().await?;
    Ok(outbox::Written { value, outbox })
}
