//! One way to start the real service for a test: `spawn_app()`.
//!
//! Each app gets a fresh PostgreSQL database (migrated by the app itself, as
//! `serve` does) and its own Redis key namespace, so tests run in parallel
//! without sharing state. Both are removed when the last instance using them
//! is dropped. `spawn_sibling()` starts a second instance on the same database
//! and namespace, as two replicas behind a load balancer would be.

use std::{
    net::TcpListener as StdListener,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{Rng, distr::Alphanumeric};
use readthrough::{
    app::Application,
    cache::{Hooks, Keys, RedisConnection, codec},
    config::ServeConfig,
};
use readthrough_client::{
    Backoff, Client, Page,
    proto::{
        self, CreateProductRequest, GetUserRequest, ListProductsResponse, product_service_client::ProductServiceClient,
        user_service_client::UserServiceClient,
    },
};
use serde::de::DeserializeOwned;
use sqlx::{Connection, Executor, PgConnection, PgPool, postgres::PgConnectOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::transport::{Channel, ClientTlsConfig};

pub use deadpool_redis::redis;

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
    config.config.database.name = Some(sandbox.database_name.clone());
    config.config.cache.namespace = sandbox.namespace.clone();
    start(config, customize, sandbox, hooks).await
}

/// Points an app at the database `url` names, instead of its test's own.
pub fn use_database(config: &mut ServeConfig, url: &str) {
    config.config.database.url = url.parse().unwrap();
    config.config.database.name = None;
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
        if self.config.config.cache.redis_cluster_urls.is_empty() {
            return scan_namespace(&mut self.redis, &self.sandbox.namespace).await;
        }
        let mut keys = Vec::new();
        for url in &self.config.config.cache.redis_cluster_urls {
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

async fn start(
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
    let redis = if config.config.cache.redis_cluster_urls.is_empty() {
        let client = redis::Client::open(sandbox.redis_url.as_str()).unwrap();
        RedisConnection::Single(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("the test Redis is reachable"),
        )
    } else {
        let urls: Vec<&str> = config
            .config
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
        db: PgPool::connect_with(config.config.database.connect_options().unwrap())
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
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10_000 && StdListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

async fn scrape(port: u16) -> String {
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
async fn key_exists(mut redis: RedisConnection, key: &str) -> bool {
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

async fn scan_namespace(conn: &mut impl redis::aio::ConnectionLike, namespace: &str) -> Vec<String> {
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

impl Sandbox {
    pub fn new() -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let config = ServeConfig::from_env().config;
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

/// A TCP proxy in front of the real Redis that a test can cut (every
/// connection dropped, new ones refused) and restore: Redis unreachable, and back.
/// It can also stall the connections it carries: they stay open but carry
/// nothing more, like a connection whose peer vanished without a reset;
/// black-hole Redis: stall them, and accept new ones that never get an
/// answer; slow every connection down to a bandwidth (a congested link); and
/// send new connections to another server (a failover behind one address).
pub struct RedisProxy {
    pub url: String,
    up: Arc<AtomicBool>,
    black_hole: Arc<AtomicBool>,
    /// Bytes a second each connection carries each way; 0: as fast as it can.
    bandwidth: Arc<AtomicU64>,
    target: Arc<std::sync::Mutex<String>>,
    cut: tokio::sync::broadcast::Sender<()>,
    stall: tokio::sync::broadcast::Sender<()>,
}

impl RedisProxy {
    pub async fn start(redis_url: &str) -> Self {
        let target = Arc::new(std::sync::Mutex::new(address_of(redis_url)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let up = Arc::new(AtomicBool::new(true));
        let black_hole = Arc::new(AtomicBool::new(false));
        let bandwidth = Arc::new(AtomicU64::new(0));
        let (cut, _) = tokio::sync::broadcast::channel::<()>(1);
        let (stall, _) = tokio::sync::broadcast::channel::<()>(1);
        let (accepting, swallowing, cuts, stalls) = (up.clone(), black_hole.clone(), cut.clone(), stall.clone());
        let (targets, limit) = (target.clone(), bandwidth.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, as far as the client can tell
                }
                let (mut cut, mut stall) = (cuts.subscribe(), stalls.subscribe());
                if swallowing.load(Ordering::SeqCst) {
                    // Accepted, and never answered, until a cut.
                    tokio::spawn(async move {
                        let _ = cut.recv().await;
                        drop(client);
                    });
                    continue;
                }
                let (target, limit) = (targets.lock().unwrap().clone(), limit.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let stalled = {
                        let (mut client_read, mut client_write) = client.split();
                        let (mut server_read, mut server_write) = server.split();
                        let carry = async {
                            tokio::join!(
                                pump(&mut client_read, &mut server_write, &limit),
                                pump(&mut server_read, &mut client_write, &limit),
                            )
                        };
                        tokio::select! {
                            _ = carry => false,
                            _ = cut.recv() => false,
                            _ = stall.recv() => true,
                        }
                    };
                    if stalled {
                        // Both sockets stay open, and nothing moves, until a cut.
                        let _ = cut.recv().await;
                    }
                });
            }
        });
        Self {
            url,
            up,
            black_hole,
            bandwidth,
            target,
            cut,
            stall,
        }
    }

    /// The connections open now carry nothing more (new ones work).
    pub fn stall(&self) {
        let _ = self.stall.send(());
    }

    /// Redis stops answering: the connections open now stall, and new ones
    /// are accepted but never answered, until a cut (then `restore`).
    pub fn black_hole(&self) {
        self.black_hole.store(true, Ordering::SeqCst);
        self.stall();
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    /// New connections reach Redis again.
    pub fn restore(&self) {
        self.black_hole.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }

    /// Every connection, open or new, carries at most `bytes_per_second`
    /// each way (`None`: no limit).
    pub fn limit_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.bandwidth.store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }

    /// New connections go to the Redis at `redis_url` (open ones are not moved).
    pub fn send_to(&self, redis_url: &str) {
        *self.target.lock().unwrap() = address_of(redis_url);
    }
}

/// `host:port` of a `redis://host:port` URL.
fn address_of(redis_url: &str) -> String {
    redis_url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string()
}

/// Copies `from` to `to` until either closes, at most `limit` bytes a second (0: no limit).
async fn pump(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    limit: &AtomicU64,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let bytes_per_second = limit.load(Ordering::SeqCst);
        if bytes_per_second > 0 {
            tokio::time::sleep(Duration::from_secs_f64(read as f64 / bytes_per_second as f64)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A Redis server of the test's own, on a free port, killed when dropped. It
/// saves nothing: started again, it is empty, as a restarted cache is. It
/// works in a directory of its own, so that the files Redis writes anyway
/// (a replica's copy of its master, a cluster node's state) neither land in
/// the checkout nor get loaded by the next server.
pub struct OwnRedis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Arguments after the usual ones, kept for `start_again`.
    extra: Vec<String>,
    pub url: String,
}

impl OwnRedis {
    pub async fn start() -> Self {
        Self::start_with_args(free_port(), &[]).await
    }

    /// A redis-server with `extra` arguments after the usual ones (a later
    /// one wins: `--port 0 --tls-port <port>` serves only TLS), ready once
    /// `port` accepts connections; `url` is the plain `redis://` form.
    pub async fn start_with_args(port: u16, extra: &[&str]) -> Self {
        Self::try_start_with_args(port, extra).await.unwrap()
    }

    /// `start_with_args`, telling instead of panicking when the server does
    /// not come up as ours (another process took the port meanwhile).
    pub async fn try_start_with_args(port: u16, extra: &[&str]) -> Result<Self, String> {
        let mut own = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|arg| arg.to_string()).collect(),
            url: format!("redis://127.0.0.1:{port}"),
        };
        own.try_start_again().await?;
        Ok(own)
    }

    /// Starts the server (again, after `kill`) on the same port and with the
    /// same arguments, and waits until it accepts connections.
    pub async fn start_again(&mut self) {
        self.try_start_again().await.unwrap()
    }

    async fn try_start_again(&mut self) -> Result<(), String> {
        self.kill();
        let port = self.port;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.path().to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services installs it)");
        self.child = Some(child);
        // A TCP connect, not a Redis client: the server may want TLS or a password.
        let up = eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        if !up {
            return Err(format!(
                "own redis-server did not start on port {port} with {:?}",
                self.extra
            ));
        }
        let exited = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten());
        match exited {
            None => Ok(()),
            Some(status) => Err(format!(
                "own redis-server on port {port} exited ({status}): the port answers for another"
            )),
        }
    }

    /// The server's process id, to tell it from another listening on its port.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

impl OwnRedis {
    /// A replica of the Redis at `master_port`, once it has its master's data.
    pub async fn replica_of(master_port: u16) -> Self {
        let replica = Self::start_with_args(free_port(), &["--replicaof", "127.0.0.1", &master_port.to_string()]).await;
        let synced = eventually(Duration::from_secs(10), || async {
            replica.info("replication").await.contains("master_link_status:up")
        })
        .await;
        assert!(synced, "the replica synced with its master");
        replica
    }

    /// This replica was made a primary: started again, it starts as one.
    pub fn promoted(&mut self) {
        if let Some(at) = self.extra.iter().position(|arg| arg == "--replicaof") {
            self.extra.drain(at..(at + 3).min(self.extra.len()));
        }
    }

    /// A client connection to this server.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// `INFO <section>`, or "" when the server does not answer.
    pub async fn info(&self, section: &str) -> String {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return String::new();
        };
        let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
            return String::new();
        };
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut connection)
            .await
            .unwrap_or_default()
    }
}

/// A Redis Sentinel of the test's own (`redis-server --sentinel`) on a free
/// port, watching the primary at `master_port` under the name `mymaster`,
/// with a 1 s down-after; killed when dropped.
pub struct OwnSentinel {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl OwnSentinel {
    pub async fn start(master_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n\
                 sentinel parallel-syncs mymaster 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services installs it)");
        let up = eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(up, "sentinel listens on {port}");
        Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// `SENTINEL <args…>` asked of this sentinel.
    pub async fn ask<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let mut connection = redis::Client::open(self.url.as_str())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        redis::cmd("SENTINEL").arg(args).query_async(&mut connection).await.ok()
    }

    /// The port of the primary this sentinel names now.
    pub async fn master_port(&self) -> Option<u16> {
        let address: Vec<String> = self.ask(&["get-master-addr-by-name", "mymaster"]).await?;
        address.get(1)?.parse().ok()
    }
}

impl Drop for OwnSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of the test's own: three masters and three replicas
/// (`redis-cli --cluster create --cluster-replicas 1`) on free ports. Every
/// node is killed when dropped.
pub struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
    /// `REDIS_CLUSTER_URLS`: every node.
    pub urls: Vec<String>,
}

impl OwnCluster {
    /// Starts a cluster, trying fresh ports a few times: ports are picked
    /// free but only taken when a node starts, and every node needs two
    /// (its port and its bus port, 10000 above), so another process
    /// starting meanwhile can take one.
    pub async fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match Self::try_start().await {
                Ok(cluster) => return cluster,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("no Redis Cluster started in 5 tries: {failures:#?}");
    }

    async fn try_start() -> Result<Self, String> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_cluster_port();
            // The cluster state file is kept in the node's own directory.
            let args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"];
            let node = OwnRedis::try_start_with_args(port, &args).await?;
            let answering = process_id(&node.url).await;
            if answering != node.pid() {
                return Err(format!("port {port} answers for process {answering:?}, not our node"));
            }
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed (scripts/services installs redis-server)");
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            ));
        }
        let cluster = Self {
            urls: nodes.iter().map(|node| node.url.clone()).collect(),
            nodes,
        };
        let ready = eventually(Duration::from_secs(20), || async {
            let mut states = Vec::new();
            for node in &cluster.nodes {
                states.push(cluster_state(&node.url).await);
            }
            states.iter().all(|ok| *ok)
        })
        .await;
        if !ready {
            return Err("not every node reports cluster_state:ok within 20 s".to_string());
        }
        Ok(cluster)
    }

    /// The index in `nodes` of the master that serves `key`'s slot now.
    pub async fn master_of(&self, key: &str) -> usize {
        let mut redis = self.connection().await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut redis)
            .await
            .unwrap();
        // <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges...>
        let port = nodes
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| {
                fields[2].contains("master")
                    && fields[8..].iter().any(|range| {
                        let (first, last) = range.split_once('-').unwrap_or((range, range));
                        matches!((first.parse::<u16>(), last.parse::<u16>()), (Ok(first), Ok(last)) if (first..=last).contains(&slot))
                    })
            })
            .map(|fields| fields[1].split(['@', ':']).nth(1).unwrap().parse::<u16>().unwrap())
            .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{nodes}"));
        self.nodes.iter().position(|node| node.port == port).unwrap()
    }

    /// A client of the whole cluster, for tests that look inside it.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls.clone())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }
}

/// The `process_id` the Redis at `url` reports, if it answers.
async fn process_id(url: &str) -> Option<u32> {
    let mut connection = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// Whether the node at `url` says `cluster_state:ok` and knows six nodes,
/// and, if it is a replica, has its master's data: a replica that has never
/// synced is not promoted when its master fails.
async fn cluster_state(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    let replication: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    let synced = replication.contains("role:master") || replication.contains("master_link_status:up");
    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6") && synced
}

/// Concurrent readers: fewer than DATABASE_FALLBACK_LIMIT (8), so that no
/// read that falls back to PostgreSQL is shed.
pub const READERS: usize = 4;

/// Users created and read once (cached), returning their ids.
pub async fn warm_users(app: &mut TestApp, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let id = app.create_user(&format!("reader{n}@example.com")).await.id;
        app.client.get_user(&id).await.unwrap();
        ids.push(id);
    }
    ids
}

/// One GetUser of a load: when it started, how long it took, and its error if it failed.
pub struct Read {
    pub started: Instant,
    pub took: Duration,
    pub error: Option<String>,
}

/// `READERS` tasks reading `ids` in turn, one call at a time each, until `finish`.
pub struct Load {
    stop: Arc<AtomicBool>,
    readers: Vec<JoinHandle<Vec<Read>>>,
}

impl Load {
    pub fn start(app: &TestApp, ids: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let readers = (0..READERS)
            .map(|reader| {
                let (mut users, ids, stop) = (app.users.clone(), ids.to_vec(), stop.clone());
                tokio::spawn(async move {
                    let mut reads = Vec::new();
                    let mut next = reader;
                    while !stop.load(Ordering::Relaxed) {
                        let id = ids[next % ids.len()].clone();
                        next += READERS;
                        let started = Instant::now();
                        let answer = users.get_user(GetUserRequest { id: id.clone() }).await;
                        let took = started.elapsed();
                        let error = match answer {
                            Ok(user) if user.get_ref().id == id => None,
                            Ok(user) => Some(format!("asked for {id}, got {}", user.get_ref().id)),
                            Err(status) => Some(format!("{status:?}")),
                        };
                        reads.push(Read { started, took, error });
                    }
                    reads
                })
            })
            .collect();
        Self { stop, readers }
    }

    /// Stops the readers (each finishes its call) and returns every read.
    pub async fn finish(mut self) -> Vec<Read> {
        self.stop.store(true, Ordering::Relaxed);
        let mut reads = Vec::new();
        for reader in std::mem::take(&mut self.readers) {
            reads.extend(reader.await.unwrap());
        }
        reads
    }
}

/// Stops the readers if a test panics before `finish`.
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
