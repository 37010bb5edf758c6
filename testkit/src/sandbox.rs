//! A database and a Redis key namespace of a test's own.

use readthrough::config::ServeConfig;
use sqlx::{Connection, Executor, PgConnection, postgres::PgConnectOptions};

use crate::redis;
use crate::scan_namespace;

/// A database and a Redis key namespace of a test's own, removed on drop
/// (the database is created by the app, as `serve` and `migrate` do).
pub struct Sandbox {
    /// The server's URL (`DATABASE_URL`)...
    pub database_url: String,
    /// ...and the test's database on it (`DATABASE_NAME`).
    pub database_name: String,
    pub namespace: String,
    pub redis_url: String,
    server: PgConnectOptions,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let config = ServeConfig::from_env().backends;
        Self {
            server: config.database.connect_options().unwrap(),
            database_url: config.database.url.expose().to_string(),
            database_name: format!("rt_test_{suffix}"),
            namespace: format!("rt-test-{suffix}"),
            redis_url: config.cache.redis_url.expose().to_string(),
        }
    }

    /// The test's database.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.server.clone().database(&self.database_name)
    }

    /// The server's maintenance database, to create and drop others.
    pub fn admin_options(&self) -> PgConnectOptions {
        self.server.clone().database("postgres")
    }

    /// The environment of a `readthrough` process using this sandbox.
    pub fn env(&self) -> [(&'static str, &str); 4] {
        [
            ("DATABASE_URL", &self.database_url),
            ("DATABASE_NAME", &self.database_name),
            ("REDIS_URL", &self.redis_url),
            ("CACHE_NAMESPACE", &self.namespace),
        ]
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let (admin, redis_url) = (self.admin_options(), self.redis_url.clone());
        let (database, namespace) = (self.database_name.clone(), self.namespace.clone());
        // Drop may run inside or outside a runtime: clean up on a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(mut conn) = PgConnection::connect_with(&admin).await {
                    let drop = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                    let _ = conn.execute(sqlx::AssertSqlSafe(drop)).await;
                }
                if let Ok(client) = redis::Client::open(redis_url.as_str())
                    && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                {
                    let keys = scan_namespace(&mut conn, &namespace).await;
                    if !keys.is_empty() {
                        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}
