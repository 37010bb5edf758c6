//! Settings: defaults that work locally, overridden by environment variables or flags.
//!
//! Every subcommand takes the same `Config`; `serve` adds `ServeConfig`.
//! Connection URLs can carry passwords, so their `Debug` output is redacted.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{ArgAction, Parser, builder::TypedValueParser};
use sqlx::postgres::PgConnectOptions;

/// A connection URL whose password never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for SecretUrl {
    /// Prints the URL redacted (see `redact_url`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

/// The parameters of a PostgreSQL URL that name a secret and that sqlx
/// understands (`sslkey` is a file's path). sqlx logs the value of any other
/// parameter with its warning that it ignores it, so those are dropped
/// here and only their names logged.
const SQLX_SECRET_PARAMETERS: [&str; 2] = ["password", "sslkey"];

fn without_unknown_secrets(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|parameter| {
            let name = parameter.split_once('=').map_or(*parameter, |(name, _)| name);
            let drop = says_secret(name) && !SQLX_SECRET_PARAMETERS.contains(&name);
            if drop {
                tracing::warn!(
                    parameter = name,
                    "ignoring a connect parameter PostgreSQL's driver does not support"
                );
            }
            !drop
        })
        .collect();
    format!("{head}?{}", kept.join("&"))
}

/// Whether a URL query parameter's name says it holds a secret.
fn says_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "key", "credential"]
        .iter()
        .any(|word| name.contains(word))
}

/// `url` with its user info, and the value of every query parameter whose
/// name says it holds a secret (`password`, `sslpassword`, `…token`,
/// `…secret`, `…key`), replaced by `***`: the one redaction for any URL a
/// log line or an error shows.
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let mut shown = match (head.find("://"), head.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}://***{}", &head[..scheme_end], &head[at..]),
        _ => head.to_string(),
    };
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((name, _)) if says_secret(name) => format!("{name}=***"),
                _ => parameter.to_string(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&parameters.join("&"));
    }
    shown
}

/// Whether two SHA-256 digests are equal, compared in time that does not
/// depend on where they differ (bearer tokens are checked by their digests).
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A secret setting: its `Debug` output is `***`, so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Where the data lives and how the cache behaves: what `seed`, `warm` and
/// `serve` share.
#[derive(Debug, Clone, Parser)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub replicas: ReplicaConfig,
    #[command(flatten)]
    pub cache: CacheConfig,
}

impl Config {
    /// Defaults and environment only, no flags: what tests and benchmarks start from.
    pub fn from_env() -> Self {
        Self::parse_from(["readthrough"])
    }
}

/// PostgreSQL: the server, the database, and the pools' limits.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Database")]
pub struct DatabaseConfig {
    /// PostgreSQL connection URL. The default is the role that owns the
    /// database (made by `scripts/services`), not a superuser; in production
    /// `serve` connects as `DATABASE_SERVICE_ROLE` instead.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://readthrough:readthrough@127.0.0.1:5432/readthrough?sslmode=disable"
    )]
    pub url: SecretUrl,

    /// The database to use on that server, in place of the one the URL names.
    #[arg(long = "database-name", env = "DATABASE_NAME")]
    pub name: Option<String>,

    /// The role `serve` connects as when it is not the owner. Where it
    /// exists, `migrate` grants it what serving needs and no more: the rows
    /// of the service's tables (the page token keys read only), not their
    /// structure, not the migrations.
    #[arg(long = "database-service-role", env = "DATABASE_SERVICE_ROLE", default_value = "readthrough_service", value_parser = parse_role)]
    pub service_role: String,

    /// Most PostgreSQL connections this instance opens (to the primary, and to each replica).
    #[arg(
        long = "database-max-connections",
        env = "DATABASE_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,

    /// Longest a single SQL statement may run (PostgreSQL's `statement_timeout`), in milliseconds.
    #[arg(long = "database-statement-timeout-ms", env = "DATABASE_STATEMENT_TIMEOUT_MS", default_value = "5000", value_parser = millis(1))]
    pub statement_timeout: Duration,

    /// Longest a query waits for a PostgreSQL connection, in milliseconds,
    /// including reconnecting: past it the call is UNAVAILABLE, so a database
    /// that is down costs a request this long, not a hang.
    #[arg(long = "database-acquire-timeout-ms", env = "DATABASE_ACQUIRE_TIMEOUT_MS", default_value = "1000", value_parser = millis(1))]
    pub acquire_timeout: Duration,
}

impl DatabaseConfig {
    /// Connection options for the primary.
    pub fn connect_options(&self) -> Result<PgConnectOptions, sqlx::Error> {
        self.options_for(&self.url)
    }

    /// Connection options for `url` (the primary or a replica), with the
    /// database `name` when it is set.
    pub fn options_for(&self, url: &SecretUrl) -> Result<PgConnectOptions, sqlx::Error> {
        let options = PgConnectOptions::from_str(&without_unknown_secrets(url.expose()))?;
        Ok(match &self.name {
            Some(name) => options.database(name),
            None => options,
        })
    }
}

/// PostgreSQL read replicas, which cache misses may read.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Read replicas")]
pub struct ReplicaConfig {
    /// Read replicas of `DATABASE_URL`, comma-separated: cache misses of users
    /// and products read from one that has replayed the last write to what
    /// they read (see `store::replicas`). Every instance sharing a cache must
    /// set it alike: writes record the marker that makes replica reads safe
    /// only where it is set.
    #[arg(
        long = "database-read-urls",
        env = "DATABASE_READ_URLS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub read_urls: Vec<SecretUrl>,

    /// A replica further behind the primary than this, in milliseconds, is
    /// not read from (write markers live twice as long).
    #[arg(long = "database-replica-max-lag-ms", env = "DATABASE_REPLICA_MAX_LAG_MS", default_value = "5000", value_parser = millis(1))]
    pub replica_max_lag: Duration,
}

/// Redis, what is cached in it and for how long, and what happens when it
/// does not answer.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Cache")]
pub struct CacheConfig {
    /// Reads that may go to PostgreSQL at once because Redis did not answer;
    /// more wait up to `REDIS_TIMEOUT_MS` for one of them, then are answered
    /// UNAVAILABLE, so an outage cannot exhaust the pool.
    #[arg(long = "database-fallback-limit", env = "DATABASE_FALLBACK_LIMIT", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub fallback_limit: u32,

    /// Redis connection URL: `redis://` or `rediss://` (TLS), with `user:password@` for an ACL user.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: SecretUrl,

    /// Seed nodes of a Redis Cluster, comma-separated (`redis://host:port`, with
    /// `user:password@` for an ACL user). When set, it replaces `REDIS_URL`.
    #[arg(long, env = "REDIS_CLUSTER_URLS", hide_env_values = true, value_delimiter = ',')]
    pub redis_cluster_urls: Vec<SecretUrl>,

    /// Redis Sentinels watching the primary (`redis://host:port`, comma-separated):
    /// when set, every connection asks them where the primary named
    /// `REDIS_SENTINEL_MASTER` is, and logs in there with the credentials of
    /// `REDIS_URL` (whose address is not used).
    #[arg(
        long,
        env = "REDIS_SENTINEL_URLS",
        hide_env_values = true,
        value_delimiter = ',',
        conflicts_with = "redis_cluster_urls"
    )]
    pub redis_sentinel_urls: Vec<SecretUrl>,

    /// The name the sentinels know the primary by.
    #[arg(long, env = "REDIS_SENTINEL_MASTER", default_value = "mymaster")]
    pub redis_sentinel_master: String,

    /// PEM file of the CA that signed a `rediss://` server's certificate, when
    /// it is not in the system's trust store.
    #[arg(long, env = "REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<PathBuf>,

    /// How many multiplexed Redis connections this instance keeps open; every
    /// request shares them, so a few suffice.
    #[arg(long, env = "REDIS_CONNECTIONS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub redis_connections: u16,

    /// Upper bound on every Redis call; past it the request is answered from PostgreSQL.
    #[arg(long = "redis-timeout-ms", env = "REDIS_TIMEOUT_MS", default_value = "50", value_parser = millis(0))]
    pub redis_timeout: Duration,

    /// Redis failures in a row (errors that mean it is unavailable, or
    /// deadlines over at least one deadline) that open the circuit breaker: then every request skips
    /// Redis at once, without waiting for a deadline, until a probe answers.
    #[arg(long, env = "REDIS_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub redis_breaker_failures: u32,

    /// How long the open breaker waits before it lets one probe try Redis
    /// again, in milliseconds (a reconnect ends the wait early).
    #[arg(long = "redis-breaker-cooldown-ms", env = "REDIS_BREAKER_COOLDOWN_MS", default_value = "1000", value_parser = millis(1))]
    pub redis_breaker_cooldown: Duration,

    /// First part of every cache key (`<namespace>:v1:user:<id>`); letters, digits, '_', '-', '.'.
    #[arg(long = "cache-namespace", env = "CACHE_NAMESPACE", default_value = "rt", value_parser = parse_namespace)]
    pub namespace: String,

    /// Turns the cache off: every read goes to PostgreSQL (for comparison and emergencies).
    #[arg(long = "cache-enabled", env = "CACHE_ENABLED", default_value_t = true, action = ArgAction::Set)]
    pub enabled: bool,

    /// Time to live of a cached user, in seconds (±10 % jitter).
    #[arg(long = "user-ttl-secs", env = "USER_TTL_SECS", default_value = "3600", value_parser = seconds(1))]
    pub user_ttl: Duration,

    /// Time to live of a cached product, in seconds (±10 % jitter).
    #[arg(long = "product-ttl-secs", env = "PRODUCT_TTL_SECS", default_value = "900", value_parser = seconds(1))]
    pub product_ttl: Duration,

    /// Time to live of a cached category list, in seconds (±10 % jitter).
    #[arg(long = "list-ttl-secs", env = "LIST_TTL_SECS", default_value = "1800", value_parser = seconds(1))]
    pub list_ttl: Duration,

    /// How long "no such id" is cached, in seconds; any write to the id clears it.
    #[arg(long = "negative-ttl-secs", env = "NEGATIVE_TTL_SECS", default_value = "30", value_parser = seconds(1))]
    pub negative_ttl: Duration,

    /// Fill lease: how long other callers wait for the caller filling a missing key
    /// before they read PostgreSQL themselves, in milliseconds.
    #[arg(long = "cache-lease-ms", env = "CACHE_LEASE_MS", default_value = "1000", value_parser = millis(10))]
    pub lease: Duration,

    /// Refresh hot entries shortly before they expire (XFetch), so expiry does not stall readers.
    #[arg(long, env = "REFRESH_AHEAD", default_value_t = true, action = ArgAction::Set)]
    pub refresh_ahead: bool,

    /// Cached values larger than this many bytes are zstd-compressed.
    #[arg(long, env = "COMPRESS_THRESHOLD_BYTES", default_value_t = 1024)]
    pub compress_threshold_bytes: usize,

    /// Keep hot entities in process memory too, in front of Redis (see `cache::near`).
    #[arg(long, env = "NEAR_CACHE_ENABLED", default_value_t = false, action = ArgAction::Set)]
    pub near_cache_enabled: bool,

    /// Most entities the near cache holds, per entity kind.
    #[arg(long, env = "NEAR_CACHE_CAPACITY", default_value_t = 100_000)]
    pub near_cache_capacity: u64,

    /// How long the near cache keeps an entry, in milliseconds: the bound on
    /// its staleness if an invalidation event were lost.
    #[arg(long = "near-cache-ttl-ms", env = "NEAR_CACHE_TTL_MS", default_value = "1000", value_parser = millis(1))]
    pub near_cache_ttl: Duration,

    /// How many ids one list fill loads at most: a cold list caches this many
    /// from its start; pages past them load (and cache) chunks of `LIST_CHUNK_IDS`.
    #[arg(long, env = "LIST_CACHE_MAX_IDS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(100..))]
    pub list_cache_max_ids: u32,

    /// Outbox rows of one kind older than this, in milliseconds, with more
    /// than the relay deletes one by one in a round (a bulk change in SQL, or
    /// what piled up while Redis was unreachable), retire every cached key of
    /// the kind with a new key epoch instead: the cache turns cold for that
    /// kind, but nothing older than them is read after about a second more.
    #[arg(long = "outbox-retire-after-ms", env = "OUTBOX_RETIRE_AFTER_MS", default_value = "1000", value_parser = millis(1))]
    pub outbox_retire_after: Duration,

    /// Ids per chunk of a list past its head (at most `LIST_CACHE_MAX_IDS`).
    #[arg(long, env = "LIST_CHUNK_IDS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(10..))]
    pub list_chunk_ids: u32,
}

/// What `serve` needs: the data settings, its listeners, and who may call.
#[derive(Debug, Clone, Parser)]
pub struct ServeConfig {
    #[command(flatten)]
    pub backends: Config,

    #[command(flatten)]
    pub server: ServerConfig,

    #[command(flatten)]
    pub auth: AuthConfig,
}

impl ServeConfig {
    pub fn from_env() -> Self {
        Self::parse_from(["readthrough"])
    }
}

/// The gRPC, admin and metrics listeners, and the limits at the edge.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Server")]
pub struct ServerConfig {
    /// Address the gRPC server listens on. Loopback by default: without
    /// authentication the service refuses any other address (see `AuthConfig`).
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the cache administration listener (CacheAdminService):
    /// apart from the data API, so a network policy or a firewall can keep it
    /// to operators.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:50052")]
    pub admin_addr: SocketAddr,

    /// Serve gRPC server reflection (what grpcurl uses to learn the API).
    #[arg(long, env = "REFLECTION_ENABLED", default_value_t = true, action = ArgAction::Set)]
    pub reflection_enabled: bool,

    /// Address of the Prometheus endpoint (`/metrics`).
    /// Loopback by default: what it tells is for your Prometheus, not the network.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: SocketAddr,

    /// PEM certificate chain of the gRPC listener; with `TLS_KEY_FILE` it
    /// speaks only TLS. Both or neither.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of `TLS_CERT_FILE`.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM file of the CA that signs client certificates: set, every client
    /// must present one (mutual TLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Apply pending migrations before serving.
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, action = ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Work in progress at once, in units of about one cached read: GetUser and
    /// GetProduct take 1, BatchGetUsers 4, ListProducts 16, writes 8. More waits
    /// in line (see `api::admission`).
    #[arg(long, env = "ADMISSION_LIMIT", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub admission_limit: u32,

    /// How long a request may wait in line before it is answered RESOURCE_EXHAUSTED, in milliseconds.
    #[arg(long = "request-queue-timeout-ms", env = "REQUEST_QUEUE_TIMEOUT_MS", default_value = "1000", value_parser = millis(0))]
    pub request_queue_timeout: Duration,

    /// Longest a request may take once admitted, whatever deadline its caller
    /// sent (a shorter one applies too); past it DEADLINE_EXCEEDED, in milliseconds.
    #[arg(long = "request-timeout-ms", env = "REQUEST_TIMEOUT_MS", default_value = "10000", value_parser = millis(1))]
    pub request_timeout: Duration,

    /// Connections open at once on each of the gRPC and admin listeners; the
    /// ones over are closed as they arrive. Each holds a file descriptor:
    /// keep the sum well under the open-file limit (`ulimit -n`).
    #[arg(long = "max-connections", env = "MAX_CONNECTIONS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_connections: u32,

    /// Connections open at once from one client address, on each listener.
    /// Behind a proxy that does not keep the client's address every client
    /// shares the proxy's: raise it there.
    #[arg(long = "max-connections-per-peer", env = "MAX_CONNECTIONS_PER_PEER", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_connections_per_peer: u32,

    /// How long a new connection has to send its first bytes (the HTTP/2
    /// preface and first frame, or the TLS hello), in milliseconds.
    #[arg(long = "connection-preface-timeout-ms", env = "CONNECTION_PREFACE_TIMEOUT_MS", default_value = "5000", value_parser = millis(1))]
    pub connection_preface_timeout: Duration,

    /// A connection from which nothing arrives for this long is closed, in
    /// seconds. Live clients answer the server's keepalive pings every 30 s.
    #[arg(long = "connection-idle-timeout-secs", env = "CONNECTION_IDLE_TIMEOUT_SECS", default_value = "120", value_parser = seconds(31))]
    pub connection_idle_timeout: Duration,

    /// File holding the bearer token `/metrics` requires
    /// (`Authorization: Bearer <token>`, Prometheus's `authorization.credentials_file`).
    /// Without it `/metrics` answers anyone who reaches `METRICS_ADDR`.
    #[arg(long, env = "METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,

    /// Key of the MAC that makes page tokens tamper-evident, instead of the
    /// random one the migrations keep in the database (which every instance
    /// shares without this). Every instance must have the same.
    #[arg(long, env = "PAGE_TOKEN_SECRET", hide_env_values = true)]
    pub page_token_secret: Option<Secret>,

    /// Earlier `PAGE_TOKEN_SECRET`s whose tokens are still accepted while a
    /// new one is rolled out, comma-separated.
    #[arg(
        long,
        env = "PAGE_TOKEN_PREVIOUS_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub page_token_previous_secrets: Vec<Secret>,

    /// How long shutdown waits for in-flight requests, in seconds.
    #[arg(long = "shutdown-grace-secs", env = "SHUTDOWN_GRACE_SECS", default_value = "10", value_parser = seconds(0))]
    pub shutdown_grace: Duration,
}

/// Who may call: bearer tokens, static or JWT (see `api::auth`). With none
/// of them set every call is allowed, and so the service listens on loopback
/// addresses only, unless `INSECURE_ALLOW_UNAUTHENTICATED` says otherwise.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthConfig {
    /// File of static tokens: one per line, `<sha256 hex of the token> <roles>`,
    /// roles comma-separated from read, write, admin.
    #[arg(long, env = "AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Shared secret (at least 32 bytes) of HS256-signed JWTs.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub auth_jwt_secret: Option<Secret>,

    /// PEM public key of RS256 (RSA) or ES256 (EC P-256) signed JWTs.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub auth_jwt_public_key_file: Option<PathBuf>,

    /// JWK set file (`{"keys": [...]}`, as an identity provider publishes at
    /// its `jwks_uri`) of public keys: a JWT's `kid` header selects its key.
    /// Re-read when it changes and on SIGHUP, so a new key can be added
    /// before it signs and the old one removed after its tokens expired.
    #[arg(long, env = "AUTH_JWKS_FILE")]
    pub auth_jwks_file: Option<PathBuf>,

    /// Issuer (`iss`) a JWT must name, if set.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,

    /// Audience (`aud`) a JWT must name. Required with a JWT key, unless
    /// `AUTH_JWT_ANY_AUDIENCE` says tokens minted for anyone are accepted.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,

    /// Accept JWTs whatever their audience (without `AUTH_JWT_AUDIENCE`).
    #[arg(long, env = "AUTH_JWT_ANY_AUDIENCE", default_value_t = false, action = ArgAction::Set)]
    pub auth_jwt_any_audience: bool,

    /// Longest a JWT may be valid for: `exp - iat`, in seconds (`iat` is required).
    #[arg(long = "auth-jwt-max-lifetime-secs", env = "AUTH_JWT_MAX_LIFETIME_SECS", default_value = "86400", value_parser = seconds(1))]
    pub auth_jwt_max_lifetime: Duration,

    /// Serve without authentication on addresses other than loopback: anyone
    /// who can reach the port can read, write and flush the cache.
    #[arg(long, env = "INSECURE_ALLOW_UNAUTHENTICATED", default_value_t = false, action = ArgAction::Set)]
    pub insecure_allow_unauthenticated: bool,
}

/// Logs and traces: for every subcommand.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Telemetry")]
pub struct TelemetryConfig {
    /// `text` for people, `json` for log collectors: one object per line,
    /// with the fields of the span it happened in (the trace id among them).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// OTLP/gRPC endpoint of an OpenTelemetry collector (`http://host:4317`):
    /// set, spans of every RPC and of its Redis and PostgreSQL calls are
    /// exported there, under the caller's W3C `traceparent` when it sent one.
    /// The SDK's own `OTEL_*` variables (sampler, batch sizes) apply too.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", hide_env_values = true, global = true)]
    pub otlp_endpoint: Option<SecretUrl>,

    /// `service.name` of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "readthrough", global = true)]
    pub service_name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A duration given as a whole number of milliseconds, at least `min`.
fn millis(min: u64) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64).range(min..).map(Duration::from_millis)
}

/// A duration given as a whole number of seconds, at least `min`.
fn seconds(min: u64) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64).range(min..).map(Duration::from_secs)
}

fn parse_role(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 63
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !raw.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(raw.to_string())
    } else {
        Err(
            "must be a PostgreSQL role name: 1 to 63 characters of A-Z, a-z, 0-9 and '_', not starting with a digit"
                .to_string(),
        )
    }
}

fn parse_namespace(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(raw.to_string())
    } else {
        Err("must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.'".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_urls_hide_credentials() {
        let url = SecretUrl("postgres://app:hunter2@db:5432/rt".to_string());
        let shown = format!("{url:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db:5432/rt"), "{shown}");
    }

    #[test]
    fn secret_query_parameters_are_hidden_and_the_rest_kept() {
        let url = SecretUrl(
            "postgres://db/rt?sslmode=verify-full&password=p1&sslpassword=p2&auth_token=p3&sslrootcert=/ca.pem"
                .to_string(),
        );
        assert_eq!(
            format!("{url:?}"),
            "\"postgres://db/rt?sslmode=verify-full&password=***&sslpassword=***&auth_token=***&sslrootcert=/ca.pem\""
        );
        assert_eq!(redact_url("rediss://:p4@cache:6380/0"), "rediss://***@cache:6380/0");
    }

    #[test]
    fn secrets_are_not_printed() {
        let secret: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{secret:?}"), "\"***\"");
    }

    #[test]
    fn the_database_name_replaces_the_one_in_the_url() {
        let mut config = Config::from_env().database;
        config.url = "postgres://u:p@db:5433/app?sslmode=disable".parse().unwrap();
        assert_eq!(config.connect_options().unwrap().get_database(), Some("app"));
        config.name = Some("t1".to_string());
        let options = config.connect_options().unwrap();
        assert_eq!(options.get_database(), Some("t1"));
        assert_eq!((options.get_host(), options.get_port()), ("db", 5433));
    }

    #[test]
    fn namespace_rejects_hash_tag_braces() {
        assert!(parse_namespace("rt-test.1").is_ok());
        assert!(parse_namespace("rt{x}").is_err());
        assert!(parse_namespace("").is_err());
    }
}
