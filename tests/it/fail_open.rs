//! Redis is an optimisation: with Redis down or dying, every call still answers from PostgreSQL.

use readthrough_client::proto::{CreateProductRequest, ListProductsRequest, UpdateUserRequest};
use tonic::Code;

use readthrough_testkit::{OwnRedis, free_port, rename_request, spawn_app_with};

#[tokio::test]
async fn reads_and_writes_succeed_with_nothing_listening_on_the_redis_port() {
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let mut app = spawn_app_with(|config| config.backends.cache.redis_url = dead_redis.parse().unwrap()).await;

    let user = app.client.create_user("offline@example.com", None).await.unwrap();
    let read = app.get_user(&user.id).await;
    assert_eq!(read, user);
    let updated = app
        .users
        .update_user(UpdateUserRequest {
            expected_version: 1,
            ..rename_request(&user.id, "still@example.com")
        })
        .await
        .unwrap()
        .into_inner();
    let reread = app.get_user(&user.id).await;
    assert_eq!(reread, updated);
    let batch = app.client.batch_get_users(vec![user.id.clone()]).await.unwrap();
    assert_eq!(batch.users, [updated]);

    let product = app
        .client
        .create_product(CreateProductRequest {
            category_id: "offline".into(),
            name: "Lantern".into(),
            description: String::new(),
            price_cents: 500,
            currency: "EUR".into(),
        })
        .await
        .unwrap();
    let page = app
        .products
        .list_products(ListProductsRequest {
            category_id: "offline".into(),
            page: 0,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((page.total_count, page.products), (1, vec![product.clone()]));
    app.reprice(&product.id, 450, 1).await.unwrap();
    let repriced = app.client.get_product(&product.id).await.unwrap();
    assert_eq!(repriced.price_cents, 450);

    app.client.delete_product(&product.id).await.unwrap();
    app.client.delete_user(&user.id).await.unwrap();
    let gone = app.client.get_user(&user.id).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let counted = app
        .metrics(&[
            r#"readthrough_cache_errors_total{operation="get"}"#,
            r#"readthrough_cache_skipped_total{operation="get"}"#,
        ])
        .await;
    assert!(
        counted.iter().sum::<f64>() >= 1.0,
        "reads that found no Redis are counted, as errors or (breaker open) as skipped: {counted:?}"
    );
}

#[tokio::test]
async fn reads_keep_working_when_redis_dies_mid_run() {
    let mut redis_server = OwnRedis::start().await;
    let url = redis_server.url.clone();
    let app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let user = app.client.create_user("survivor@example.com", None).await.unwrap();
    app.client.get_user(&user.id).await.unwrap();
    assert_eq!(
        app.metric(r#"readthrough_cache_errors_total{operation="get"}"#).await,
        0.0
    );

    redis_server.kill();

    for _ in 0..20 {
        let read = app.get_user(&user.id).await;
        assert_eq!(read.email, "survivor@example.com");
    }
    let updated = app.rename_user(&user.id, "after@example.com").await.unwrap();
    assert_eq!(updated.email, "after@example.com");
    assert!(app.metric(r#"readthrough_cache_errors_total{operation="get"}"#).await >= 1.0);
}
