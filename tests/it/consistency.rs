//! Consistency: a small run of the consistency checker (`checker.rs`), and
//! the holes a line-by-line review of the cache layer found, each closed.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_redis::redis;
use readthrough::{
    cache::{Hook, Hooks, Kind, RedisConnection},
    domain::{ProductId, UserId},
};
use readthrough_client::proto::{GetUserRequest, ListProductsRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tonic::Code;

use readthrough_testkit::{
    OwnCluster, OwnRedis, RedisProxy, Sandbox, TestApp,
    checker::{self, Settings},
    eventually, rename_request, spawn_app, spawn_app_with, spawn_app_with_hooks,
};

const USER_LOADS: &str = r#"readthrough_db_queries_total{query="user.get_many"}"#;
const LIST_LOADS: &str = r#"readthrough_db_queries_total{query="product.list_head"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_and_writes_on_two_instances_stay_consistent() {
    let report = checker::run(Settings::small()).await;
    assert_consistent(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_and_writes_on_two_instances_stay_consistent_on_a_cluster() {
    let cluster = OwnCluster::start().await;
    let report = checker::run(Settings {
        redis_cluster_urls: cluster.urls.clone(),
        ..Settings::small()
    })
    .await;
    assert_consistent(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_stay_consistent_while_invalidate_all_moves_the_key_epochs() {
    let report = checker::run(Settings {
        duration: Duration::from_secs(5),
        retire_all: true,
        ..Settings::small()
    })
    .await;
    assert!(report.epoch_bumps >= 2, "the epochs moved: {report:?}");
    assert_consistent(&report);
}

pub fn assert_consistent(report: &checker::Report) {
    assert!(report.writes > 50 && report.reads > 100, "the run did work: {report:?}");
    assert!(report.entries_checked > 10, "the cache was compared: {report:?}");
    assert_eq!(
        report.stale_entries,
        Vec::<String>::new(),
        "stale entries after quiescing"
    );
    assert_eq!(
        report.read_violations,
        Vec::<String>::new(),
        "reads older than an acknowledged write"
    );
}

/// The deletions Redis ran (DEL and UNLINK sent by clients, not by scripts),
/// as MONITOR reports them, each with its keys.
struct Monitor {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
}

impl Monitor {
    async fn start(redis_url: &str) -> Self {
        let address = redis_url.trim_start_matches("redis://").trim_end_matches('/');
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
        Self { lines }
    }

    /// Every deletion until a `PING` that `marker` sends, in order.
    async fn deletions_until(&mut self, marker: &str, send: impl Future<Output = ()>) -> Vec<Vec<String>> {
        send.await;
        let mut deletions = Vec::new();
        while let Some(line) = self.lines.next_line().await.unwrap() {
            // +1732712345.123456 [0 127.0.0.1:5555] "DEL" "key" ...   ([0 lua] inside scripts)
            if line.contains(" lua]") {
                continue;
            }
            let words: Vec<String> = line.split('"').skip(1).step_by(2).map(str::to_string).collect();
            match words.first().map(String::as_str) {
                Some("PING") if words.get(1).map(String::as_str) == Some(marker) => return deletions,
                Some("DEL" | "UNLINK" | "del" | "unlink") => deletions.push(words[1..].to_vec()),
                _ => {}
            }
        }
        panic!("MONITOR ended before the marker");
    }
}

/// Each deleted entry key whose lease was not deleted by the same command or an earlier one.
fn entries_deleted_before_their_lease(deletions: &[Vec<String>]) -> Vec<String> {
    let mut leases_gone = HashSet::new();
    let mut early = Vec::new();
    for command in deletions {
        leases_gone.extend(command.iter().filter(|key| key.ends_with(":lease")).cloned());
        for key in command
            .iter()
            .filter(|key| key.contains(":user:e") && !key.ends_with(":lease"))
        {
            if !leases_gone.contains(&format!("{key}:lease")) {
                early.push(key.clone());
            }
        }
    }
    early
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalidation_deletes_the_lease_no_later_than_the_entry() {
    // A lease deleted after its entry lets a fill of the old row land in
    // between (Redis does not run a pipeline's commands as one).
    let own = OwnRedis::start().await;
    let url = own.url.clone();
    let app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let user = app.create_user("lease@example.com").await;
    let mut monitor = Monitor::start(&own.url).await;
    let marker_client = redis::Client::open(own.url.as_str()).unwrap();
    let mut marker = marker_client.get_multiplexed_async_connection().await.unwrap();
    let mut users = app.users.clone();
    let admin = app.admin().await;
    let id = user.id.clone();
    let db = app.db.clone();

    let deletions = monitor
        .deletions_until("done", async {
            // The service's own write.
            users
                .update_user(rename_request(&id, "write@example.com"))
                .await
                .unwrap();
            // A change by hand, which the outbox relay invalidates.
            sqlx::query("UPDATE users SET email = 'hand@example.com', version = version + 1 WHERE id = $1::uuid")
                .bind(&id)
                .execute(&db)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            // An operator's invalidation.
            admin.invalidate_user(&id, false).await.unwrap();
            let _: String = redis::cmd("PING").arg("done").query_async(&mut marker).await.unwrap();
        })
        .await;
    let key = app.keys.user(UserId::parse(&user.id).unwrap());
    let entry_deletions = deletions.iter().filter(|command| command.contains(&key)).count();
    assert!(
        entry_deletions >= 3,
        "the write, the relay and the operator each deleted the entry: {deletions:?}"
    );
    assert_eq!(
        entries_deleted_before_their_lease(&deletions),
        Vec::<String>::new(),
        "{deletions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_dropped_by_its_deadline_gives_its_lease_back() {
    let hold = Arc::new(AtomicBool::new(true));
    let held = hold.clone();
    let hooks = Hooks {
        // The first fill comes long after the caller's deadline.
        before_fill: Some(Arc::new(move |_key: &str| {
            let wait = held.swap(false, Ordering::SeqCst);
            Box::pin(async move {
                if wait {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            })
        })),
        ..Hooks::default()
    };
    let app = spawn_app_with_hooks(hooks, |config| config.backends.cache.lease = Duration::from_secs(10)).await;
    let user = app.create_user("deadline@example.com").await;
    let lease = app.keys.lease(&app.keys.user(UserId::parse(&user.id).unwrap()));

    let mut request = tonic::Request::new(GetUserRequest { id: user.id.clone() });
    request.set_timeout(Duration::from_millis(300));
    let mut reader = app.users.clone();
    let read = tokio::spawn(async move { reader.get_user(request).await });
    assert!(
        app.eventually_exists(&lease, true, Duration::from_secs(2)).await,
        "the reader took the lease"
    );
    let status = read.await.unwrap().unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let released = app.eventually_exists(&lease, false, Duration::from_secs(1)).await;
    assert!(released, "the lease (10 s) was given back when its reader went away");
    let started = Instant::now();
    assert_eq!(app.get_user(&user.id).await.version, 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the next reader did not wait out the lease"
    );
}

/// A hook delaying every fill of keys containing `part` by `delay`.
fn delay_fills(part: &'static str, delay: Duration) -> Hook {
    Arc::new(move |key: &str| {
        let wait = key.contains(part);
        Box::pin(async move {
            if wait {
                tokio::time::sleep(delay).await;
            }
        })
    })
}

/// Two instances with a 200 ms lease whose fills of keys containing `part`
/// come 400 ms after their load: every load outlasts its lease twice over.
async fn slow_pair(part: &'static str) -> (TestApp, TestApp) {
    let lease = Duration::from_millis(200);
    let slow = || Hooks {
        before_fill: Some(delay_fills(part, lease * 2)),
        ..Hooks::default()
    };
    // Hundreds of client tasks and two servers share two cores: a 50 ms Redis deadline
    // would measure the scheduler (the h2load test in stampede.rs keeps the default).
    let first = spawn_app_with_hooks(slow(), |config| {
        config.backends.cache.lease = lease;
        config.backends.cache.redis_timeout = Duration::from_millis(1000);
    })
    .await;
    let second = first.spawn_sibling_with_hooks(slow()).await;
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_slower_than_the_lease_still_fills_once_for_every_caller() {
    // The load outlasts the 200 ms lease twice over: without keeping the lease
    // alive the fill is refused, and callers on both instances each load.
    let (mut first, second) = slow_pair(":user:").await;
    let user = first.create_user("slow@example.com").await;

    let calls: Vec<_> = (0..500)
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
                    .map(|r| r.into_inner().version)
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 1);
    }
    let loads = first.metric(USER_LOADS).await;
    assert!(loads <= 2.0, "500 misses loaded the row {loads} times (at most 2)");
    let key = first.keys.user(UserId::parse(&user.id).unwrap());
    assert!(first.exists(&key).await, "the slow load was cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_lists_load_once_across_instances_even_when_the_load_outlasts_the_lease() {
    let (first, second) = slow_pair(":list:").await;
    first.create_products("cold", 30).await;
    first.outbox_drained().await;

    let calls: Vec<_> = (0..200)
        .map(|n| {
            let mut client = if n % 2 == 0 {
                first.products.clone()
            } else {
                second.products.clone()
            };
            tokio::spawn(async move {
                client
                    .list_products(ListProductsRequest {
                        category_id: "cold".into(),
                        page: n % 3,
                        page_size: 10,
                        ..ListProductsRequest::default()
                    })
                    .await
                    .map(|r| r.into_inner().products.len())
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 10);
    }
    let loads = first.metric(LIST_LOADS).await;
    assert!(loads <= 2.0, "200 cold pages loaded the list {loads} times (at most 2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_fails_validation_is_served_but_never_cached() {
    let mut app = spawn_app().await;
    let id = uuid::Uuid::new_v4();
    // Written by hand, past what the service would accept: a category id with a space.
    sqlx::query("INSERT INTO products (id, name, category_id, price_cents, currency) VALUES ($1, 'Odd', 'Not valid', 100, 'EUR')")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    app.outbox_drained().await;
    for _ in 0..3 {
        let product = app.client.get_product(&id.to_string()).await.unwrap();
        assert_eq!(product.category_id, "Not valid");
    }
    let key = app.keys.product(ProductId::from_uuid(id));
    assert!(!app.exists(&key).await, "nothing cached");
    assert!(!app.exists(&app.keys.lease(&key)).await, "no lease left to wait out");
    assert_eq!(
        app.metric(r#"readthrough_cache_corrupt_total{entity="product"}"#).await,
        0.0,
        "never filled, so never found corrupt"
    );
    assert_eq!(
        app.metric(r#"readthrough_cache_uncacheable_total{entity="product"}"#)
            .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_by_hand_drops_every_cached_entry_of_the_table() {
    let app = spawn_app().await;
    let user = app.create_user("gone@example.com").await;
    let product = app.create_product("gone", "Gone").await;
    app.outbox_drained().await;
    app.client.get_product(&product.id).await.unwrap();
    assert_eq!(app.list_page("gone", 0, 10).await.products.len(), 1);
    let user_key = app.keys.user(UserId::parse(&user.id).unwrap());
    assert!(
        app.read_until_cached(&user_key, || app.client.get_user(&user.id)).await,
        "cached before the truncate"
    );

    sqlx::query("TRUNCATE users, products").execute(&app.db).await.unwrap();

    // The relay deletes the truncate's outbox rows once it has retired the
    // keys. (A NotFound is no proof: one slow GET would answer it from PostgreSQL.)
    app.outbox_drained().await;
    let epochs = app.keys.epochs_known();
    assert_eq!(
        [Kind::User, Kind::Product, Kind::List].map(|kind| epochs.of(kind)),
        [1, 1, 1],
        "every kind of the truncated tables has a new key epoch"
    );
    assert_ne!(app.keys.user(UserId::parse(&user.id).unwrap()), user_key);
    let status = app.client.get_user(&user.id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = app.client.get_product(&product.id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(app.list_page("gone", 0, 10).await.products.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_event_subscription_is_noticed_and_replaced() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let mut app = spawn_app_with(|config| {
        config.backends.cache.redis_url = url.parse().unwrap();
        // The near cache is what subscribes.
        config.backends.cache.near_cache_enabled = true;
    })
    .await;
    let channel = app.keys.events();
    let received = r#"readthrough_events_received_total{event="user.updated"}"#;
    let event = format!(r#"{{"event":"user.updated","id":"{}"}}"#, uuid::Uuid::new_v4());
    let publish = |redis: &RedisConnection| {
        let (channel, event) = (channel.clone(), event.clone());
        let mut redis = redis.clone();
        async move {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(event)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    };
    let heard = eventually(Duration::from_secs(5), || async {
        publish(&app.redis).await;
        app.metric(received).await >= 1.0
    })
    .await;
    assert!(heard, "events arrive through the proxy");

    proxy.stall();
    let replaced = eventually(Duration::from_secs(6), || async {
        app.metric("readthrough_event_subscription_lost_total").await >= 1.0
    })
    .await;
    assert!(replaced, "the silent subscription was noticed (PING without an answer)");
    let before = app.metric(received).await;
    let heard_again = eventually(Duration::from_secs(5), || async {
        publish(&app.redis).await;
        app.metric(received).await > before
    })
    .await;
    assert!(heard_again, "events arrive again on the new subscription");

    // A name the service does not know is counted, but not as a series of its own.
    let stranger = format!(
        r#"{{"event":"attacker.{}","id":"{}"}}"#,
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4()
    );
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(stranger)
        .query_async(&mut app.redis)
        .await
        .unwrap();
    let counted = eventually(Duration::from_secs(2), || async {
        app.metric(r#"readthrough_events_received_total{event="other"}"#).await == 1.0
    })
    .await;
    assert!(counted, "an unknown event name is counted as `other`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_finds_its_outbox_rows_by_index_however_long_the_outbox() {
    let app = spawn_app().await;
    // An outage's worth of rows the relay has not got to (dated ahead, so it leaves them).
    sqlx::query(
        "INSERT INTO cache_outbox (entity, entity_id, event, xact_id, created_at) \
         SELECT 'user', gen_random_uuid(), 'user.updated', pg_current_xact_id(), now() + interval '1 day' \
         FROM generate_series(1, 100000)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query("ANALYZE cache_outbox").execute(&app.db).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        readthrough::store::outbox::RECORDED
    )))
    .fetch_all(&app.db)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("cache_outbox_xact_id_idx"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}
