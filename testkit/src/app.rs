//! One way to start the real service for a test: `spawn_app()`.
//!
//! Each app gets a fresh PostgreSQL database (migrated by the app itself, as
//! `serve` does) and its own Redis key namespace, so tests run in parallel
//! without sharing state. Both are removed when the last instance using them
//! is dropped. `spawn_sibling()` starts a second instance on the same database
//! and namespace, as two replicas behind a load balancer would be.

use std::{net::TcpListener as StdListener, sync::Arc, time::Duration};

use rand::{Rng, distr::Alphanumeric};
use readthrough::{
    app::Application,
    cache::{Hooks, Keys, RedisConnection, codec},
    config::ServeConfig,
};
use readthrough_client::{
    Backoff, Client, Page,
    proto::{
        self, CreateProductRequest, ListProductsResponse, product_service_client::ProductServiceClient,
        user_service_client::UserServiceClient,
    },
};
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::Sandbox;
use crate::redis;

pub struct TestApp {
    /// The typed client of the data API (`readthrough-client`), as another
    /// service would call it, but without retries (tests check the status
    /// each call gets) and with a deadline no test reaches.
    pub client: Client,
    /// The raw stubs, on the client's channel, for requests the typed
    /// client does not send (malformed, hostile, unusual).
    pub users: UserServiceClient<Channel>,
    pub products: ProductServiceClient<Channel>,
    /// Direct access to the app's database, bypassing the service.
    pub db: PgPool,
    /// Direct access to the real Redis, or to the app's Redis Cluster (even
    /// when the app is pointed elsewhere, as through a proxy).
    pub redis: RedisConnection,
    pub keys: Keys,
    pub config: ServeConfig,
    /// For clients the app has no field for.
    pub grpc_port: u16,
    /// The cache administration listener (`CacheAdminServiceClient`).
    pub admin_port: u16,
    pub metrics_port: u16,
    stop: Option<oneshot::Sender<()>>,
    sandbox: Arc<Sandbox>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts an app on a fresh database and namespace, after `customize` adjusts its settings.
pub async fn spawn_app_with(customize: impl FnOnce(&mut ServeConfig)) -> TestApp {
    spawn_app_with_hooks(Hooks::default(), customize).await
}

/// `spawn_app_with`, with hooks in the cache layer.
pub async fn spawn_app_with_hooks(hooks: Hooks, customize: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let sandbox = Arc::new(Sandbox::new());
    let mut config = ServeConfig::from_env();
    config.backends.database.name = Some(sandbox.database_name.clone());
    config.backends.cache.namespace = sandbox.namespace.clone();
    start(config, customize, sandbox, hooks).await
}

/// Points an app at the database `url` names, instead of its test's own.
pub fn use_database(config: &mut ServeConfig, url: &str) {
    config.backends.database.url = url.parse().unwrap();
    config.backends.database.name = None;
}

impl TestApp {
    /// A second instance sharing this one's database and Redis namespace.
    pub async fn spawn_sibling(&self) -> TestApp {
        self.spawn_sibling_with(|_| {}).await
    }

    pub async fn spawn_sibling_with(&self, customize: impl FnOnce(&mut ServeConfig)) -> TestApp {
        start(self.config.clone(), customize, self.sandbox.clone(), Hooks::default()).await
    }

    /// A second instance sharing this one's database and namespace, with hooks of its own.
    pub async fn spawn_sibling_with_hooks(&self, hooks: Hooks) -> TestApp {
        start(self.config.clone(), |_| {}, self.sandbox.clone(), hooks).await
    }

    /// The raw bytes cached under `key`, read straight from Redis.
    pub async fn cached(&mut self, key: &str) -> Option<Vec<u8>> {
        redis::cmd("GET").arg(key).query_async(&mut self.redis).await.unwrap()
    }

    /// The value cached under `key`, decoded; panics if it does not decode.
    pub async fn cached_value<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let bytes = self.cached(key).await?;
        Some(codec::decode(&bytes).expect("cached value decodes"))
    }

    pub async fn exists(&mut self, key: &str) -> bool {
        key_exists(self.redis.clone(), key).await
    }

    /// Repeats `read` until `key` is cached, for at most 5 s. One read fills
    /// it, unless Redis missed its deadline on a busy machine: the read then
    /// failed open, served from PostgreSQL and filled nothing.
    pub async fn read_until_cached<F, Fut>(&self, key: &str, mut read: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future,
    {
        eventually(Duration::from_secs(5), || {
            let (redis, read) = (self.redis.clone(), read());
            async move {
                read.await;
                key_exists(redis, key).await
            }
        })
        .await
    }

    /// Waits until every write's invalidation is done (the outbox is empty),
    /// so that the outbox relay deletes nothing the test fills afterwards.
    pub async fn outbox_drained(&self) {
        let drained = eventually(Duration::from_secs(5), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM cache_outbox")
                .fetch_one(&self.db)
                .await
                .unwrap()
                == 0
        })
        .await;
        assert!(drained, "the outbox drains");
    }

    /// Whether `key` comes to exist (`present`) or to be gone within `limit`.
    pub async fn eventually_exists(&self, key: &str, present: bool, limit: Duration) -> bool {
        eventually(limit, || {
            let redis = self.redis.clone();
            async move { key_exists(redis, key).await == present }
        })
        .await
    }

    /// Every key of this app's namespace (on a cluster: of every node that
    /// answers, once).
    pub async fn namespace_keys(&mut self) -> Vec<String> {
        if self.config.backends.cache.redis_cluster_urls.is_empty() {
            return scan_namespace(&mut self.redis, &self.sandbox.namespace).await;
        }
        let mut keys = Vec::new();
        for url in &self.config.backends.cache.redis_cluster_urls {
            let client = redis::Client::open(url.expose()).unwrap();
            // A node a test killed is skipped: its replica holds its keys.
            if let Ok(mut node) = client.get_multiplexed_async_connection().await {
                keys.extend(scan_namespace(&mut node, &self.sandbox.namespace).await);
            }
        }
        keys.sort();
        keys.dedup(); // a replica holds its master's keys
        keys
    }

    /// The value of one Prometheus sample, scraped from this app's `/metrics`
    /// (0 when absent), e.g. `readthrough_cache_hits_total{entity="user"}`.
    /// Under nextest each test is its own process, so counters start at 0.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics(&[sample]).await[0]
    }

    /// The whole `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        scrape(self.metrics_port).await
    }

    /// Several samples (see `metric`) from one scrape, so they are consistent with each other.
    pub async fn metrics(&self, samples: &[&str]) -> Vec<f64> {
        let text = scrape(self.metrics_port).await;
        samples
            .iter()
            .map(|sample| {
                text.lines()
                    .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
                    .map(|value| value.trim().parse().unwrap())
                    .unwrap_or(0.0)
            })
            .collect()
    }
}

impl TestApp {
    /// A channel to this app's TLS listener (an app started with
    /// `TLS_CERT_FILE`), trusting and presenting what `tls` says; connected,
    /// or the error that refused it, within 5 s.
    pub async fn tls_channel(&self, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("https://127.0.0.1:{}", self.grpc_port))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }
}

/// A user with only an id and an email: what a change of the email sends
/// (with the update mask `["email"]`).
pub fn email_change(id: &str, email: &str) -> proto::User {
    proto::User {
        id: id.into(),
        email: email.into(),
        ..Default::default()
    }
}

/// An unconditional change of a user's email, for a raw stub (see `TestApp::rename_user`).
pub fn rename_request(id: &str, email: &str) -> proto::UpdateUserRequest {
    proto::UpdateUserRequest {
        user: Some(email_change(id, email)),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["email".into()],
        }),
        expected_version: 0,
    }
}

/// The typed client the tests use: no retries, and a deadline no test reaches.
pub fn test_client(builder: readthrough_client::ClientBuilder) -> readthrough_client::ClientBuilder {
    builder.backoff(Backoff::none()).deadline(Duration::from_secs(60))
}

/// Requests every test file makes, built in one place (through the typed client).
impl TestApp {
    pub async fn get_user(&self, id: &str) -> proto::User {
        self.client.get_user(id).await.unwrap()
    }

    pub async fn create_user(&self, email: &str) -> proto::User {
        self.client.create_user(email, None).await.unwrap()
    }

    /// An unconditional change of a user's email.
    pub async fn rename_user(&self, id: &str, email: &str) -> Result<proto::User, tonic::Status> {
        self.client.update_user(email_change(id, email), &["email"], 0).await
    }

    pub async fn create_product(&self, category: &str, name: &str) -> proto::Product {
        let request = CreateProductRequest {
            category_id: category.to_string(),
            name: name.to_string(),
            description: format!("about {name}"),
            price_cents: 1999,
            currency: "EUR".to_string(),
        };
        self.client.create_product(request).await.unwrap()
    }

    /// A change of a product's price, unconditional when `expected_version` is 0.
    pub async fn reprice(
        &self,
        id: &str,
        price_cents: i64,
        expected_version: i64,
    ) -> Result<proto::Product, tonic::Status> {
        let product = proto::Product {
            id: id.into(),
            price_cents,
            ..Default::default()
        };
        self.client
            .update_product(product, &["price_cents"], expected_version)
            .await
    }

    /// A typed client of this app's cache administration listener.
    pub async fn admin(&self) -> Client {
        test_client(Client::builder(format!("http://127.0.0.1:{}", self.admin_port)))
            .connect()
            .await
            .expect("connects to the admin listener")
    }

    /// Products with random names, so that list order differs from creation order.
    pub async fn create_products(&self, category: &str, count: usize) -> Vec<proto::Product> {
        let mut created = Vec::with_capacity(count);
        for _ in 0..count {
            let name: String = rand::rng().sample_iter(&Alphanumeric).take(8).map(char::from).collect();
            created.push(self.create_product(category, &name).await);
        }
        created
    }

    /// Page `page` (by number) of a category.
    pub async fn list_page(&self, category: &str, page: i32, page_size: i32) -> ListProductsResponse {
        let page = Page::Number(page);
        self.client.list_products(category, page, page_size).await.unwrap()
    }

    /// The page after `page_token`.
    pub async fn list_after(&self, category: &str, page_token: &str, page_size: i32) -> ListProductsResponse {
        let page = Page::After(page_token.to_string());
        self.client.list_products(category, page, page_size).await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub(crate) async fn start(
    mut config: ServeConfig,
    customize: impl FnOnce(&mut ServeConfig),
    sandbox: Arc<Sandbox>,
    hooks: Hooks,
) -> TestApp {
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    customize(&mut config);
    let app = Application::build(config.clone()).await.expect("app builds");
    app.set_hooks(hooks);
    let (grpc_port, admin_port, metrics_port) = (app.grpc_port(), app.admin_port(), app.metrics_port());
    let keys = app.cache_keys();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let endpoint = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}")).unwrap();
    // An app serving TLS never answers this plaintext channel: its tests
    // connect through `TestApp::tls_channel` instead.
    let channel = if config.server.tls_cert_file.is_some() {
        endpoint.connect_lazy()
    } else {
        endpoint.connect().await.expect("connects to the app")
    };
    let redis = if config.backends.cache.redis_cluster_urls.is_empty() {
        let client = redis::Client::open(sandbox.redis_url.as_str()).unwrap();
        RedisConnection::Single(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("the test Redis is reachable"),
        )
    } else {
        let urls: Vec<&str> = config
            .backends
            .cache
            .redis_cluster_urls
            .iter()
            .map(|url| url.expose())
            .collect();
        let client = redis::cluster::ClusterClient::new(urls).unwrap();
        RedisConnection::Cluster(client.get_async_connection().await.expect("the cluster is reachable"))
    };
    TestApp {
        client: test_client(Client::builder("")).with_channel(channel.clone()).unwrap(),
        users: UserServiceClient::new(channel.clone()),
        products: ProductServiceClient::new(channel),
        db: PgPool::connect_with(config.backends.database.connect_options().unwrap())
            .await
            .unwrap(),
        redis,
        keys,
        config,
        grpc_port,
        admin_port,
        metrics_port,
        stop: Some(stop),
        sandbox,
    }
}

/// A free local port with nothing listening on it.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port for a Redis Cluster node: its cluster bus listens 10000
/// above it, on a port that must be free too and below 65536 (which
/// ephemeral ports often are not).
pub(crate) fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10_000 && StdListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

pub(crate) async fn scrape(port: u16) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Whether `key` exists in Redis, asked on its own connection handle.
pub(crate) async fn key_exists(mut redis: RedisConnection, key: &str) -> bool {
    let exists: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut redis).await.unwrap();
    exists == 1
}

/// Waits until `check` holds, polling every 20 ms, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn scan_namespace(conn: &mut impl redis::aio::ConnectionLike, namespace: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap_or_default();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}
