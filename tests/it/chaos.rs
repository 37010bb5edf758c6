//! The chaos run: three `readthrough serve` processes on a PostgreSQL and a
//! Redis (with a replica) of the run's own, each instance reaching Redis
//! through a proxy of its own. Clients read and write through all three
//! while a nemesis injects one fault at a time, at random: an instance
//! killed with SIGKILL and started again; Redis killed and started again
//! empty; a failover to a replica that missed the last writes, behind the
//! same address; one instance's Redis black-holed; PostgreSQL restarted; a
//! bulk SQL update of 20,000 products; a bulk SQL delete of 1,000 products
//! the clients do not write.
//!
//! What it checks, and reports: no acknowledged write is lost; no read
//! returns a version older than a write acknowledged before the read began;
//! reads of cached keys succeed while Redis is reachable (99.9 %); after a
//! bulk change, no instance serves a changed product's old version 3 s after
//! the commit; and each instance's resident memory at the end is within 1.2
//! times what it was after warming up.
//!
//! `CHAOS_SECONDS` (60 here; `scripts/chaos` runs 300) sets the length,
//! `CHAOS_SEED` the order of the faults, and `CHAOS_REPORT` a file to write
//! the report to (`scripts/chaos` writes `docs/reliability.md`).

use std::{
    collections::HashMap,
    fmt::Write as _,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{
    Rng, SeedableRng,
    rngs::StdRng,
    seq::{IndexedRandom, SliceRandom},
};
use readthrough_client::{Client, proto};
use sqlx::PgPool;

use readthrough_testkit::{OwnRedis, RedisProxy, own_postgres::OwnPostgres, redis, test_client};

const INSTANCES: usize = 3;
const CLIENTS: usize = 8;
/// Users and products the clients write (and read).
const WRITTEN: usize = 60;
/// Users and products the clients only read: cached, unless a fault retired them.
const READ_ONLY: usize = 200;
/// Products a bulk update changes, and products bulk deletes remove 1,000 at a time.
const BULK_UPDATED: i64 = 20_000;
const BULK_DELETABLE: i64 = 20_000;
const BULK_DELETED: usize = 1_000;
/// How long after a bulk change's commit nothing may serve what it changed.
const BULK_BOUND: Duration = Duration::from_secs(3);
const NAMESPACE: &str = "rt-chaos";
/// How long the clients run before the first fault (and the memory baseline).
const WARM_UP: Duration = Duration::from_secs(10);
/// How long the instances idle after the run before their memory is read again.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillInstance,
    RedisRestartedEmpty,
    RedisFailover,
    BlackHoledInstance,
    PostgresRestarted,
    BulkUpdate,
    BulkDelete,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::KillInstance,
        Fault::RedisRestartedEmpty,
        Fault::RedisFailover,
        Fault::BlackHoledInstance,
        Fault::PostgresRestarted,
        Fault::BulkUpdate,
        Fault::BulkDelete,
    ];

    fn describe(self) -> &'static str {
        match self {
            Fault::KillInstance => "an instance killed (SIGKILL) and started again",
            Fault::RedisRestartedEmpty => "Redis killed and started again empty",
            Fault::RedisFailover => "Redis failover to a replica that missed writes",
            Fault::BlackHoledInstance => "one instance's Redis black-holed",
            Fault::PostgresRestarted => "PostgreSQL restarted",
            Fault::BulkUpdate => "bulk SQL update of 20,000 products",
            Fault::BulkDelete => "bulk SQL delete of 1,000 products",
        }
    }

    /// Whose reads may fail meanwhile for want of Redis, or of the instance
    /// itself: they are left out of the availability figure.
    fn cuts_off(self) -> Option<Reach> {
        match self {
            Fault::RedisRestartedEmpty | Fault::RedisFailover => Some(Reach::All),
            Fault::BlackHoledInstance | Fault::KillInstance => Some(Reach::One),
            Fault::PostgresRestarted | Fault::BulkUpdate | Fault::BulkDelete => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    All,
    One,
}

/// One fault as injected.
#[derive(Debug, Clone)]
struct Injected {
    fault: Fault,
    /// The instance it concerned, when one.
    instance: Option<usize>,
    /// Since the start of the run.
    at: Duration,
    healed: Duration,
    /// From the heal until every instance served a cached read from Redis again.
    recovery: Option<Duration>,
    /// Bulk changes: products served in their old version `BULK_BOUND` after the commit, of those sampled.
    bulk_stale: Option<(usize, usize)>,
    /// Each instance's resident memory once recovered, in KiB: a leak shows as a climb.
    resident: Vec<u64>,
}

/// A `readthrough serve` process, on ports it chose itself.
struct Instance {
    child: Child,
    client: Client,
    metrics_port: u16,
    logs: tempfile::NamedTempFile,
}

impl Instance {
    async fn start(env: &[(String, String)]) -> Self {
        let logs = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_readthrough"))
            .arg("serve")
            .envs(env.iter().cloned())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("GRPC_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("MIGRATE_ON_START", "false")
            .stdout(Stdio::null())
            .stderr(logs.reopen().unwrap())
            .spawn()
            .expect("the readthrough binary starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (grpc_port, metrics_port) = loop {
            let text = std::fs::read_to_string(logs.path()).unwrap_or_default();
            let serving = text
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|line| line["fields"]["message"] == "serving");
            if let Some(line) = serving {
                let port = |name: &str| line["fields"][name].as_u64().unwrap() as u16;
                break (port("grpc_port"), port("metrics_port"));
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("readthrough serve exited ({status}): {text}");
            }
            assert!(
                Instant::now() < deadline,
                "readthrough serve was serving within 30 s: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let client = test_client(Client::builder(format!("http://127.0.0.1:{grpc_port}")))
            .deadline(Duration::from_secs(10))
            .connect()
            .await
            .expect("connects to the instance");
        Self {
            child,
            client,
            metrics_port,
            logs,
        }
    }

    /// Resident memory, in KiB.
    fn resident_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    async fn metric(&self, sample: &str) -> f64 {
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await else {
            return 0.0;
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        let mut text = String::new();
        if stream.write_all(request).await.is_err() || stream.read_to_string(&mut text).await.is_err() {
            return 0.0;
        }
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "instance log tail:\n{}",
                std::fs::read_to_string(self.logs.path())
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// What a client saw: acknowledged writes and reads, each key's in order.
#[derive(Default)]
struct History {
    /// Key → (acknowledged at, version).
    acks: HashMap<String, Vec<(Instant, i64)>>,
    /// Key → (began at, version).
    reads: HashMap<String, Vec<(Instant, i64)>>,
    /// Reads of read-only keys: (began at, instance, succeeded).
    cached_reads: Vec<(Instant, usize, bool)>,
    writes_sent: u64,
    reads_sent: u64,
}

/// A key the clients use: a user or a product, by id.
#[derive(Clone)]
enum Key {
    User(String),
    Product(String),
}

impl Key {
    fn id(&self) -> &str {
        match self {
            Key::User(id) | Key::Product(id) => id,
        }
    }
}

/// Everything the run shares: the instances (`None` while one is down), and what happened.
struct Run {
    started: Instant,
    instances: RwLock<Vec<Option<Client>>>,
    history: Mutex<History>,
    stop: AtomicBool,
    counter: AtomicU64,
}

impl Run {
    fn live(&self) -> Vec<(usize, Client)> {
        self.instances
            .read()
            .unwrap()
            .iter()
            .enumerate()
            .filter_map(|(n, client)| Some((n, client.clone()?)))
            .collect()
    }
}

/// Reads and writes until the run stops.
async fn client_loop(run: Arc<Run>, written: Arc<Vec<Key>>, read_only: Arc<Vec<Key>>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !run.stop.load(Ordering::Relaxed) {
        let live = run.live();
        let Some((instance, client)) = live.get(rng.random_range(0..live.len().max(1))).cloned() else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let roll = rng.random_range(0..100);
        if roll < 50 {
            let key = &read_only[rng.random_range(0..read_only.len())];
            let began = Instant::now();
            let ok = read(&client, key).await.is_ok();
            let mut history = run.history.lock().unwrap();
            history.reads_sent += 1;
            history.cached_reads.push((began, instance, ok));
        } else if roll < 80 {
            let key = &written[rng.random_range(0..written.len())];
            let began = Instant::now();
            let outcome = read(&client, key).await;
            let mut history = run.history.lock().unwrap();
            history.reads_sent += 1;
            if let Ok(version) = outcome {
                note(&mut history.reads, key, began, version);
            }
        } else {
            let key = &written[rng.random_range(0..written.len())];
            let n = run.counter.fetch_add(1, Ordering::Relaxed);
            let outcome = write(&client, key, n).await;
            let acked = Instant::now();
            let mut history = run.history.lock().unwrap();
            history.writes_sent += 1;
            if let Ok(version) = outcome {
                note(&mut history.acks, key, acked, version);
            }
        }
    }
}

/// Adds `version`, seen at `at`, to `key`'s history in `seen`.
fn note(seen: &mut HashMap<String, Vec<(Instant, i64)>>, key: &Key, at: Instant, version: i64) {
    seen.entry(key.id().to_string()).or_default().push((at, version));
}

async fn read(client: &Client, key: &Key) -> Result<i64, tonic::Status> {
    match key {
        Key::User(id) => client.get_user(id).await.map(|user| user.version),
        Key::Product(id) => client.get_product(id).await.map(|product| product.version),
    }
}

async fn write(client: &Client, key: &Key, n: u64) -> Result<i64, tonic::Status> {
    match key {
        Key::User(id) => {
            let change = readthrough_testkit::email_change(id, &format!("chaos-{n}@example.com"));
            client.update_user(change, &["email"], 0).await.map(|user| user.version)
        }
        Key::Product(id) => {
            let change = proto::Product {
                id: id.clone(),
                price_cents: (n % 100_000) as i64,
                ..Default::default()
            };
            client
                .update_product(change, &["price_cents"], 0)
                .await
                .map(|product| product.version)
        }
    }
}

/// The Redis servers: the primary every proxy leads to, and its replica.
struct Redises {
    primary: OwnRedis,
    replica: OwnRedis,
}

/// The chaos run's world: its servers, instances and proxies.
struct World {
    postgres: OwnPostgres,
    redises: Redises,
    proxies: Vec<RedisProxy>,
    instances: Vec<Instance>,
    env: Vec<Vec<(String, String)>>,
    db: PgPool,
    bulk_updated: Vec<String>,
    bulk_deletable: Vec<String>,
    deleted: usize,
}

impl World {
    async fn instance_started(&mut self, n: usize, run: &Run) {
        let instance = Instance::start(&self.env[n]).await;
        run.instances.write().unwrap()[n] = Some(instance.client.clone());
        self.instances[n] = instance;
    }

    /// Injects `fault` and heals it; which instance it concerned.
    async fn inject(&mut self, fault: Fault, run: &Run, rng: &mut StdRng) -> (Option<usize>, Option<(usize, usize)>) {
        match fault {
            Fault::KillInstance => {
                let n = rng.random_range(0..INSTANCES);
                run.instances.write().unwrap()[n] = None;
                self.instances[n].kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.instance_started(n, run).await;
                (Some(n), None)
            }
            Fault::RedisRestartedEmpty => {
                self.redises.primary.kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.redises.primary.start_again().await;
                (None, None)
            }
            Fault::RedisFailover => {
                // The replica stops copying; the writes meanwhile reach the primary alone.
                let _: () = redis::cmd("REPLICAOF")
                    .arg("NO")
                    .arg("ONE")
                    .query_async(&mut self.redises.replica.connection().await)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                for proxy in &self.proxies {
                    proxy.send_to(&self.redises.replica.url);
                    proxy.cut();
                }
                self.redises.primary.kill();
                for proxy in &self.proxies {
                    proxy.restore();
                }
                // The promoted replica is the primary from now on (and starts
                // as one if killed later); a new replica copies it.
                self.redises.replica.promoted();
                let replica = OwnRedis::replica_of(self.redises.replica.port).await;
                let promoted = std::mem::replace(&mut self.redises.replica, replica);
                self.redises.primary = promoted;
                (None, None)
            }
            Fault::BlackHoledInstance => {
                let n = rng.random_range(0..INSTANCES);
                self.proxies[n].black_hole();
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.proxies[n].cut();
                self.proxies[n].restore();
                (Some(n), None)
            }
            Fault::PostgresRestarted => {
                self.postgres.stop().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.postgres.start().await;
                (None, None)
            }
            Fault::BulkUpdate => {
                let sample: Vec<String> = self.bulk_updated.choose_multiple(rng, 200).cloned().collect();
                let before = self.cache_products(run, &sample).await;
                sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = ANY($1::uuid[])")
                    .bind(&self.bulk_updated)
                    .execute(&self.db)
                    .await
                    .unwrap();
                let committed = Instant::now();
                tokio::time::sleep(BULK_BOUND.saturating_sub(committed.elapsed())).await;
                let stale = self.still_served(run, &sample, &before).await;
                (None, Some((stale, sample.len())))
            }
            Fault::BulkDelete => {
                let end = (self.deleted + BULK_DELETED).min(self.bulk_deletable.len());
                let doomed = self.bulk_deletable[self.deleted..end].to_vec();
                self.deleted = end;
                let sample: Vec<String> = doomed.choose_multiple(rng, 100).cloned().collect();
                let before = self.cache_products(run, &sample).await;
                sqlx::query("DELETE FROM products WHERE id = ANY($1::uuid[])")
                    .bind(&doomed)
                    .execute(&self.db)
                    .await
                    .unwrap();
                let committed = Instant::now();
                tokio::time::sleep(BULK_BOUND.saturating_sub(committed.elapsed())).await;
                let stale = self.still_served(run, &sample, &before).await;
                (None, Some((stale, sample.len())))
            }
        }
    }

    /// Reads `ids` through every live instance (so that they are cached);
    /// the price each was read at. (A change in SQL leaves `version` alone.)
    async fn cache_products(&self, run: &Run, ids: &[String]) -> HashMap<String, i64> {
        let mut prices = HashMap::new();
        for (_, client) in run.live() {
            for id in ids {
                if let Ok(product) = client.get_product(id).await {
                    prices.insert(id.clone(), product.price_cents);
                }
            }
        }
        prices
    }

    /// How many of `ids` some live instance still serves at the price in
    /// `before` (every bulk change moves the price, or deletes the product).
    async fn still_served(&self, run: &Run, ids: &[String], before: &HashMap<String, i64>) -> usize {
        let mut stale = 0;
        for id in ids {
            for (_, client) in run.live() {
                // Deleted products are NOT_FOUND; any other error says nothing either way.
                let old = client
                    .get_product(id)
                    .await
                    .is_ok_and(|product| before.get(id) == Some(&product.price_cents));
                if old {
                    stale += 1;
                    break;
                }
            }
        }
        stale
    }

    /// Time until every instance serves a read-only key from Redis again.
    async fn recovery(&self, run: &Run, probe: &Key) -> Option<Duration> {
        let healed = Instant::now();
        let mut recovered = [false; INSTANCES];
        while healed.elapsed() < Duration::from_secs(30) {
            let clients = run.instances.read().unwrap().clone();
            for (n, client) in clients.iter().enumerate() {
                let Some(client) = client.as_ref().filter(|_| !recovered[n]) else {
                    continue;
                };
                let label = match probe {
                    Key::User(_) => "user",
                    Key::Product(_) => "product",
                };
                let sample = format!(r#"readthrough_cache_hits_total{{entity="{label}"}}"#);
                let hits = self.instances[n].metric(&sample).await;
                let read = read(client, probe).await.is_ok();
                recovered[n] = read && self.instances[n].metric(&sample).await > hits;
            }
            if recovered.iter().all(|done| *done) {
                return Some(healed.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

/// `count` rows inserted by SQL; their ids.
async fn insert_users(db: &PgPool, prefix: &str, count: i64) -> Vec<String> {
    sqlx::query_scalar(
        "INSERT INTO users (id, email) SELECT gen_random_uuid(), $1 || n || '@example.com' \
         FROM generate_series(1, $2) AS n RETURNING id::text",
    )
    .bind(prefix)
    .bind(count)
    .fetch_all(db)
    .await
    .unwrap()
}

async fn insert_products(db: &PgPool, category: &str, count: i64) -> Vec<String> {
    sqlx::query_scalar(
        "INSERT INTO products (id, category_id, name, price_cents, currency) \
         SELECT gen_random_uuid(), $1, 'product ' || n, 100, 'EUR' FROM generate_series(1, $2) AS n RETURNING id::text",
    )
    .bind(category)
    .bind(count)
    .fetch_all(db)
    .await
    .unwrap()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_run_loses_no_acknowledged_write_and_serves_nothing_older() {
    let seconds = env_number("CHAOS_SECONDS", 60);
    let seed = env_number("CHAOS_SEED", rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);

    // Servers of the run's own.
    let postgres = OwnPostgres::init(&[("max_connections", "200")], &[]).await;
    let primary = OwnRedis::start().await;
    let replica = OwnRedis::replica_of(primary.port).await;
    let mut proxies = Vec::new();
    for _ in 0..INSTANCES {
        proxies.push(RedisProxy::start(&primary.url).await);
    }
    let database_url = postgres.url("postgres");
    let env: Vec<Vec<(String, String)>> = proxies
        .iter()
        .map(|proxy| {
            vec![
                ("DATABASE_URL".to_string(), database_url.clone()),
                ("REDIS_URL".to_string(), proxy.url.clone()),
                ("CACHE_NAMESPACE".to_string(), NAMESPACE.to_string()),
            ]
        })
        .collect();
    let migrated = Command::new(env!("CARGO_BIN_EXE_readthrough"))
        .arg("migrate")
        .envs(env[0].iter().cloned())
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(migrated.success(), "readthrough migrate");
    let db = PgPool::connect(&database_url).await.unwrap();

    // The data: keys the clients write, keys they only read, and bulk targets.
    let users = insert_users(&db, "chaos-", (WRITTEN + READ_ONLY) as i64).await;
    let products = insert_products(&db, "chaos", (WRITTEN + READ_ONLY) as i64).await;
    let bulk_updated = insert_products(&db, "bulk-updated", BULK_UPDATED).await;
    let bulk_deletable = insert_products(&db, "bulk-deleted", BULK_DELETABLE).await;
    let written: Vec<Key> = users[..WRITTEN / 2]
        .iter()
        .map(|id| Key::User(id.clone()))
        .chain(products[..WRITTEN / 2].iter().map(|id| Key::Product(id.clone())))
        .collect();
    let read_only: Vec<Key> = users[WRITTEN..]
        .iter()
        .map(|id| Key::User(id.clone()))
        .chain(products[WRITTEN..].iter().map(|id| Key::Product(id.clone())))
        .collect();

    let mut instances = Vec::new();
    for instance_env in &env {
        instances.push(Instance::start(instance_env).await);
    }
    let run = Arc::new(Run {
        started: Instant::now(),
        instances: RwLock::new(instances.iter().map(|instance| Some(instance.client.clone())).collect()),
        history: Mutex::default(),
        stop: AtomicBool::new(false),
        counter: AtomicU64::new(0),
    });
    let mut world = World {
        postgres,
        redises: Redises { primary, replica },
        proxies,
        instances,
        env,
        db: db.clone(),
        bulk_updated,
        bulk_deletable,
        deleted: 0,
    };
    // Warm up: every read-only key cached.
    for (_, client) in run.live() {
        for key in &read_only {
            read(&client, key).await.unwrap();
        }
    }
    let (written, read_only) = (Arc::new(written), Arc::new(read_only));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client_loop(
                run.clone(),
                written.clone(),
                read_only.clone(),
                seed.wrapping_add(n as u64),
            ))
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;

    // The nemesis: a bulk update first, then every fault once, in random
    // order, then again, until the end. Resident memory is read after the
    // first: the warm-up has then run every path once, a relay's batches
    // included (which the allocator keeps some of for later).
    let deadline = run.started + Duration::from_secs(seconds);
    let mut injected = Vec::new();
    let mut warm_resident: Option<Vec<u64>> = None;
    let mut queue: Vec<Fault> = vec![Fault::BulkUpdate];
    while Instant::now() + Duration::from_secs(8) < deadline {
        if queue.is_empty() {
            queue = Fault::ALL.to_vec();
            queue.shuffle(&mut rng);
        }
        let fault = queue.pop().unwrap();
        let at = run.started.elapsed();
        let (instance, bulk_stale) = world.inject(fault, &run, &mut rng).await;
        let healed = run.started.elapsed();
        let recovery = world
            .recovery(&run, &read_only[rng.random_range(0..read_only.len())])
            .await;
        eprintln!(
            "chaos: {:>6.1} s {} (instance {instance:?}), healed at {:.1} s, recovered {recovery:?}",
            at.as_secs_f64(),
            fault.describe(),
            healed.as_secs_f64()
        );
        injected.push(Injected {
            fault,
            instance,
            at,
            healed,
            recovery,
            bulk_stale,
            resident: world.instances.iter().map(Instance::resident_kib).collect(),
        });
        let quiet = Duration::from_millis(rng.random_range(2000..4000));
        tokio::time::sleep(quiet.min(deadline.saturating_duration_since(Instant::now()))).await;
        if warm_resident.is_none() {
            warm_resident = Some(world.instances.iter().map(Instance::resident_kib).collect());
        }
    }
    let warm_resident = warm_resident.unwrap_or_default();
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
    run.stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    // A bulk change's batches raise resident memory for a few seconds (the
    // allocator gives it back later): the least of it while the instances
    // idle is what leaked memory cannot hide from.
    let mut end_resident: Vec<u64> = world.instances.iter().map(Instance::resident_kib).collect();
    let settled = Instant::now() + SETTLE;
    while Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (end, instance) in end_resident.iter_mut().zip(&world.instances) {
            *end = (*end).min(instance.resident_kib());
        }
    }

    // Every acknowledged write is in PostgreSQL.
    let history = std::mem::take(&mut *run.history.lock().unwrap());
    let mut lost = Vec::new();
    for key in written.iter() {
        let table = match key {
            Key::User(_) => "users",
            Key::Product(_) => "products",
        };
        let stored: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM {table} WHERE id = $1::uuid"
        )))
        .bind(key.id())
        .fetch_one(&db)
        .await
        .unwrap();
        let newest = history
            .acks
            .get(key.id())
            .and_then(|acks| acks.iter().map(|a| a.1).max());
        if newest.is_some_and(|newest| newest > stored) {
            lost.push(format!("{}: acknowledged {newest:?}, stored {stored}", key.id()));
        }
    }
    // No read older than a write acknowledged before it began.
    let mut stale = Vec::new();
    for (key, reads) in &history.reads {
        let acks = history.acks.get(key).map(Vec::as_slice).unwrap_or_default();
        for (began, version) in reads {
            let newest = acks.iter().filter(|(at, _)| at < began).map(|a| a.1).max();
            if let Some(newest) = newest.filter(|newest| newest > version) {
                stale.push(format!("{key}: read {version} after {newest} was acknowledged"));
            }
        }
    }
    // Reads of cached keys, but those while Redis was cut off from their instance.
    let cut = |at: Instant, instance: usize| {
        injected.iter().any(|fault| {
            let from = run.started + fault.at;
            let to = run.started + fault.healed + fault.recovery.unwrap_or(Duration::from_secs(30));
            let reach = fault.fault.cuts_off();
            (from..to).contains(&at)
                && (reach == Some(Reach::All) || (reach == Some(Reach::One) && fault.instance == Some(instance)))
        })
    };
    let counted: Vec<bool> = history
        .cached_reads
        .iter()
        .filter(|(at, instance, _)| !cut(*at, *instance))
        .map(|(_, _, ok)| *ok)
        .collect();
    let availability = counted.iter().filter(|ok| **ok).count() as f64 / counted.len().max(1) as f64;
    let bulk_stale: usize = injected
        .iter()
        .filter_map(|fault| fault.bulk_stale)
        .map(|(stale, _)| stale)
        .sum();
    let memory_growth = warm_resident
        .iter()
        .zip(&end_resident)
        .map(|(warm, end)| *end as f64 / (*warm).max(1) as f64)
        .fold(0.0, f64::max);
    let acknowledged: usize = history.acks.values().map(Vec::len).sum();

    let report = Report {
        seconds,
        seed,
        injected: &injected,
        reads: history.reads_sent,
        writes: history.writes_sent,
        acknowledged,
        lost: &lost,
        stale: &stale,
        cached_reads: counted.len(),
        availability,
        bulk_stale,
        warm_resident: &warm_resident,
        end_resident: &end_resident,
    }
    .markdown();
    println!("{report}");
    if let Ok(path) = std::env::var("CHAOS_REPORT") {
        std::fs::write(&path, &report).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    assert_eq!(lost, Vec::<String>::new(), "acknowledged writes lost");
    assert_eq!(stale, Vec::<String>::new(), "reads older than an acknowledged write");
    assert!(
        availability >= 0.999,
        "cached reads succeeded {:.3} % of the time",
        availability * 100.0
    );
    assert_eq!(
        bulk_stale, 0,
        "products served in their old version 3 s after a bulk change"
    );
    assert!(memory_growth <= 1.2, "resident memory grew {memory_growth:.2} times");
    drop(world);
}

struct Report<'a> {
    seconds: u64,
    seed: u64,
    injected: &'a [Injected],
    reads: u64,
    writes: u64,
    acknowledged: usize,
    lost: &'a [String],
    stale: &'a [String],
    cached_reads: usize,
    availability: f64,
    bulk_stale: usize,
    warm_resident: &'a [u64],
    end_resident: &'a [u64],
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Reliability: the chaos run\n");
        let _ = writeln!(
            out,
            "Written by `scripts/chaos` (`tests/it/chaos.rs`): three `readthrough serve` processes (the release binary) on a \
             PostgreSQL and a Redis with a replica of the run's own, each instance reaching Redis through a TCP proxy of its own. \
             {CLIENTS} clients read and write {WRITTEN} users and products and read {} more (cached) through all three, while a \
             nemesis injects one fault at a time. Reproduce with `CHAOS_SECONDS={} CHAOS_SEED={} scripts/chaos`.\n",
            2 * READ_ONLY,
            self.seconds,
            self.seed
        );
        let _ = writeln!(out, "Machine: {} cores; commit {}.\n", num_cpus(), commit());
        let _ = writeln!(out, "## Goals\n");
        let _ = writeln!(out, "| measure | goal | measured |\n|---|---|---|");
        let _ = writeln!(out, "| acknowledged writes lost | 0 | {} |", self.lost.len());
        let _ = writeln!(
            out,
            "| reads older than a write acknowledged before they began | 0 | {} |",
            self.stale.len()
        );
        let _ = writeln!(
            out,
            "| reads of cached keys that succeeded, while Redis was reachable | ≥ 99.9 % | {:.3} % of {} |",
            self.availability * 100.0,
            self.cached_reads
        );
        let _ = writeln!(
            out,
            "| products served in their old version 3 s after a bulk change | 0 | {} |",
            self.bulk_stale
        );
        for (n, (warm, end)) in self.warm_resident.iter().zip(self.end_resident).enumerate() {
            let restarted = self
                .injected
                .iter()
                .any(|fault| fault.fault == Fault::KillInstance && fault.instance == Some(n));
            let _ = writeln!(
                out,
                "| instance {n}{}: resident memory at the end ÷ after warm-up | ≤ 1.2 | {:.2} ({} → {} MiB) |",
                if restarted { " (killed and started again)" } else { "" },
                *end as f64 / (*warm).max(1) as f64,
                warm / 1024,
                end / 1024
            );
        }
        let _ = writeln!(
            out,
            "\n{} s; {} reads and {} writes sent, {} writes acknowledged.\n",
            self.seconds, self.reads, self.writes, self.acknowledged
        );
        let _ = writeln!(out, "## Faults\n");
        let _ = writeln!(
            out,
            "| at | fault | instance | healed at | recovered after | old after 3 s | resident MiB then |\n|---|---|---|---|---|---|---|"
        );
        for fault in self.injected {
            let _ = writeln!(
                out,
                "| {:.1} s | {} | {} | {:.1} s | {} | {} | {} |",
                fault.at.as_secs_f64(),
                fault.fault.describe(),
                fault.instance.map_or("all".to_string(), |n| n.to_string()),
                fault.healed.as_secs_f64(),
                fault
                    .recovery
                    .map_or("not within 30 s".to_string(), |took| format!("{} ms", took.as_millis())),
                fault
                    .bulk_stale
                    .map_or(String::new(), |(stale, sampled)| format!("{stale} of {sampled}")),
                fault
                    .resident
                    .iter()
                    .map(|kib| (kib / 1024).to_string())
                    .collect::<Vec<_>>()
                    .join(" / "),
            );
        }
        let _ = writeln!(
            out,
            "\n\"Recovered\": from the heal until every instance served a cached read from Redis again (a hit counted in its \
             `/metrics`). Reads left out of the availability figure: those sent while Redis was cut off from their instance \
             (killed, failing over, black-holed), from the fault until that recovery. Reads of keys being written are \
             checked for staleness, not counted for availability (a miss needs PostgreSQL, which one fault stops). \
             \"After warm-up\": after {} s of the clients' load and the first fault, always a bulk update, so that \
             every path, a relay's batches included, has run once. Resident memory at the end is the least read (every 250 ms) while the instances idle for {} s after the \
             clients stop: a bulk change's relay batches raise it for a few seconds and the allocator gives that back, \
             while leaked memory stays.",
            WARM_UP.as_secs(),
            SETTLE.as_secs()
        );
        for (title, lines) in [("Lost writes", self.lost), ("Stale reads", self.stale)] {
            if !lines.is_empty() {
                let _ = writeln!(out, "\n## {title}\n");
                for line in lines.iter().take(20) {
                    let _ = writeln!(out, "- {line}");
                }
            }
        }
        out
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default()
}
