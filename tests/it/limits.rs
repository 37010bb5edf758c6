//! Bounded by default: request size, request and statement deadlines, and
//! database errors mapped to the status that tells the caller what to do.

use std::{sync::Arc, time::Duration};

use prost_types::{Struct, Value, value::Kind};
use readthrough::{cache::Hooks, store::StoreError};
use readthrough_client::proto::GetUserRequest;
use sqlx::{Connection, PgConnection};
use tonic::Code;

use readthrough_testkit::{RedisProxy, Sandbox, spawn_app, spawn_app_with, spawn_app_with_hooks};

fn preferences(key: &str, value: &str) -> Struct {
    Struct {
        fields: [(
            key.to_string(),
            Value {
                kind: Some(Kind::StringValue(value.to_string())),
            },
        )]
        .into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_a_preferences_key_or_value_is_invalid_argument() {
    let app = spawn_app().await;
    for bad in [preferences("a\0b", "x"), preferences("theme", "da\0rk")] {
        let status = app.client.create_user("nul@example.com", Some(bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("preferences:"), "{status:?}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_64_kib_is_refused_before_it_is_decoded() {
    let app = spawn_app().await;
    for size in [100 * 1024, 5 * 1024 * 1024] {
        let status = app.client.create_user(&"x".repeat(size), None).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{size} bytes: {status:?}");
    }
    // The largest valid request still fits: 16 KiB of preferences.
    let largest = preferences("blob", &"x".repeat(16 * 1024 - 20));
    app.client
        .create_user("big@example.com", Some(largest))
        .await
        .expect("16 KiB of preferences is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_its_timeout_is_unavailable_and_changes_nothing() {
    let app = spawn_app_with(|config| config.backends.database.statement_timeout = Duration::from_millis(200)).await;
    let user = app.create_user("locked@example.com").await;
    let mut holder = PgConnection::connect_with(&app.config.backends.database.connect_options().unwrap())
        .await
        .unwrap();
    let mut lock = holder.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM users WHERE id = $1::uuid FOR UPDATE")
        .bind(&user.id)
        .execute(&mut *lock)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let status = app.rename_user(&user.id, "waited@example.com").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    lock.rollback().await.unwrap();
    let email: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1::uuid")
        .bind(&user.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(email, "locked@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_server_deadline_is_deadline_exceeded() {
    let hooks = Hooks {
        before_fill: Some(Arc::new(|_key: &str| {
            Box::pin(tokio::time::sleep(Duration::from_secs(3)))
        })),
        ..Hooks::default()
    };
    let app = spawn_app_with_hooks(hooks, |config| {
        config.server.request_timeout = Duration::from_millis(300)
    })
    .await;
    let user = app.create_user("slow@example.com").await;
    let started = std::time::Instant::now();
    let status = app.client.get_user(&user.id).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_say_whether_to_fix_the_input_retry_or_wait() {
    let app = spawn_app().await;
    // Class 22 (data exception): bad input, whoever let it through.
    // The caller is told in the service's words, not PostgreSQL's.
    let error = sqlx::query(r#"SELECT '"\u0000"'::jsonb"#)
        .execute(&app.db)
        .await
        .unwrap_err();
    let told = match StoreError::from(error) {
        StoreError::Invalid(invalid) => invalid.to_string(),
        other => panic!("not Invalid: {other:?}"),
    };
    assert!(
        !told.contains("unsupported Unicode escape") && !told.contains("\\u0000"),
        "{told}"
    );
    let error = sqlx::query("SELECT convert_from('\\x00'::bytea, 'UTF8')")
        .execute(&app.db)
        .await
        .unwrap_err();
    let told = StoreError::from(error).to_string();
    assert!(
        !told.contains("0x00") && !told.contains("invalid byte sequence"),
        "{told}"
    );

    // 57014 (statement timeout): the database is overloaded, not the request wrong.
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("SET statement_timeout = 10")
        .execute(&mut *conn)
        .await
        .unwrap();
    let error = sqlx::query("SELECT pg_sleep(1)").execute(&mut *conn).await.unwrap_err();
    sqlx::query("RESET statement_timeout")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert!(matches!(StoreError::from(error), StoreError::Unavailable(_)));

    // 40P01 (deadlock): retry the transaction.
    for statement in [
        "CREATE TABLE locks (id int PRIMARY KEY)",
        "INSERT INTO locks VALUES (1), (2)",
    ] {
        sqlx::query(statement).execute(&app.db).await.unwrap();
    }
    let options = app.config.backends.database.connect_options().unwrap();
    let lock_in_order = |first: i32, second: i32| {
        let options = options.clone();
        async move {
            let mut conn = PgConnection::connect_with(&options).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM locks WHERE id = $1 FOR UPDATE")
                .bind(first)
                .execute(&mut *tx)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let outcome = sqlx::query("SELECT 1 FROM locks WHERE id = $1 FOR UPDATE")
                .bind(second)
                .execute(&mut *tx)
                .await;
            outcome.err()
        }
    };
    let (one, two) = tokio::join!(lock_in_order(1, 2), lock_in_order(2, 1));
    let deadlock = one
        .or(two)
        .expect("one of the two transactions is chosen as the deadlock victim");
    assert!(matches!(StoreError::from(deadlock), StoreError::Aborted(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_only_so_many_reads_go_to_postgres_and_the_rest_are_unavailable_after_a_deadline() {
    // PostgreSQL holds the first two fallbacks for longer than the others may wait.
    let (served, shed, metric) =
        fallbacks_while_users_are_locked(Duration::from_millis(50), Duration::from_millis(500)).await;
    assert_eq!(
        (served, shed),
        (2, 3),
        "two fallbacks at a time; the others turned away"
    );
    assert_eq!(metric, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_waiting_for_a_fallback_less_than_a_redis_deadline_are_served() {
    let (served, shed, metric) =
        fallbacks_while_users_are_locked(Duration::from_secs(5), Duration::from_millis(300)).await;
    assert_eq!(
        (served, shed),
        (5, 0),
        "the three waiting were served once the first two were"
    );
    assert_eq!(metric, 0.0);
}

/// Five concurrent reads while Redis is down (connections refused) and
/// users are locked in PostgreSQL for `locked`, with room for two fallbacks
/// and a Redis deadline of `redis_timeout`: how many were served, how
/// many turned away, and the shed metric.
async fn fallbacks_while_users_are_locked(redis_timeout: Duration, locked: Duration) -> (usize, usize, f64) {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let app = spawn_app_with(|config| {
        config.backends.cache.redis_url = url.parse().unwrap();
        config.backends.cache.redis_timeout = redis_timeout;
        config.backends.cache.fallback_limit = 2;
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(app.create_user(&format!("fallback{n}@example.com")).await.id);
    }
    proxy.cut();
    // Reads of users block behind this lock until it is released: the first
    // two fallbacks stay busy while the others arrive.
    let mut holder = PgConnection::connect_with(&app.config.backends.database.connect_options().unwrap())
        .await
        .unwrap();
    let mut lock = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    let reads: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut users = app.users.clone();
            let id = id.clone();
            tokio::spawn(async move {
                users
                    .get_user(GetUserRequest { id })
                    .await
                    .map(|r| r.into_inner().version)
            })
        })
        .collect();
    tokio::time::sleep(locked).await;
    lock.rollback().await.unwrap();
    let mut served = 0;
    let mut shed = 0;
    for read in reads {
        match read.await.unwrap() {
            Ok(version) => {
                assert_eq!(version, 1);
                served += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                shed += 1;
            }
        }
    }
    (served, shed, app.metric("readthrough_db_fallbacks_shed_total").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_closes_a_connection_that_never_finishes_its_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", app.metrics_port))
        .await
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the half-sent request was cut off by the header timeout"
    );
}
