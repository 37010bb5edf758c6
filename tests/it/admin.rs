//! CacheAdminService: operator invalidation of one entry or one category list
//! (deleted), or of a whole kind (a new key epoch), checked through Redis directly.

use readthrough::domain::{CategoryId, ProductId, UserId};
use tonic::Code;

use readthrough_testkit::{RedisProxy, Sandbox, TestApp, spawn_app, spawn_app_with};

/// This app's cached keys whose entity part is `entity` (e.g. `product`).
async fn keys_of(app: &mut TestApp, entity: &str) -> Vec<String> {
    let infix = format!(":{entity}:");
    let mut keys: Vec<String> = app
        .namespace_keys()
        .await
        .into_iter()
        .filter(|key| key.contains(&infix))
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn invalidate_user_dry_run_reports_and_the_real_run_deletes() {
    let mut app = spawn_app().await;
    let admin = app.admin().await;
    let user = app.create_user("ada@example.com").await;
    app.outbox_drained().await;
    let key = app.keys.user(UserId::parse(&user.id).unwrap());
    assert!(
        app.read_until_cached(&key, || app.get_user(&user.id)).await,
        "the read filled the cache"
    );

    let dry = admin.invalidate_user(&user.id, true).await.unwrap();
    assert_eq!(
        dry.keys,
        vec![key.clone()],
        "only the entry exists: the fill released its lease"
    );
    assert_eq!(dry.count, 1);
    assert!(dry.dry_run);
    assert!(app.exists(&key).await, "a dry run deletes nothing");

    let real = admin.invalidate_user(&user.id, false).await.unwrap();
    assert_eq!((real.keys, real.count, real.dry_run), (vec![key.clone()], 1, false));
    assert!(!app.exists(&key).await, "the entry is gone");

    let again = admin.invalidate_user(&user.id, true).await.unwrap();
    assert_eq!((again.keys.len(), again.count), (0, 0), "nothing left to invalidate");

    let read = app.get_user(&user.id).await;
    assert_eq!(read, user);
    assert!(
        app.read_until_cached(&key, || app.get_user(&user.id)).await,
        "the next read refilled the cache"
    );
}

#[tokio::test]
async fn invalidate_product_deletes_its_entry() {
    let mut app = spawn_app().await;
    let admin = app.admin().await;
    let product = app.create_product("tools", "Hammer").await;
    app.outbox_drained().await;
    let key = app.keys.product(ProductId::parse(&product.id).unwrap());
    assert!(
        app.read_until_cached(&key, || app.client.get_product(&product.id))
            .await
    );

    let response = admin.invalidate_product(&product.id, false).await.unwrap();
    assert_eq!((response.keys, response.count), (vec![key.clone()], 1));
    assert!(!app.exists(&key).await);
}

#[tokio::test]
async fn invalidate_category_deletes_both_list_keys() {
    let mut app = spawn_app().await;
    let admin = app.admin().await;
    for name in ["Anvil", "Bellows", "Chisel"] {
        app.create_product("smithing", name).await;
    }
    app.create_product("garden", "Rake").await;
    app.outbox_drained().await;
    for category in ["smithing", "garden"] {
        let page = app.list_page(category, 0, 10).await;
        assert!(page.total_count >= 1);
    }
    let smithing = CategoryId::parse("smithing").unwrap();
    let (ids_key, meta_key) = (app.keys.list_ids(&smithing), app.keys.list_meta(&smithing));
    assert!(
        app.exists(&ids_key).await && app.exists(&meta_key).await,
        "the list is cached"
    );

    let response = admin.invalidate_category("smithing", false).await.unwrap();
    let mut deleted = response.keys.clone();
    deleted.sort();
    let mut expected = vec![ids_key.clone(), meta_key.clone()];
    expected.sort();
    assert_eq!((deleted, response.count), (expected, 2));
    assert!(!app.exists(&ids_key).await && !app.exists(&meta_key).await);

    let garden = CategoryId::parse("garden").unwrap();
    assert!(
        app.exists(&app.keys.list_ids(&garden)).await,
        "another category's list stays"
    );
}

/// Changes a user's email in PostgreSQL with the triggers off: a change the
/// outbox never hears of, which only `InvalidateAll` brings to the cache.
async fn change_email_unseen(app: &TestApp, id: &str, email: &str) {
    let mut tx = app.db.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET email = $1 WHERE id = $2::uuid")
        .bind(email)
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn email_of(app: &mut TestApp, id: &str) -> String {
    app.get_user(id).await.email
}

#[tokio::test]
async fn invalidate_all_products_retires_them_and_leaves_users() {
    let mut app = spawn_app().await;
    let admin = app.admin().await;
    let mut products = Vec::new();
    for name in ["Lamp", "Desk", "Chair", "Shelf", "Rug"] {
        products.push(app.create_product("furniture", name).await);
    }
    let users = [
        app.create_user("one@example.com").await,
        app.create_user("two@example.com").await,
    ];
    app.outbox_drained().await;
    for product in &products {
        app.client.get_product(&product.id).await.unwrap();
    }
    for user in &users {
        email_of(&mut app, &user.id).await;
    }
    let product_keys = keys_of(&mut app, "product").await;
    let user_keys = keys_of(&mut app, "user").await;
    assert_eq!((product_keys.len(), user_keys.len()), (5, 2), "all were cached");

    let dry = admin.invalidate_all("product", true).await.unwrap();
    assert_eq!(dry.count, product_keys.len() as i64);
    let mut sample = dry.keys.clone();
    sample.sort();
    assert_eq!(sample, product_keys, "a sample this small is every key");
    assert_eq!(
        (dry.dry_run, dry.epochs["product"]),
        (true, 0),
        "a dry run retires nothing"
    );

    let real = admin.invalidate_all("product", false).await.unwrap();
    assert_eq!((real.count, real.dry_run), (0, false));
    assert_eq!(
        (real.epochs["product"], real.epochs["user"], real.epochs["list"]),
        (1, 0, 0),
        "only the products' epoch moved"
    );
    let hits = app.metric(r#"readthrough_cache_hits_total{entity="product"}"#).await;
    app.client.get_product(&products[0].id).await.unwrap();
    assert_eq!(
        app.metric(r#"readthrough_cache_hits_total{entity="product"}"#).await,
        hits,
        "a retired product is read from PostgreSQL"
    );
    assert!(
        app.exists(&app.keys.product(ProductId::parse(&products[0].id).unwrap()))
            .await,
        "and cached again under the new epoch"
    );
    assert_eq!(keys_of(&mut app, "user").await, user_keys, "users stay");
    let hits = app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await;
    email_of(&mut app, &users[0].id).await;
    assert_eq!(
        app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await,
        hits + 1.0,
        "a user is still a hit"
    );
}

#[tokio::test]
async fn invalidate_all_reaches_every_instance_before_it_answers() {
    let app = spawn_app().await;
    let mut other = app.spawn_sibling().await;
    let user = app.create_user("before@example.com").await;
    app.outbox_drained().await;
    assert_eq!(email_of(&mut other, &user.id).await, "before@example.com");
    change_email_unseen(&app, &user.id, "after@example.com").await;
    assert_eq!(
        email_of(&mut other, &user.id).await,
        "before@example.com",
        "the cache still holds the old row"
    );

    app.admin().await.invalidate_all("user", false).await.unwrap();
    assert_eq!(
        email_of(&mut other, &user.id).await,
        "after@example.com",
        "the other instance reads the new epoch as soon as the call has answered"
    );
}

#[tokio::test]
async fn a_dry_run_samples_at_most_100_keys_but_counts_all() {
    let mut app = spawn_app().await;
    let admin = app.admin().await;
    fill_namespace(&app, 250).await;
    let dry = admin.invalidate_all(EVERYTHING, true).await.unwrap();
    assert_eq!((dry.count, dry.keys.len()), (250, 100));

    let real = admin.invalidate_all(EVERYTHING, false).await.unwrap();
    assert_eq!(real.epochs.values().copied().collect::<Vec<_>>(), [1, 1, 1]);
    assert_eq!(keys_of(&mut app, "list").await.len(), 250, "nothing is deleted…");
    let dry = admin.invalidate_all(EVERYTHING, true).await.unwrap();
    assert_eq!(dry.count, 0, "…but nothing is in the new epochs");
}

/// `count` list entries written by hand.
async fn fill_namespace(app: &TestApp, count: usize) {
    let mut redis = app.redis.clone();
    for start in (0..count).step_by(10_000) {
        let mut pipe = readthrough_testkit::redis::pipe();
        for i in start..count.min(start + 10_000) {
            let category = CategoryId::parse(&format!("c{i}")).unwrap();
            pipe.cmd("SET").arg(app.keys.list_meta(&category)).arg("x").ignore();
        }
        let () = pipe.query_async(&mut redis).await.unwrap();
    }
}

/// `InvalidateAll`'s entity for every kind.
const EVERYTHING: &str = "";

#[tokio::test]
async fn one_invalidate_all_runs_at_a_time_per_instance() {
    let app = spawn_app().await;
    let client = app.admin().await;
    let calls = (0..4).map(|_| {
        let client = client.clone();
        async move { client.invalidate_all(EVERYTHING, false).await }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    let aborted = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Err(status) if status.code() == Code::Aborted))
        .count();
    let done = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    assert_eq!((aborted, done), (3, 1), "{outcomes:?}");
    // The lock is released with the call: the next one runs (after the spacing between bumps).
    let next = app.admin().await.invalidate_all(EVERYTHING, false).await.unwrap();
    assert_eq!(next.epochs["user"], 2);
}

#[tokio::test]
async fn invalidate_all_stops_at_the_server_deadline_and_frees_the_next_run() {
    let app = spawn_app_with(|config| config.server.request_timeout = std::time::Duration::from_millis(20)).await;
    fill_namespace(&app, 200_000).await;
    let client = app.admin().await;
    let status = client.invalidate_all(EVERYTHING, true).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let next = client.invalidate_all(EVERYTHING, true).await.unwrap_err();
    assert_eq!(
        next.code(),
        Code::DeadlineExceeded,
        "the next run starts (and stops) instead of ABORTED"
    );
    // A real run is cut while it waits for the instances to follow; its bump stays made.
    let status = client.invalidate_all(EVERYTHING, false).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(app.keys.epochs_known().of(readthrough::cache::Kind::List), 1);
}

#[tokio::test]
async fn bad_input_is_invalid_argument() {
    let app = spawn_app().await;
    let admin = app.admin().await;
    let status = admin.invalidate_user("nope", true).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("id:"), "{status:?}");

    let status = admin.invalidate_product("", false).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let status = admin.invalidate_category("no*globs", false).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("category_id:"), "{status:?}");

    for entity in ["bogus", "users", "*"] {
        let status = admin.invalidate_all(entity, false).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{entity}: {status:?}");
        assert!(status.message().starts_with("entity:"), "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable_not_success() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let admin = app.admin().await;
    proxy.cut();

    let status = admin
        .invalidate_user(&uuid::Uuid::new_v4().to_string(), false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "cache unavailable");

    let status = admin.invalidate_all("", true).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
