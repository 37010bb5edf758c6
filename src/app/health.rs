//! The health service: what it reports, and the watch over PostgreSQL and
//! the cache that decides it.

use std::time::Duration;

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{CacheAdminApi, ProductApi, UserApi},
    proto::{
        cache_admin_service_server::CacheAdminServiceServer, product_service_server::ProductServiceServer,
        user_service_server::UserServiceServer,
    },
    service::Services,
    store,
};

/// How often the dependencies are checked for health.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Checks PostgreSQL and the cache every `HEALTH_INTERVAL`: each one's state
/// is the gauge `readthrough_dependency_up{dependency}`, and a change is
/// logged. Health turns NOT_SERVING only when neither can answer: with
/// PostgreSQL down, cached reads are still served; with Redis down, every
/// read goes to PostgreSQL. A load balancer that took an instance out for
/// either would take out every instance at once, for an outage they share.
pub(super) async fn watch_dependencies(services: Services, health: HealthReporter) {
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
pub(super) async fn set_health(health: &HealthReporter, status: ServingStatus) {
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
