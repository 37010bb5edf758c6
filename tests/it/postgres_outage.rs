//! PostgreSQL stopped under a running app (a server of the test's own):
//! cached reads go on, misses and writes fail fast with UNAVAILABLE, and once
//! PostgreSQL is back the app recovers by itself.

use std::time::{Duration, Instant};

use readthrough::{
    domain::UserId,
    proto::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient},
};
use tonic::{Code, transport::Channel};

use crate::{
    helpers::{eventually, rename_user, spawn_app_with, use_database},
    own_postgres::OwnPostgres,
};

/// Longest a miss or a write may take to fail while PostgreSQL is down.
const FAIL_FAST: Duration = Duration::from_secs(2);
/// Longest the app may take to serve misses and writes again once PostgreSQL is back.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_cached_reads_succeed_and_the_rest_fails_fast_until_it_is_back() {
    let postgres = OwnPostgres::init(&[], &[]).await;
    let url = postgres.url("readthrough");
    let mut app = spawn_app_with(|config| use_database(config, &url)).await;
    let mut warm = Vec::new();
    for i in 0..20 {
        warm.push(app.create_user(&format!("warm-{i}@example.com")).await.id);
    }
    let cold = app.create_user("cold@example.com").await.id;
    app.outbox_drained().await;
    let mut users = app.users.clone();
    for id in &warm {
        get_user(&mut users, id).await.expect("a warm-up read");
        let key = app.keys.user(UserId::parse(id).unwrap());
        assert!(app.exists(&key).await, "{key} is cached");
    }

    postgres.stop().await;

    let mut slowest_hit = Duration::ZERO;
    for _ in 0..5 {
        for id in &warm {
            let started = Instant::now();
            get_user(&mut users, id)
                .await
                .expect("a cached user is served while PostgreSQL is down");
            slowest_hit = slowest_hit.max(started.elapsed());
        }
    }
    let never_created = uuid::Uuid::new_v4().to_string();
    let miss = timed(get_user(&mut users, &cold)).await;
    let absent_miss = timed(get_user(&mut users, &never_created)).await;
    let create = timed(async {
        users
            .clone()
            .create_user(CreateUserRequest {
                email: "during-outage@example.com".into(),
                preferences: None,
            })
            .await
            .map(drop)
    })
    .await;
    let update = timed(async {
        users
            .clone()
            .update_user(rename_user(&warm[0], "renamed@example.com"))
            .await
            .map(drop)
    })
    .await;
    println!("PostgreSQL down: 100 cached reads, slowest {slowest_hit:?}");
    for (what, (result, elapsed)) in [
        ("miss", &miss),
        ("miss on an absent id", &absent_miss),
        ("CreateUser", &create),
        ("UpdateUser", &update),
    ] {
        println!("PostgreSQL down: {what} failed after {elapsed:?}: {result:?}");
        let code = result.as_ref().expect_err(what).code();
        assert_eq!(code, Code::Unavailable, "{what}: {result:?}");
        assert!(*elapsed < FAIL_FAST, "{what} took {elapsed:?}");
    }

    postgres.start().await;
    let restarted = Instant::now();
    let recovered = eventually(RECOVERY_LIMIT, || {
        let mut users = users.clone();
        let (cold, warm) = (cold.clone(), warm[0].clone());
        async move {
            let miss = get_user(&mut users, &cold).await.is_ok();
            let write = users.update_user(rename_user(&warm, "back@example.com")).await.is_ok();
            miss && write
        }
    })
    .await;
    println!(
        "PostgreSQL back: misses and writes served again after {:?}",
        restarted.elapsed()
    );
    assert!(
        recovered,
        "the app serves misses and writes within {RECOVERY_LIMIT:?} of PostgreSQL's return"
    );
}

async fn get_user(users: &mut UserServiceClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    users.get_user(GetUserRequest { id: id.to_string() }).await.map(drop)
}

async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let result = call.await;
    (result, started.elapsed())
}
