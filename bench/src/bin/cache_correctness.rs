//! Figures for the cache's concurrency mechanisms, on real PostgreSQL and Redis:
//!
//! 1. Stampede: 1000 concurrent GetUser calls for one cold key, spread over two
//!    instances: database loads of that key, and p50/p99 latency as a ratio
//!    to one uncontended database read.
//! 2. Refresh ahead: a hot key with a 2 s TTL read steadily for 7 s, with and
//!    without refresh ahead: database loads, readers that missed, p99.
//! 3. The consistency checker, larger than its test: operations, stale
//!    entries, read-rule violations.
//!
//! ```text
//! cargo run --release -p readthrough-bench --bin cache_correctness
//! CHECKER_SECONDS=60 CHECKER_CLIENTS=32 cargo run --release -p readthrough-bench --bin cache_correctness
//! ```

use std::time::{Duration, Instant};

use readthrough::domain::UserId;
use readthrough_testkit::{checker, spawn_app_with};

#[tokio::main]
async fn main() {
    stampede(50).await;
    stampede(1000).await;
    refresh_ahead(true).await;
    refresh_ahead(false).await;
    consistency().await;
}

/// With the default 50 ms Redis deadline, and with a deadline this machine's
/// scheduler cannot trip while 1000 client tasks share its two cores.
async fn stampede(redis_timeout_ms: u64) {
    let first =
        spawn_app_with(|config| config.backends.cache.redis_timeout = Duration::from_millis(redis_timeout_ms)).await;
    let second = first.spawn_sibling().await;
    let id = first.create_user("hot@example.com").await.id;

    let user_id = UserId::parse(&id).unwrap();
    let mut reads = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        readthrough::store::users::get_many(&first.db, &[user_id])
            .await
            .unwrap();
        reads.push(started.elapsed());
    }
    reads.sort();
    let db_read = reads[reads.len() / 2];

    let loads_before = first.metric(LOADS).await;
    let calls: Vec<_> = (0..1000)
        .map(|n| {
            let client = if n % 2 == 0 {
                first.client.clone()
            } else {
                second.client.clone()
            };
            let id = id.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                client.get_user(&id).await.unwrap();
                started.elapsed()
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for call in calls {
        latencies.push(call.await.unwrap());
    }
    latencies.sort();
    let loads = first.metric(LOADS).await - loads_before;
    let errors = first.metric(r#"readthrough_cache_errors_total{operation="get"}"#).await
        + first
            .metric(r#"readthrough_cache_errors_total{operation="mget"}"#)
            .await;
    let (p50, p99) = (latencies[500], latencies[990]);
    println!("stampede: 1000 concurrent GetUser on one cold key over 2 instances, REDIS_TIMEOUT_MS={redis_timeout_ms}");
    println!("  database loads of the key: {loads}   (Redis GET errors: {errors})");
    println!(
        "  uncontended database read (median of 200): {:.3} ms; GetUser p50 {:.3} ms = {:.1}x, p99 {:.3} ms = {:.1}x",
        ms(db_read),
        ms(p50),
        p50.as_secs_f64() / db_read.as_secs_f64(),
        ms(p99),
        p99.as_secs_f64() / db_read.as_secs_f64(),
    );
}

const LOADS: &str = r#"readthrough_db_queries_total{query="user.get_many"}"#;

async fn refresh_ahead(enabled: bool) {
    let app = spawn_app_with(|config| {
        config.backends.cache.user_ttl = Duration::from_secs(2);
        config.backends.cache.refresh_ahead = enabled;
    })
    .await;
    let id = app.create_user("steady@example.com").await.id;
    let (loads_before, misses_before) = (app.metric(LOADS).await, app.metric(MISSES).await);
    let deadline = Instant::now() + Duration::from_secs(7);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (client, id) = (app.client.clone(), id.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    client.get_user(&id).await.unwrap();
                    latencies.push(started.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for reader in readers {
        latencies.extend(reader.await.unwrap());
    }
    latencies.sort();
    let loads = app.metric(LOADS).await - loads_before;
    let misses = app.metric(MISSES).await - misses_before;
    println!(
        "refresh ahead {}: {} reads of one hot key (TTL 2 s) in 7 s: {loads} database loads ({:.2}/s), {misses} reads missed, p99 {:.3} ms, max {:.3} ms",
        if enabled { "on " } else { "off" },
        latencies.len(),
        loads / 7.0,
        ms(latencies[latencies.len() * 99 / 100]),
        ms(*latencies.last().unwrap()),
    );
}

const MISSES: &str = r#"readthrough_cache_misses_total{entity="user"}"#;

async fn consistency() {
    let seconds = env_or("CHECKER_SECONDS", 20);
    let clients = env_or("CHECKER_CLIENTS", 16);
    let report = checker::run(checker::Settings {
        clients: clients as usize,
        duration: Duration::from_secs(seconds),
        users: 50,
        products: 60,
        max_delay: Duration::from_millis(10),
        retire_all: std::env::var("CHECKER_RETIRE_ALL").is_ok_and(|v| v == "true"),
        redis_cluster_urls: Vec::new(),
        database: None,
    })
    .await;
    println!(
        "consistency checker: {clients} clients, 2 instances, {seconds} s: {} operations ({} reads, {} writes), {} stale of {} cached entries, {} read-rule violations, {} key epoch bumps",
        report.operations,
        report.reads,
        report.writes,
        report.stale_entries.len(),
        report.entries_checked,
        report.read_violations.len(),
        report.epoch_bumps,
    );
    for problem in report.stale_entries.iter().chain(&report.read_violations).take(10) {
        println!("  {problem}");
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
