//! GetUser throughput and latency with a warm cache, and with the cache turned off.
//!
//! Starts the real server in-process (port 0) on a database and Redis namespace
//! of its own, seeds users, then drives GetUser with random ids from many
//! concurrent clients for a fixed time. Client and server share this machine,
//! so the figures are for the whole loop, not the server alone.
//!
//! ```text
//! cargo bench --bench get_user                 # 10 s per mode, 64 concurrent calls
//! BENCH_SECONDS=30 BENCH_CONCURRENCY=128 cargo bench --bench get_user
//! ```

use std::time::{Duration, Instant};

use rand::Rng;
use readthrough::{
    app::Application,
    config::ServeConfig,
    ops::{self, SeedOptions, WarmOptions, demo_user_id},
    proto::{GetUserRequest, user_service_client::UserServiceClient},
    service::Services,
    telemetry,
};
use sqlx::{Connection, Executor, PgConnection};
use tonic::transport::Channel;

const USERS: u32 = 10_000;
/// HTTP/2 connections the load is spread over (as a client's channel pool would).
const CONNECTIONS: usize = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 64);
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let base = ServeConfig::from_env();
    let admin_url = base.config.database_url.with_database("postgres");
    let database = format!("rt_bench_{suffix}");

    let mut config = base.clone();
    config.config.database_url = base.config.database_url.with_database(&database);
    config.config.cache_namespace = format!("rt-bench-{suffix}");
    config.grpc_addr = "127.0.0.1:0".parse()?;
    config.metrics_addr = "127.0.0.1:0".parse()?;

    let cached = start(config.clone()).await?;
    let services = Services::connect(&config.config, Default::default()).await?;
    ops::seed(
        &services.pool,
        SeedOptions {
            users: USERS,
            products: 0,
            categories: 1,
        },
    )
    .await?;
    // Every user cached, so the warm run measures hits only.
    let warmed = ops::warm(
        &services.users,
        &services.products,
        &WarmOptions {
            recent_users: USERS,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(warmed.users, u64::from(USERS));
    let mut uncached_config = config.clone();
    uncached_config.config.cache_enabled = false;
    let uncached = start(uncached_config).await?;

    println!(
        "GetUser, {USERS} users, {concurrency} concurrent calls over {CONNECTIONS} connections, {seconds} s per mode"
    );
    let hits_before = hits();
    run(cached.0, concurrency, Duration::from_secs(seconds), "warm cache").await?;
    let hit_count = hits() - hits_before;
    println!("  (cache hits during the warm run: {hit_count})");
    run(uncached.0, concurrency, Duration::from_secs(seconds), "cache off").await?;

    for (_, stop) in [cached, uncached] {
        let _ = stop.send(());
    }
    services.pool.close().await;
    let mut admin = PgConnection::connect(admin_url.expose()).await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE \"{database}\" WITH (FORCE)"
        )))
        .await?;
    Ok(())
}

/// Starts a server; returns its gRPC port and the sender that stops it.
async fn start(config: ServeConfig) -> anyhow::Result<(u16, tokio::sync::oneshot::Sender<()>)> {
    let app = Application::build(config).await?;
    let port = app.grpc_port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok((port, stop))
}

/// Runs `concurrency` callers for `duration` and prints throughput and latency.
async fn run(port: u16, concurrency: usize, duration: Duration, label: &str) -> anyhow::Result<()> {
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        channels.push(
            Channel::from_shared(format!("http://127.0.0.1:{port}"))?
                .connect()
                .await?,
        );
    }
    let started = Instant::now();
    let deadline = started + duration;
    let callers: Vec<_> = (0..concurrency)
        .map(|caller| {
            let mut client = UserServiceClient::new(channels[caller % CONNECTIONS].clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let id = demo_user_id(rand::rng().random_range(0..USERS)).to_string();
                    let sent = Instant::now();
                    client.get_user(GetUserRequest { id }).await.expect("GetUser succeeds");
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for caller in callers {
        latencies.extend(caller.await?);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{label:>12}: {:>8} calls in {:>5.1} s = {:>8.0} calls/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(0.50).as_secs_f64() * 1e3,
        percentile(0.99).as_secs_f64() * 1e3,
    );
    Ok(())
}

fn hits() -> f64 {
    let text = telemetry::metrics_handle().render();
    text.lines()
        .find_map(|line| line.strip_prefix(r#"readthrough_cache_hits_total{entity="user"} "#))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
