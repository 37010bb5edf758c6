//! Running Redis commands so that they fail open: every call has a deadline,
//! and a failed or slow call returns `None`, so the caller answers from
//! PostgreSQL instead. After a run of failures the circuit breaker (see
//! `breaker`) skips Redis altogether until a probe finds it answering again.
//! Failures are counted per operation and logged at most once per
//! `LOG_INTERVAL`, so an outage does not turn into a log line per request.

use std::{future::Future, sync::Arc, time::Duration};

use deadpool_redis::redis::{
    self, ErrorKind, RetryMethod, ServerErrorKind,
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo},
};
use tracing::Instrument;

use super::{
    breaker::{Admission, Breaker, Probe, Unavailable},
    connections::{self, Connections, Handle},
    load_scripts,
};
use crate::telemetry::Throttle;

const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Sends commands on the shared connections, within a deadline, behind the
/// breaker (requests' calls) or without one (background work).
pub(super) struct Executor {
    pub connections: Arc<Connections>,
    /// The deadline of requests' calls; background calls set their own.
    pub timeout: Duration,
    errors: ErrorLog,
    breaker: Option<Arc<Breaker>>,
}

impl Executor {
    pub fn new(connections: Arc<Connections>, timeout: Duration, breaker: Option<Arc<Breaker>>) -> Self {
        Self {
            connections,
            timeout,
            errors: ErrorLog::default(),
            breaker,
        }
    }

    /// Logs a failure of `operation` (throttled, see `ErrorLog`).
    pub fn report(&self, operation: &str, error: &str) {
        self.errors.report(operation, error);
    }

    /// Whether the circuit breaker is letting commands through (closed);
    /// always, for background work.
    pub fn breaker_closed(&self) -> bool {
        self.breaker
            .as_ref()
            .is_none_or(|breaker| breaker.state() == super::breaker::State::Closed)
    }

    pub async fn run<T: redis::FromRedisValue>(&self, operation: &'static str, cmd: &redis::Cmd) -> Option<T> {
        self.send(operation, Request::Cmd(cmd), self.timeout).await
    }

    pub async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        pipe: &redis::Pipeline,
    ) -> Option<T> {
        self.send(operation, Request::Pipeline(pipe), self.timeout).await
    }

    pub async fn run_pipe_within<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        pipe: &redis::Pipeline,
        timeout: Duration,
    ) -> Option<T> {
        self.send(operation, Request::Pipeline(pipe), timeout).await
    }

    /// Sends `request` on one of the connections within `timeout`. A server
    /// that answers NOSCRIPT has lost the scripts: they are loaded again, and
    /// the request is sent once more (its commands are safe to repeat).
    async fn send<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        request: Request<'_>,
        timeout: Duration,
    ) -> Option<T> {
        self.with_deadline(operation, timeout, async {
            let mut checked = self.connections.get().ok_or_else(Failure::not_connected)?;
            let mut sent = request.send::<T>(&mut checked.connection).await;
            if sent
                .as_ref()
                .is_err_and(|error| error.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
            {
                load_scripts(&mut checked.connection)
                    .await
                    .map_err(|error| self.failed(&checked, error))?;
                sent = request.send::<T>(&mut checked.connection).await;
            }
            sent.map_err(|error| self.failed(&checked, error))
        })
        .await
    }

    fn failed(&self, checked: &connections::Checked, error: redis::RedisError) -> Failure {
        self.connections.report_error(checked, &error);
        Failure {
            unavailable: means_unavailable(&error),
            message: error.to_string(),
        }
    }

    async fn with_deadline<T>(
        &self,
        operation: &'static str,
        timeout: Duration,
        call: impl Future<Output = Result<T, Failure>>,
    ) -> Option<T> {
        if let Some(breaker) = &self.breaker {
            match breaker.admit() {
                Admission::Run => {}
                Admission::Skip => return skipped(operation),
                Admission::Probe(probe) => {
                    self.spawn_probe(probe);
                    return skipped(operation);
                }
            }
        }
        let started = std::time::Instant::now();
        let span = tracing::debug_span!(
            "redis",
            otel.kind = "client",
            db.system = "redis",
            db.operation = operation
        );
        let outcome = tokio::time::timeout(timeout, call).instrument(span).await;
        crate::telemetry::histogram("readthrough_redis_duration_seconds", "operation", operation)
            .record(started.elapsed().as_secs_f64());
        let (failure, how) = match outcome {
            Ok(Ok(value)) => {
                if let Some(breaker) = &self.breaker {
                    breaker.succeeded();
                }
                return Some(value);
            }
            Ok(Err(failure)) => (failure, Unavailable::Error),
            Err(_) => {
                if self.breaker.is_none() {
                    self.connections.replace_all();
                }
                let failure = Failure {
                    unavailable: true,
                    message: format!("timed out after {timeout:?}"),
                };
                (failure, Unavailable::Deadline)
            }
        };
        if let Some(breaker) = &self.breaker {
            if failure.unavailable {
                breaker.failed(how);
            } else {
                // Redis answered, with an error about this command alone.
                breaker.succeeded();
            }
        }
        metrics::counter!("readthrough_cache_errors_total", "operation" => operation).increment(1);
        self.errors.report(operation, &failure.message);
        None
    }

    /// PINGs Redis in the background, within the usual deadline, and tells
    /// the half-open breaker the outcome. No request waits for it.
    fn spawn_probe(&self, probe: Probe) {
        let (connections, timeout) = (self.connections.clone(), self.timeout);
        tokio::spawn(async move {
            let Some(mut checked) = connections.get() else {
                return probe.answered(false);
            };
            let ping = redis::cmd("PING");
            let answered =
                match tokio::time::timeout(timeout, ping.query_async::<redis::Value>(&mut checked.connection)).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(error)) => {
                        connections.report_error(&checked, &error);
                        false
                    }
                    // A silent connection may be half-open, with nobody at the other end
                    // any more: make a new one, which then probes again when it connects.
                    Err(_) => {
                        connections.replace(&checked);
                        false
                    }
                };
            probe.answered(answered);
        });
    }

    /// Runs `cmd` on one node of the cluster, within the deadline.
    pub async fn run_at<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        (host, port): &(String, u16),
        cmd: redis::Cmd,
    ) -> Option<T> {
        self.with_deadline(operation, self.timeout, async {
            let mut checked = self.connections.get().ok_or_else(Failure::not_connected)?;
            let Handle::Cluster(connection) = &mut checked.connection else {
                return Err(Failure::not_connected());
            };
            let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            let value = connection
                .route_command(cmd, at)
                .await
                .map_err(|error| self.failed(&checked, error))?;
            redis::from_redis_value(value).map_err(|error| Failure {
                unavailable: false,
                message: error.to_string(),
            })
        })
        .await
    }
}

/// Why a command got no value.
struct Failure {
    /// Redis is unreachable or cannot serve (as opposed to refusing this one command).
    unavailable: bool,
    message: String,
}

impl Failure {
    fn not_connected() -> Self {
        Self {
            unavailable: true,
            message: NOT_CONNECTED.to_string(),
        }
    }
}

/// A command or a pipeline (see `RedisClient::send`).
#[derive(Clone, Copy)]
enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipeline(&'a redis::Pipeline),
}

impl Request<'_> {
    async fn send<T: redis::FromRedisValue>(self, connection: &mut Handle) -> redis::RedisResult<T> {
        match self {
            Request::Cmd(cmd) => cmd.query_async(connection).await,
            Request::Pipeline(pipe) => pipe.query_async(connection).await,
        }
    }
}

/// A command the open breaker did not send: the caller fails open at once.
#[cold]
fn skipped<T>(operation: &'static str) -> Option<T> {
    metrics::counter!("readthrough_cache_skipped_total", "operation" => operation).increment(1);
    None
}

const NOT_CONNECTED: &str = "not connected (reconnecting)";

/// Whether an error means Redis cannot serve right now (the connection is
/// gone, or the server says it is loading, busy, down, or a replica now),
/// which counts towards opening the breaker; an error about the command
/// itself (a wrong type, a script error) does not.
fn means_unavailable(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || matches!(error.retry_method(), RetryMethod::WaitAndRetry)
        || (error.kind() == ErrorKind::Extension && error.code() == Some("BUSY"))
        || is_read_only(error)
}

/// The server has become a replica (a failover demoted it): writes there
/// fail, and the connection must be made again, to the new primary.
pub fn is_read_only(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// Logs the first Redis error of each interval and how many followed it unlogged.
#[derive(Default)]
struct ErrorLog(Throttle);

impl ErrorLog {
    fn report(&self, operation: &str, error: &str) {
        if let Some(suppressed) = self.0.pass(LOG_INTERVAL) {
            tracing::warn!(
                operation,
                error,
                suppressed,
                "redis unavailable; serving from PostgreSQL"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use deadpool_redis::redis::{ErrorKind, RedisError, ServerErrorKind};

    use super::means_unavailable;

    #[test]
    fn only_errors_that_say_redis_cannot_serve_count_towards_the_breaker() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(means_unavailable(&RedisError::from(reset)));
        assert!(means_unavailable(&RedisError::from((ErrorKind::Io, "broken pipe"))));
        let loading = ErrorKind::Server(ServerErrorKind::BusyLoading);
        assert!(means_unavailable(&RedisError::from((loading, "loading the dataset"))));

        let wrong_type = ErrorKind::Server(ServerErrorKind::ResponseError);
        assert!(!means_unavailable(&RedisError::from((wrong_type, "WRONGTYPE"))));
        let undecodable = ErrorKind::UnexpectedReturnType;
        assert!(!means_unavailable(&RedisError::from((
            undecodable,
            "not a bulk string"
        ))));
    }
}
