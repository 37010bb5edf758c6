//! Key epochs: an instance uses what it reads from Redis, and counts an
//! invalidation as done, only while it knows the current epochs (see
//! `cache::epochs`).

use std::time::Duration;

use readthrough::{cache::Kind, domain::UserId};

use readthrough_testkit::{OwnRedis, eventually, free_port, redis, spawn_app, spawn_app_with};

#[tokio::test]
async fn an_instance_that_cannot_read_the_key_epochs_uses_nothing_it_reads_from_redis() {
    let port = free_port();
    // An ACL user allowed every cache key but the epochs hash.
    let _redis = OwnRedis::start_with_args(
        port,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "readthrough",
            "on",
            ">s3cret",
            "~*:user:*",
            "~*:product:*",
            "~*:list:*",
            "&*",
            "+@all",
        ],
    )
    .await;
    let url = format!("redis://readthrough:s3cret@127.0.0.1:{port}");
    let app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let user = app.create_user("epochless@example.com").await;
    for _ in 0..3 {
        let read = app.get_user(&user.id).await;
        assert_eq!(read, user, "answered from PostgreSQL");
    }
    let [hits, get_errors, skipped, epoch_errors] = app
        .metrics(&[
            r#"readthrough_cache_hits_total{entity="user"}"#,
            r#"readthrough_cache_errors_total{operation="get"}"#,
            r#"readthrough_cache_skipped_total{operation="get"}"#,
            r#"readthrough_cache_errors_total{operation="epochs"}"#,
        ])
        .await[..]
    else {
        unreachable!("four samples")
    };
    assert_eq!(hits, 0.0, "no value read from Redis was used");
    assert_eq!(
        (get_errors, skipped),
        (0.0, 0.0),
        "Redis answered every read, and the breaker stayed closed"
    );
    assert!(epoch_errors >= 1.0, "the refused epochs read is counted");
    // Nor can it confirm an invalidation: the relay keeps the write's outbox row.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM cache_outbox")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(left, 1, "the creation's invalidation waits for known epochs");
}

/// A Redis restarted empty, or a promoted replica that lacks the last bump,
/// shows epochs lower than the instances know: they must not go back to
/// them, since keys of the older epoch were retired and may be stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_that_went_back_are_bumped_above_the_highest_seen() {
    let mut app = spawn_app().await;
    let admin = app.admin().await;
    let bumped = admin.invalidate_all("user", false).await.unwrap();
    assert_eq!(bumped.epochs["user"], 1);

    // The bump is lost.
    let epochs_key = app.keys.epochs();
    let _: () = redis::cmd("DEL")
        .arg(&epochs_key)
        .query_async(&mut app.redis)
        .await
        .unwrap();

    let epochs = app.keys.epochs_known();
    let moved_on = eventually(Duration::from_secs(5), || async { epochs.of(Kind::User) == 2 }).await;
    assert!(moved_on, "the user epoch went above the one seen, not back to 0");
    let stored: Option<u64> = redis::cmd("HGET")
        .arg(&epochs_key)
        .arg("user")
        .query_async(&mut app.redis)
        .await
        .unwrap();
    assert_eq!(stored, Some(2), "and Redis holds it");
    let user = app.create_user("after-the-loss@example.com").await;
    let read = app.get_user(&user.id).await;
    assert_eq!(read, user);
    assert!(
        app.exists(&app.keys.user(UserId::parse(&user.id).unwrap())).await,
        "filled at the new epoch"
    );
}
