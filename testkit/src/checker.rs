//! The consistency checker: many clients doing random reads and writes against
//! two instances that share PostgreSQL and Redis, with random delays injected
//! into the cache layer (before fills and before invalidations). Then it
//! quiesces and checks two things:
//!
//! - every cached entry equals its row in PostgreSQL (stale entries: 0);
//! - every read returned a version at least as new as the newest write
//!   acknowledged before that read began (and nothing, after a delete).
//!
//! A small run is a test (`consistency.rs`); a larger one is the benchmark
//! `cargo run --release -p readthrough-bench --bin cache_correctness`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rand::{Rng, seq::IndexedRandom};
use readthrough::{
    cache::{Entry, Hook, Hooks, Kind, ListMeta},
    config::SecretUrl,
    domain::{CategoryId, Product, ProductId, User, UserId},
};
use readthrough_client::{
    Client, Page,
    proto::{self, CreateProductRequest},
};
use tonic::Code;

use crate::{TestApp, email_change, redis, spawn_app_with_hooks, use_database};

pub struct Settings {
    pub clients: usize,
    pub duration: Duration,
    pub users: usize,
    pub products: usize,
    /// Upper bound of each injected delay.
    pub max_delay: Duration,
    /// Runs `InvalidateAll` (every kind) back to back meanwhile, so the key
    /// epochs move under the clients.
    pub retire_all: bool,
    /// `REDIS_CLUSTER_URLS` for both instances; empty: the test Redis.
    pub redis_cluster_urls: Vec<String>,
    /// `DATABASE_URL` and `DATABASE_READ_URLS` for both instances; `None`:
    /// a database of the test's own on the test PostgreSQL, no replicas.
    pub database: Option<(String, Vec<String>)>,
}

impl Settings {
    /// The small run the tests make: 8 clients for 3 s over 10 users and 12
    /// products, on the test Redis and a database of the test's own.
    pub fn small() -> Self {
        Self {
            clients: 8,
            duration: Duration::from_secs(3),
            users: 10,
            products: 12,
            max_delay: Duration::from_millis(5),
            retire_all: false,
            redis_cluster_urls: Vec::new(),
            database: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub operations: u64,
    pub reads: u64,
    pub writes: u64,
    /// Cached entries and lists compared with PostgreSQL at the end.
    pub entries_checked: u64,
    /// Key epoch bumps made during the run (`retire_all`).
    pub epoch_bumps: u64,
    pub stale_entries: Vec<String>,
    pub read_violations: Vec<String>,
}

const CATEGORIES: [&str; 3] = ["alpha", "beta", "gamma"];
/// A delete's acknowledgement, newer than any version.
const DELETED: i64 = i64::MAX;

/// One acknowledged write or one read, as a client saw it.
#[derive(Debug, Clone, Copy)]
struct Ack {
    at: Instant,
    version: i64,
}

#[derive(Debug, Clone, Copy)]
struct Read {
    began: Instant,
    /// `None`: NOT_FOUND.
    version: Option<i64>,
}

#[derive(Default)]
struct History {
    acks: HashMap<String, Vec<Ack>>,
    reads: HashMap<String, Vec<Read>>,
}

fn random_delay(max: Duration) -> Hook {
    Arc::new(move |_key: &str| {
        let delay = rand::rng().random_range(Duration::ZERO..=max);
        Box::pin(tokio::time::sleep(delay))
    })
}

pub async fn run(settings: Settings) -> Report {
    let hooks = || Hooks {
        before_fill: Some(random_delay(settings.max_delay)),
        before_invalidate: Some(random_delay(settings.max_delay)),
    };
    let cluster_urls: Vec<SecretUrl> = settings
        .redis_cluster_urls
        .iter()
        .map(|url| url.parse().unwrap())
        .collect();
    let mut first = spawn_app_with_hooks(hooks(), |config| {
        config.backends.cache.redis_cluster_urls = cluster_urls;
        if let Some((primary, replicas)) = &settings.database {
            use_database(config, primary);
            config.backends.replicas.read_urls = replicas.iter().map(|url| url.parse().unwrap()).collect();
        }
    })
    .await;
    let second = first.spawn_sibling_with_hooks(hooks()).await;

    let mut user_ids = Vec::new();
    for n in 0..settings.users {
        user_ids.push(first.create_user(&format!("user{n}@example.com")).await.id);
    }
    let mut product_ids = Vec::new();
    for n in 0..settings.products {
        let request = CreateProductRequest {
            category_id: CATEGORIES[n % CATEGORIES.len()].into(),
            name: format!("product {n}"),
            description: String::new(),
            price_cents: 100,
            currency: "EUR".into(),
        };
        product_ids.push(first.client.create_product(request).await.unwrap().id);
    }

    let history = Arc::new(Mutex::new(History::default()));
    let deadline = Instant::now() + settings.duration;
    let instances = [first.client.clone(), second.client.clone()];
    let clients: Vec<_> = (0..settings.clients)
        .map(|_| {
            let (instances, history) = (instances.clone(), history.clone());
            let (user_ids, product_ids) = (user_ids.clone(), product_ids.clone());
            tokio::spawn(async move {
                let mut counts = (0u64, 0u64);
                while Instant::now() < deadline {
                    let client = &instances[rand::rng().random_range(0..instances.len())];
                    let step = Step::random(&user_ids, &product_ids);
                    let is_read = step.run(client, &history).await;
                    if is_read { counts.0 += 1 } else { counts.1 += 1 }
                }
                counts
            })
        })
        .collect();
    let admin = first.admin().await;
    let retiring = settings.retire_all.then(|| {
        tokio::spawn(async move {
            let mut bumps = 0;
            while Instant::now() < deadline {
                admin.invalidate_all("", false).await.unwrap();
                bumps += 1;
            }
            bumps
        })
    });
    let mut report = Report::default();
    for client in clients {
        let (reads, writes) = client.await.unwrap();
        report.reads += reads;
        report.writes += writes;
    }
    report.operations = report.reads + report.writes;
    if let Some(retiring) = retiring {
        report.epoch_bumps = retiring.await.unwrap();
    }

    quiesce(&first).await;
    (report.stale_entries, report.entries_checked) = stale_entries(&mut first).await;
    report.read_violations = read_violations(&history.lock().unwrap());
    drop(second);
    report
}

/// One random operation.
enum Step {
    GetUser(String),
    UpdateUser(String),
    DeleteUser(String),
    GetProduct(String),
    ListProducts(&'static str),
    UpdateProduct(String),
}

impl Step {
    fn random(users: &[String], products: &[String]) -> Self {
        let mut rng = rand::rng();
        let user = users.choose(&mut rng).unwrap().clone();
        let product = products.choose(&mut rng).unwrap().clone();
        match rng.random_range(0..100) {
            0..40 => Step::GetUser(user),
            40..55 => Step::UpdateUser(user),
            55..57 => Step::DeleteUser(user),
            57..77 => Step::GetProduct(product),
            77..87 => Step::ListProducts(CATEGORIES.choose(&mut rng).unwrap()),
            _ => Step::UpdateProduct(product),
        }
    }

    /// Runs the step and records what the client saw; true for a read.
    async fn run(self, client: &Client, history: &Mutex<History>) -> bool {
        let began = Instant::now();
        match self {
            Step::GetUser(id) => {
                let version = found(client.get_user(&id).await.map(|user| user.version));
                record_read(history, id, began, version);
                true
            }
            Step::GetProduct(id) => {
                let read = client.get_product(&id).await;
                record_read(history, id, began, found(read.map(|product| product.version)));
                true
            }
            Step::ListProducts(category) => {
                let page = client.list_products(category, Page::Number(0), 100).await.unwrap();
                for product in page.products {
                    record_read(history, product.id, began, Some(product.version));
                }
                true
            }
            Step::UpdateUser(id) => {
                let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
                let written = client.update_user(email_change(&id, &email), &["email"], 0).await;
                if let Some(version) = found(written.map(|user| user.version)) {
                    record_ack(history, id, version);
                }
                false
            }
            Step::DeleteUser(id) => {
                if client.delete_user(&id).await.is_ok() {
                    record_ack(history, id, DELETED);
                }
                false
            }
            Step::UpdateProduct(id) => {
                let (product, path) = {
                    let mut rng = rand::rng();
                    let product = proto::Product {
                        id: id.clone(),
                        category_id: CATEGORIES.choose(&mut rng).unwrap().to_string(),
                        name: format!("product {}", rng.random_range(0..1000)),
                        price_cents: rng.random_range(0..10_000),
                        ..Default::default()
                    };
                    let path = *["category_id", "name", "price_cents"].choose(&mut rng).unwrap();
                    (product, path)
                };
                let version = client.update_product(product, &[path], 0).await.unwrap().version;
                record_ack(history, id, version);
                false
            }
        }
    }
}

/// The version read, `None` for NOT_FOUND; any other error fails the run.
fn found(result: Result<i64, tonic::Status>) -> Option<i64> {
    match result {
        Ok(version) => Some(version),
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => panic!("unexpected error: {status:?}"),
    }
}

fn record_read(history: &Mutex<History>, id: String, began: Instant, version: Option<i64>) {
    history
        .lock()
        .unwrap()
        .reads
        .entry(id)
        .or_default()
        .push(Read { began, version });
}

fn record_ack(history: &Mutex<History>, id: String, version: i64) {
    let at = Instant::now();
    history
        .lock()
        .unwrap()
        .acks
        .entry(id)
        .or_default()
        .push(Ack { at, version });
}

/// Every read saw at least the newest write acknowledged before it began.
fn read_violations(history: &History) -> Vec<String> {
    let mut violations = Vec::new();
    for (id, reads) in &history.reads {
        let acks = history.acks.get(id).map(Vec::as_slice).unwrap_or_default();
        for read in reads {
            let Some(newest) = acks
                .iter()
                .filter(|ack| ack.at < read.began)
                .map(|ack| ack.version)
                .max()
            else {
                continue;
            };
            let ok = match read.version {
                // A delete is the newest state there is; it may have committed before its ack.
                None => acks.iter().any(|ack| ack.version == DELETED),
                Some(version) => newest != DELETED && version >= newest,
            };
            if !ok {
                violations.push(format!(
                    "{id}: read {:?} after write {newest} was acknowledged",
                    read.version
                ));
            }
        }
    }
    violations
}

/// Waits until the outbox is empty and injected delays have run out.
async fn quiesce(app: &TestApp) {
    for _ in 0..250 {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_outbox")
            .fetch_one(&app.db)
            .await
            .unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Cached entries (users, products, lists) of the current key epochs that
/// differ from PostgreSQL, and how many were compared. (Keys of a retired
/// epoch are never read again.)
pub async fn stale_entries(app: &mut TestApp) -> (Vec<String>, u64) {
    let mut stale = Vec::new();
    let mut checked = 0;
    let current: Vec<String> = Kind::ALL
        .map(|kind| app.keys.pattern_for(kind).trim_end_matches('*').to_string())
        .into();
    for key in app.namespace_keys().await {
        if key.ends_with(":lease") || !current.iter().any(|prefix| key.starts_with(prefix)) {
            continue;
        }
        if let Some(id) = tag(&key, ":user:") {
            checked += 1;
            let id = UserId::parse(id).unwrap();
            let cached: Entry<User> = app.cached_value(&key).await.unwrap();
            let row = readthrough::store::users::get_many(&app.db, &[id]).await.unwrap().pop();
            if cached.value != row {
                stale.push(format!("{key}: cached {:?}, stored {row:?}", cached.value));
            }
        } else if let Some(id) = tag(&key, ":product:") {
            checked += 1;
            let id = ProductId::parse(id).unwrap();
            let cached: Entry<Product> = app.cached_value(&key).await.unwrap();
            let row = readthrough::store::products::get_many(&app.db, &[id])
                .await
                .unwrap()
                .pop();
            if cached.value != row {
                stale.push(format!("{key}: cached {:?}, stored {row:?}", cached.value));
            }
        } else if let Some(category) = tag(&key, ":list:").filter(|_| key.ends_with(":meta")) {
            checked += 1;
            let category = CategoryId::parse(category).unwrap();
            let meta: ListMeta = app.cached_value(&key).await.unwrap();
            // Every cached (id, position) must be where PostgreSQL has it.
            let cached: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(app.keys.list_ids(&category))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut app.redis)
                .await
                .unwrap();
            let (stored, total) = readthrough::store::products::list_head(&app.db, &category, u64::MAX >> 1)
                .await
                .unwrap();
            let misplaced: Vec<&(String, f64)> = cached
                .iter()
                .filter(|(id, position)| stored.get(*position as usize).map(ToString::to_string).as_ref() != Some(id))
                .collect();
            if !misplaced.is_empty() || meta.total != total {
                stale.push(format!(
                    "{key}: cached {misplaced:?} misplaced, total {} against {total} stored",
                    meta.total,
                ));
            }
        }
    }
    (stale, checked)
}

/// The part of `key` inside the hash tag that follows `kind` and its epoch,
/// e.g. the id of `rt:v1:user:e0:{id}`.
fn tag<'a>(key: &'a str, kind: &str) -> Option<&'a str> {
    let rest = &key[key.find(kind)? + kind.len()..];
    let (epoch, rest) = rest.strip_prefix('e')?.split_once(':')?;
    epoch.parse::<u64>().ok()?;
    rest.strip_prefix('{')?.split('}').next()
}
