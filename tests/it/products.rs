//! ProductService: cached products and paginated category lists, kept right across writes.

use prost_types::FieldMask;
use rand::{Rng, distr::Alphanumeric};
use readthrough::{
    cache::{Entry, ListMeta},
    domain::{CategoryId, Product, ProductId},
    proto::{
        self, CreateProductRequest, DeleteProductRequest, GetProductRequest, ListProductsRequest, UpdateProductRequest,
    },
};
use tonic::Code;

use crate::helpers::{TestApp, redis, spawn_app, spawn_app_with};

async fn create_product(app: &mut TestApp, category: &str, name: &str) -> proto::Product {
    app.products
        .create_product(CreateProductRequest {
            category_id: category.to_string(),
            name: name.to_string(),
            description: format!("about {name}"),
            price_cents: 1999,
            currency: "EUR".to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Products with random names, so that list order differs from creation order.
async fn create_products(app: &mut TestApp, category: &str, count: usize) -> Vec<proto::Product> {
    let mut created = Vec::with_capacity(count);
    for _ in 0..count {
        let name: String = rand::rng().sample_iter(&Alphanumeric).take(8).map(char::from).collect();
        created.push(create_product(app, category, &name).await);
    }
    created
}

async fn list_page(app: &mut TestApp, category: &str, page: i32, page_size: i32) -> proto::ListProductsResponse {
    app.products
        .list_products(ListProductsRequest {
            category_id: category.to_string(),
            page,
            page_size,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Every page of the category concatenated, checking each page's `total_count`.
async fn list_all(app: &mut TestApp, category: &str, page_size: i32) -> (Vec<proto::Product>, i64) {
    let first = list_page(app, category, 0, page_size).await;
    let total = first.total_count;
    let mut all = first.products;
    let mut page = 1;
    while (all.len() as i64) < total {
        let next = list_page(app, category, page, page_size).await;
        assert_eq!(next.total_count, total, "total_count is the same on every page");
        assert!(
            !next.products.is_empty(),
            "page {page} is empty before all {total} were listed"
        );
        all.extend(next.products);
        page += 1;
    }
    let past_end = list_page(app, category, page, page_size).await;
    assert!(past_end.products.is_empty(), "the page past the end is empty");
    (all, total)
}

/// The products in the order ListProducts promises: by name, then id.
fn in_list_order(mut products: Vec<proto::Product>) -> Vec<String> {
    products.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    products.into_iter().map(|p| p.id).collect()
}

fn ids(products: &[proto::Product]) -> Vec<String> {
    products.iter().map(|p| p.id.clone()).collect()
}

#[tokio::test]
async fn pages_list_every_product_of_the_category_exactly_once() {
    let mut app = spawn_app().await;
    let books = create_products(&mut app, "books", 45).await;
    create_products(&mut app, "games", 5).await;

    let (cold, total) = list_all(&mut app, "books", 7).await;
    assert_eq!(total, 45);
    assert_eq!(ids(&cold), in_list_order(books.clone()));

    let hits_before = app.metric(r#"readthrough_cache_hits_total{entity="list"}"#).await;
    let (warm, _) = list_all(&mut app, "books", 7).await;
    assert_eq!(ids(&warm), ids(&cold));
    let hits = app.metric(r#"readthrough_cache_hits_total{entity="list"}"#).await - hits_before;
    assert_eq!(
        hits, 8.0,
        "7 full pages and the empty page past the end came from the cache"
    );

    let default_size = list_page(&mut app, "books", 0, 0).await;
    assert_eq!((default_size.products.len(), default_size.page_size), (20, 20));
}

#[tokio::test]
async fn a_warm_page_does_not_reach_the_database() {
    let mut app = spawn_app().await;
    create_products(&mut app, "tools", 12).await;
    list_page(&mut app, "tools", 1, 5).await;
    let before = product_queries(&app).await;
    let page = list_page(&mut app, "tools", 1, 5).await;
    assert_eq!(page.products.len(), 5);
    assert_eq!(product_queries(&app).await, before);
}

async fn product_queries(app: &TestApp) -> f64 {
    app.metric(r#"readthrough_db_queries_total{query="product.list_ids"}"#)
        .await
        + app
            .metric(r#"readthrough_db_queries_total{query="product.get_many"}"#)
            .await
        + app
            .metric(r#"readthrough_db_queries_total{query="product.count_in_category"}"#)
            .await
}

#[tokio::test]
async fn moving_a_product_updates_both_category_lists() {
    let mut app = spawn_app().await;
    let mut books = create_products(&mut app, "books", 9).await;
    let mut games = create_products(&mut app, "games", 4).await;
    list_all(&mut app, "books", 4).await;
    list_all(&mut app, "games", 4).await;

    let moved = books.remove(3);
    let updated = app
        .products
        .update_product(UpdateProductRequest {
            product: Some(proto::Product {
                id: moved.id.clone(),
                category_id: "games".to_string(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["category_id".to_string()],
            }),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((updated.category_id.as_str(), updated.version), ("games", 2));
    games.push(updated);

    let (book_list, book_total) = list_all(&mut app, "books", 4).await;
    let (game_list, game_total) = list_all(&mut app, "games", 4).await;
    assert_eq!((book_total, game_total), (8, 5));
    assert_eq!(ids(&book_list), in_list_order(books));
    assert_eq!(ids(&game_list), in_list_order(games));
}

#[tokio::test]
async fn renaming_a_product_reorders_its_list() {
    let mut app = spawn_app().await;
    let mut tools = create_products(&mut app, "tools", 10).await;
    list_all(&mut app, "tools", 3).await;

    let last = in_list_order(tools.clone()).pop().unwrap();
    let renamed = app
        .products
        .update_product(UpdateProductRequest {
            product: Some(proto::Product {
                id: last.clone(),
                name: "0 first now".to_string(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["name".to_string()],
            }),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    tools.retain(|p| p.id != last);
    tools.push(renamed);

    let (listed, total) = list_all(&mut app, "tools", 3).await;
    assert_eq!(total, 10);
    assert_eq!(listed[0].id, last);
    assert_eq!(
        listed[0].name, "0 first now",
        "the list shows the new name, not a stale product entry"
    );
    assert_eq!(ids(&listed), in_list_order(tools));
}

#[tokio::test]
async fn create_and_delete_change_the_total() {
    let mut app = spawn_app().await;
    let toys = create_products(&mut app, "toys", 3).await;
    assert_eq!(list_page(&mut app, "toys", 0, 10).await.total_count, 3);

    create_product(&mut app, "toys", "Yo-yo").await;
    assert_eq!(list_page(&mut app, "toys", 0, 10).await.total_count, 4);

    app.products
        .delete_product(DeleteProductRequest { id: toys[0].id.clone() })
        .await
        .unwrap();
    let page = list_page(&mut app, "toys", 0, 10).await;
    assert_eq!(page.total_count, 3);
    assert!(!ids(&page.products).contains(&toys[0].id));
    let product_key = app.keys.product(ProductId::parse(&toys[0].id).unwrap());
    assert!(!app.exists(&product_key).await);
    let gone = app
        .products
        .get_product(GetProductRequest { id: toys[0].id.clone() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let empty = list_page(&mut app, "no-such-category", 0, 10).await;
    assert_eq!((empty.total_count, empty.products.len()), (0, 0));
}

#[tokio::test]
async fn a_huge_category_caches_only_its_head_and_pages_past_it_still_work() {
    let mut app = spawn_app_with(|config| config.config.list_cache_max_ids = 100).await;
    let category = CategoryId::parse("bulk").unwrap();
    sqlx::query(
        "INSERT INTO products (id, category_id, name, price_cents, currency) \
         SELECT gen_random_uuid(), 'bulk', md5(i::text), i, 'USD' FROM generate_series(1, 250) AS i",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let expected: Vec<String> = sqlx::query_scalar("SELECT id::text FROM products ORDER BY name, id")
        .fetch_all(&app.db)
        .await
        .unwrap();

    let (listed, total) = list_all(&mut app, "bulk", 40).await;
    assert_eq!(total, 250);
    assert_eq!(ids(&listed), expected);

    let meta: ListMeta = app.cached_value(&app.keys.list_meta(&category)).await.unwrap();
    assert_eq!(
        meta,
        ListMeta {
            total: 250,
            cached: 100
        }
    );
    let cached_ids: i64 = redis::cmd("ZCARD")
        .arg(app.keys.list_ids(&category))
        .query_async(&mut app.redis)
        .await
        .unwrap();
    assert_eq!(cached_ids, 100);
}

#[tokio::test]
async fn damaged_list_entries_are_rebuilt() {
    let mut app = spawn_app().await;
    let pens = create_products(&mut app, "pens", 6).await;
    let category = CategoryId::parse("pens").unwrap();
    list_page(&mut app, "pens", 0, 3).await;

    // The ids evicted while the metadata survived.
    let _: () = redis::cmd("DEL")
        .arg(app.keys.list_ids(&category))
        .query_async(&mut app.redis)
        .await
        .unwrap();
    assert_eq!(
        ids(&list_page(&mut app, "pens", 0, 6).await.products),
        in_list_order(pens.clone())
    );

    // Garbage metadata.
    let _: () = redis::cmd("SET")
        .arg(app.keys.list_meta(&category))
        .arg("junk")
        .query_async(&mut app.redis)
        .await
        .unwrap();
    let page = list_page(&mut app, "pens", 0, 6).await;
    assert_eq!((page.total_count, ids(&page.products)), (6, in_list_order(pens)));
    let meta: ListMeta = app.cached_value(&app.keys.list_meta(&category)).await.unwrap();
    assert_eq!(meta.total, 6, "the metadata was rebuilt");
}

#[tokio::test]
async fn large_values_are_stored_compressed() {
    let mut app = spawn_app().await;
    let created = app
        .products
        .create_product(CreateProductRequest {
            category_id: "books".to_string(),
            name: "Long read".to_string(),
            description: "lorem ipsum ".repeat(400),
            price_cents: 0,
            currency: "GBP".to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let read = app
        .products
        .get_product(GetProductRequest { id: created.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, created);

    let key = app.keys.product(ProductId::parse(&created.id).unwrap());
    let raw = app.cached(&key).await.unwrap();
    assert_eq!(raw[1] & 1, 1, "the zstd flag is set");
    assert!(
        raw.len() < 1000,
        "4800 characters of description compress well: {} bytes",
        raw.len()
    );
    let cached: Product = app
        .cached_value::<Entry<Product>>(&key)
        .await
        .and_then(|e| e.value)
        .unwrap();
    assert_eq!(cached.description, created.description);
}
