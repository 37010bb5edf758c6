//! Redis access that fails open: every call has a deadline, and a failed or
//! slow call returns `None` so the caller answers from PostgreSQL instead.
//!
//! Failures are counted per operation and logged at most once per
//! `LOG_INTERVAL`, so an outage does not turn into a log line per request.

use std::{
    future::Future,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_redis::{Pool, Runtime, redis};

use crate::config::Config;

const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// An ordered page of a cached category list, read in one round trip.
#[derive(Debug)]
pub struct ListPageRaw {
    pub ids: Vec<String>,
    pub meta: Option<Vec<u8>>,
}

pub struct RedisClient {
    pool: Pool,
    timeout: Duration,
    errors: ErrorLog,
}

impl RedisClient {
    /// Creates the pool without connecting, so the service starts while Redis is down.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let mut pool_config = deadpool_redis::Config::from_url(config.redis_url.expose());
        let timeout = config.redis_timeout();
        pool_config.pool = Some(deadpool_redis::PoolConfig {
            max_size: config.redis_pool_size,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(timeout),
                create: Some(timeout),
                recycle: Some(timeout),
            },
            ..Default::default()
        });
        let pool = pool_config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))?;
        Ok(Self {
            pool,
            timeout,
            errors: ErrorLog::default(),
        })
    }

    /// GET for one key, MGET for several; `None` when Redis could not answer.
    pub async fn get_many(&self, keys: &[String]) -> Option<Vec<Option<Vec<u8>>>> {
        match keys {
            [] => Some(Vec::new()),
            [key] => self
                .run("get", redis::cmd("GET").arg(key))
                .await
                .map(|v| vec![v]),
            _ => self.run("mget", redis::cmd("MGET").arg(keys)).await,
        }
    }

    /// SET with an expiry for each entry, pipelined into one round trip.
    pub async fn set_many(&self, entries: &[(String, Vec<u8>, u64)]) -> Option<()> {
        if entries.is_empty() {
            return Some(());
        }
        let mut pipe = redis::pipe();
        for (key, value, ttl_secs) in entries {
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(ttl_secs)
                .ignore();
        }
        self.run_pipe("set", &pipe).await
    }

    /// Deletes the keys in one round trip, one DEL per key so that no command
    /// spans two Redis Cluster slots.
    pub async fn delete(&self, keys: &[String]) -> Option<()> {
        if keys.is_empty() {
            return Some(());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("DEL").arg(key).ignore();
        }
        self.run_pipe("del", &pipe).await
    }

    /// The ids at positions `start..=stop` and the list's metadata, in one round trip.
    pub async fn read_list_page(
        &self,
        ids_key: &str,
        meta_key: &str,
        start: u64,
        stop: u64,
    ) -> Option<ListPageRaw> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(ids_key)
            .arg(start)
            .arg(stop)
            .cmd("GET")
            .arg(meta_key);
        let (ids, meta) = self.run_pipe("list_read", &pipe).await?;
        Some(ListPageRaw { ids, meta })
    }

    /// Replaces a category list atomically (MULTI): the ids with their positions as
    /// scores, and the metadata, both expiring after `ttl_secs`.
    pub async fn write_list(
        &self,
        ids_key: &str,
        meta_key: &str,
        ids: &[String],
        meta: &[u8],
        ttl_secs: u64,
    ) -> Option<()> {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(ids_key).ignore();
        // Chunked so that no single command grows unboundedly large.
        for (chunk_index, chunk) in ids.chunks(1000).enumerate() {
            let first = chunk_index * 1000;
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(ids_key);
            for (offset, id) in chunk.iter().enumerate() {
                zadd.arg(first + offset).arg(id);
            }
            pipe.add_command(zadd).ignore();
        }
        pipe.cmd("EXPIRE").arg(ids_key).arg(ttl_secs).ignore();
        pipe.cmd("SET")
            .arg(meta_key)
            .arg(meta)
            .arg("EX")
            .arg(ttl_secs)
            .ignore();
        self.run_pipe("list_write", &pipe).await
    }

    /// Answers PONG when Redis is reachable; for readiness reporting.
    pub async fn ping(&self) -> bool {
        self.run::<String>("ping", &redis::cmd("PING"))
            .await
            .is_some()
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &redis::Cmd,
    ) -> Option<T> {
        self.with_deadline(operation, async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            cmd.query_async::<T>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        })
        .await
    }

    async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        pipe: &redis::Pipeline,
    ) -> Option<T> {
        self.with_deadline(operation, async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            pipe.query_async::<T>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        })
        .await
    }

    async fn with_deadline<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, String>>,
    ) -> Option<T> {
        let error = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(error)) => error,
            Err(_) => format!("timed out after {:?}", self.timeout),
        };
        metrics::counter!("readthrough_cache_errors_total", "operation" => operation).increment(1);
        self.errors.report(operation, &error);
        None
    }
}

/// Logs the first Redis error of each interval and how many followed it unlogged.
#[derive(Default)]
struct ErrorLog {
    last_logged: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl ErrorLog {
    fn report(&self, operation: &str, error: &str) {
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|at| at.elapsed() < LOG_INTERVAL) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            operation,
            error,
            suppressed,
            "redis unavailable; serving from PostgreSQL"
        );
    }
}
