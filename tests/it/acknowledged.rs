//! No read contradicts an acknowledged write, whoever cannot reach Redis:
//! a writer cut off alone hands its invalidation to another instance's
//! relay; when no instance can reach Redis, writes are fenced, and no
//! instance trusts Redis for their kinds until the invalidations are done.

use std::time::{Duration, Instant};

use readthrough_testkit::{RedisProxy, Sandbox, TestApp, spawn_app_with};

/// `count` users, created and read once through `app` (cached).
async fn cached_users(app: &TestApp, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let id = app.create_user(&format!("v1-{n}@example.com")).await.id;
        app.get_user(&id).await;
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_an_instance_cut_off_from_redis_is_seen_at_once_through_another() {
    let sandbox = Sandbox::new();
    let proxy = RedisProxy::start(&sandbox.redis_url).await;
    let url = proxy.url.clone();
    let writer = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let direct = sandbox.redis_url.clone();
    let reader = writer
        .spawn_sibling_with(|config| config.backends.cache.redis_url = direct.parse().unwrap())
        .await;
    let ids = cached_users(&reader, 20).await;
    reader.outbox_drained().await;

    proxy.cut();
    let mut stale = Vec::new();
    let mut slowest = Duration::ZERO;
    for (n, id) in ids.iter().enumerate() {
        let started = Instant::now();
        let written = writer.rename_user(id, &format!("v2-{n}@example.com")).await.unwrap();
        slowest = slowest.max(started.elapsed());
        let read = reader.get_user(id).await;
        if read.version < written.version {
            stale.push(format!(
                "{id}: read version {} after {} was acknowledged",
                read.version, written.version
            ));
        }
    }
    println!("20 writes cut off from Redis; slowest acknowledged after {slowest:?}");
    assert_eq!(stale, Vec::<String>::new(), "no read older than an acknowledged write");
    assert_eq!(
        writer.metric("readthrough_writes_handed_over_total").await,
        20.0,
        "another instance's relay carried out every invalidation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_no_instance_reaches_redis_are_never_contradicted_once_it_is_back() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let first = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let second = first.spawn_sibling().await;
    let ids = cached_users(&first, 20).await;
    first.outbox_drained().await;
    for id in &ids {
        second.get_user(id).await;
    }

    proxy.cut();
    let mut acknowledged = Vec::new();
    let started = Instant::now();
    for (n, id) in ids.iter().enumerate() {
        let app = if n % 2 == 0 { &first } else { &second };
        let written = app.rename_user(id, &format!("v2-{n}@example.com")).await;
        acknowledged.push(written.expect("writes go on while Redis is unreachable").version);
    }
    println!("20 writes while Redis was unreachable took {:?}", started.elapsed());
    proxy.restore();

    // Three seconds of reads through both instances, from the moment Redis is back.
    let back = Instant::now();
    let (mut reads, mut older, mut failed) = (0, Vec::new(), 0);
    while back.elapsed() < Duration::from_secs(3) {
        for (id, version) in ids.iter().zip(&acknowledged) {
            for app in [&first, &second] {
                match app.client.get_user(id).await {
                    Ok(read) if read.version < *version => older.push(format!("{id}: {} < {version}", read.version)),
                    Ok(_) => {}
                    Err(_) => failed += 1,
                }
                reads += 1;
            }
        }
    }
    println!(
        "{reads} reads in the 3 s after Redis came back: {} older than acknowledged, {failed} failed",
        older.len()
    );
    assert_eq!(older, Vec::<String>::new(), "no read older than an acknowledged write");
}
