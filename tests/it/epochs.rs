//! Key epochs: an instance uses what it reads from Redis, and counts an
//! invalidation as done, only while it knows the current epochs (see
//! `cache::epochs`).

use readthrough::proto::GetUserRequest;

use crate::helpers::{OwnRedis, free_port, spawn_app_with};

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
    let mut app = spawn_app_with(|config| config.config.redis_url = url.parse().unwrap()).await;
    let user = app.create_user("epochless@example.com").await;
    for _ in 0..3 {
        let read = app
            .users
            .get_user(GetUserRequest { id: user.id.clone() })
            .await
            .unwrap()
            .into_inner();
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
