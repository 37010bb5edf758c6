//! Every input rule: INVALID_ARGUMENT naming the field, nothing written, nothing cached.

use prost_types::{FieldMask, Struct, Value, value::Kind};
use readthrough_client::proto::{
    self, CreateProductRequest, CreateUserRequest, ListProductsRequest, UpdateProductRequest, UpdateUserRequest,
};
use tonic::Code;

use readthrough_testkit::{TestApp, spawn_app};

/// Asserts the call failed with INVALID_ARGUMENT and a message naming `field`.
#[track_caller]
/// `result` (of the typed client or a raw stub) is INVALID_ARGUMENT naming `field`.
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = result.expect_err("the call should be rejected");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{field}:")),
        "message names {field}: {:?}",
        status.message()
    );
}

fn product(category: &str, name: &str, description: &str, price_cents: i64, currency: &str) -> CreateProductRequest {
    CreateProductRequest {
        category_id: category.to_string(),
        name: name.to_string(),
        description: description.to_string(),
        price_cents,
        currency: currency.to_string(),
    }
}

fn nested(depth: usize) -> Struct {
    let mut value = Struct::default();
    for _ in 1..depth {
        value = Struct {
            fields: [(
                "a".to_string(),
                Value {
                    kind: Some(Kind::StructValue(value)),
                },
            )]
            .into(),
        };
    }
    value
}

async fn assert_nothing_stored(app: &mut TestApp) {
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let products: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!((users, products), (0, 0), "rejected writes stored nothing");
    let epochs = app.keys.epochs();
    let cached: Vec<String> = app
        .namespace_keys()
        .await
        .into_iter()
        .filter(|key| *key != epochs)
        .collect();
    assert_eq!(cached, Vec::<String>::new(), "rejected requests cached nothing");
}

#[tokio::test]
async fn ids_must_be_uuids() {
    let mut app = spawn_app().await;
    for bad in [
        "",
        "42",
        "not-a-uuid",
        "../../etc",
        "rt:v1:user:*",
        "123e4567-e89b-12d3-a456-42661417400",
    ] {
        assert_invalid(app.client.get_user(bad).await, "id");
        assert_invalid(app.client.delete_user(bad).await, "id");
        assert_invalid(app.client.get_product(bad).await, "id");
        assert_invalid(app.client.delete_product(bad).await, "id");
        assert_invalid(app.client.batch_get_users([bad]).await, "ids");
    }
    assert_nothing_stored(&mut app).await;
}

#[tokio::test]
async fn a_batch_of_more_than_100_ids_is_rejected() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..101).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    assert_invalid(app.client.batch_get_users(ids.clone()).await, "ids");

    let hundred = app.client.batch_get_users(ids[..100].to_vec()).await.unwrap();
    assert_eq!(hundred.missing_ids.len(), 100);
}

#[tokio::test]
async fn emails_must_be_well_formed_and_at_most_254_characters() {
    let mut app = spawn_app().await;
    let too_long = format!("{}@example.com", "a".repeat(243));
    assert_eq!(too_long.len(), 255);
    for bad in [
        "",
        "plain",
        "@example.com",
        "a@",
        "a b@example.com",
        "a@b",
        "a@@example.com",
        too_long.as_str(),
    ] {
        let request = CreateUserRequest {
            email: bad.into(),
            preferences: None,
        };
        assert_invalid(app.users.create_user(request).await, "email");
    }
    let longest = format!("{}@example.com", "a".repeat(242));
    assert_eq!(longest.len(), 254);
    let request = CreateUserRequest {
        email: longest,
        preferences: None,
    };
    assert_invalid(app.users.create_user(request).await, "email"); // local part over 64
    let ok = CreateUserRequest {
        email: format!("{}@{}.com", "a".repeat(64), "b".repeat(185)),
        preferences: None,
    };
    assert!(app.users.create_user(ok).await.is_ok(), "254 characters are accepted");
}

#[tokio::test]
async fn invisible_and_reordering_characters_are_refused_in_emails_and_names() {
    let mut app = spawn_app().await;
    // Right-to-left override, zero-width space, byte order mark, left-to-right isolate.
    for hidden in ['\u{202E}', '\u{200B}', '\u{FEFF}', '\u{2066}'] {
        let request = CreateUserRequest {
            email: format!("ad{hidden}min@example.com"),
            preferences: None,
        };
        assert_invalid(app.users.create_user(request).await, "email");
        let request = product("books", &format!("Manual{hidden}"), "", 100, "EUR");
        assert_invalid(app.client.create_product(request).await, "name");
    }
    assert_nothing_stored(&mut app).await;
    // A joiner is part of some scripts and emoji sequences: names keep it.
    let family = product("books", "Family \u{1F468}\u{200D}\u{1F469}", "", 100, "EUR");
    assert!(app.client.create_product(family).await.is_ok());
}

#[tokio::test]
async fn an_unknown_update_mask_path_is_quoted_back_only_in_part() {
    let mut app = spawn_app().await;
    let user = app.create_user("mask@example.com").await;
    let mut request = readthrough_testkit::rename_request(&user.id, "new@example.com");
    request.update_mask = Some(prost_types::FieldMask {
        paths: vec!["x".repeat(50_000)],
    });
    let status = app.users.update_user(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().len() < 200,
        "{} bytes of message",
        status.message().len()
    );
}

#[tokio::test]
async fn preferences_are_bounded_in_size_and_depth() {
    let mut app = spawn_app().await;
    let big = Struct {
        fields: [(
            "blob".to_string(),
            Value {
                kind: Some(Kind::StringValue("x".repeat(16 * 1024))),
            },
        )]
        .into(),
    };
    for preferences in [big, nested(17)] {
        let request = CreateUserRequest {
            email: "p@example.com".into(),
            preferences: Some(preferences),
        };
        assert_invalid(app.users.create_user(request).await, "preferences");
    }
    // Deeper than protobuf decoding allows: rejected before our own checks run.
    let request = CreateUserRequest {
        email: "p@example.com".into(),
        preferences: Some(nested(60)),
    };
    let status = app.users.create_user(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("preferences"), "{status:?}");
    let nan = Struct {
        fields: [(
            "n".to_string(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        )]
        .into(),
    };
    let request = CreateUserRequest {
        email: "p@example.com".into(),
        preferences: Some(nan),
    };
    assert_invalid(app.users.create_user(request).await, "preferences");
    assert_nothing_stored(&mut app).await;

    let deepest = CreateUserRequest {
        email: "p@example.com".into(),
        preferences: Some(nested(16)),
    };
    assert!(app.users.create_user(deepest).await.is_ok(), "16 levels are accepted");
}

#[tokio::test]
async fn product_fields_are_validated() {
    let mut app = spawn_app().await;
    let long_name = "n".repeat(201);
    let long_description = "d".repeat(5001);
    let long_category = "c".repeat(65);
    let cases = [
        (product("books", "", "", 1, "EUR"), "name"),
        (product("books", &long_name, "", 1, "EUR"), "name"),
        (product("books", "Book", &long_description, 1, "EUR"), "description"),
        (product("books", "Book", "", -1, "EUR"), "price_cents"),
        (product("books", "Book", "", 1, "eur"), "currency"),
        (product("books", "Book", "", 1, "EU"), "currency"),
        (product("books", "Book", "", 1, "EURO"), "currency"),
        (product("", "Book", "", 1, "EUR"), "category_id"),
        (product(&long_category, "Book", "", 1, "EUR"), "category_id"),
        (product("a b", "Book", "", 1, "EUR"), "category_id"),
        (product("a:{b}", "Book", "", 1, "EUR"), "category_id"),
        (product("*", "Book", "", 1, "EUR"), "category_id"),
    ];
    for (request, field) in cases {
        assert_invalid(app.client.create_product(request).await, field);
    }
    assert_nothing_stored(&mut app).await;

    let edge = product(&"c".repeat(64), &"é".repeat(200), &"d".repeat(5000), 0, "JPY");
    assert!(
        app.client.create_product(edge).await.is_ok(),
        "values at the limits are accepted"
    );
}

#[tokio::test]
async fn pages_are_bounded() {
    let mut app = spawn_app().await;
    let list = |category: &str, page: i32, page_size: i32| ListProductsRequest {
        category_id: category.into(),
        page,
        page_size,
        ..Default::default()
    };
    assert_invalid(app.products.list_products(list("books", 0, 101)).await, "page_size");
    assert_invalid(app.products.list_products(list("books", 0, -1)).await, "page_size");
    assert_invalid(app.products.list_products(list("books", -1, 10)).await, "page");
    assert_invalid(app.products.list_products(list("books", 100_001, 100)).await, "page");
    assert_invalid(app.products.list_products(list("books", i32::MAX, 100)).await, "page");
    assert_invalid(app.products.list_products(list("no such", 0, 10)).await, "category_id");
    assert_nothing_stored(&mut app).await;

    let last_allowed = app
        .products
        .list_products(list("books", 100_000, 100))
        .await
        .unwrap()
        .into_inner();
    assert!(last_allowed.products.is_empty());
}

#[tokio::test]
async fn page_tokens_must_be_ours_and_for_this_category() {
    let mut app = spawn_app().await;
    for name in ["a", "b", "c"] {
        app.create_product("books", name).await;
    }
    let token = app.list_page("books", 0, 1).await.next_page_token;
    assert!(!token.is_empty());
    let after = |category: &str, page: i32, page_token: &str| ListProductsRequest {
        category_id: category.into(),
        page,
        page_size: 1,
        page_token: page_token.into(),
    };
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for bad in ["garbage", &tampered, &"x".repeat(10_000)] {
        assert_invalid(app.products.list_products(after("books", 0, bad)).await, "page_token");
    }
    assert_invalid(
        app.products.list_products(after("games", 0, &token)).await,
        "page_token",
    );
    assert_invalid(app.products.list_products(after("books", 2, &token)).await, "page");
    let next = app
        .products
        .list_products(after("books", 0, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.products[0].name, "b");
}

#[tokio::test]
async fn updates_need_a_valid_mask_and_version() {
    let mut app = spawn_app().await;
    let user = app.client.create_user("m@example.com", None).await.unwrap();
    let update = |paths: &[&str], expected_version: i64, email: &str| UpdateUserRequest {
        user: Some(proto::User {
            id: user.id.clone(),
            email: email.into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        expected_version,
    };
    assert_invalid(
        app.users.update_user(update(&[], 0, "n@example.com")).await,
        "update_mask",
    );
    assert_invalid(
        app.users.update_user(update(&["version"], 0, "n@example.com")).await,
        "update_mask",
    );
    assert_invalid(
        app.users
            .update_user(update(&["email", "nickname"], 0, "n@example.com"))
            .await,
        "update_mask",
    );
    assert_invalid(
        app.users.update_user(update(&["email"], -1, "n@example.com")).await,
        "expected_version",
    );
    assert_invalid(
        app.users.update_user(update(&["email"], 0, "not an email")).await,
        "email",
    );
    let no_user = UpdateUserRequest {
        user: None,
        update_mask: None,
        expected_version: 0,
    };
    assert_invalid(app.users.update_user(no_user).await, "user");

    let product_update = UpdateProductRequest {
        product: Some(proto::Product {
            id: "nope".into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["name".into()],
        }),
        expected_version: 0,
    };
    assert_invalid(app.products.update_product(product_update).await, "product.id");

    let missing = UpdateProductRequest {
        product: Some(proto::Product {
            id: uuid::Uuid::new_v4().to_string(),
            name: "x".into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["name".into()],
        }),
        expected_version: 0,
    };
    let status = app.products.update_product(missing).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let unchanged = app.get_user(&user.id).await;
    assert_eq!((unchanged.email.as_str(), unchanged.version), ("m@example.com", 1));
}
