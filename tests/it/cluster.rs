//! The cache on a Redis Cluster of three masters and three replicas, started
//! by each test (`REDIS_CLUSTER_URLS`): the core cases of the single-Redis
//! tests, and what only a cluster has (keys in many slots, several masters).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use readthrough::{cache::Kind, domain::UserId};
use readthrough_client::proto::Product;

use readthrough_testkit::checker;
use readthrough_testkit::{OwnCluster, TestApp, redis, spawn_app_with};

async fn on_cluster(cluster: &OwnCluster) -> TestApp {
    let urls: Vec<_> = cluster.urls.iter().map(|url| url.parse().unwrap()).collect();
    // These tests check routing, not deadlines: a generous one keeps a busy
    // machine from turning a slow GET into a fail-open read that fills nothing.
    spawn_app_with(move |config| {
        config.backends.cache.redis_cluster_urls = urls;
        config.backends.cache.redis_timeout = Duration::from_millis(1000);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_fills_a_hit_and_an_update_reaches_another_instance() {
    let cluster = OwnCluster::start().await;
    let app = on_cluster(&cluster).await;
    let other = app.spawn_sibling().await;
    let user = app.create_user("clustered@example.com").await;
    app.outbox_drained().await;

    assert_eq!(app.get_user(&user.id).await, user);
    assert_eq!(app.get_user(&user.id).await, user);
    let [hits, misses] = app
        .metrics(&[
            r#"readthrough_cache_hits_total{entity="user"}"#,
            r#"readthrough_cache_misses_total{entity="user"}"#,
        ])
        .await[..]
    else {
        unreachable!()
    };
    assert_eq!((hits, misses), (1.0, 1.0), "a miss, then a hit");
    let key = app.keys.user(readthrough::domain::UserId::parse(&user.id).unwrap());
    let mut redis = cluster.connection().await;
    let cached: bool = redis::cmd("EXISTS").arg(&key).query_async(&mut redis).await.unwrap();
    assert!(cached, "{key} is cached in the cluster");

    assert_eq!(other.get_user(&user.id).await.email, "clustered@example.com");
    app.rename_user(&user.id, "renamed@example.com").await.unwrap();
    assert_eq!(
        other.get_user(&user.id).await.email,
        "renamed@example.com",
        "the update is read through the other instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reads_across_slots_keep_the_callers_order() {
    let cluster = OwnCluster::start().await;
    let app = on_cluster(&cluster).await;
    let mut ids = Vec::new();
    for n in 0..24 {
        ids.push(app.create_user(&format!("batch{n}@example.com")).await.id);
    }
    app.outbox_drained().await;
    let slots: std::collections::HashSet<_> = ids
        .iter()
        .map(|id| redis::cluster_routing::Slot::for_key(app.keys.user(readthrough::domain::UserId::parse(id).unwrap())))
        .collect();
    assert!(slots.len() > 10, "the keys lie in many slots: {}", slots.len());
    // A shuffled order with an unknown id and a repeat, read twice: misses, then hits.
    let mut asked = ids.clone();
    asked.reverse();
    asked.insert(5, uuid::Uuid::new_v4().to_string());
    asked.push(ids[3].clone());
    for round in 0..2 {
        let found = app.client.batch_get_users(asked.clone()).await.unwrap();
        let answered: Vec<String> = found.users.iter().map(|user| user.id.clone()).collect();
        let expected: Vec<String> = asked[..asked.len() - 1]
            .iter()
            .filter(|id| ids.contains(id))
            .cloned()
            .collect();
        assert_eq!(
            answered, expected,
            "round {round}: in the caller's order, a repeat once"
        );
        assert_eq!(found.missing_ids, [asked[5].clone()]);
    }
    assert!(
        app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await >= 24.0,
        "the second round was served from the cluster"
    );
    assert_eq!(
        app.metric(r#"readthrough_cache_errors_total{operation="mget"}"#).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_a_list_and_a_corrupt_entry_repaired() {
    let cluster = OwnCluster::start().await;
    let app = on_cluster(&cluster).await;
    let products = app.create_products("lamps", 250).await;
    app.outbox_drained().await;
    let mut expected: Vec<(String, String)> = products.iter().map(|p| (p.name.clone(), p.id.clone())).collect();
    expected.sort();
    for _ in 0..2 {
        let mut listed = Vec::new();
        for page in 0..3 {
            let response = app.list_page("lamps", page, 100).await;
            assert_eq!(response.total_count, 250);
            listed.extend(response.products.into_iter().map(|p| (p.name, p.id)));
        }
        assert_eq!(listed, expected, "every product once, in order");
    }
    assert!(app.metric(r#"readthrough_cache_hits_total{entity="list"}"#).await >= 3.0);

    let user = app.create_user("repaired@example.com").await;
    app.outbox_drained().await;
    app.get_user(&user.id).await;
    let key = app.keys.user(readthrough::domain::UserId::parse(&user.id).unwrap());
    let mut redis = cluster.connection().await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("not an entry")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(app.get_user(&user.id).await, user, "read from PostgreSQL");
    assert_eq!(
        app.metric(r#"readthrough_cache_corrupt_total{entity="user"}"#).await,
        1.0
    );
    let repaired: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
    assert_ne!(repaired, b"not an entry", "the fill replaced it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_keys_on_every_master_and_invalidate_all_retires_them() {
    let cluster = OwnCluster::start().await;
    let app = on_cluster(&cluster).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(app.create_user(&format!("counted{n}@example.com")).await.id);
    }
    app.outbox_drained().await;
    for id in &ids {
        app.get_user(id).await;
    }
    let admin = app.admin().await;
    let dry = admin.invalidate_all("user", true).await.unwrap();
    assert_eq!(dry.count, 30, "keys on all three masters are counted");

    admin.invalidate_all("user", false).await.unwrap();
    assert_eq!(app.keys.epochs_known().of(Kind::User), 1);
    let hits = app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await;
    app.get_user(&ids[0]).await;
    assert_eq!(
        app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await,
        hits,
        "a retired key is not read"
    );
}

/// Kills the master that serves a hot user's slot while two instances read
/// it, and read and write products, without pause. PostgreSQL answers while
/// the slot has no master; hits come back once its replica is promoted; the
/// instances notice the new master and retire every key (the replica may
/// lack the last DELs), so nothing cached afterwards is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_under_load_fails_no_read_and_leaves_nothing_stale() {
    const USER_HITS: &str = r#"readthrough_cache_hits_total{entity="user"}"#;
    const USER_EPOCH: &str = r#"readthrough_cache_key_epoch{entity="user"}"#;
    let mut cluster = OwnCluster::start().await;
    let mut app = on_cluster(&cluster).await;
    let other = app.spawn_sibling().await;
    let hot = app.create_user("hot@example.com").await;
    let products: Vec<String> = app
        .create_products("failover", 10)
        .await
        .into_iter()
        .map(|p| p.id)
        .collect();
    app.outbox_drained().await;
    app.get_user(&hot.id).await;
    let hot_key = app.keys.user(UserId::parse(&hot.id).unwrap());
    let master = cluster.master_of(&hot_key).await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for (n, instance) in [&app, &other].into_iter().enumerate() {
        let client = instance.client.clone();
        let (hot, products, stop, failures) = (hot.id.clone(), products.clone(), stop.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let product = products[round % products.len()].clone();
                let read_user = client.get_user(&hot).await.map(drop);
                let read_product = client.get_product(&product).await.map(drop);
                let rename = Product {
                    id: product,
                    name: format!("renamed by {n} in round {round}"),
                    ..Default::default()
                };
                let written = client.update_product(rename, &["name"], 0).await.map(drop);
                for result in [read_user, read_product, written] {
                    if let Err(status) = result {
                        eprintln!("failed during the failover: {status:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.nodes[master].kill();
    let killed = Instant::now();
    // Hits on the hot user have resumed once they rise at every sample for
    // 200 ms, after the failover's bump; they resumed when that run began.
    let mut resumed = None;
    let mut last = 0.0;
    let mut rising_since: Option<Instant> = None;
    while killed.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let hits = app.metric(USER_HITS).await + other.metric(USER_HITS).await;
        rising_since = (hits > last).then(|| rising_since.unwrap_or_else(Instant::now));
        last = hits;
        if let Some(since) = rising_since
            && since.elapsed() >= Duration::from_millis(200)
            && app.metric(USER_EPOCH).await > 0.0
        {
            resumed = Some(since - killed);
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let resumed = resumed.expect("hits resume within 20 s of the kill");
    println!(
        "failover: hits resumed {} ms after the master was killed",
        resumed.as_millis()
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no call failed during the failover"
    );
    assert_ne!(cluster.master_of(&hot_key).await, master, "a replica was promoted");
    assert_eq!(
        (app.metric(USER_EPOCH).await, other.metric(USER_EPOCH).await),
        (1.0, 1.0),
        "both instances noticed the failover, and it retired the keys once"
    );

    app.outbox_drained().await;
    let (stale, checked) = checker::stale_entries(&mut app).await;
    assert!(checked > 0, "entries were cached after the failover");
    assert_eq!(
        stale,
        Vec::<String>::new(),
        "nothing cached is stale after the failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_published_only_once_the_deletes_it_announces_are_done() {
    let cluster = OwnCluster::start().await;
    let writer = on_cluster(&cluster).await;
    let reader = writer
        .spawn_sibling_with(|config| config.backends.cache.near_cache_enabled = true)
        .await;
    let channel_master = cluster.master_of(&writer.keys.events()).await;
    // A user whose entry lives on another master than the events channel.
    let (user, key) = loop {
        let user = writer
            .create_user(&format!("{}@example.com", uuid::Uuid::new_v4()))
            .await;
        let key = writer.keys.user(UserId::parse(&user.id).unwrap());
        if cluster.master_of(&key).await != channel_master {
            break (user, key);
        }
    };
    writer.outbox_drained().await;
    assert_eq!(
        reader.get_user(&user.id).await,
        user,
        "cached in Redis and in the reader's near cache"
    );

    // The entry's master holds every write for 500 ms: the delete waits.
    let entry_master = &cluster.nodes[cluster.master_of(&key).await];
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(500)
        .arg("WRITE")
        .query_async(&mut entry_master.connection().await)
        .await
        .unwrap();
    const HEARD: &str = r#"readthrough_events_received_total{event="user.updated"}"#;
    let write = tokio::spawn({
        let client = writer.client.clone();
        let change = readthrough_testkit::email_change(&user.id, "renamed@example.com");
        async move { client.update_user(change, &["email"], 0).await.unwrap() }
    });
    // The reader reads the moment it hears of the change.
    while !write.is_finished() {
        if reader.metric(HEARD).await > 0.0 {
            reader.get_user(&user.id).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let renamed = write.await.unwrap();
    assert_eq!(
        reader.get_user(&user.id).await,
        renamed,
        "what the reader read on hearing of the change was already the new version"
    );
}
