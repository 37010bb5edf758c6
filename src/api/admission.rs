//! Admission control at the gRPC edge: the work in progress is bounded, the
//! rest waits in line (first come, first served) and is turned away with
//! RESOURCE_EXHAUSTED after `queue_timeout`; an admitted request gets
//! DEADLINE_EXCEEDED past `request_timeout`, whatever deadline its caller sent.
//!
//! Why: when the process is short of CPU, every runnable request competes for
//! it, and so does Redis on the same machine; a reply waits behind them all.
//! Past the Redis deadline the cache counts as down and each request goes to
//! PostgreSQL, which costs more CPU still: a cascade. Bounding the work in
//! progress keeps the wait for CPU inside a request short, so the deadline
//! measures Redis, and the queueing happens here, before a request starts,
//! where it costs nothing but memory. Health checks skip the line.
//!
//! Work is counted in units of about one cached read's CPU: a call costs the
//! units of its method (`methods::Cost`), so one limit admits many cheap reads at
//! once (which also lets HTTP/2 write their responses together) but only a
//! few page reads, each of which decodes and encodes a hundred products.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use super::methods::{self, Cost};

#[derive(Clone)]
pub struct AdmissionLayer {
    units: Arc<Semaphore>,
    limit: u32,
    queue_timeout: Duration,
    request_timeout: Duration,
}

impl AdmissionLayer {
    /// `limit`: units in progress at once. A call costs at most `limit`, so
    /// any call fits alone, however small the limit.
    pub fn new(limit: u32, queue_timeout: Duration, request_timeout: Duration) -> Self {
        let limit = limit.max(1);
        Self {
            units: Arc::new(Semaphore::new(limit as usize)),
            limit,
            queue_timeout,
            request_timeout,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

impl<S> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this request (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cost = match methods::of(request.uri().path()).cost {
            Cost::Free => return Box::pin(inner.call(request)),
            Cost::Units(units) => units.min(self.layer.limit),
        };
        let (pool, queue_timeout, request_timeout) = (
            self.layer.units.clone(),
            self.layer.queue_timeout,
            self.layer.request_timeout,
        );
        Box::pin(async move {
            let permit = match pool.clone().try_acquire_many_owned(cost) {
                Ok(permit) => permit,
                Err(_) => match tokio::time::timeout(queue_timeout, pool.acquire_many_owned(cost)).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        metrics::counter!("readthrough_requests_shed_total").increment(1);
                        return Ok(Status::resource_exhausted("server busy; retry with backoff").into_http());
                    }
                },
            };
            let response = match tokio::time::timeout(request_timeout, inner.call(request)).await {
                Ok(response) => response,
                Err(_) => Ok(Status::deadline_exceeded("the server's request deadline passed").into_http()),
            };
            drop(permit);
            response
        })
    }
}
