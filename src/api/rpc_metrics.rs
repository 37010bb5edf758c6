//! RPC metrics, from one tower layer in front of everything a listener
//! serves: `readthrough_rpc_duration_seconds{service,method,code}`, from a
//! request's arrival to the end of its response (trailers included), with
//! the gRPC code by its canonical name (`NOT_FOUND`). So health checks,
//! reflection and calls the edge turns away (authentication, admission) are
//! counted too, and no handler has to remember to.
//!
//! The code of a handled call arrives in the response's trailers; a call
//! refused before a handler has it in its headers (a trailers-only
//! response). A call dropped before its status was read (the client reset
//! the stream, or went away) counts as `CANCELLED`. (A request whose body
//! the client abandons before tonic has read it gets tonic's own answer,
//! `UNKNOWN`, which the client never sees: load generators cause a few of
//! each when they stop.)
//!
//! The layer also opens each call's span (see `telemetry::traces`): the
//! caller's `traceparent` is its parent, and it stays open until the
//! response's last frame, so a trace shows the whole call.

use std::{
    cell::RefCell,
    collections::HashMap,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use futures_util::future::BoxFuture;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use metrics::Histogram;
use opentelemetry::trace::TraceId;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

use super::methods;
use crate::telemetry::traces;

/// The span of one RPC, at `$level`, with the OpenTelemetry attributes of
/// a gRPC server call; the code and trace id are recorded later.
macro_rules! rpc_span {
    ($level:expr, $service:expr, $method:expr) => {
        tracing::span!(
            $level,
            "rpc",
            otel.name = format!("{}/{}", $service, $method),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = $service,
            rpc.method = $method,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        )
    };
}
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S> Service<http::Request<Body>> for RpcMetrics<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let &methods::Method {
            service, name: method, ..
        } = methods::of(request.uri().path());
        let parent = traces::remote_parent(request.headers());
        // At debug level unless the call is traced: at info, a span per call
        // costs more than a cache hit's own work.
        let span = if parent.is_some() || traces::exporting() {
            rpc_span!(tracing::Level::INFO, service, method)
        } else {
            rpc_span!(tracing::Level::DEBUG, service, method)
        };
        let trace_id = traces::join(&span, parent);
        if let Some(trace_id) = trace_id {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        let response = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            // Recorded as CANCELLED if this future is dropped first.
            let mut call = Call {
                service,
                method,
                started,
                code: None,
                recorded: false,
                span,
                trace_id,
            };
            let response = response.await?;
            let (parts, body) = response.into_parts();
            call.code = code_in(&parts.headers);
            let timed = Timed { inner: body, call };
            Ok(http::Response::from_parts(parts, Body::new(timed)))
        })
    }
}

/// A response body that records its call when it ends, or as CANCELLED
/// when it is dropped before its status was read (the client went away).
struct Timed {
    inner: Body,
    call: Call,
}

/// One call, recorded once: when it ends or, failing that, when dropped.
struct Call {
    service: &'static str,
    method: &'static str,
    started: Instant,
    /// The status code, once the headers or trailers told it.
    code: Option<Code>,
    recorded: bool,
    /// Open until the call ends, so a trace shows the whole call.
    span: tracing::Span,
    trace_id: Option<TraceId>,
}

impl Call {
    fn record(&mut self, otherwise: Code) {
        if !self.recorded {
            self.recorded = true;
            let code = self.code.unwrap_or(otherwise);
            let elapsed = self.started.elapsed();
            duration(self.service, self.method, code).record(elapsed.as_secs_f64());
            self.span.record("rpc.grpc.status_code", code as i64);
            if server_fault(code) {
                self.span.record("otel.status_code", "ERROR");
            }
            tracing::debug!(
                service = self.service,
                method = self.method,
                code = code_name(code),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                trace_id = self.trace_id.map(tracing::field::display),
                "rpc"
            );
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

impl HttpBody for Timed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(code_in) {
                    self.call.code = Some(code);
                }
            }
            Some(Err(status)) => self.call.code = Some(status.code()),
            // The end, with no status: a broken response.
            None => self.call.record(Code::Unknown),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `code` says the server failed, not the caller (OpenTelemetry's
/// rule for the status of gRPC server spans).
fn server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The `grpc-status` in headers or trailers, when there is one.
fn code_in(headers: &HeaderMap) -> Option<Code> {
    let status = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(status))
}

/// The latency histogram of a call, looked up by name once per thread rather
/// than on every call.
fn duration(service: &'static str, method: &'static str, code: Code) -> Histogram {
    thread_local! {
        static HANDLES: RefCell<HashMap<(&'static str, &'static str, Code), Histogram>> = RefCell::new(HashMap::new());
    }
    HANDLES.with_borrow_mut(|handles| {
        handles
            .entry((service, method, code))
            .or_insert_with(|| {
                metrics::histogram!(
                    "readthrough_rpc_duration_seconds",
                    "service" => service,
                    "method" => method,
                    "code" => code_name(code),
                )
            })
            .clone()
    })
}

/// A gRPC code's canonical name, as the gRPC specification spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_go_by_their_canonical_names() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_in(&HeaderMap::new()), None);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(code_in(&trailers), Some(Code::NotFound));
    }
}
