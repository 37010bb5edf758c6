//! Wiring: pools, services, health, reflection, metrics endpoint, graceful shutdown.
//!
//! `Application::build` binds the three listeners (the data API, cache
//! administration and metrics; port 0 picks a free one, which is how tests
//! start real servers side by side) and `run_until_stopped` serves until the
//! given future completes.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::{ServingStatus, server::HealthReporter};
use tonic_reflection::server::{
    v1::{ServerReflection, ServerReflectionServer},
    v1alpha::{ServerReflection as ServerReflectionV1Alpha, ServerReflectionServer as ServerReflectionServerV1Alpha},
};
use tower::layer::util::{Identity, Stack};

use crate::{
    api::{AdmissionLayer, AuthLayer, Authenticator, CacheAdminApi, PageTokens, ProductApi, RpcMetricsLayer, UserApi},
    cache::{Cache, Keys},
    config::{Secret, ServeConfig},
    listener::{self, Limits},
    proto::{
        cache_admin_service_server::CacheAdminServiceServer, product_service_server::ProductServiceServer,
        user_service_server::UserServiceServer,
    },
    service::{Services, relay},
    store, telemetry, tls,
};

/// The largest request a service decodes. The largest valid one is an
/// UpdateUser with 16 KiB of preferences (up to about twice that as a protobuf
/// Struct) or a product with a 5,000-character description; anything bigger
/// is refused before it is decoded.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Calls one HTTP/2 connection may have in progress at once: the
/// per-connection limit, so one client cannot take the whole admission limit
/// from the others. Clients see it in the connection's settings and queue
/// further calls on their side (a gRPC channel is usually one connection, so
/// shedding them instead would fail a well-behaved busy client); a client
/// that ignores it has its extra streams refused at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Streams a client may open and reset before the server handles them (the
/// HTTP/2 "rapid reset" guard).
const MAX_PENDING_RESETS: usize = 64;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// The metrics listener's bounds: a scrape is one short request, and a few
/// connections from one address are all a Prometheus needs, so that idle
/// sockets from elsewhere cannot hold every slot for long.
const METRICS_LIMITS: Limits = Limits {
    max: 64,
    per_peer: 8,
    first_bytes: Duration::from_secs(1),
    idle: Duration::from_secs(10),
};
pub struct Application {
    config: ServeConfig,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    metrics_listener: TcpListener,
    auth: AuthLayer,
    services: Services,
    page_tokens: PageTokens,
    /// The SHA-256 of the token `/metrics` requires (`METRICS_TOKEN_FILE`).
    metrics_token: Option<[u8; 32]>,
    /// `None`: the gRPC listener speaks plaintext.
    tls: Option<ServerTlsConfig>,
}

impl Application {
    /// Migrates (unless told not to), connects, and binds the listeners.
    /// Redis is not contacted: the service starts and serves while Redis is down.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        Self::build_with_cache(config, |cache| cache).await
    }

    /// `build`, with the cache adjusted by `adjust` (as the tests add hooks).
    pub async fn build_with_cache(config: ServeConfig, adjust: impl FnOnce(Cache) -> Cache) -> anyhow::Result<Self> {
        // First: the cache registers its metric handles when it is created.
        telemetry::metrics_handle();
        let cache = adjust(Cache::new(&config.config)?);
        let auth =
            AuthLayer::new(Authenticator::from_config(&config.auth).context("loading the authentication settings")?);
        let metrics_token = metrics_token(&config)?;
        check_exposure(&config, auth.enabled())?;
        tls::install_crypto_provider();
        let tls = tls::server_config(
            config.server.tls_cert_file.as_deref(),
            config.server.tls_key_file.as_deref(),
            config.server.tls_client_ca_file.as_deref(),
        )?;
        if config.server.migrate_on_start {
            store::migrate(&config.config.database)
                .await
                .context("migrating the database")?;
        }
        let services = Services::connect_with(&config.config, cache)
            .await
            .context("connecting to PostgreSQL")?;
        let page_tokens = page_tokens(&config, services.replicas.primary()).await?;
        let grpc_listener = TcpListener::bind(config.server.grpc_addr)
            .await
            .with_context(|| format!("binding GRPC_ADDR {}", config.server.grpc_addr))?;
        let admin_listener = TcpListener::bind(config.server.admin_addr)
            .await
            .with_context(|| format!("binding ADMIN_ADDR {}", config.server.admin_addr))?;
        let metrics_listener = TcpListener::bind(config.server.metrics_addr)
            .await
            .with_context(|| format!("binding METRICS_ADDR {}", config.server.metrics_addr))?;
        Ok(Self {
            config,
            grpc_listener,
            admin_listener,
            metrics_listener,
            auth,
            services,
            page_tokens,
            metrics_token,
            tls,
        })
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    /// The cache's key names, at the key epochs this instance knows.
    pub fn cache_keys(&self) -> Keys {
        self.services.cache.keys().clone()
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, stops
    /// accepting, lets in-flight requests finish (up to the grace period) and
    /// closes the pools.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (grpc_port, admin_port, metrics_port) = (self.grpc_port(), self.admin_port(), self.metrics_port());
        let services = self.services;
        let Services {
            users,
            products,
            cache,
            replicas,
            ..
        } = services.clone();
        let admin = CacheAdminApi::new(cache.clone());
        let retire_after = Duration::from_millis(self.config.config.cache.outbox_retire_after_ms);
        let mut background = vec![
            tokio::spawn(relay::run(cache.clone(), replicas, retire_after)),
            tokio::spawn({
                let services = services.clone();
                async move { services.report_gauges().await }
            }),
        ];
        // Events only tell near caches what to forget: without one, receiving
        // every instance's events (a million in a bulk change) is wasted work.
        if self.config.config.cache.near_cache_enabled {
            background.push(tokio::spawn({
                let services = services.clone();
                async move { cache.receive_events(|feed| services.on_event(&feed)).await }
            }));
        }
        background.push(tokio::spawn({
            let auth = self.auth.clone();
            async move { auth.follow_key_set().await }
        }));
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let watch = tokio::spawn(watch_dependencies(services.clone(), health.clone()));

        let metrics = tokio::spawn(telemetry::serve_metrics(
            listener::bounded(self.metrics_listener, METRICS_LIMITS, "metrics"),
            self.metrics_token,
        ));
        let limits = Limits {
            max: self.config.server.max_client_connections as usize,
            per_peer: self.config.server.max_client_connections_per_peer as usize,
            first_bytes: Duration::from_millis(self.config.server.connection_preface_timeout_ms),
            idle: Duration::from_secs(self.config.server.connection_idle_timeout_secs),
        };
        let (stop_accepting, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let edge = Edge {
            auth: self.auth,
            admission: AdmissionLayer::new(
                self.config.server.admission_limit,
                Duration::from_millis(self.config.server.request_queue_timeout_ms),
                Duration::from_millis(self.config.server.request_timeout_ms),
            ),
            reflection: self.config.server.reflection_enabled,
            tls: self.tls,
        };
        let api = edge
            .server()?
            .add_service(health_service)
            .add_optional_service(edge.reflection_v1(Listener::Data))
            .add_optional_service(edge.reflection_v1alpha(Listener::Data))
            .add_service(UserServiceServer::new(UserApi::new(users)).max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(
                ProductServiceServer::new(ProductApi::new(products, self.page_tokens))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .serve_with_incoming_shutdown(listener::bounded(self.grpc_listener, limits, "grpc"), until_stopped());
        let admin = edge
            .server()?
            .add_optional_service(edge.reflection_v1(Listener::Admin))
            .add_optional_service(edge.reflection_v1alpha(Listener::Admin))
            .add_service(CacheAdminServiceServer::new(admin).max_decoding_message_size(MAX_REQUEST_BYTES))
            .serve_with_incoming_shutdown(listener::bounded(self.admin_listener, limits, "admin"), until_stopped());
        let servers = async {
            let (api, admin) = tokio::join!(api, admin);
            api.context("gRPC server failed")?;
            admin.context("gRPC admin server failed")
        };
        tokio::pin!(servers);
        tracing::info!(grpc_port, admin_port, metrics_port, tls = edge.tls.is_some(), "serving");

        let result = tokio::select! {
            result = &mut servers => result,
            () = shutdown => {
                tracing::info!("shutting down: NOT_SERVING, finishing in-flight requests");
                watch.abort();
                set_health(&health, ServingStatus::NotServing).await;
                let _ = stop_accepting.send(true);
                let grace = Duration::from_secs(self.config.server.shutdown_grace_secs);
                match tokio::time::timeout(grace, &mut servers).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(?grace, "grace period over; dropping the remaining connections");
                        Ok(())
                    }
                }
            }
        };
        metrics.abort();
        for task in background {
            task.abort();
        }
        services.pool().close().await;
        tracing::info!("stopped");
        result
    }
}

/// What both gRPC listeners share: TLS, the transport's limits,
/// authentication (outermost: a refused call costs nothing else), admission,
/// and reflection.
struct Edge {
    auth: AuthLayer,
    admission: AdmissionLayer,
    reflection: bool,
    /// `None`: the listeners speak plaintext.
    tls: Option<ServerTlsConfig>,
}

/// The layers every call passes, outermost last: metrics, authentication, admission.
type EdgeLayers = Stack<AdmissionLayer, Stack<AuthLayer, Stack<RpcMetricsLayer, Identity>>>;

impl Edge {
    fn server(&self) -> anyhow::Result<Server<EdgeLayers>> {
        let mut server = Server::builder();
        if let Some(tls) = &self.tls {
            // Only TLS from here: a plaintext client's first bytes fail the handshake.
            server = server.tls_config(tls.clone()).context("TLS settings")?;
        }
        Ok(server
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // A client that opens and resets streams faster than they are served is cut off.
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            // Clients reconnect now and then, so load spreads over new instances.
            .max_connection_age(MAX_CONNECTION_AGE)
            // Outermost: calls that authentication or admission turn away are counted too.
            .layer(RpcMetricsLayer)
            .layer(self.auth.clone())
            .layer(self.admission.clone()))
    }

    fn reflection_v1(&self, listener: Listener) -> Option<ServerReflectionServer<impl ServerReflection>> {
        self.reflection.then(|| {
            reflection_builder(listener)
                .build_v1()
                .expect("the embedded descriptor sets are valid")
        })
    }

    /// grpcurl before 1.9 speaks only v1alpha.
    fn reflection_v1alpha(
        &self,
        listener: Listener,
    ) -> Option<ServerReflectionServerV1Alpha<impl ServerReflectionV1Alpha>> {
        self.reflection.then(|| {
            reflection_builder(listener)
                .build_v1alpha()
                .expect("the embedded descriptor sets are valid")
        })
    }
}

/// The gRPC listener a reflection service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// `GRPC_ADDR`: users, products, health.
    Data,
    /// `ADMIN_ADDR`: cache administration.
    Admin,
}

/// Reflection that describes only what `listener` serves: the data port
/// does not advertise (or describe) CacheAdminService, nor the admin port
/// the data API.
fn reflection_builder(listener: Listener) -> tonic_reflection::server::Builder<'static> {
    let mut set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set is valid");
    let served_elsewhere = |service: &str| match listener {
        Listener::Data => service == "CacheAdminService",
        Listener::Admin => service != "CacheAdminService",
    };
    set.file
        .retain(|file| !file.service.iter().any(|service| served_elsewhere(service.name())));
    let builder = tonic_reflection::server::Builder::configure().register_file_descriptor_set(set);
    match listener {
        Listener::Data => builder.register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        Listener::Admin => builder,
    }
}

/// Page tokens signed with `PAGE_TOKEN_SECRET` if set, else with the newest
/// key the migrations keep in the database; accepted when signed with any of
/// those or `PAGE_TOKEN_PREVIOUS_SECRETS`.
async fn page_tokens(config: &ServeConfig, pool: &sqlx::PgPool) -> anyhow::Result<PageTokens> {
    let server = &config.server;
    let secret = |secret: &Secret| secret.expose().as_bytes().to_vec();
    let mut keys: Vec<Vec<u8>> = server.page_token_secret.iter().map(secret).collect();
    keys.extend(
        store::page_token_keys(pool)
            .await
            .context("reading the page token keys (run `readthrough migrate`)")?,
    );
    keys.extend(server.page_token_previous_secrets.iter().map(secret));
    if keys.is_empty() {
        anyhow::bail!("no page token key: the table page_token_keys is empty (run `readthrough migrate`)");
    }
    Ok(PageTokens::new(keys))
}

/// The SHA-256 of the token in `METRICS_TOKEN_FILE`, if set.
fn metrics_token(config: &ServeConfig) -> anyhow::Result<Option<[u8; 32]>> {
    let Some(path) = &config.server.metrics_token_file else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading METRICS_TOKEN_FILE {}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        bail!(
            "METRICS_TOKEN_FILE {} must hold a token of at least 16 characters",
            path.display()
        );
    }
    Ok(Some(Sha256::digest(token.as_bytes()).into()))
}

/// Without authentication anyone who reaches a port can read, write and flush
/// the cache, or read what the metrics tell of the traffic: refuse to listen
/// beyond loopback unless the operator insists. Logs what guards each listener.
fn check_exposure(config: &ServeConfig, authenticated: bool) -> anyhow::Result<()> {
    let server = &config.server;
    let metrics_guarded = server.metrics_token_file.is_some();
    let listeners = [
        ("GRPC_ADDR", server.grpc_addr, authenticated, "bearer tokens"),
        (
            "ADMIN_ADDR",
            server.admin_addr,
            authenticated,
            "bearer tokens with the admin role",
        ),
        (
            "METRICS_ADDR",
            server.metrics_addr,
            metrics_guarded,
            "METRICS_TOKEN_FILE",
        ),
    ];
    let describe = |(_, addr, guarded, guard): &(&str, SocketAddr, bool, &str)| {
        let reach = if addr.ip().is_loopback() {
            "loopback only"
        } else {
            "beyond loopback"
        };
        let guard = if *guarded { guard } else { "no authentication" };
        format!("{addr} ({reach}, {guard})")
    };
    tracing::info!(
        grpc = describe(&listeners[0]),
        admin = describe(&listeners[1]),
        metrics = describe(&listeners[2]),
        tls = server.tls_cert_file.is_some(),
        "listeners"
    );
    let open: Vec<String> = listeners
        .iter()
        .filter(|(_, addr, guarded, _)| !addr.ip().is_loopback() && !guarded)
        .map(|(name, addr, _, _)| format!("{name}={addr}"))
        .collect();
    let tokens_in_clear = authenticated
        && server.tls_cert_file.is_none()
        && listeners[..2].iter().any(|(_, addr, _, _)| !addr.ip().is_loopback());
    if tokens_in_clear {
        tracing::warn!(
            "bearer tokens cross the network in plaintext: set TLS_CERT_FILE and TLS_KEY_FILE, or terminate TLS in front"
        );
    }
    if open.is_empty() {
        return Ok(());
    }
    if config.auth.insecure_allow_unauthenticated {
        tracing::warn!(
            exposed = open.join(", "),
            "INSECURE: serving without authentication beyond loopback; anyone who reaches these ports can read what they serve, and on the gRPC ports write and flush the cache"
        );
        return Ok(());
    }
    bail!(
        "{} beyond loopback without authentication: set AUTH_TOKENS_FILE, AUTH_JWT_SECRET, \
         AUTH_JWT_PUBLIC_KEY_FILE or AUTH_JWKS_FILE (gRPC and admin), METRICS_TOKEN_FILE (metrics), listen on \
         127.0.0.1, or set INSECURE_ALLOW_UNAUTHENTICATED=true",
        open.join(" and ")
    )
}

/// How often the dependencies are checked for health.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Checks PostgreSQL and the cache every `HEALTH_INTERVAL`: each one's state
/// is the gauge `readthrough_dependency_up{dependency}`, and a change is
/// logged. Health turns NOT_SERVING only when neither can answer: with
/// PostgreSQL down, cached reads are still served; with Redis down, every
/// read goes to PostgreSQL. A load balancer that took an instance out for
/// either would take out every instance at once, for an outage they share.
async fn watch_dependencies(services: Services, health: HealthReporter) {
    let mut every = tokio::time::interval(HEALTH_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(bool, bool)> = None;
    loop {
        every.tick().await;
        let now = (store::answers(services.pool()).await, services.cache.can_serve());
        let (postgres, cache) = now;
        metrics::gauge!("readthrough_dependency_up", "dependency" => "postgres").set(f64::from(u8::from(postgres)));
        metrics::gauge!("readthrough_dependency_up", "dependency" => "redis").set(f64::from(u8::from(cache)));
        if last == Some(now) {
            continue;
        }
        let serving = postgres || cache;
        match (postgres, cache) {
            (true, true) => tracing::info!("PostgreSQL and the cache both answer"),
            (true, false) => tracing::warn!("degraded: the cache cannot serve; PostgreSQL answers every read"),
            (false, true) => tracing::warn!("degraded: PostgreSQL does not answer; only cached reads succeed"),
            (false, false) => tracing::error!("neither PostgreSQL nor the cache answers: NOT_SERVING"),
        }
        // SERVING was set at start.
        let was_serving = last.is_none_or(|(postgres, cache)| postgres || cache);
        if serving != was_serving {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&health, status).await;
        }
        last = Some(now);
    }
}

/// Sets the overall status ("") and each service's status.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(service_name::<UserServiceServer<UserApi>>(), status)
        .await;
    health
        .set_service_status(service_name::<ProductServiceServer<ProductApi>>(), status)
        .await;
    health
        .set_service_status(service_name::<CacheAdminServiceServer<CacheAdminApi>>(), status)
        .await;
}

fn service_name<S: tonic::server::NamedService>() -> &'static str {
    S::NAME
}

/// The runtime every command runs on: tokio's multi-threaded scheduler, with
/// its LIFO slot turned off when built with `--cfg tokio_unstable` (as
/// `.cargo/config.toml` does).
///
/// Why: the slot runs a task woken by the running task next. When a Redis
/// reply batch wakes many requests, each finished request wakes its HTTP/2
/// connection task into the slot, which then writes that one response before
/// the other requests finish: a `writev` per response. Without the slot the
/// finished requests are written together; on the warm GetUser benchmark this
/// took writes per call from about 1.1 to 0.4, system time per call from about
/// 15 µs to 6 µs, and throughput up by about half (docs/benchmarks.md).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
