//! The read path under load: one Redis command per warm read, sockets without
//! Nagle delays, admission control at the edge, the optional near cache, and
//! a seed that does not flood the relay.

use std::{os::fd::BorrowedFd, sync::Arc, time::Duration};

use readthrough::{
    cache::{Hook, Hooks},
    ops::{self, SeedOptions, demo_user_id},
    service::Services,
};
use readthrough_client::proto::GetUserRequest;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use readthrough_testkit::{OwnRedis, eventually, redis, spawn_app, spawn_app_with, spawn_app_with_hooks};

/// Per command, the calls `INFO commandstats` counted since the last reset.
async fn command_calls(conn: &mut impl redis::aio::ConnectionLike) -> Vec<(String, u64)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn a_warm_get_user_costs_exactly_one_redis_get() {
    let own = OwnRedis::start().await;
    let app = spawn_app_with(|config| config.backends.cache.redis_url = own.url.parse().unwrap()).await;
    let user = app.create_user("hot@example.com").await;
    app.get_user(&user.id).await; // miss, fill
    let mut conn = redis::Client::open(own.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Let the write's background work (outbox confirmation) settle, then count from zero.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    for _ in 0..100 {
        app.get_user(&user.id).await;
    }
    let elapsed = started.elapsed();

    let mut calls = command_calls(&mut conn).await;
    calls.retain(|(name, _)| name != "info" && name != "config|resetstat");
    // The key epochs are read every 200 ms by the instance, not by a read.
    let polls = calls
        .iter()
        .find(|(name, _)| name == "hmget")
        .map_or(0, |(_, count)| *count);
    assert!(
        polls <= elapsed.as_millis() as u64 / 200 + 1,
        "{polls} epoch reads in {elapsed:?}: {calls:?}"
    );
    calls.retain(|(name, _)| name != "hmget");
    assert_eq!(calls, [("get".to_string(), 100)], "one GET per read, nothing else");
}

/// The TCP_NODELAY setting of every socket of this process whose local port is `port`.
fn nodelay_of_sockets_on(port: u16) -> Vec<bool> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:")) {
            continue;
        }
        // SAFETY: the descriptor is open (just listed) and only borrowed for these two calls.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        let connected = socket.peer_addr().is_ok();
        if connected && local.is_some_and(|a| a.port() == port) {
            found.push(socket.tcp_nodelay().unwrap());
        }
    }
    found
}

#[tokio::test]
async fn accepted_grpc_and_metrics_sockets_have_tcp_nodelay() {
    let app = spawn_app().await;
    app.list_page("books", 0, 10).await; // the client connection is accepted and open
    let grpc = nodelay_of_sockets_on(app.grpc_port);
    assert!(!grpc.is_empty(), "the test client's connection is accepted");
    assert!(
        grpc.iter().all(|&on| on),
        "every accepted gRPC socket has TCP_NODELAY: {grpc:?}"
    );

    // Hold a metrics connection open while checking the server's side of it.
    let stream = std::net::TcpStream::connect(("127.0.0.1", app.metrics_port)).unwrap();
    let metrics = eventually(Duration::from_secs(2), || async {
        !nodelay_of_sockets_on(app.metrics_port).is_empty()
    })
    .await;
    assert!(metrics, "the metrics connection is accepted");
    let accepted = nodelay_of_sockets_on(app.metrics_port);
    // Our client end has a random local port; only the server's end is on the metrics port.
    assert!(accepted.iter().all(|&on| on), "{accepted:?}");
    drop(stream);
}

/// Holds every fill until released, so a request stays in flight.
fn hold_fills(release: Arc<tokio::sync::Notify>) -> Hook {
    Arc::new(move |_key: &str| {
        let release = release.clone();
        Box::pin(async move { release.notified().await })
    })
}

#[tokio::test]
async fn past_the_admission_limit_requests_wait_then_are_shed_but_health_answers() {
    let release = Arc::new(tokio::sync::Notify::new());
    let hooks = Hooks {
        before_fill: Some(hold_fills(release.clone())),
        ..Hooks::default()
    };
    let app = spawn_app_with_hooks(hooks, |config| {
        config.server.admission_limit = 1;
        config.server.request_queue_timeout = Duration::from_millis(100);
    })
    .await;
    let user = app.create_user("busy@example.com").await;

    // The first read misses and is held at its fill: the one permit is taken.
    let first = tokio::spawn({
        let (client, id) = (app.client.clone(), user.id.clone());
        async move { client.get_user(&id).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let shed = app.client.get_user(&user.id).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", app.grpc_port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await;
    assert!(health.is_ok(), "health checks skip the line: {health:?}");

    // Released within the queue time, a waiting request is served.
    let second = tokio::spawn({
        let (client, id) = (app.client.clone(), user.id.clone());
        async move { client.get_user(&id).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    release.notify_one();
    assert!(first.await.unwrap().is_ok());
    release.notify_one(); // in case the second read missed too and waits at its fill
    assert!(
        second.await.unwrap().is_ok(),
        "a request that waited less than the queue time is served"
    );
    assert_eq!(app.metric("readthrough_requests_shed_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_serves_hot_reads_and_drops_entries_on_any_instances_write() {
    // A TTL far longer than the test: only invalidation events can drop entries.
    let near = |config: &mut readthrough::config::ServeConfig| {
        config.backends.cache.near_cache_enabled = true;
        config.backends.cache.near_cache_ttl = Duration::from_secs(600);
    };
    let a = spawn_app_with(near).await;
    let b = a.spawn_sibling_with(near).await;
    let user = a.create_user("near@example.com").await;
    let near_hits = r#"readthrough_near_cache_hits_total{entity="user"}"#;

    b.get_user(&user.id).await;
    let before = b.metric(near_hits).await;
    for _ in 0..10 {
        assert_eq!(b.get_user(&user.id).await.version, 1);
    }
    assert_eq!(
        b.metric(near_hits).await - before,
        10.0,
        "repeated reads are near-cache hits"
    );

    // A write on A: B drops its entry when the event arrives.
    a.rename_user(&user.id, "moved@example.com").await.unwrap();
    let b_sees_it = eventually(Duration::from_secs(2), || {
        let (b, id) = (&b, &user.id);
        async move { b.get_user(id).await.version == 2 }
    })
    .await;
    assert!(b_sees_it, "the other instance's near cache dropped the old version");

    // A write on B: B's own next read sees it at once.
    b.get_user(&user.id).await;
    b.rename_user(&user.id, "back@example.com").await.unwrap();
    let read = b.get_user(&user.id).await;
    assert_eq!(read.version, 3, "read-your-write on the writing instance");
}

#[tokio::test]
async fn seed_invalidates_what_it_inserts_itself_and_leaves_the_relay_nothing() {
    let mut app = spawn_app().await;
    // Cached before the seed: an empty list of a demo category, and "no such user".
    assert_eq!(app.list_page("category-00", 0, 10).await.total_count, 0);
    let demo = GetUserRequest {
        id: demo_user_id(0).to_string(),
    };
    assert_eq!(
        app.users.get_user(demo.clone()).await.unwrap_err().code(),
        Code::NotFound
    );

    let services = Services::connect(&app.config.backends).await.unwrap();
    // A real seed runs for longer than a read of the key epochs is trusted:
    // its invalidations count only because it keeps reading them.
    tokio::time::sleep(readthrough::cache::EPOCH_TRUST * 2).await;
    let options = SeedOptions {
        users: 20,
        products: 300,
        categories: 3,
    };
    let report = ops::seed(&services, options).await.unwrap();
    assert_eq!(
        (report.users_inserted, report.products_inserted, report.left_to_relay),
        (20, 300, 0)
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_outbox")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(outbox, 0, "seed deleted its outbox rows once it had invalidated");

    assert_eq!(
        app.list_page("category-00", 0, 10).await.total_count,
        100,
        "the list was invalidated"
    );
    assert!(
        app.users.get_user(demo).await.is_ok(),
        "the negative entry was invalidated"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        app.metric("readthrough_outbox_relayed_total").await,
        0.0,
        "the relay had nothing to do"
    );
}
