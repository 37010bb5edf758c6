//! Logs (`tracing`, filtered by `RUST_LOG`), traces (OpenTelemetry, see
//! `traces`) and Prometheus metrics.

mod filters;
pub mod traces;

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{Stream, StreamExt};
use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::Histogram;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing_subscriber::{EnvFilter, Layer, filter::filter_fn, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use self::filters::AskEveryTime;
pub use self::traces::Tracing;
use crate::config::{LogFormat, TelemetryConfig, same_digest};

/// Latency buckets in seconds: from a cache hit (sub-millisecond) to a slow database read.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A client must send its request headers within this, or the connection is
/// closed: a scrape is one short request.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a metrics connection stays open.
const METRICS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise, as text or JSON
/// lines (`LOG_FORMAT`); and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
/// spans to an OpenTelemetry collector (see `traces`). Call it inside the
/// Tokio runtime, which exports the spans; a second call changes nothing.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<Tracing> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = fmt::layer().with_writer(std::io::stderr);
    let logs = match config.log_format {
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(AskEveryTime(filter))
            .boxed(),
        LogFormat::Text => logs.with_filter(AskEveryTime(filter)).boxed(),
    };
    let (spans, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let provider = traces::provider(endpoint.expose(), &config.service_name)?;
            let tracer = provider.tracer("readthrough");
            // Spans only (events stay in the logs), this crate's only, at
            // every level: whatever RUST_LOG says about the logs.
            let ours = filter_fn(|meta| meta.is_span() && meta.target().starts_with("readthrough"));
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(AskEveryTime(ours));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    let installed = tracing_subscriber::registry().with(logs).with(spans).try_init().is_ok();
    if installed && provider.is_some() {
        traces::EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(Tracing {
        provider: provider.filter(|_| installed),
    })
}

/// A histogram with one label, looked up once per thread rather than on
/// every call (a lookup in the registry hashes the key and takes a lock).
/// `label` is the same for every use of a `name`.
pub fn histogram(name: &'static str, label: &'static str, value: &'static str) -> Histogram {
    thread_local! {
        static HANDLES: RefCell<HashMap<(&'static str, &'static str), Histogram>> = RefCell::new(HashMap::new());
    }
    HANDLES.with_borrow_mut(|handles| {
        handles
            .entry((name, value))
            .or_insert_with(|| metrics::histogram!(name, label => value))
            .clone()
    })
}

/// The process-wide metrics recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        metrics::gauge!("readthrough_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

/// Serves the Prometheus text format on `GET /metrics` to each of
/// `connections` until the task is dropped (the listener bounds how many
/// there are and how long they may say nothing). With `token`, a scrape
/// must send `Authorization: Bearer <token>`; `token` is its SHA-256.
pub async fn serve_metrics<S, C>(connections: S, token: Option<[u8; 32]>)
where
    S: Stream<Item = std::io::Result<C>>,
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handle = metrics_handle();
    tokio::pin!(connections);
    // Histograms are aggregated lazily; upkeep keeps their memory bounded between scrapes.
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let stream = tokio::select! {
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
            accepted = connections.next() => match accepted {
                Some(Ok(stream)) => stream,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        tokio::spawn(async move {
            let service = service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                if token.is_some_and(|token| !bearer_matches(&request, &token)) {
                    Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .header("www-authenticate", "Bearer")
                        .body(Full::new(Bytes::from(
                            "a bearer token is required (METRICS_TOKEN_FILE)\n",
                        )))
                } else if request.uri().path() == "/metrics" {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(handle.render())))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from("see /metrics\n")))
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, connection).await;
        });
    }
}

/// Whether `request` carries the bearer token whose SHA-256 is `token`,
/// compared in time that does not depend on where they differ.
fn bearer_matches(request: &hyper::Request<hyper::body::Incoming>, token: &[u8; 32]) -> bool {
    let Some(presented) = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
    same_digest(&digest, token)
}

/// Lets one log line through per interval and counts the ones held back, so
/// that a failure repeating on every request logs once per interval.
#[derive(Default)]
pub struct Throttle {
    last_passed: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl Throttle {
    /// `Some(n)` when a line may be logged now, `n` being how many were held
    /// back since the last one; `None` when this one is held back.
    pub fn pass(&self, interval: Duration) -> Option<u64> {
        let mut last = self.last_passed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|at| at.elapsed() < interval) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}
