//! `scripts/bench`: readthrough measured as a user would measure it.
//!
//! The release binary runs as its own process on a database and Redis
//! namespace of its own, seeded and warmed, and is driven over loopback by
//! h2load (fixed requests) and by this program's load generator (varying
//! requests), alternating round by round with the floor: a bare tonic server
//! answering GetUser with a constant User. Figures are medians over the
//! rounds; the ratio to the floor compares runs made side by side. Redis's
//! own `INFO commandstats` and readthrough's `/metrics` are read around every
//! run. The results, with the machine and commit, go to `docs/benchmarks.md`.
//!
//! Settings (environment): BENCH_SECONDS (5) per run, BENCH_ROUNDS (3),
//! BENCH_PRODUCTS (1000000, all in one category), BENCH_OUTPUT
//! (docs/benchmarks.md), BENCH_PROFILE (1: perf record a warm GetUser run),
//! BENCH_SCENARIOS (all of start,hot,random,lists,prices,mixed,profile,outbox,near,bulk,drain),
//! and DATABASE_URL / REDIS_URL as for readthrough.

mod events;
mod h2load;
mod load;
mod probe;
mod report;
mod servers;
mod stats;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use deadpool_redis::redis;
use rand::seq::IndexedRandom;
use readthrough::{
    config::DatabaseConfig,
    ops::{demo_product_id, demo_user_id},
};
use readthrough_client::{
    Client, Page,
    proto::{self, GetUserRequest, ListProductsRequest},
};
use sqlx::{Connection, Executor, PgConnection};

use crate::{
    h2load::{Call, Load},
    probe::{CacheCounts, Metrics, RedisStats},
    report::{Measured, Report, Target},
    servers::Server,
    stats::{Latencies, median},
};

/// The list every list scenario reads: the seed puts every product in it.
const CATEGORY: &str = "category-00";
const DATABASE: &str = "readthrough_bench";
const NAMESPACE: &str = "rt-bench";
/// Calls in flight from our own load generator: as h2load's 16 × 32.
const LOAD_CONNECTIONS: usize = 16;
const LOAD_IN_FLIGHT: usize = 512;
/// ListProducts page size of the list scenarios, and the deep page.
const PAGE_SIZE: i32 = 100;
const DEEP_PAGE: i32 = 9_999;

struct Settings {
    run: Duration,
    rounds: usize,
    users: u32,
    products: u32,
    /// The benchmark's own database.
    database: DatabaseConfig,
    redis_url: String,
    output: PathBuf,
    profile: bool,
    /// Which scenarios to run (BENCH_SCENARIOS); `None`: all.
    scenarios: Option<Vec<String>>,
    /// Request bodies for h2load.
    scratch: PathBuf,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            match std::env::var(name) {
                Ok(value) => value.parse().with_context(|| format!("{name}={value}")),
                Err(_) => Ok(default),
            }
        };
        let config = readthrough::config::Config::from_env();
        let scratch = h2load::tempfile_path("bodies");
        std::fs::create_dir_all(&scratch)?;
        Ok(Self {
            run: Duration::from_secs(number("BENCH_SECONDS", 5)?),
            rounds: number("BENCH_ROUNDS", 3)? as usize,
            users: 10_000,
            products: number("BENCH_PRODUCTS", 1_000_000)? as u32,
            database: DatabaseConfig {
                name: Some(DATABASE.to_string()),
                ..config.database
            },
            redis_url: config.cache.redis_url.expose().to_string(),
            output: std::env::var("BENCH_OUTPUT").map_or_else(|_| PathBuf::from("docs/benchmarks.md"), PathBuf::from),
            profile: number("BENCH_PROFILE", 1)? == 1,
            scenarios: std::env::var("BENCH_SCENARIOS")
                .ok()
                .map(|list| list.split(',').map(|s| s.trim().to_string()).collect()),
            scratch,
        })
    }

    fn runs(&self, scenario: &str) -> bool {
        self.scenarios
            .as_ref()
            .is_none_or(|list| list.iter().any(|s| s == scenario))
    }

    /// The environment of every readthrough process of the run.
    fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL".to_string(), self.database.url.expose().to_string()),
            ("DATABASE_NAME".to_string(), DATABASE.to_string()),
            ("REDIS_URL".to_string(), self.redis_url.clone()),
            ("CACHE_NAMESPACE".to_string(), NAMESPACE.to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // scripts/bench built the binaries just now: this is their commit.
    report::commit();
    let settings = Settings::from_env()?;
    let mut report = Report::new(&settings.output, settings.run, settings.rounds, settings.products);
    let mut redis_stats = RedisStats::connect(&settings.redis_url).await?;

    eprintln!(
        "bench: a fresh database and namespace, seeded with {} products",
        settings.products
    );
    fresh_database(&settings).await?;
    clear_namespace(&settings.redis_url).await?;
    servers::run_readthrough(&["migrate"], &settings.env(&[]))?;
    let products = settings.products.to_string();
    let seed_time = servers::run_readthrough(
        &["seed", "--users", "10000", "--products", &products, "--categories", "1"],
        &settings.env(&[]),
    )?;
    let outbox_after_seed = outbox_rows(&settings).await?;
    report.seed(seed_time, outbox_after_seed);

    let floor = servers::start_floor()?;
    let service = servers::start_readthrough(&settings.env(&[]))?;
    let calls = Calls::write(&settings)?;
    let ids: Arc<Vec<String>> = Arc::new((0..settings.users).map(|n| demo_user_id(n).to_string()).collect());

    let after_start_rate = if settings.runs("start") {
        eprintln!("bench: throughput in the seconds after `serve` starts");
        Some(after_start(&service, &calls, &mut report).await?)
    } else {
        None
    };
    // The seed left PostgreSQL a million dead outbox rows and fresh tables:
    // vacuum and checkpoint now, so that autovacuum does not run during the runs.
    settle_database(&settings).await?;
    servers::run_readthrough(&["warm", "--recent-users", "10000"], &settings.env(&[]))?;

    if settings.runs("hot") {
        eprintln!("bench: warm GetUser, one hot id");
        hot_get_user(
            &settings,
            &floor,
            &service,
            &calls,
            after_start_rate,
            &mut redis_stats,
            &mut report,
        )
        .await?;
    }
    if settings.runs("random") {
        eprintln!("bench: warm GetUser, 10,000 random ids");
        let workload = load::Workload::RandomUsers(ids.clone());
        let random = compare_load(&settings, &floor, &service, &workload, &mut redis_stats).await?;
        report.compare(
            "warm GetUser, 10,000 random ids (load generator, 16 connections × 512 in flight)",
            &random,
        );
    }
    if settings.runs("lists") {
        eprintln!("bench: ListProducts, page 0 and a deep page");
        lists(&settings, &service, &calls, &mut redis_stats, &mut report).await?;
    }
    if settings.runs("prices") {
        eprintln!("bench: ListProducts under 50 price updates per second");
        price_updates(&settings, &service, &calls, &mut redis_stats, &mut report).await?;
    }
    if settings.runs("mixed") {
        eprintln!("bench: a mixed run with writes");
        let mixed = load::Workload::Mixed {
            users: ids.clone(),
            category: CATEGORY.to_string(),
        };
        let mut runs = Vec::new();
        for _ in 0..settings.rounds {
            runs.push(measure_load(&service, &mixed, settings.run, &mut redis_stats).await?);
        }
        report.single(
            "mixed: 90 % GetUser, 5 % ListProducts, 5 % UpdateUser (load generator)",
            &runs,
        );
    }
    if settings.profile && settings.runs("profile") {
        eprintln!("bench: profiling a warm GetUser run");
        report.profile(profile(&settings, &service, &calls.get_user)?);
    }
    drop(service);

    if settings.runs("outbox") {
        // No instance runs now, so no relay drains the outbox under the measurement.
        eprintln!("bench: writes with a long outbox");
        outbox_writes(&settings, &mut report).await?;
    }
    if settings.runs("near") {
        eprintln!("bench: the near cache");
        near_cache(&settings, &floor, &calls, ids, &mut redis_stats, &mut report).await?;
    }
    // These two change prices in bulk and leave them changed: they run last.
    if settings.runs("bulk") {
        eprintln!("bench: a bulk SQL UPDATE of products under reads");
        events::bulk(&settings, &mut report).await?;
    }
    if settings.runs("drain") {
        eprintln!("bench: the relay draining a million outbox rows");
        events::drain(&settings, &calls, &mut report).await?;
    }

    report.write()?;
    eprintln!("bench: wrote {}", settings.output.display());
    Ok(())
}

/// Rows put in the outbox for the long-outbox measurement.
const LONG_OUTBOX: i64 = 1_000_000;
/// Writes timed with each outbox length.
const OUTBOX_WRITES: usize = 2000;

/// A user update's database time (the write, the lookup of its own outbox
/// rows, the commit: `store::users::update`, as the service runs it) with an
/// empty outbox and with `LONG_OUTBOX` rows in it, alternating round by round.
async fn outbox_writes(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    use readthrough::{
        domain::{Email, ExpectedVersion, UserId, UserPatch},
        store::{outbox, users},
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(settings.database.connect_options()?)
        .await?;
    sqlx::query("DELETE FROM cache_outbox").execute(&pool).await?;
    let id = UserId::parse(&demo_user_id(0).to_string())?;
    let timed = |long: bool| {
        let pool = pool.clone();
        async move {
            if long {
                // Rows of an outage that the relay has not got to yet.
                sqlx::query(
                    "INSERT INTO cache_outbox (entity, entity_id, event, xact_id) \
                     SELECT 'user', gen_random_uuid(), 'user.updated', pg_current_xact_id() FROM generate_series(1, $1)",
                )
                .bind(LONG_OUTBOX)
                .execute(&pool)
                .await?;
                sqlx::query("ANALYZE cache_outbox").execute(&pool).await?;
            }
            let mut took = Vec::with_capacity(OUTBOX_WRITES);
            for n in 0..OUTBOX_WRITES {
                let patch = UserPatch {
                    id,
                    email: Some(Email::parse(&format!("outbox-{n}@example.com"))?),
                    preferences: None,
                    expected_version: ExpectedVersion::parse(0)?,
                };
                let started = Instant::now();
                let written = users::update(&pool, &patch).await?;
                took.push(started.elapsed());
                let ids: Vec<i64> = written.outbox.iter().map(|row| row.id).collect();
                outbox::confirm(&pool, &ids).await?;
            }
            sqlx::query("DELETE FROM cache_outbox").execute(&pool).await?;
            sqlx::query("VACUUM ANALYZE cache_outbox").execute(&pool).await?;
            anyhow::Ok(Latencies::from_durations(took))
        }
    };
    let mut rounds = Vec::new();
    for _ in 0..settings.rounds {
        let empty = timed(false).await?;
        let long = timed(true).await?;
        rounds.push((empty, long));
    }
    report.outbox_writes(&rounds, LONG_OUTBOX);
    Ok(())
}

/// Warm GetUser on one hot id against the floor, and the targets that go with it.
async fn hot_get_user(
    settings: &Settings,
    floor: &Server,
    service: &Server,
    calls: &Calls,
    after_start_rate: Option<f64>,
    redis_stats: &mut RedisStats,
    report: &mut Report,
) -> anyhow::Result<()> {
    let hot = compare_h2load(settings, floor, service, &calls.get_user, redis_stats).await?;
    let ratio = report.compare("warm GetUser, one hot id (h2load 16 × 32)", &hot);
    let ours: Vec<Measured> = hot.iter().map(|(ours, _)| ours.clone()).collect();
    let totals = report::totals(&ours);
    report.target(Target::at_least(
        "warm GetUser, one hot id, ÷ floor, same run",
        ratio,
        0.6,
    ));
    report.target(Target::at_most(
        "Redis errors during the warm run",
        totals.counts.errors,
        0.0,
    ));
    report.target(Target::at_least(
        "hit rate during the warm run",
        totals.counts.hit_rate(),
        0.999,
    ));
    report.target(Target::between(
        "Redis commands per warm GetUser",
        totals.commands_per_call,
        0.95,
        1.05,
    ));
    if let Some(rate) = after_start_rate {
        report.target(Target::at_least(
            "after a seed, warm GetUser in seconds 5–10 of `serve` ÷ the warm runs above",
            rate / median(ours.iter().map(Measured::throughput)),
            0.9,
        ));
    }
    Ok(())
}

/// The fixed requests h2load sends.
struct Calls {
    get_user: Call,
    page_zero: Call,
    deep_page: Call,
}

impl Calls {
    fn write(settings: &Settings) -> anyhow::Result<Self> {
        let list = |page| ListProductsRequest {
            category_id: CATEGORY.to_string(),
            page,
            page_size: PAGE_SIZE,
            ..Default::default()
        };
        let dir = &settings.scratch;
        Ok(Self {
            get_user: Call::new(
                "/readthrough.v1.UserService/GetUser",
                &GetUserRequest {
                    id: demo_user_id(0).to_string(),
                },
                dir,
                "get-user",
            )?,
            page_zero: Call::new("/readthrough.v1.ProductService/ListProducts", &list(0), dir, "page-0")?,
            deep_page: Call::new(
                "/readthrough.v1.ProductService/ListProducts",
                &list(DEEP_PAGE),
                dir,
                "page-deep",
            )?,
        })
    }
}

async fn fresh_database(settings: &Settings) -> anyhow::Result<()> {
    let admin = settings.database.connect_options()?.database("postgres");
    let mut conn = PgConnection::connect_with(&admin).await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{DATABASE}\" WITH (FORCE)"
    )))
    .await?;
    Ok(())
}

async fn settle_database(settings: &Settings) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect_with(&settings.database.connect_options()?).await?;
    conn.execute("VACUUM ANALYZE").await?;
    conn.execute("CHECKPOINT").await?;
    Ok(())
}

async fn outbox_rows(settings: &Settings) -> anyhow::Result<i64> {
    let mut conn = PgConnection::connect_with(&settings.database.connect_options()?).await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM cache_outbox")
        .fetch_one(&mut conn)
        .await?)
}

async fn clear_namespace(redis_url: &str) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{NAMESPACE}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(keys).query_async::<()>(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// h2load in a blocking thread, so this process's own tasks (a writer) keep running.
async fn h2load(
    port: u16,
    call: &Call,
    load: Load,
    run: Duration,
    requests: Option<u64>,
) -> anyhow::Result<h2load::Run> {
    let (path, body) = (call.path, call.body_path());
    tokio::task::spawn_blocking(move || h2load::run_file(port, path, &body, load, run, requests)).await?
}

/// One h2load run against readthrough, with what Redis and readthrough counted.
async fn measure_h2load(
    service: &Server,
    call: &Call,
    load: Load,
    run: Duration,
    redis_stats: &mut RedisStats,
) -> anyhow::Result<Measured> {
    let metrics_port = service.metrics_port.context("readthrough serves metrics")?;
    let before = Metrics::scrape(metrics_port)?;
    redis_stats.reset().await?;
    let cpu = probe::cpu_seconds(service.pid());
    let done = h2load(service.grpc_port, call, load, run, None).await?;
    let cpu = probe::cpu_seconds(service.pid()) - cpu;
    let commands = redis_stats.calls().await?;
    let counts = CacheCounts::between(&before, &Metrics::scrape(metrics_port)?);
    Ok(Measured::new(done.requests, done.seconds, done.latencies, cpu)
        .with_http_failures(done.failed)
        .with_service(counts, commands))
}

/// The floor and readthrough, alternating, `rounds` times each.
async fn compare_h2load(
    settings: &Settings,
    floor: &Server,
    service: &Server,
    call: &Call,
    redis_stats: &mut RedisStats,
) -> anyhow::Result<Vec<(Measured, Measured)>> {
    let mut pairs = Vec::new();
    for _ in 0..settings.rounds {
        let cpu = probe::cpu_seconds(floor.pid());
        let bare = h2load(floor.grpc_port, call, Load::STANDARD, settings.run, None).await?;
        let bare = Measured::new(
            bare.requests,
            bare.seconds,
            bare.latencies,
            probe::cpu_seconds(floor.pid()) - cpu,
        );
        let ours = measure_h2load(service, call, Load::STANDARD, settings.run, redis_stats).await?;
        pairs.push((ours, bare));
    }
    Ok(pairs)
}

async fn measure_load(
    service: &Server,
    workload: &load::Workload,
    run: Duration,
    redis_stats: &mut RedisStats,
) -> anyhow::Result<Measured> {
    let metrics_port = service.metrics_port.context("readthrough serves metrics")?;
    let channels = load::connect(&service.url(), LOAD_CONNECTIONS).await?;
    let before = Metrics::scrape(metrics_port)?;
    redis_stats.reset().await?;
    let cpu = probe::cpu_seconds(service.pid());
    let done = load::run(&channels, workload, LOAD_IN_FLIGHT, run).await;
    let cpu = probe::cpu_seconds(service.pid()) - cpu;
    let commands = redis_stats.calls().await?;
    let counts = CacheCounts::between(&before, &Metrics::scrape(metrics_port)?);
    Ok(Measured::new(done.requests, done.seconds, done.latencies, cpu)
        .with_rpc_errors(done.errors)
        .with_service(counts, commands))
}

async fn compare_load(
    settings: &Settings,
    floor: &Server,
    service: &Server,
    workload: &load::Workload,
    redis_stats: &mut RedisStats,
) -> anyhow::Result<Vec<(Measured, Measured)>> {
    let floor_channels = load::connect(&floor.url(), LOAD_CONNECTIONS).await?;
    let mut pairs = Vec::new();
    for _ in 0..settings.rounds {
        let cpu = probe::cpu_seconds(floor.pid());
        let bare = load::run(&floor_channels, workload, LOAD_IN_FLIGHT, settings.run).await;
        let bare = Measured::new(
            bare.requests,
            bare.seconds,
            bare.latencies,
            probe::cpu_seconds(floor.pid()) - cpu,
        );
        let ours = measure_load(service, workload, settings.run, redis_stats).await?;
        pairs.push((ours, bare));
    }
    Ok(pairs)
}

/// Hot GetUser throughput in each of the first 10 seconds after `serve`
/// started (right after a seed), and what the outbox relay had to do; the
/// median rate of seconds 5 to 10.
async fn after_start(service: &Server, calls: &Calls, report: &mut Report) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut per_second = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        let run = h2load(
            service.grpc_port,
            &calls.get_user,
            Load::STANDARD,
            Duration::from_secs(1),
            None,
        )
        .await?;
        per_second.push((started.elapsed().as_secs_f64(), run.throughput()));
    }
    let metrics = Metrics::scrape(service.metrics_port.context("metrics")?)?;
    let late = median(per_second.iter().filter(|(at, _)| *at >= 5.0).map(|(_, rate)| *rate));
    report.after_start(per_second, metrics.sum("readthrough_outbox_relayed_total", &[]));
    Ok(late)
}

async fn lists(
    settings: &Settings,
    service: &Server,
    calls: &Calls,
    redis_stats: &mut RedisStats,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Warm both pages first: the head, the directory and the deep page's chunk.
    for call in [&calls.page_zero, &calls.deep_page] {
        h2load(service.grpc_port, call, Load::SINGLE, settings.run, Some(1)).await?;
    }
    let (mut zero, mut deep) = (Vec::new(), Vec::new());
    for _ in 0..settings.rounds {
        zero.push(measure_h2load(service, &calls.page_zero, Load::STANDARD, settings.run, redis_stats).await?);
        deep.push(measure_h2load(service, &calls.deep_page, Load::STANDARD, settings.run, redis_stats).await?);
    }
    report.single("ListProducts page 0, size 100, warm (h2load 16 × 32)", &zero);
    report.single(
        &format!(
            "ListProducts page {DEEP_PAGE}, size 100, warm, {} products (h2load 16 × 32)",
            settings.products
        ),
        &deep,
    );
    let zero_rate = median(zero.iter().map(Measured::throughput));
    let deep_rate = median(deep.iter().map(Measured::throughput));
    report.target(Target::at_most(
        "warm page 9,999 ÷ page 0 (cost: throughput of page 0 ÷ throughput of page 9,999)",
        zero_rate / deep_rate,
        1.5,
    ));

    let mut single = Vec::new();
    for _ in 0..settings.rounds {
        let run = h2load(
            service.grpc_port,
            &calls.page_zero,
            Load::SINGLE,
            settings.run,
            Some(2_000),
        )
        .await?;
        single.push(Measured::new(run.requests, run.seconds, run.latencies, 0.0));
    }
    report.single(
        "ListProducts page 0, size 100, warm, one client, one call at a time (h2load 1 × 1)",
        &single,
    );
    report.target(Target::at_most(
        "ListProducts page_size 100 warm, single client, p50 (ms)",
        median(single.iter().map(|m| m.latencies.p50())),
        3.0,
    ));
    Ok(())
}

/// List page 0 without writes, and while a writer changes prices 50 times a
/// second: of random products of the category (the target: price changes
/// leave the list cached), and of the products on the page being read (each
/// change then makes every concurrent reader of the page wait for that
/// product's reload).
async fn price_updates(
    settings: &Settings,
    service: &Server,
    calls: &Calls,
    redis_stats: &mut RedisStats,
    report: &mut Report,
) -> anyhow::Result<()> {
    let client = Client::connect(service.url()).await?;
    let page = client.list_products(CATEGORY, Page::Number(0), PAGE_SIZE).await?;
    let on_page: Arc<Vec<String>> = Arc::new(page.products.into_iter().map(|p| p.id).collect());
    let in_category: Arc<Vec<String>> = Arc::new(
        (0..settings.products)
            .step_by((settings.products as usize / 10_000).max(1))
            .map(|n| demo_product_id(n).to_string())
            .collect(),
    );
    let mut quiet = Vec::new();
    let mut written = [(Vec::new(), 0u64, Vec::new()), (Vec::new(), 0u64, Vec::new())];
    for _ in 0..settings.rounds {
        quiet.push(measure_h2load(service, &calls.page_zero, Load::STANDARD, settings.run, redis_stats).await?);
        for (ids, (runs, writes, latencies)) in [&in_category, &on_page].into_iter().zip(written.iter_mut()) {
            let writer = tokio::spawn(update_prices(client.clone(), ids.clone(), settings.run));
            runs.push(measure_h2load(service, &calls.page_zero, Load::STANDARD, settings.run, redis_stats).await?);
            let (made, took) = writer.await??;
            *writes += made;
            latencies.push(took.p50());
        }
    }
    report.single("ListProducts page 0, size 100, no writes (h2load 16 × 32)", &quiet);
    let quiet_rate = median(quiet.iter().map(Measured::throughput));
    let seconds = settings.run.as_secs_f64() * settings.rounds as f64;
    for ((runs, writes, latencies), whose) in written
        .iter()
        .zip(["random products of the category", "the page's own products"])
    {
        report.single(
            &format!(
                "ListProducts page 0, size 100, while {whose} change price 50 times a second \
                 ({writes} updates in {seconds:.0} s; update p50 {:.1} ms)",
                median(latencies.iter().copied())
            ),
            runs,
        );
    }
    let ratio = |runs: &[Measured]| median(runs.iter().map(Measured::throughput)) / quiet_rate;
    report.target(Target::at_least(
        "ListProducts throughput under 50 price updates/s on the category ÷ without",
        ratio(&written[0].0),
        0.8,
    ));
    report.note(&format!(
        "Under 50 price updates/s on the products of the page being read itself, ListProducts throughput is \
         {:.2} × the run without writes: each change makes the concurrent readers of that page wait for the \
         product's reload, which on this saturated machine takes several scheduling delays.",
        ratio(&written[1].0)
    ));
    Ok(())
}

/// UpdateProduct (price) on the given products, started 50 times a second
/// for `run` whether or not earlier ones have finished (as independent
/// writers would); how many were made, and their latencies.
async fn update_prices(
    client: Client,
    ids: Arc<Vec<String>>,
    run: Duration,
) -> anyhow::Result<(u64, stats::Latencies)> {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + run;
    let mut updates = Vec::new();
    while Instant::now() < deadline {
        tick.tick().await;
        let client = client.clone();
        let product = proto::Product {
            id: ids.choose(&mut rand::rng()).cloned().unwrap_or_default(),
            price_cents: rand::random_range(1..100_000),
            ..Default::default()
        };
        updates.push(tokio::spawn(async move {
            let began = Instant::now();
            client
                .update_product(product, &["price_cents"], 0)
                .await
                .map(|_| began.elapsed())
        }));
    }
    let mut took = Vec::with_capacity(updates.len());
    for update in updates {
        took.push(update.await??);
    }
    Ok((took.len() as u64, stats::Latencies::from_durations(took)))
}

/// `perf record` on readthrough during a warm GetUser run: the top frames by self time.
fn profile(settings: &Settings, service: &Server, call: &Call) -> anyhow::Result<String> {
    let data = h2load::tempfile_path("perf.data");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &service.pid().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running perf (Debian package linux-perf)")?;
    std::thread::sleep(Duration::from_millis(300));
    let run = h2load::run_file(
        service.grpc_port,
        call.path,
        &call.body_path(),
        Load::STANDARD,
        settings.run,
        None,
    )?;
    let _ = std::process::Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    perf.wait()?;
    let top = |sort: &str, lines: usize| -> anyhow::Result<String> {
        let out = std::process::Command::new("perf")
            .args(["report", "--no-children", "--stdio", "--sort", sort, "-i"])
            .arg(&data)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .take(lines)
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .map(|line| line.trim_end_matches(" - -").to_string())
            .map(|line| line.chars().take(150).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n"))
    };
    let text = format!(
        "{:.0} calls/s while profiled. Self time by shared object:\n\n{}\n\nTop frames (self time):\n\n{}\n",
        run.throughput(),
        top("dso", 3)?,
        top("dso,symbol", 15)?
    );
    let _ = std::fs::remove_file(&data);
    Ok(text)
}

/// The near cache on: warm GetUser against the floor, and how long after a
/// write's acknowledgement another instance stops serving the old value.
async fn near_cache(
    settings: &Settings,
    floor: &Server,
    calls: &Calls,
    ids: Arc<Vec<String>>,
    redis_stats: &mut RedisStats,
    report: &mut Report,
) -> anyhow::Result<()> {
    let env = settings.env(&[("NEAR_CACHE_ENABLED", "true"), ("NEAR_CACHE_TTL_MS", "60000")]);
    let a = servers::start_readthrough(&env)?;
    let b = servers::start_readthrough(&env)?;
    let hot = compare_h2load(settings, floor, &a, &calls.get_user, redis_stats).await?;
    let ratio = report.compare("warm GetUser, one hot id, near cache on (h2load 16 × 32)", &hot);
    report.target(Target::at_least(
        "warm GetUser, one hot id, near cache on, ÷ floor",
        ratio,
        0.85,
    ));

    let (writer, reader) = (Client::connect(a.url()).await?, Client::connect(b.url()).await?);
    let lags = invalidation_lags(writer, reader, &ids[..200.min(ids.len())]).await?;
    report.near_cache_lag(&lags);
    report.target(Target::at_most(
        "near-cache invalidation lag across instances, p99 (ms)",
        lags.p99(),
        10.0,
    ));
    Ok(())
}

/// For each id: read it on the reader (now in its near cache), update it on
/// the writer, then read it on the reader until the new version shows; the
/// time from the update's acknowledgement to that read.
async fn invalidation_lags(writer: Client, reader: Client, ids: &[String]) -> anyhow::Result<stats::Latencies> {
    let mut lags = Vec::with_capacity(ids.len());
    for (n, id) in ids.iter().enumerate() {
        reader.get_user(id).await?;
        reader.get_user(id).await?;
        let change = load::with_preferences(id.clone(), n as u32);
        let updated = writer.update_user(change, &["preferences"], 0).await?;
        let acknowledged = Instant::now();
        loop {
            let seen = reader.get_user(id).await?;
            if seen.version >= updated.version {
                break;
            }
            anyhow::ensure!(
                acknowledged.elapsed() < Duration::from_secs(5),
                "{id}: old version after 5 s"
            );
        }
        lags.push(acknowledged.elapsed());
    }
    Ok(stats::Latencies::from_durations(lags))
}
