//! Invalidation that is never lost: the outbox relay, writes made by hand in
//! PostgreSQL, and the events every instance with a near cache receives.

use std::time::Duration;

use readthrough::{
    cache::{Event, EventName},
    domain::{ProductId, UserId},
};
use readthrough_client::proto::{CreateProductRequest, GetUserRequest};

use readthrough_testkit::{RedisProxy, Sandbox, eventually, redis, spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_could_not_invalidate_is_invalidated_once_redis_is_back() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let mut app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let user = app.client.create_user("before@example.com", None).await.unwrap();
    let key = app.keys.user(UserId::parse(&user.id).unwrap());
    assert!(
        app.read_until_cached(&key, || app.client.get_user(&user.id)).await,
        "version 1 is cached"
    );

    proxy.cut();
    let updated = app.rename_user(&user.id, "after@example.com").await.unwrap();
    assert_eq!(updated.version, 2, "the write commits while Redis is unreachable");
    assert!(app.exists(&key).await, "the stale entry is still in Redis");
    assert!(app.metric("readthrough_invalidation_failures_total").await >= 1.0);

    proxy.restore();
    let gone = app.eventually_exists(&key, false, Duration::from_secs(5)).await;
    assert!(
        gone,
        "the relay removed the stale entry within 5 s of Redis coming back"
    );
    let read = app.client.get_user(&user.id).await.unwrap();
    assert_eq!(read.email, "after@example.com");
}

#[tokio::test]
async fn a_row_changed_by_hand_is_invalidated_within_a_second() {
    let app = spawn_app().await;
    let user = app.client.create_user("hand@example.com", None).await.unwrap();
    app.client.get_user(&user.id).await.unwrap();

    sqlx::query("UPDATE users SET email = 'psql@example.com' WHERE id = $1::uuid")
        .bind(&user.id)
        .execute(&app.db)
        .await
        .unwrap();

    let mut users = app.users.clone();
    let seen = eventually(Duration::from_secs(1), || {
        let (mut users, id) = (users.clone(), user.id.clone());
        async move { users.get_user(GetUserRequest { id }).await.unwrap().into_inner().email == "psql@example.com" }
    })
    .await;
    assert!(seen, "the cached user was invalidated within a second");
    assert_eq!(
        users
            .get_user(GetUserRequest { id: user.id })
            .await
            .unwrap()
            .into_inner()
            .email,
        "psql@example.com"
    );
}

#[tokio::test]
async fn an_absent_id_inserted_by_hand_is_found_within_a_second() {
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4();
    let mut users = app.users.clone();
    users.get_user(GetUserRequest { id: id.to_string() }).await.unwrap_err(); // cached as absent

    sqlx::query("INSERT INTO users (id, email) VALUES ($1, 'late@example.com')")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();

    let found = eventually(Duration::from_secs(1), || {
        let mut users = users.clone();
        async move { users.get_user(GetUserRequest { id: id.to_string() }).await.is_ok() }
    })
    .await;
    assert!(found, "the negative entry was cleared by the insert's outbox row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_is_published_as_an_event_to_every_instance() {
    // Instances subscribe to events for their near caches.
    let mut app = spawn_app_with(|config| config.backends.cache.near_cache_enabled = true).await;
    let _sibling = app.spawn_sibling().await;
    let client = redis::Client::open(Sandbox::new().redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}:v1:events", app.config.backends.cache.namespace))
        .await
        .unwrap();

    let product = app
        .client
        .create_product(CreateProductRequest {
            category_id: "lamps".into(),
            name: "Desk lamp".into(),
            description: String::new(),
            price_cents: 3000,
            currency: "EUR".into(),
        })
        .await
        .unwrap();
    app.reprice(&product.id, 2500, 1).await.unwrap();

    let mut messages = pubsub.on_message();
    let mut events = Vec::new();
    while events.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(2), futures_util::StreamExt::next(&mut messages))
            .await
            .expect("events arrive within 2 s")
            .unwrap();
        events.push(serde_json::from_slice::<Event>(message.get_payload_bytes()).unwrap());
    }
    let id = ProductId::parse(&product.id).unwrap().as_uuid();
    assert_eq!(
        events,
        [
            Event {
                event: EventName::ProductCreated,
                id,
                categories: vec!["lamps".into()]
            },
            // A price change leaves the product's place in its list: no category.
            Event {
                event: EventName::ProductPriceChanged,
                id,
                categories: vec![]
            },
        ]
    );
    drop(messages);
    // Both instances (one process, one set of metrics) received both events.
    let received = eventually(Duration::from_secs(2), || async {
        app.metric(r#"readthrough_events_received_total{event="product.price.changed"}"#)
            .await
            == 2.0
    })
    .await;
    assert!(received, "each instance counted the event");
    assert!(
        !app.exists(&app.keys.product(ProductId::parse(&product.id).unwrap()))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_one_event_per_entity_for_a_burst_of_changes() {
    let app = spawn_app().await;
    let user = app.create_user("burst@example.com").await;
    app.outbox_drained().await; // the create's own invalidation is done
    let client = redis::Client::open(Sandbox::new().redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}:v1:events", app.config.backends.cache.namespace))
        .await
        .unwrap();

    // Five changes by hand in one transaction: five outbox rows for one user.
    let mut tx = app.db.begin().await.unwrap();
    for n in 0..5 {
        sqlx::query("UPDATE users SET preferences = jsonb_build_object('n', $2::int) WHERE id = $1::uuid")
            .bind(&user.id)
            .bind(n)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let mut messages = pubsub.on_message();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut messages)).await
    {
        events.push(serde_json::from_slice::<Event>(message.get_payload_bytes()).unwrap());
    }
    let id = UserId::parse(&user.id).unwrap().as_uuid();
    assert_eq!(
        events,
        [Event {
            event: EventName::UserUpdated,
            id,
            categories: vec![],
        }],
        "five rows, one event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_batch_nobody_subscribes_to_deletes_its_keys_and_publishes_nothing() {
    let mut app = spawn_app().await; // no near cache: nothing subscribes
    let user = app.create_user("unheard@example.com").await;
    app.outbox_drained().await;
    let key = app.keys.user(UserId::parse(&user.id).unwrap());
    assert!(
        app.read_until_cached(&key, || app.get_user(&user.id)).await,
        "the user is cached"
    );
    let published = r#"readthrough_events_published_total{event="user.updated"}"#;

    // By hand: the relay carries it out.
    sqlx::query("UPDATE users SET email = 'changed-unheard@example.com' WHERE id = $1::uuid")
        .bind(&user.id)
        .execute(&app.db)
        .await
        .unwrap();
    app.outbox_drained().await;

    assert!(!app.exists(&key).await, "the relay deleted the entry");
    assert_eq!(app.metric(published).await, 0.0, "and published no event");
    assert_eq!(app.get_user(&user.id).await.email, "changed-unheard@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_instance_with_a_near_cache_subscribes_to_events() {
    let mut app = spawn_app().await; // no near cache
    let with_near_cache = app
        .spawn_sibling_with(|config| config.backends.cache.near_cache_enabled = true)
        .await;
    let channel = app.keys.events();
    let user = app.create_user("heard@example.com").await;
    let heard = eventually(Duration::from_secs(5), || async {
        with_near_cache
            .metric(r#"readthrough_events_received_total{event="user.created"}"#)
            .await
            >= 1.0
    })
    .await;
    assert!(heard, "the instance with a near cache receives events ({})", user.id);
    let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut app.redis)
        .await
        .unwrap();
    assert_eq!(subscribers, 1, "only the instance with a near cache subscribed");
}
