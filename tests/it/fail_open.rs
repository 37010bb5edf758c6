//! Redis is an optimisation: with Redis down or dying, every call still answers from PostgreSQL.

use prost_types::FieldMask;
use readthrough::proto::{
    self, BatchGetUsersRequest, CreateProductRequest, CreateUserRequest, DeleteProductRequest, DeleteUserRequest,
    GetProductRequest, GetUserRequest, ListProductsRequest, UpdateProductRequest, UpdateUserRequest,
};
use tonic::Code;

use crate::helpers::{OwnRedis, free_port, rename_user, spawn_app_with};

#[tokio::test]
async fn reads_and_writes_succeed_with_nothing_listening_on_the_redis_port() {
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let mut app = spawn_app_with(|config| config.config.cache.redis_url = dead_redis.parse().unwrap()).await;

    let user = app
        .users
        .create_user(CreateUserRequest {
            email: "offline@example.com".into(),
            preferences: None,
        })
        .await
        .unwrap()
        .into_inner();
    let read = app.get_user(&user.id).await;
    assert_eq!(read, user);
    let updated = app
        .users
        .update_user(UpdateUserRequest {
            expected_version: 1,
            ..rename_user(&user.id, "still@example.com")
        })
        .await
        .unwrap()
        .into_inner();
    let reread = app.get_user(&user.id).await;
    assert_eq!(reread, updated);
    let batch = app
        .users
        .batch_get_users(BatchGetUsersRequest {
            ids: vec![user.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.users, [updated]);

    let product = app
        .products
        .create_product(CreateProductRequest {
            category_id: "offline".into(),
            name: "Lantern".into(),
            description: String::new(),
            price_cents: 500,
            currency: "EUR".into(),
        })
        .await
        .unwrap()
        .into_inner();
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
    app.products
        .update_product(UpdateProductRequest {
            product: Some(proto::Product {
                id: product.id.clone(),
                price_cents: 450,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["price_cents".into()],
            }),
            expected_version: 1,
        })
        .await
        .unwrap();
    let repriced = app
        .products
        .get_product(GetProductRequest { id: product.id.clone() })
        .await
        .unwrap();
    assert_eq!(repriced.into_inner().price_cents, 450);

    app.products
        .delete_product(DeleteProductRequest { id: product.id })
        .await
        .unwrap();
    app.users
        .delete_user(DeleteUserRequest { id: user.id.clone() })
        .await
        .unwrap();
    let gone = app.users.get_user(GetUserRequest { id: user.id }).await.unwrap_err();
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
    let mut app = spawn_app_with(|config| config.config.cache.redis_url = url.parse().unwrap()).await;
    let user = app
        .users
        .create_user(CreateUserRequest {
            email: "survivor@example.com".into(),
            preferences: None,
        })
        .await
        .unwrap()
        .into_inner();
    app.users
        .get_user(GetUserRequest { id: user.id.clone() })
        .await
        .unwrap();
    assert_eq!(
        app.metric(r#"readthrough_cache_errors_total{operation="get"}"#).await,
        0.0
    );

    redis_server.kill();

    for _ in 0..20 {
        let read = app.get_user(&user.id).await;
        assert_eq!(read.email, "survivor@example.com");
    }
    let updated = app
        .users
        .update_user(rename_user(&user.id, "after@example.com"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.email, "after@example.com");
    assert!(app.metric(r#"readthrough_cache_errors_total{operation="get"}"#).await >= 1.0);
}
