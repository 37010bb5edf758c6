//! Admission control at the gRPC edge: at most `max_in_flight` requests are
//! worked on at once; the rest wait in line (first come, first served) and are
//! turned away with RESOURCE_EXHAUSTED after `queue_timeout`.
//!
//! Why: when the process is short of CPU, every runnable request competes for
//! it, and a Redis reply that has arrived waits behind them all. Past the
//! Redis deadline the cache counts as down and each request goes to
//! PostgreSQL, which costs more CPU still: a cascade. Bounding the work in
//! progress keeps the wait for CPU inside a request short, so the deadline
//! measures Redis, and the queueing happens here, before a request starts,
//! where it costs nothing but memory. Health checks skip the line.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
}

impl AdmissionLayer {
    pub fn new(max_in_flight: usize, queue_timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            queue_timeout,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            permits: self.permits.clone(),
            queue_timeout: self.queue_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
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
        if request.uri().path().starts_with(HEALTH_PATH) {
            return Box::pin(inner.call(request));
        }
        let (permits, queue_timeout) = (self.permits.clone(), self.queue_timeout);
        Box::pin(async move {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => match tokio::time::timeout(queue_timeout, permits.acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        metrics::counter!("readthrough_requests_shed_total").increment(1);
                        return Ok(Status::resource_exhausted("server busy; retry with backoff").into_http());
                    }
                },
            };
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}
