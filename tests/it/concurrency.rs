//! Correct under concurrency: one load per cold key, no stale sets, negative
//! caching, and refresh ahead of expiry.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use readthrough::{
    cache::{Entry, Hook, Hooks, codec},
    domain::{User, UserId},
};
use readthrough_client::proto::GetUserRequest;
use tokio::sync::Notify;
use tonic::Code;

use readthrough_testkit::{redis, spawn_app_with, spawn_app_with_hooks};

const USER_LOADS: &str = r#"readthrough_db_queries_total{query="user.get_many"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_on_two_instances_load_the_row_once() {
    // 1000 client tasks and two servers share two cores here: a 50 ms Redis deadline
    // would measure the scheduler, and this test is about stampedes, not timeouts.
    // For the same reason, leases get time enough for the holder to fill.
    let first = spawn_app_with(|config| {
        config.backends.cache.redis_timeout = Duration::from_millis(1000);
        config.backends.cache.lease = Duration::from_secs(5);
    })
    .await;
    let second = first.spawn_sibling().await;
    let user = first.create_user("hot@example.com").await;

    let calls: Vec<_> = (0..1000)
        .map(|n| {
            let mut client = if n % 2 == 0 {
                first.users.clone()
            } else {
                second.users.clone()
            };
            let id = user.id.clone();
            tokio::spawn(async move {
                client
                    .get_user(GetUserRequest { id })
                    .await
                    .map(|r| r.into_inner().email)
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "hot@example.com");
    }
    // Both instances record into this process's metrics: the sum over both.
    let loads = first.metric(USER_LOADS).await;
    let errors = first.metric(r#"readthrough_cache_errors_total{operation="get"}"#).await;
    assert!(
        loads <= 2.0,
        "the cold key was loaded {loads} times (target 1, at most 2); {errors} GET errors"
    );
}

/// A hook that pauses the first fill of a user key until `resume` is notified,
/// after notifying `paused`.
fn pause_first_user_fill(paused: Arc<Notify>, resume: Arc<Notify>) -> Hook {
    let armed = Arc::new(AtomicBool::new(true));
    Arc::new(move |key: &str| {
        let pause = key.contains(":user:") && armed.swap(false, Ordering::SeqCst);
        let (paused, resume) = (paused.clone(), resume.clone());
        Box::pin(async move {
            if pause {
                paused.notify_one();
                resume.notified().await;
            }
        })
    })
}

/// Reader misses and loads version 1; a writer commits version 2 and
/// invalidates; then the reader's fill runs. Returns the version left cached.
async fn stale_set_interleaving() -> Option<i64> {
    let (paused, resume) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let hooks = Hooks {
        before_fill: Some(pause_first_user_fill(paused.clone(), resume.clone())),
        ..Hooks::default()
    };
    let mut app = spawn_app_with_hooks(hooks, |_| {}).await;
    let user = app.create_user("v1@example.com").await;

    let mut reader = app.users.clone();
    let id = user.id.clone();
    let read = tokio::spawn(async move { reader.get_user(GetUserRequest { id }).await.unwrap().into_inner() });
    paused.notified().await; // the reader holds version 1, not yet cached

    let written = app.rename_user(&user.id, "v2@example.com").await.unwrap();
    assert_eq!(written.version, 2);
    resume.notify_one();
    assert_eq!(read.await.unwrap().version, 1, "the reader began before the write");

    let key = app.keys.user(UserId::parse(&user.id).unwrap());
    let cached: Option<Entry<User>> = app.cached_value(&key).await;
    cached.and_then(|entry| entry.value).map(|user| user.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_lost_the_race_with_a_write_is_refused() {
    let left = stale_set_interleaving().await;
    assert_eq!(left, None, "no stale entry remains (version 1 must not be cached)");
}

/// The same race done by hand as plain cache-aside does it (read the row,
/// then SET it unconditionally), with the write between the two: the old
/// version is cached, and served, after the write was acknowledged. This is
/// what the lease guard above prevents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lease_guard_the_same_race_caches_the_old_version() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.create_user("v1@example.com").await;
    app.outbox_drained().await;
    let id = UserId::parse(&user.id).unwrap();
    let read = readthrough::store::users::get_many(&app.db, &[id]).await.unwrap();

    let written = app.rename_user(&user.id, "v2@example.com").await.unwrap();
    assert_eq!(written.version, 2);
    app.outbox_drained().await;

    let entry = Entry {
        value: read.into_iter().next(),
        load_ms: 1,
        expires_at_ms: u64::MAX,
    };
    let () = redis::cmd("SET")
        .arg(app.keys.user(id))
        .arg(codec::encode(&entry, usize::MAX).unwrap())
        .arg("EX")
        .arg(60)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert_eq!(
        app.get_user(&user.id).await.version,
        1,
        "the unguarded fill leaves version 1 cached after the write"
    );
}

#[tokio::test]
async fn an_absent_id_is_cached_briefly() {
    let app = spawn_app_with(|config| config.backends.cache.negative_ttl = Duration::from_secs(1)).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut users = app.users.clone();
    for _ in 0..3 {
        let status = users.get_user(GetUserRequest { id: id.clone() }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    assert_eq!(
        app.metric(USER_LOADS).await,
        1.0,
        "later lookups of the absent id were answered by the cache"
    );

    tokio::time::sleep(Duration::from_millis(1200)).await;
    users.get_user(GetUserRequest { id }).await.unwrap_err();
    assert_eq!(app.metric(USER_LOADS).await, 2.0, "the negative entry expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_refreshed_before_it_expires() {
    let app = spawn_app_with(|config| config.backends.cache.user_ttl = Duration::from_secs(1)).await;
    let user = app.create_user("refresh@example.com").await;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        app.client.get_user(&user.id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let refreshes = app.metric(r#"readthrough_cache_refreshes_total{entity="user"}"#).await;
    let misses = app.metric(r#"readthrough_cache_misses_total{entity="user"}"#).await;
    assert!(
        refreshes >= 2.0,
        "a 1 s entry read for 2.5 s was refreshed ahead ({refreshes} times)"
    );
    assert_eq!(misses, 1.0, "only the first read missed; expiry never stalled a reader");
}
