//! Wiring: pools, services, the listeners, background tasks, graceful shutdown.
//! The edge every call passes is in `edge.rs`, health in `health.rs`, the
//! runtime and signals in `runtime.rs`.
//!
//! `Application::build` binds the three listeners (the data API, cache
//! administration and metrics; port 0 picks a free one, which is how tests
//! start real servers side by side) and `run_until_stopped` serves until the
//! given future completes.

mod edge;
mod health;
mod runtime;

use std::future::Future;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tonic::transport::ServerTlsConfig;
use tonic_health::ServingStatus;

use crate::{
    api::{AdmissionLayer, AuthLayer, Authenticator, CacheAdminApi, PageTokens, ProductApi, UserApi},
    cache::Keys,
    config::{Secret, ServeConfig},
    listener::{self, Limits},
    proto::{
        cache_admin_service_server::CacheAdminServiceServer, product_service_server::ProductServiceServer,
        user_service_server::UserServiceServer,
    },
    service::{Services, relay},
    store, telemetry, tls,
};
use edge::{Edge, Listener, MAX_REQUEST_BYTES, METRICS_LIMITS, check_exposure};
use health::{set_health, watch_dependencies};
pub use runtime::{runtime, shutdown_signal};

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
        // First: the cache registers its metric handles when it is created.
        telemetry::metrics_handle();
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
            store::migrate(&config.backends.database)
                .await
                .context("migrating the database")?;
        }
        let services = Services::connect(&config.backends).await?;
        let page_tokens = page_tokens(&config, services.database.primary()).await?;
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

    /// Sets the cache's failpoint hooks (see `cache::failpoints`), before it serves.
    #[cfg(feature = "test-hooks")]
    pub fn set_hooks(&self, hooks: crate::cache::Hooks) {
        self.services.cache.set_hooks(hooks);
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
            database,
            ..
        } = services.clone();
        let admin = CacheAdminApi::new(cache.clone());
        let retire_after = self.config.backends.cache.outbox_retire_after;
        let mut background = vec![
            tokio::spawn(relay::run(cache.clone(), database, retire_after)),
            tokio::spawn({
                let services = services.clone();
                async move { services.report_gauges().await }
            }),
        ];
        // Events only tell near caches what to forget: without one, receiving
        // every instance's events (a million in a bulk change) is wasted work.
        if self.config.backends.cache.near_cache_enabled {
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
            first_bytes: self.config.server.connection_preface_timeout,
            idle: self.config.server.connection_idle_timeout,
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
                self.config.server.request_queue_timeout,
                self.config.server.request_timeout,
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
                let grace = self.config.server.shutdown_grace;
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
