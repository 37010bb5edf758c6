//! What an operator sees of the service: RPC metrics for every call a
//! listener answers, by service, method and canonical gRPC code.

use std::{sync::Arc, time::Duration};

use readthrough::cache::Hooks;
use readthrough_client::proto::{GetUserRequest, user_service_client::UserServiceClient};
use tonic::Code;
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_client::HealthClient},
};

use readthrough_testkit::{
    OwnRedis, eventually, own_postgres::OwnPostgres, spawn_app, spawn_app_with, spawn_app_with_hooks, use_database,
};

fn rpc_count(service: &str, method: &str, code: &str) -> String {
    format!(r#"readthrough_rpc_duration_seconds_count{{service="{service}",method="{method}",code="{code}"}}"#)
}

#[tokio::test]
async fn every_call_is_counted_by_service_method_and_canonical_code() {
    let mut app = spawn_app().await;
    let user = app.create_user("counted@example.com").await;
    app.get_user(&user.id).await;
    let missing = GetUserRequest {
        id: uuid::Uuid::new_v4().to_string(),
    };
    let status = app.users.get_user(missing.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", app.grpc_port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    health.check(HealthCheckRequest::default()).await.unwrap();
    // The admin listener serves no user calls: refused before any handler.
    let mut on_admin = UserServiceClient::connect(format!("http://127.0.0.1:{}", app.admin_port))
        .await
        .unwrap();
    assert_eq!(
        on_admin.get_user(missing).await.unwrap_err().code(),
        Code::Unimplemented
    );

    let users = "readthrough.v1.UserService";
    let counts = app
        .metrics(&[
            &rpc_count(users, "CreateUser", "OK"),
            &rpc_count(users, "GetUser", "OK"),
            &rpc_count(users, "GetUser", "NOT_FOUND"),
            &rpc_count("grpc.health.v1.Health", "Check", "OK"),
            &rpc_count(users, "GetUser", "UNIMPLEMENTED"),
        ])
        .await;
    assert_eq!(counts, [1.0, 1.0, 1.0, 1.0, 1.0]);
}

#[tokio::test]
async fn a_call_its_client_gives_up_on_counts_as_cancelled() {
    // Every fill takes a second: the call is still running when its client stops waiting.
    let hooks = Hooks {
        before_fill: Some(Arc::new(|_key: &str| {
            Box::pin(tokio::time::sleep(Duration::from_secs(1)))
        })),
        ..Hooks::default()
    };
    let app = spawn_app_with_hooks(hooks, |_| {}).await;
    let user = app.create_user("impatient@example.com").await;
    app.outbox_drained().await;
    // Dropped after 100 ms, without a deadline the server would act on: the stream is reset.
    let call = app.client.get_user(&user.id);
    assert!(tokio::time::timeout(Duration::from_millis(100), call).await.is_err());

    let sample = rpc_count("readthrough.v1.UserService", "GetUser", "CANCELLED");
    let counted = eventually(Duration::from_secs(3), || async { app.metric(&sample).await == 1.0 }).await;
    assert!(counted, "the abandoned call is counted as CANCELLED");
}

#[tokio::test]
async fn redis_and_postgres_latency_the_pools_the_outbox_and_the_build_are_exported() {
    let app = spawn_app().await;
    let user = app.create_user("measured@example.com").await;
    app.get_user(&user.id).await;
    app.get_user(&user.id).await;
    app.outbox_drained().await;

    let [redis_gets, inserts] = app
        .metrics(&[
            r#"readthrough_redis_duration_seconds_count{operation="get"}"#,
            r#"readthrough_db_duration_seconds_count{query="user.insert"}"#,
        ])
        .await[..]
    else {
        unreachable!("two samples")
    };
    assert!(redis_gets >= 2.0, "each read's GET is timed: {redis_gets}");
    assert_eq!(inserts, 1.0, "the insert is timed");
    let version = format!(r#"readthrough_build_info{{version="{}"}} 1"#, env!("CARGO_PKG_VERSION"));
    let gauges = [
        version.as_str(),
        r#"readthrough_db_pool_connections{state="idle"}"#,
        r#"readthrough_db_pool_connections{state="in_use"}"#,
        "readthrough_redis_connections_up 2",
        "readthrough_outbox_backlog_rows 0",
        "readthrough_outbox_oldest_seconds 0",
    ];
    // The gauges are set every second.
    let exported = eventually(Duration::from_secs(3), || async {
        let text = app.metrics_text().await;
        gauges
            .iter()
            .all(|gauge| text.lines().any(|line| line.starts_with(gauge)))
    })
    .await;
    assert!(
        exported,
        "every gauge is exported: {gauges:?}\n{}",
        app.metrics_text().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_only_when_neither_postgres_nor_the_cache_answers() {
    let postgres = OwnPostgres::init(&[], &[]).await;
    let mut redis = OwnRedis::start().await;
    let (database_url, redis_url) = (postgres.url("readthrough"), redis.url.clone());
    let app = spawn_app_with(|config| {
        use_database(config, &database_url);
        config.backends.cache.redis_url = redis_url.parse().unwrap();
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", app.grpc_port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    let becomes = |status: ServingStatus, postgres_up: f64, redis_up: f64| {
        let (app, health) = (&app, health.clone());
        async move {
            let reached = eventually(Duration::from_secs(10), || {
                let mut health = health.clone();
                async move {
                    let now = health
                        .check(HealthCheckRequest::default())
                        .await
                        .unwrap()
                        .into_inner()
                        .status;
                    let up = app
                        .metrics(&[
                            r#"readthrough_dependency_up{dependency="postgres"}"#,
                            r#"readthrough_dependency_up{dependency="redis"}"#,
                        ])
                        .await;
                    now == status as i32 && up == [postgres_up, redis_up]
                }
            })
            .await;
            assert!(
                reached,
                "health {status:?} with postgres {postgres_up}, redis {redis_up}"
            );
        }
    };
    becomes(ServingStatus::Serving, 1.0, 1.0).await;
    postgres.stop().await;
    becomes(ServingStatus::Serving, 0.0, 1.0).await;
    redis.kill();
    becomes(ServingStatus::NotServing, 0.0, 0.0).await;
    redis.start_again().await;
    becomes(ServingStatus::Serving, 0.0, 1.0).await;
    postgres.start().await;
    becomes(ServingStatus::Serving, 1.0, 1.0).await;
}
