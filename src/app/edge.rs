//! What both gRPC listeners share (TLS, the transport's limits,
//! authentication, admission, reflection), and the rule that decides which
//! listeners may face the network.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use prost::Message;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_reflection::server::{
    v1::{ServerReflection, ServerReflectionServer},
    v1alpha::{ServerReflection as ServerReflectionV1Alpha, ServerReflectionServer as ServerReflectionServerV1Alpha},
};
use tower::layer::util::{Identity, Stack};

use crate::{
    api::{AdmissionLayer, AuthLayer, RpcMetricsLayer},
    config::ServeConfig,
    listener::Limits,
};

/// The largest request a service decodes. The largest valid one is an
/// UpdateUser with 16 KiB of preferences (up to about twice that as a protobuf
/// Struct) or a product with a 5,000-character description; anything bigger
/// is refused before it is decoded.
pub(super) const MAX_REQUEST_BYTES: usize = 64 * 1024;
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
pub(super) const METRICS_LIMITS: Limits = Limits {
    max: 64,
    per_peer: 8,
    first_bytes: Duration::from_secs(1),
    idle: Duration::from_secs(10),
};
/// What both gRPC listeners share: TLS, the transport's limits,
/// authentication (outermost: a refused call costs nothing else), admission,
/// and reflection.
pub(super) struct Edge {
    pub auth: AuthLayer,
    pub admission: AdmissionLayer,
    pub reflection: bool,
    /// `None`: the listeners speak plaintext.
    pub tls: Option<ServerTlsConfig>,
}

/// The layers every call passes, outermost last: metrics, authentication, admission.
type EdgeLayers = Stack<AdmissionLayer, Stack<AuthLayer, Stack<RpcMetricsLayer, Identity>>>;

impl Edge {
    pub fn server(&self) -> anyhow::Result<Server<EdgeLayers>> {
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

    pub fn reflection_v1(&self, listener: Listener) -> Option<ServerReflectionServer<impl ServerReflection>> {
        self.reflection.then(|| {
            reflection_builder(listener)
                .build_v1()
                .expect("the embedded descriptor sets are valid")
        })
    }

    /// grpcurl before 1.9 speaks only v1alpha.
    pub fn reflection_v1alpha(
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
pub(super) enum Listener {
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

/// Without authentication anyone who reaches a port can read, write and flush
/// the cache, or read what the metrics tell of the traffic: refuse to listen
/// beyond loopback unless the operator insists. Logs what guards each listener.
pub(super) fn check_exposure(config: &ServeConfig, authenticated: bool) -> anyhow::Result<()> {
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
