//! Wiring: pools, services, health, reflection, metrics endpoint, graceful shutdown.
//!
//! `Application::build` binds both listeners (port 0 picks a free one, which
//! is how tests start real servers side by side) and `run_until_stopped`
//! serves until the given future completes.

use std::{future::Future, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{AdmissionLayer, CacheAdminApi, PageTokens, ProductApi, UserApi},
    cache::Hooks,
    config::ServeConfig,
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
/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Streams a client may open and reset before the server handles them (the
/// HTTP/2 "rapid reset" guard).
const MAX_PENDING_RESETS: usize = 64;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);

pub struct Application {
    config: ServeConfig,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    services: Services,
    /// `None`: the gRPC listener speaks plaintext.
    tls: Option<ServerTlsConfig>,
}

impl Application {
    /// Migrates (unless told not to), connects, and binds the listeners.
    /// Redis is not contacted: the service starts and serves while Redis is down.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        Self::build_with_hooks(config, Hooks::default()).await
    }

    /// `build`, with test hooks in the cache layer.
    pub async fn build_with_hooks(config: ServeConfig, hooks: Hooks) -> anyhow::Result<Self> {
        // First: the cache registers its metric handles when it is created.
        telemetry::metrics_handle();
        tls::install_crypto_provider();
        let tls = tls::server_config(
            config.tls_cert_file.as_deref(),
            config.tls_key_file.as_deref(),
            config.tls_client_ca_file.as_deref(),
        )?;
        if config.migrate_on_start {
            store::migrate(&config.config).await.context("migrating the database")?;
        }
        let services = Services::connect(&config.config, hooks)
            .await
            .context("connecting to PostgreSQL")?;
        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding GRPC_ADDR {}", config.grpc_addr))?;
        let metrics_listener = TcpListener::bind(config.metrics_addr)
            .await
            .with_context(|| format!("binding METRICS_ADDR {}", config.metrics_addr))?;
        Ok(Self {
            config,
            grpc_listener,
            metrics_listener,
            services,
            tls,
        })
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, stops
    /// accepting, lets in-flight requests finish (up to the grace period) and
    /// closes the pools.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (grpc_port, metrics_port) = (self.grpc_port(), self.metrics_port());
        let services = self.services;
        let Services {
            users,
            products,
            pool,
            cache,
        } = services.clone();
        let admin = CacheAdminApi::new(cache.clone());
        let background = [
            tokio::spawn(relay::run(pool.clone(), cache.clone())),
            tokio::spawn({
                let services = services.clone();
                async move { cache.receive_events(|feed| services.on_event(&feed)).await }
            }),
        ];
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        // grpcurl before 1.9 speaks only v1alpha.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let metrics = tokio::spawn(telemetry::serve_metrics(self.metrics_listener));
        let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
        let admission = AdmissionLayer::new(
            self.config.admission_limit,
            Duration::from_millis(self.config.request_queue_timeout_ms),
            Duration::from_millis(self.config.request_timeout_ms),
        );
        // Our own listener, so tonic's `tcp_nodelay` setting does not reach the
        // accepted sockets: set it here. Without it a response's trailers wait
        // for the client's delayed ACK (Nagle), about 40 ms per call.
        let incoming = TcpIncoming::from(self.grpc_listener).with_nodelay(Some(true));
        let tls_on = self.tls.is_some();
        let mut server = Server::builder();
        if let Some(tls) = self.tls {
            // Only TLS from here: a plaintext client's first bytes fail the handshake.
            server = server.tls_config(tls).context("TLS settings")?;
        }
        let server = server
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // A client that opens and resets streams faster than they are served is cut off.
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            // Clients reconnect now and then, so load spreads over new instances.
            .max_connection_age(MAX_CONNECTION_AGE)
            .layer(admission)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(UserServiceServer::new(UserApi::new(users)).max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(
                ProductServiceServer::new(ProductApi::new(
                    products,
                    PageTokens::new(self.config.page_token_secret.expose().as_bytes()),
                ))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(CacheAdminServiceServer::new(admin).max_decoding_message_size(MAX_REQUEST_BYTES))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            });
        tokio::pin!(server);
        tracing::info!(grpc_port, metrics_port, tls = tls_on, "serving");

        let result = tokio::select! {
            result = &mut server => result.context("gRPC server failed"),
            () = shutdown => {
                tracing::info!("shutting down: NOT_SERVING, finishing in-flight requests");
                set_health(&health, ServingStatus::NotServing).await;
                let _ = stop_accepting.send(());
                let grace = Duration::from_secs(self.config.shutdown_grace_secs);
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(result) => result.context("gRPC server failed"),
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
        pool.close().await;
        tracing::info!("stopped");
        result
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
