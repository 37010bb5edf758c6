//! Invalidations made in bulk by SQL, which no service write path sees: the
//! triggers record one outbox row per changed row, and the relays of the
//! running instances carry them out.
//!
//! `bulk`: one UPDATE of 300,000 products while two instances serve random
//! GetProduct; what the readers saw (failures, breaker openings, old prices
//! 3 s after the commit) and how long the outbox took to empty; then again
//! with every core also kept busy. `drain`: 1,000,000 rows carried out key
//! by key (retiring by key epoch put off); rows per second, and read p99
//! while they drain ÷ before.
//!
//! Both change prices and leave the database with them: `main` runs them last.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use rand::seq::IndexedRandom;
use readthrough::ops::demo_product_id;
use readthrough_client::Client;
use sqlx::PgPool;

use crate::{
    Calls, Settings,
    h2load::{self, Load},
    load::{self, LoadRun},
    probe::{CacheCounts, Metrics},
    report::{Report, Target},
    servers::{self, Server},
};

/// Products the bulk UPDATE changes: the first of the seed's.
const BULK_ROWS: u32 = 300_000;
/// Of those, how many are read into the cache before each UPDATE.
const WARM: usize = 20_000;
/// Of the warmed ones, how many are read back through each instance after the UPDATE.
const SAMPLE: usize = 600;
/// When the sample is read: the bound on staleness the scenario checks.
const STALE_AFTER: Duration = Duration::from_secs(3);
/// The read load of `bulk`: 16 connections (8 to each instance), 64 calls in flight in all.
const BULK_CONNECTIONS: usize = 16;
const BULK_IN_FLIGHT: usize = 64;
/// Load before the UPDATE starts.
const LEAD: Duration = Duration::from_secs(1);
/// GetProduct calls at once while warming and sampling.
const CONCURRENCY: usize = 32;
/// Rows the `drain` UPDATE puts in the outbox.
const DRAIN_ROWS: u32 = 1_000_000;
/// How often the outbox is looked at while it drains.
const POLL: Duration = Duration::from_millis(50);
/// How long an outbox may take to empty before the scenario gives up on it.
const EMPTY_LIMIT: Duration = Duration::from_secs(300);

/// One bulk UPDATE under read load.
pub struct Bulk {
    /// Every core was kept busy by other processes meanwhile.
    pub busy_cores: usize,
    pub rows: u64,
    /// From BEGIN to the commit's acknowledgement.
    pub update_seconds: f64,
    /// The read load, from a second before the UPDATE until the outbox was empty.
    pub load: LoadRun,
    /// Both instances' counters over the load.
    pub counts: CacheCounts,
    pub breaker_openings: f64,
    /// Sample reads (through both instances) that failed, by code.
    pub sample_errors: BTreeMap<String, u64>,
    /// Sample answers, and those with the price from before the UPDATE.
    pub sampled: usize,
    pub stale: usize,
    /// Seconds from the commit to an empty outbox (`None`: not within `EMPTY_LIMIT`).
    pub emptied: Option<f64>,
    /// The product key epoch moved: the relay retired the rows rather than carrying them out.
    pub retired: bool,
}

impl Bulk {
    /// Reads that failed: those of the load and of the sample.
    pub fn failed_reads(&self) -> u64 {
        self.load.errors.values().sum::<u64>() + self.sample_errors.values().sum::<u64>()
    }
}

/// A million outbox rows carried out key by key.
pub struct Drain {
    pub rows: u64,
    pub update_seconds: f64,
    /// Seconds from the commit to an empty outbox, and rows still there when given up.
    pub emptied: Option<f64>,
    pub left: i64,
    /// Warm GetUser on one hot id (h2load 16 × 32), before the UPDATE and right after its commit.
    pub before: h2load::Run,
    pub during: h2load::Run,
    /// What both relays counted as carried out.
    pub relayed: f64,
    pub breaker_openings: f64,
    pub retired: bool,
}

impl Drain {
    /// Rows carried out per second, from the commit until empty (or until given up).
    pub fn rate(&self) -> f64 {
        let seconds = self.emptied.unwrap_or(EMPTY_LIMIT.as_secs_f64());
        (self.rows as f64 - self.left as f64) / seconds
    }

    pub fn p99_ratio(&self) -> f64 {
        self.during.latencies.p99() / self.before.latencies.p99()
    }
}

/// `bulk`: two instances, two UPDATEs (the second with every core busy).
pub async fn bulk(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let pool = pool(settings).await?;
    let a = servers::start_readthrough(&settings.env(&[]))?;
    let b = servers::start_readthrough(&settings.env(&[]))?;
    wait_until_empty(&pool).await?;
    let ids: Arc<Vec<String>> = Arc::new(
        (0..BULK_ROWS.min(settings.products))
            .map(|n| demo_product_id(n).to_string())
            .collect(),
    );
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let mut runs = Vec::new();
    for busy in [0, cores] {
        // No autovacuum of the previous UPDATE's dead rows during this one.
        super::settle_database(settings).await?;
        runs.push(bulk_update(&pool, [&a, &b], &ids, busy).await?);
    }
    report.section(&bulk_section(&runs));
    for run in &runs {
        let during = if run.busy_cores > 0 {
            format!(", {} cores busy", run.busy_cores)
        } else {
            String::new()
        };
        let name = format!("bulk UPDATE of {} products, 2 instances{during}", run.rows);
        report.target(Target::at_most(
            &format!("{name}: failed reads"),
            run.failed_reads() as f64,
            0.0,
        ));
        report.target(Target::at_most(
            &format!("{name}: breaker openings"),
            run.breaker_openings,
            0.0,
        ));
        report.target(Target::at_most(
            &format!("{name}: answers with the old price 3 s after the commit"),
            run.stale as f64,
            0.0,
        ));
    }
    Ok(())
}

/// Warms a sample, starts the read load, UPDATEs every product of `ids`
/// after a second of it, reads the sample back through each instance 3 s
/// after the commit, and stops the load once the outbox is empty.
async fn bulk_update(
    pool: &PgPool,
    servers: [&Server; 2],
    ids: &Arc<Vec<String>>,
    busy: usize,
) -> anyhow::Result<Bulk> {
    let clients = [client(servers[0]).await?, client(servers[1]).await?];
    let warm: Vec<String> = ids.choose_multiple(&mut rand::rng(), WARM).cloned().collect();
    get_prices(&clients, &warm).await?;
    let sample: Vec<String> = warm.choose_multiple(&mut rand::rng(), SAMPLE).cloned().collect();
    let old: HashMap<String, i64> =
        sqlx::query_as("SELECT id::text, price_cents FROM products WHERE id = ANY($1::text[]::uuid[])")
            .bind(&sample)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();

    let _busy = BusyLoops::start(busy)?;
    let before = scrape(servers)?;
    let epoch = product_epoch(servers[0])?;
    let mut channels = load::connect(&servers[0].url(), BULK_CONNECTIONS / 2).await?;
    channels.extend(load::connect(&servers[1].url(), BULK_CONNECTIONS / 2).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let workload = load::Workload::RandomProducts(ids.clone());
    let reads = tokio::spawn({
        let stop = stop.clone();
        async move { load::run_until(&channels, &workload, BULK_IN_FLIGHT, EMPTY_LIMIT * 2, stop).await }
    });
    tokio::time::sleep(LEAD).await;

    let began = Instant::now();
    let mut tx = pool.begin().await?;
    let rows = sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = ANY($1::text[]::uuid[])")
        .bind(ids.as_slice())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    let committed = Instant::now();
    let emptied = tokio::spawn(empty_after(pool.clone(), committed));

    tokio::time::sleep_until((committed + STALE_AFTER).into()).await;
    let (on_a, on_b) = tokio::join!(get_prices(&clients[..1], &sample), get_prices(&clients[1..], &sample));
    let (mut sampled, mut stale, mut sample_errors) = (0, 0, BTreeMap::new());
    for answers in [on_a?, on_b?] {
        for (id, answer) in sample.iter().zip(answers) {
            match answer {
                Ok(price) => {
                    sampled += 1;
                    if old.get(id) == Some(&price) {
                        stale += 1;
                    }
                }
                Err(code) => *sample_errors.entry(format!("{code:?}")).or_default() += 1,
            }
        }
    }

    let emptied = emptied.await??;
    stop.store(true, Ordering::Relaxed);
    let load = reads.await?;
    let after = scrape(servers)?;
    Ok(Bulk {
        busy_cores: busy,
        rows,
        update_seconds: (committed - began).as_secs_f64(),
        load,
        counts: counts(&before, &after),
        breaker_openings: breaker_openings(&before, &after),
        sample_errors,
        sampled,
        stale,
        emptied,
        retired: product_epoch(servers[0])? != epoch,
    })
}

/// `drain`: two instances that carry every row out key by key; hot GetUser
/// p99 before the UPDATE and while its rows drain.
pub async fn drain(settings: &Settings, calls: &Calls, report: &mut Report) -> anyhow::Result<()> {
    let pool = pool(settings).await?;
    // Retiring a kind by key epoch (what a backlog this large gets otherwise) put off.
    let env = settings.env(&[("OUTBOX_RETIRE_AFTER_MS", "600000")]);
    let (a, b) = (servers::start_readthrough(&env)?, servers::start_readthrough(&env)?);
    let servers = [&a, &b];
    wait_until_empty(&pool).await?;
    super::settle_database(settings).await?;
    let (port, get_user) = (servers[0].grpc_port, &calls.get_user);
    super::h2load(port, get_user, Load::SINGLE, settings.run, Some(1)).await?;
    let before = super::h2load(port, get_user, Load::STANDARD, settings.run, None).await?;

    let metrics = scrape(servers)?;
    let epoch = product_epoch(servers[0])?;
    let began = Instant::now();
    let mut tx = pool.begin().await?;
    let rows =
        sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id IN (SELECT id FROM products LIMIT $1)")
            .bind(i64::from(DRAIN_ROWS))
            .execute(&mut *tx)
            .await?
            .rows_affected();
    tx.commit().await?;
    let committed = Instant::now();
    let emptied = tokio::spawn(empty_after(pool.clone(), committed));
    let during = super::h2load(port, get_user, Load::STANDARD, settings.run, None).await?;
    let (emptied, left) = match emptied.await?? {
        Some(seconds) => (Some(seconds), 0),
        None => (None, outbox_rows(&pool).await?),
    };
    let after = scrape(servers)?;
    let drain = Drain {
        rows,
        update_seconds: (committed - began).as_secs_f64(),
        emptied,
        left,
        before,
        during,
        relayed: delta(&metrics, &after, "readthrough_outbox_relayed_total", &[]),
        breaker_openings: breaker_openings(&metrics, &after),
        retired: product_epoch(servers[0])? != epoch,
    };
    report.section(&drain_section(&drain, report.run_seconds()));
    report.target(Target::at_least(
        &format!(
            "outbox relay throughput, {} rows carried out key by key (rows/s)",
            drain.rows
        ),
        drain.rate(),
        100_000.0,
    ));
    report.target(Target::at_most(
        "warm GetUser p99 while the outbox drains ÷ before",
        drain.p99_ratio(),
        1.5,
    ));
    Ok(())
}

async fn pool(settings: &Settings) -> anyhow::Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(settings.database.connect_options()?)
        .await?)
}

/// A client that does not retry: a failed read shows.
async fn client(server: &Server) -> anyhow::Result<Client> {
    Ok(Client::builder(server.url()).retries(0).connect().await?)
}

/// The price GetProduct answers for each of `ids` (or the call's code),
/// `CONCURRENCY` calls at a time spread over `clients`.
async fn get_prices(clients: &[Client], ids: &[String]) -> anyhow::Result<Vec<Result<i64, tonic::Code>>> {
    let per_task = ids.len().div_ceil(CONCURRENCY).max(1);
    let tasks: Vec<_> = ids
        .chunks(per_task)
        .enumerate()
        .map(|(n, chunk)| {
            let client = clients[n % clients.len()].clone();
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                let mut prices = Vec::with_capacity(chunk.len());
                for id in &chunk {
                    prices.push(
                        client
                            .get_product(id)
                            .await
                            .map(|product| product.price_cents)
                            .map_err(|status| status.code()),
                    );
                }
                prices
            })
        })
        .collect();
    let mut prices = Vec::with_capacity(ids.len());
    for task in tasks {
        prices.extend(task.await?);
    }
    Ok(prices)
}

/// Seconds from `since` until the outbox was first seen empty (looked at
/// every `POLL`); `None` if it was not within `EMPTY_LIMIT`.
async fn empty_after(pool: PgPool, since: Instant) -> anyhow::Result<Option<f64>> {
    while since.elapsed() < EMPTY_LIMIT {
        // The oldest row by the primary key: cheap however many rows the relay deleted.
        let oldest: Option<i64> = sqlx::query_scalar("SELECT id FROM cache_outbox ORDER BY id LIMIT 1")
            .fetch_optional(&pool)
            .await?;
        if oldest.is_none() {
            return Ok(Some(since.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(None)
}

/// Waits for what earlier runs (the seed) left in the outbox to be carried out.
async fn wait_until_empty(pool: &PgPool) -> anyhow::Result<()> {
    empty_after(pool.clone(), Instant::now())
        .await?
        .map(drop)
        .with_context(|| {
            format!(
                "the outbox still had rows {} s after the instances started",
                EMPTY_LIMIT.as_secs()
            )
        })
}

async fn outbox_rows(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM cache_outbox")
        .fetch_one(pool)
        .await?)
}

fn scrape(servers: [&Server; 2]) -> anyhow::Result<[Metrics; 2]> {
    let port = |server: &Server| server.metrics_port.context("readthrough serves metrics");
    Ok([Metrics::scrape(port(servers[0])?)?, Metrics::scrape(port(servers[1])?)?])
}

/// What both instances added to `name` between the scrapes.
fn delta(before: &[Metrics; 2], after: &[Metrics; 2], name: &str, labels: &[&str]) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(before, after)| after.sum(name, labels) - before.sum(name, labels))
        .sum()
}

fn breaker_openings(before: &[Metrics; 2], after: &[Metrics; 2]) -> f64 {
    delta(
        before,
        after,
        "readthrough_cache_breaker_transitions_total",
        &["to=\"open\""],
    )
}

/// Both instances' cache counters added up.
fn counts(before: &[Metrics; 2], after: &[Metrics; 2]) -> CacheCounts {
    let [a, b] = [0, 1].map(|n| CacheCounts::between(&before[n], &after[n]));
    CacheCounts {
        hits: a.hits + b.hits,
        near_hits: a.near_hits + b.near_hits,
        misses: a.misses + b.misses,
        errors: a.errors + b.errors,
        failed_rpcs: a.failed_rpcs + b.failed_rpcs,
        shed: a.shed + b.shed,
    }
}

/// The product key epoch an instance reads now: it moves when a relay retires products.
fn product_epoch(server: &Server) -> anyhow::Result<f64> {
    let port = server.metrics_port.context("readthrough serves metrics")?;
    Ok(Metrics::scrape(port)?.sum("readthrough_cache_key_epoch", &["entity=\"product\""]))
}

/// Processes that each keep a core busy (a shell's empty loop), killed on drop.
struct BusyLoops(Vec<Child>);

impl BusyLoops {
    fn start(count: usize) -> anyhow::Result<Self> {
        let mut loops = Self(Vec::with_capacity(count));
        for _ in 0..count {
            loops.0.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting a busy loop")?,
            );
        }
        Ok(loops)
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The bulk UPDATEs under read load, one row per run.
fn bulk_section(runs: &[Bulk]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### A bulk SQL UPDATE of products while two instances serve reads\n\n\
         Two instances; 20,000 random products of the first 300,000 read into the cache; GetProduct on random ids \
         of those 300,000 (load generator, 16 connections split over both instances, 64 calls in flight) from a \
         second before `UPDATE products SET price_cents = price_cents + 1 WHERE id = ANY($1)` on all of them (one \
         transaction, in psql's place) until the outbox is empty. 3 s after the commit, 600 of the warmed \
         products are read through each instance: an answer with the price from before the UPDATE is stale. \
         The second run keeps every core busy meanwhile with as many shell busy loops.\n\n\
         | busy loops | rows | UPDATE took s | reads/s | p50 / p99 ms | failed reads (load; sample) | breaker openings | \
         cache errors | stale answers 3 s after the commit | outbox empty after s | retired by key epoch |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    let codes = |errors: &BTreeMap<String, u64>| {
        if errors.is_empty() {
            "0".to_string()
        } else {
            errors
                .iter()
                .map(|(code, n)| format!("{n} {code}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    for run in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.0} | {:.2} / {:.2} | {}; {} | {:.0} | {:.0} | {} of {} | {} | {} |",
            run.busy_cores,
            run.rows,
            run.update_seconds,
            run.load.requests as f64 / run.load.seconds,
            run.load.latencies.p50(),
            run.load.latencies.p99(),
            codes(&run.load.errors),
            codes(&run.sample_errors),
            run.breaker_openings,
            run.counts.errors,
            run.stale,
            run.sampled,
            run.emptied
                .map_or_else(|| "not within 300 s".to_string(), |s| format!("{s:.2}")),
            if run.retired { "yes" } else { "no" }
        );
    }
    out.push('\n');
    out
}

/// The relay draining a large outbox key by key, and reads meanwhile.
fn drain_section(drain: &Drain, run_seconds: u64) -> String {
    let mut out = String::new();
    let emptied = drain.emptied.map_or_else(
        || format!("was not empty after 300 s ({} rows left)", drain.left),
        |s| format!("was empty {s:.2} s after the commit"),
    );
    let _ = writeln!(
        out,
        "### The outbox relay draining {rows} rows key by key\n\n\
         Two instances with `OUTBOX_RETIRE_AFTER_MS=600000`, so that the relay carries every row out key by key \
         rather than retiring the kind by key epoch. `UPDATE products SET price_cents = price_cents + 1` on {rows} \
         products in one transaction ({update:.1} s) put {rows} rows in the outbox; it {emptied}: \
         **{rate:.0} rows/s**. The relays counted {relayed:.0} rows carried out; breaker openings {openings:.0}; \
         product key epoch moved: {retired}.\n\n\
         Warm GetUser on one hot id (h2load 16 × 32, one instance), {run} s before the UPDATE and {run} s from its \
         commit:\n\n| run | calls/s | p50 ms | p99 ms | HTTP failures |\n|---|---|---|---|---|\n\
         | before | {:.0} | {:.2} | {:.2} | {} |\n| while draining | {:.0} | {:.2} | {:.2} | {} |\n\n\
         p99 while draining ÷ before: **{ratio:.2}**.\n",
        drain.before.throughput(),
        drain.before.latencies.p50(),
        drain.before.latencies.p99(),
        drain.before.failed,
        drain.during.throughput(),
        drain.during.latencies.p50(),
        drain.during.latencies.p99(),
        drain.during.failed,
        rows = drain.rows,
        update = drain.update_seconds,
        rate = drain.rate(),
        relayed = drain.relayed,
        openings = drain.breaker_openings,
        retired = if drain.retired { "yes" } else { "no" },
        run = run_seconds,
        ratio = drain.p99_ratio(),
    );
    out
}
