//! A Redis that is replaced: a replica promoted behind the same address, a
//! Sentinel failover, a Redis restarted empty. What the new server holds
//! from before it took over is never read (see `cache::epochs`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use readthrough::cache::Kind;

use readthrough_testkit::{
    Load, OwnRedis, OwnSentinel, RedisProxy, TestApp, eventually, redis, spawn_app_with, warm_users,
};

/// Every user's version as PostgreSQL has it.
async fn stored_versions(app: &TestApp, ids: &[String]) -> Vec<i64> {
    let mut versions = Vec::new();
    for id in ids {
        let version: i64 = sqlx::query_scalar("SELECT version FROM users WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        versions.push(version);
    }
    versions
}

/// Reads of `ids` through `apps` that returned a version older than
/// `acknowledged`, over `period`.
async fn older_reads(apps: &[&TestApp], ids: &[String], acknowledged: &[i64], period: Duration) -> Vec<String> {
    let started = Instant::now();
    let mut older = Vec::new();
    while started.elapsed() < period {
        for (id, version) in ids.iter().zip(acknowledged) {
            for app in apps {
                if let Ok(read) = app.client.get_user(id).await
                    && read.version < *version
                {
                    older.push(format!("{id}: read {} after {version}", read.version));
                }
            }
        }
    }
    older
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_behind_the_same_address_serves_nothing_deleted_after_it_stopped_copying() {
    let mut master = OwnRedis::start().await;
    let replica = OwnRedis::replica_of(master.port).await;
    let proxy = RedisProxy::start(&master.url).await;
    let url = proxy.url.clone();
    let mut app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let sibling = app.spawn_sibling().await;
    let ids = warm_users(&mut app, 10).await;
    app.outbox_drained().await;

    // The replica has every cached entry, then stops copying: the writes
    // below reach the master alone, as the last writes before a crash do.
    let copied: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut master.connection().await)
        .await
        .unwrap();
    assert_eq!(copied, 1, "the replica has the cached entries");
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut replica.connection().await)
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        acknowledged.push(
            app.rename_user(id, &format!("after-{n}@example.com"))
                .await
                .unwrap()
                .version,
        );
    }

    // The failover: the master is gone, and its address leads to the replica.
    proxy.send_to(&replica.url);
    proxy.cut();
    master.kill();
    proxy.restore();
    let older = older_reads(&[&app, &sibling], &ids, &acknowledged, Duration::from_secs(2)).await;
    assert_eq!(older, Vec::<String>::new(), "no read older than an acknowledged write");
    assert!(
        app.keys.epochs_known().of(Kind::User) >= 1,
        "the instances retired what the new server held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_reads_and_writes_fails_no_read_and_leaves_nothing_stale() {
    let mut master = OwnRedis::start().await;
    let replica = OwnRedis::replica_of(master.port).await;
    let sentinels = [
        OwnSentinel::start(master.port).await,
        OwnSentinel::start(master.port).await,
        OwnSentinel::start(master.port).await,
    ];
    let ready = eventually(Duration::from_secs(20), || async {
        let mut ready = true;
        for sentinel in &sentinels {
            let others: Vec<redis::Value> = sentinel.ask(&["sentinels", "mymaster"]).await.unwrap_or_default();
            let replicas: Vec<redis::Value> = sentinel.ask(&["replicas", "mymaster"]).await.unwrap_or_default();
            ready &= others.len() == 2 && replicas.len() == 1;
        }
        ready
    })
    .await;
    assert!(ready, "the sentinels know each other and the replica");
    let urls: Vec<String> = sentinels.iter().map(|sentinel| sentinel.url.clone()).collect();
    let mut app = spawn_app_with(|config| {
        config.backends.cache.redis_sentinel_urls = urls.iter().map(|url| url.parse().unwrap()).collect();
    })
    .await;
    let ids = warm_users(&mut app, 20).await;
    app.outbox_drained().await;

    let readers = Load::start(&app, &ids);
    let writing = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn({
        let (client, ids, writing) = (app.client.clone(), ids.clone(), writing.clone());
        async move {
            let mut writes = 0;
            while writing.load(Ordering::Relaxed) {
                let id = &ids[writes % ids.len()];
                let change = readthrough_testkit::email_change(id, &format!("write-{writes}@example.com"));
                client.update_user(change, &["email"], 0).await.expect("writes go on");
                writes += 1;
            }
            writes
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    master.kill();
    let killed = Instant::now();
    let replica_port = replica.port;
    let promoted = eventually(Duration::from_secs(30), || async {
        sentinels[0].master_port().await == Some(replica_port)
    })
    .await;
    assert!(promoted, "the sentinels promoted the replica");
    let promoted_after = killed.elapsed();
    // Under load on the new primary for a while.
    let served = eventually(Duration::from_secs(10), || async {
        app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await > 0.0
            && app.keys.epochs_known().of(Kind::User) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    writing.store(false, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    let reads = readers.finish().await;

    let failed: Vec<&String> = reads.iter().filter_map(|r| r.error.as_ref()).collect();
    println!(
        "{} reads and {writes} writes; the replica was promoted {promoted_after:?} after the kill; {} reads failed",
        reads.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} reads failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(served, "the instance serves from the new primary, in a new epoch");
    let stored = stored_versions(&app, &ids).await;
    let older = older_reads(&[&app], &ids, &stored, Duration::ZERO).await;
    assert_eq!(older, Vec::<String>::new(), "nothing stale after the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_after_redis_restarted_empty_starts_above_every_epoch_used() {
    let mut redis_server = OwnRedis::start().await;
    let url = redis_server.url.clone();
    let first = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let bumped = first.admin().await.invalidate_all("user", false).await.unwrap();
    assert_eq!(bumped.epochs["user"], 1);

    redis_server.kill();
    redis_server.start_again().await; // empty: the epochs are gone
    let second = first.spawn_sibling().await;
    let epoch = second.keys.epochs_known().of(Kind::User);
    assert!(
        epoch > 1,
        "started at user epoch {epoch}, not at or below the 1 the first instance used"
    );
    let agreed = eventually(Duration::from_secs(5), || async {
        first.keys.epochs_known().of(Kind::User) == second.keys.epochs_known().of(Kind::User)
    })
    .await;
    assert!(agreed, "both read and invalidate the same epoch");

    let user = second.create_user("after-the-restart@example.com").await;
    first.get_user(&user.id).await;
    let renamed = second.rename_user(&user.id, "renamed@example.com").await.unwrap();
    assert_eq!(first.get_user(&user.id).await, renamed);
}
