//! ProductService: cached products and paginated category lists, kept right across writes.

use readthrough::{
    cache::{Entry, ListMeta},
    domain::{CategoryId, Product, ProductId},
};
use readthrough_client::proto::{self, CreateProductRequest};
use tonic::Code;

use readthrough_testkit::{TestApp, redis, spawn_app, spawn_app_with};

/// Every page of the category concatenated, checking each page's `total_count`.
async fn list_all(app: &mut TestApp, category: &str, page_size: i32) -> (Vec<proto::Product>, i64) {
    let first = app.list_page(category, 0, page_size).await;
    let total = first.total_count;
    let mut all = first.products;
    let mut page = 1;
    while (all.len() as i64) < total {
        let next = app.list_page(category, page, page_size).await;
        assert_eq!(next.total_count, total, "total_count is the same on every page");
        assert!(
            !next.products.is_empty(),
            "page {page} is empty before all {total} were listed"
        );
        all.extend(next.products);
        page += 1;
    }
    let past_end = app.list_page(category, page, page_size).await;
    assert!(past_end.products.is_empty(), "the page past the end is empty");
    (all, total)
}

/// The ids of every product of a category, walked page by page with tokens.
async fn walk_with_tokens(app: &mut TestApp, category: &str, page_size: i32) -> Vec<String> {
    let mut page = app.list_page(category, 0, page_size).await;
    let mut walked = ids(&page.products);
    while !page.next_page_token.is_empty() {
        page = app.list_after(category, &page.next_page_token, page_size).await;
        assert!(!page.products.is_empty(), "a token leads to a page with products");
        walked.extend(ids(&page.products));
    }
    walked
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
    let books = app.create_products("books", 45).await;
    app.create_products("games", 5).await;

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

    let default_size = app.list_page("books", 0, 0).await;
    assert_eq!((default_size.products.len(), default_size.page_size), (20, 20));
}

#[tokio::test]
async fn a_warm_page_does_not_reach_the_database() {
    let app = spawn_app().await;
    app.create_products("tools", 12).await;
    app.list_page("tools", 1, 5).await;
    let before = product_queries(&app).await;
    let page = app.list_page("tools", 1, 5).await;
    assert_eq!(page.products.len(), 5);
    assert_eq!(product_queries(&app).await, before);
}

/// Every query a product page can cost, by its counted name.
const PRODUCT_QUERIES: &[&str] = &[
    "product.get_many",
    "product.list_head",
    "product.list_range",
    "product.list_directory",
    "product.list_offset",
    "product.count_in_category",
];

async fn queries(app: &TestApp, names: &[&str]) -> f64 {
    let mut sum = 0.0;
    for name in names {
        sum += app
            .metric(&format!(r#"readthrough_db_queries_total{{query="{name}"}}"#))
            .await;
    }
    sum
}

async fn product_queries(app: &TestApp) -> f64 {
    queries(app, PRODUCT_QUERIES).await
}

#[tokio::test]
async fn moving_a_product_updates_both_category_lists() {
    let mut app = spawn_app().await;
    let mut books = app.create_products("books", 9).await;
    let mut games = app.create_products("games", 4).await;
    list_all(&mut app, "books", 4).await;
    list_all(&mut app, "games", 4).await;

    let moved = books.remove(3);
    let updated = app
        .client
        .update_product(
            proto::Product {
                id: moved.id.clone(),
                category_id: "games".to_string(),
                ..Default::default()
            },
            &["category_id"],
            1,
        )
        .await
        .unwrap();
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
    let mut tools = app.create_products("tools", 10).await;
    list_all(&mut app, "tools", 3).await;

    let last = in_list_order(tools.clone()).pop().unwrap();
    let renamed = app
        .client
        .update_product(
            proto::Product {
                id: last.clone(),
                name: "0 first now".to_string(),
                ..Default::default()
            },
            &["name"],
            0,
        )
        .await
        .unwrap();
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
    let toys = app.create_products("toys", 3).await;
    assert_eq!(app.list_page("toys", 0, 10).await.total_count, 3);

    app.create_product("toys", "Yo-yo").await;
    assert_eq!(app.list_page("toys", 0, 10).await.total_count, 4);

    app.client.delete_product(&toys[0].id).await.unwrap();
    let page = app.list_page("toys", 0, 10).await;
    assert_eq!(page.total_count, 3);
    assert!(!ids(&page.products).contains(&toys[0].id));
    let product_key = app.keys.product(ProductId::parse(&toys[0].id).unwrap());
    assert!(!app.exists(&product_key).await);
    let gone = app.client.get_product(&toys[0].id).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let empty = app.list_page("no-such-category", 0, 10).await;
    assert_eq!((empty.total_count, empty.products.len()), (0, 0));
}

/// `count` products in `category`, inserted directly; their ids in list order.
async fn insert_products(app: &TestApp, category: &str, count: u32) -> Vec<String> {
    sqlx::query(
        "INSERT INTO products (id, category_id, name, price_cents, currency) \
         SELECT gen_random_uuid(), $1, md5(i::text), i, 'USD' FROM generate_series(1, $2) AS i",
    )
    .bind(category)
    .bind(count as i32)
    .execute(&app.db)
    .await
    .unwrap();
    // The rows' invalidations (done by the outbox relay, 200 ms on) must not
    // land in the middle of the test and drop the list it has just cached.
    app.outbox_drained().await;
    sqlx::query_scalar("SELECT id::text FROM products WHERE category_id = $1 ORDER BY name, id")
        .bind(category)
        .fetch_all(&app.db)
        .await
        .unwrap()
}

async fn cached_list_len(app: &mut TestApp, category: &CategoryId) -> i64 {
    redis::cmd("ZCARD")
        .arg(app.keys.list_ids(category))
        .query_async(&mut app.redis)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_huge_category_caches_its_head_then_the_chunks_deep_pages_need() {
    let mut app = spawn_app_with(|config| {
        config.backends.cache.list_cache_max_ids = 100;
        config.backends.cache.list_chunk_ids = 50;
    })
    .await;
    let category = CategoryId::parse("bulk").unwrap();
    let expected = insert_products(&app, "bulk", 250).await;

    let first = app.list_page("bulk", 0, 40).await;
    assert_eq!(first.total_count, 250);
    let meta: ListMeta = app.cached_value(&app.keys.list_meta(&category)).await.unwrap();
    assert_eq!((meta.total, meta.head, meta.chunk), (250, 100, 50));
    assert_eq!(
        cached_list_len(&mut app, &category).await,
        100,
        "a cold list caches its head only"
    );

    let (listed, total) = list_all(&mut app, "bulk", 40).await;
    assert_eq!(total, 250);
    assert_eq!(ids(&listed), expected);
    assert_eq!(
        cached_list_len(&mut app, &category).await,
        250,
        "walking it cached every chunk"
    );

    let before = product_queries(&app).await;
    let (again, _) = list_all(&mut app, "bulk", 40).await;
    assert_eq!(ids(&again), expected);
    assert_eq!(
        product_queries(&app).await,
        before,
        "the second walk read only the cache"
    );
}

#[tokio::test]
async fn a_cold_deep_page_is_one_range_scan_never_an_offset() {
    let app = spawn_app_with(|config| {
        config.backends.cache.list_cache_max_ids = 100;
        config.backends.cache.list_chunk_ids = 50;
    })
    .await;
    let expected = insert_products(&app, "deep", 1_000).await;
    app.list_page("deep", 0, 20).await;

    let deep = app.list_page("deep", 45, 20).await; // positions 900..920
    assert_eq!(ids(&deep.products), expected[900..920]);
    let deeper = app.list_page("deep", 47, 20).await; // 940..960: another chunk
    assert_eq!(ids(&deeper.products), expected[940..960]);

    assert_eq!(queries(&app, &["product.list_offset"]).await, 0.0, "no OFFSET scan");
    assert_eq!(
        queries(&app, &["product.list_range"]).await,
        2.0,
        "one range scan per chunk"
    );
    assert_eq!(
        queries(&app, &["product.list_directory"]).await,
        1.0,
        "one directory per list generation"
    );

    // The plan of the chunk query: an index range scan that reads only its rows.
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) \
         SELECT id, name FROM products WHERE category_id = 'deep' AND (name, id) >= ($1, $2::uuid) \
         ORDER BY name, id LIMIT 50",
    )
    .bind(&deep.products[0].name)
    .bind(&deep.products[0].id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("Index"), "{plan}");
    assert!(plan.contains("rows=50 "), "the scan stops after its 50 rows: {plan}");
}

#[tokio::test]
async fn page_tokens_walk_every_product_exactly_once() {
    let mut app = spawn_app_with(|config| {
        config.backends.cache.list_cache_max_ids = 100;
        config.backends.cache.list_chunk_ids = 20;
    })
    .await;
    let expected = insert_products(&app, "walk", 230).await;

    let cold = walk_with_tokens(&mut app, "walk", 30).await;
    assert_eq!(cold, expected);
    let before = product_queries(&app).await;
    let warm = walk_with_tokens(&mut app, "walk", 30).await;
    assert_eq!(warm, expected);
    assert_eq!(product_queries(&app).await, before, "a warm walk reads only the cache");
}

#[tokio::test]
async fn a_token_after_a_change_continues_after_its_last_product() {
    let app = spawn_app().await;
    app.create_products("shelf", 12).await;
    let first = app.list_page("shelf", 0, 5).await;
    let last_seen = first.products.last().unwrap().clone();

    // Products that sort before and after the page boundary: the list changes generation.
    app.create_product("shelf", "0 sorts first").await;
    app.create_product("shelf", "zz sorts last").await;

    let second = app.list_after("shelf", &first.next_page_token, 5).await;
    assert_eq!(second.total_count, 14, "the total is the current one");
    let expected: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM products WHERE category_id = 'shelf' AND (name, id) > ($1, $2::uuid) \
         ORDER BY name, id LIMIT 5",
    )
    .bind(&last_seen.name)
    .bind(&last_seen.id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        ids(&second.products),
        expected,
        "the next five after the last product seen"
    );
}

#[tokio::test]
async fn price_and_description_changes_leave_the_list_cached() {
    let mut app = spawn_app().await;
    let mut pens = app.create_products("pens", 6).await;
    let category = CategoryId::parse("pens").unwrap();
    app.list_page("pens", 0, 10).await;
    let meta_key = app.keys.list_meta(&category);
    let generation = app.cached_value::<ListMeta>(&meta_key).await.unwrap().generation;

    let target = pens.remove(2);
    let updated = app
        .client
        .update_product(
            proto::Product {
                id: target.id.clone(),
                price_cents: 4242,
                description: "now cheaper".to_string(),
                ..Default::default()
            },
            &["price_cents", "description"],
            0,
        )
        .await
        .unwrap();
    assert_eq!(updated.version, 2);

    let meta: ListMeta = app.cached_value(&meta_key).await.expect("the list is still cached");
    assert_eq!(meta.generation, generation, "the same list, not a refill");
    let hits = app.metric(r#"readthrough_cache_hits_total{entity="list"}"#).await;
    let page = app.list_page("pens", 0, 10).await;
    assert_eq!(
        app.metric(r#"readthrough_cache_hits_total{entity="list"}"#).await,
        hits + 1.0,
        "the page's ids came from the cached list"
    );
    let shown = page.products.iter().find(|p| p.id == target.id).unwrap();
    assert_eq!(
        (shown.price_cents, shown.version),
        (4242, 2),
        "with the product's new price"
    );

    // A rename moves the product within the list: that invalidates it.
    app.client
        .update_product(
            proto::Product {
                id: target.id.clone(),
                name: "0 renamed".to_string(),
                ..Default::default()
            },
            &["name"],
            0,
        )
        .await
        .unwrap();
    assert!(!app.exists(&meta_key).await, "a rename drops the list");
}

#[tokio::test]
async fn damaged_list_entries_are_rebuilt() {
    let mut app = spawn_app().await;
    let pens = app.create_products("pens", 6).await;
    let category = CategoryId::parse("pens").unwrap();
    app.list_page("pens", 0, 3).await;

    // The ids evicted while the metadata survived.
    let _: () = redis::cmd("DEL")
        .arg(app.keys.list_ids(&category))
        .query_async(&mut app.redis)
        .await
        .unwrap();
    assert_eq!(
        ids(&app.list_page("pens", 0, 6).await.products),
        in_list_order(pens.clone())
    );

    // Garbage metadata.
    let _: () = redis::cmd("SET")
        .arg(app.keys.list_meta(&category))
        .arg("junk")
        .query_async(&mut app.redis)
        .await
        .unwrap();
    let page = app.list_page("pens", 0, 6).await;
    assert_eq!((page.total_count, ids(&page.products)), (6, in_list_order(pens)));
    let meta: ListMeta = app.cached_value(&app.keys.list_meta(&category)).await.unwrap();
    assert_eq!(meta.total, 6, "the metadata was rebuilt");
}

#[tokio::test]
async fn large_values_are_stored_compressed() {
    let mut app = spawn_app().await;
    let created = app
        .client
        .create_product(CreateProductRequest {
            category_id: "books".to_string(),
            name: "Long read".to_string(),
            description: "lorem ipsum ".repeat(400),
            price_cents: 0,
            currency: "GBP".to_string(),
        })
        .await
        .unwrap();
    let read = app.client.get_product(&created.id).await.unwrap();
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

#[tokio::test]
async fn page_tokens_work_across_instances_with_no_secret_set_and_cannot_be_forged() {
    use readthrough::{api::PageTokens, domain::Cursor};
    let app = spawn_app().await;
    let sibling = app.spawn_sibling().await;
    app.create_products("forge", 6).await;
    let first = app.list_page("forge", 0, 3).await;
    let second = sibling.list_after("forge", &first.next_page_token, 3).await;
    assert_eq!(second.products.len(), 3, "the database's key is shared");

    let refused = |token: String| {
        let client = app.client.clone();
        async move {
            let page = readthrough_client::Page::After(token);
            let status = client.list_products("forge", page, 3).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            status.message().to_string()
        }
    };
    let cursor = |position: u64, name: &str| Cursor {
        generation: 1,
        position,
        key: Some((name.to_string(), ProductId::parse(&first.products[2].id).unwrap())),
    };
    let category = CategoryId::parse("forge").unwrap();
    // The key the service once had built in, public in its source.
    let built_in = PageTokens::new(vec![b"readthrough page tokens".to_vec()]);
    refused(built_in.encode(&category, &cursor(3, &first.products[2].name))).await;

    // Signed with the real key (as if it leaked): what it decodes to is still checked.
    let keys: Vec<Vec<u8>> = sqlx::query_scalar("SELECT key FROM page_token_keys")
        .fetch_all(&app.db)
        .await
        .unwrap();
    let real = PageTokens::new(keys);
    for position in [1 << 63, u64::MAX - 4] {
        refused(real.encode(&category, &cursor(position, &first.products[2].name))).await;
    }
    let message = refused(real.encode(&category, &cursor(3, "nul\0name"))).await;
    assert!(!message.contains("0x00") && !message.contains("UTF8"), "{message}");
}
