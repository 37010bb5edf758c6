//! PostgreSQL stopped under a running app (a server of the test's own):
//! cached reads go on, misses and writes fail fast with UNAVAILABLE, and once
//! PostgreSQL is back the app recovers by itself.

use std::time::{Duration, Instant};

use readthrough::domain::UserId;
use tonic::Code;

use readthrough_testkit::{email_change, eventually, own_postgres::OwnPostgres, spawn_app_with, use_database};

/// Longest a miss or a write may take to fail while PostgreSQL is down.
const FAIL_FAST: Duration = Duration::from_secs(2);
/// Longest the app may take to serve misses and writes again once PostgreSQL is back.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_cached_reads_succeed_and_the_rest_fails_fast_until_it_is_back() {
    let postgres = OwnPostgres::init(&[], &[]).await;
    let url = postgres.url("readthrough");
    let app = spawn_app_with(|config| use_database(config, &url)).await;
    let mut warm = Vec::new();
    for i in 0..20 {
        warm.push(app.create_user(&format!("warm-{i}@example.com")).await.id);
    }
    let cold = app.create_user("cold@example.com").await.id;
    app.outbox_drained().await;
    let client = app.client.clone();
    for id in &warm {
        let key = app.keys.user(UserId::parse(id).unwrap());
        assert!(
            app.read_until_cached(&key, || client.get_user(id)).await,
            "{key} is cached"
        );
    }

    postgres.stop().await;

    let mut slowest_hit = Duration::ZERO;
    for _ in 0..5 {
        for id in &warm {
            let started = Instant::now();
            client
                .get_user(id)
                .await
                .expect("a cached user is served while PostgreSQL is down");
            slowest_hit = slowest_hit.max(started.elapsed());
        }
    }
    let never_created = uuid::Uuid::new_v4().to_string();
    let miss = timed(async { client.get_user(&cold).await.map(drop) }).await;
    let absent_miss = timed(async { client.get_user(&never_created).await.map(drop) }).await;
    let create = timed(async { client.create_user("during-outage@example.com", None).await.map(drop) }).await;
    let update = timed(async { app.rename_user(&warm[0], "renamed@example.com").await.map(drop) }).await;
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
        let (client, cold, warm) = (client.clone(), cold.clone(), warm[0].clone());
        async move {
            let miss = client.get_user(&cold).await.is_ok();
            let write = client.update_user(email_change(&warm, "back@example.com"), &["email"], 0);
            miss && write.await.is_ok()
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

async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let result = call.await;
    (result, started.elapsed())
}
