//! Hostile input, table-driven: each request gets its status, and neither
//! PostgreSQL nor Redis changes.

use std::{future::Future, pin::Pin};

use prost_types::{Struct, Value, value::Kind};
use readthrough_client::proto::{
    BatchGetUsersRequest, CreateProductRequest, CreateUserRequest, GetProductRequest, GetUserRequest,
    ListProductsRequest, UpdateUserRequest,
};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use readthrough_testkit::{TestApp, redis, rename_request, spawn_app};

type Call<'a> = Pin<Box<dyn Future<Output = Result<(), Status>> + 'a>>;

fn preferences(key: &str, kind: Kind) -> Struct {
    Struct {
        fields: [(key.to_string(), Value { kind: Some(kind) })].into(),
    }
}

fn nested(depth: usize) -> Struct {
    (1..depth).fold(Struct::default(), |inner, _| preferences("a", Kind::StructValue(inner)))
}

fn user(email: &str, preferences: Option<Struct>) -> CreateUserRequest {
    CreateUserRequest {
        email: email.to_string(),
        preferences,
    }
}

fn product(category: &str, name: &str, description: &str) -> CreateProductRequest {
    CreateProductRequest {
        category_id: category.to_string(),
        name: name.to_string(),
        description: description.to_string(),
        price_cents: 100,
        currency: "EUR".to_string(),
    }
}

fn list(category: &str) -> ListProductsRequest {
    ListProductsRequest {
        category_id: category.to_string(),
        page_size: 10,
        ..Default::default()
    }
}

/// Every row of both tables and every key of the namespace with its value (DUMP), as text.
async fn state(app: &mut TestApp) -> (String, Vec<(String, Vec<u8>)>) {
    let rows: Option<String> = sqlx::query_scalar(
        "SELECT (SELECT string_agg(u::text, '|' ORDER BY id) FROM users u) || '/' ||
                coalesce((SELECT string_agg(p::text, '|' ORDER BY id) FROM products p), '')",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let mut keys = app.namespace_keys().await;
    keys.sort();
    let mut values = Vec::new();
    for key in keys {
        let dump: Vec<u8> = redis::cmd("DUMP").arg(&key).query_async(&mut app.redis).await.unwrap();
        values.push((key, dump));
    }
    (rows.unwrap_or_default(), values)
}

/// Sends whatever bytes it is given as a request's message, unchecked.
#[derive(Default)]
struct RawBytes;

impl Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = bytes::Buf::copy_to_bytes(src, bytes::Buf::remaining(src));
        Ok(Some(bytes.to_vec()))
    }
}

async fn send_raw(port: u16, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(tonic::Request::new(body), path.parse().unwrap(), RawBytes)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn each_hostile_request_gets_its_status_and_changes_nothing() {
    let mut app = spawn_app().await;
    let existing = app.create_user("existing@example.com").await;
    app.create_product("books", "A book").await;
    app.outbox_drained().await;
    let before = state(&mut app).await;

    let users = app.users.clone();
    let products = app.products.clone();
    let port = app.grpc_port;
    let five_mib = "x".repeat(5 * 1024 * 1024);
    let million_ids = vec![existing.id.clone(); 1_000_000];
    let mut long_mask = rename_request(&existing.id, "changed@example.com");
    long_mask.update_mask = Some(prost_types::FieldMask {
        paths: vec!["p".repeat(50_000)],
    });
    let long_mask: UpdateUserRequest = long_mask;

    let create_user = |request: CreateUserRequest| -> Call<'_> {
        let mut users = users.clone();
        Box::pin(async move { users.create_user(request).await.map(|_| ()) })
    };
    let create_product = |request: CreateProductRequest| -> Call<'_> {
        let mut products = products.clone();
        Box::pin(async move { products.create_product(request).await.map(|_| ()) })
    };
    let get_user = |id: &str| -> Call<'_> {
        let (mut users, id) = (users.clone(), id.to_string());
        Box::pin(async move { users.get_user(GetUserRequest { id }).await.map(|_| ()) })
    };
    let get_product = |id: &str| -> Call<'_> {
        let (mut products, id) = (products.clone(), id.to_string());
        Box::pin(async move { products.get_product(GetProductRequest { id }).await.map(|_| ()) })
    };
    let list_products = |category: &str| -> Call<'_> {
        let (mut products, request) = (products.clone(), list(category));
        Box::pin(async move { products.list_products(request).await.map(|_| ()) })
    };

    let string = |s: &str| Kind::StringValue(s.to_string());
    let cases: Vec<(&str, Code, Call<'_>)> = vec![
        (
            "NUL in a preferences key",
            Code::InvalidArgument,
            create_user(user("a@example.com", Some(preferences("k\0", string("v"))))),
        ),
        (
            "NUL in a preferences value",
            Code::InvalidArgument,
            create_user(user("a@example.com", Some(preferences("k", string("v\0"))))),
        ),
        (
            "bidi override in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{202E}min@example.com", None)),
        ),
        (
            "zero-width space in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{200B}min@example.com", None)),
        ),
        (
            "bidi isolate in a product name",
            Code::InvalidArgument,
            create_product(product("books", "Book\u{2067}", "")),
        ),
        (
            "zero-width space in a product name",
            Code::InvalidArgument,
            create_product(product("books", "Bo\u{200B}ok", "")),
        ),
        (
            "an Arabic letter mark (U+061C, Cf) in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{061C}min@example.com", None)),
        ),
        (
            "a soft hyphen (U+00AD, Cf) in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{00AD}min@example.com", None)),
        ),
        (
            "a tag character (U+E0041, Cf) in an email",
            Code::InvalidArgument,
            create_user(user("admin\u{E0041}@example.com", None)),
        ),
        (
            "a Mongolian vowel separator (U+180E, Cf) in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{180E}min@example.com", None)),
        ),
        (
            "a combining grapheme joiner (U+034F, default ignorable) in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{034F}min@example.com", None)),
        ),
        (
            "a Hangul filler (U+3164, default ignorable) in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{3164}min@example.com", None)),
        ),
        (
            "a variation selector (U+FE0F, default ignorable) in an email",
            Code::InvalidArgument,
            create_user(user("ad\u{FE0F}min@example.com", None)),
        ),
        (
            "a product name of only spaces",
            Code::InvalidArgument,
            create_product(product("books", "   ", "")),
        ),
        (
            "a product name of only a Hangul filler",
            Code::InvalidArgument,
            create_product(product("books", "\u{3164}", "")),
        ),
        (
            "a tag character in a product name",
            Code::InvalidArgument,
            create_product(product("books", "Book\u{E0041}", "")),
        ),
        (
            "a soft hyphen in a product name",
            Code::InvalidArgument,
            create_product(product("books", "Bo\u{00AD}ok", "")),
        ),
        (
            "a joiner with nothing visible before it in a product name",
            Code::InvalidArgument,
            create_product(product("books", "\u{200D}Book", "")),
        ),
        (
            "a 5 MiB request",
            Code::OutOfRange,
            create_product(product("books", "Big", &five_mib)),
        ),
        ("a million repeated ids", Code::OutOfRange, {
            let (mut users, ids) = (users.clone(), million_ids);
            Box::pin(async move { users.batch_get_users(BatchGetUsersRequest { ids }).await.map(|_| ()) })
        }),
        (
            "preferences nested 60 deep",
            Code::InvalidArgument,
            create_user(user("a@example.com", Some(nested(60)))),
        ),
        (
            "a NaN in preferences",
            Code::InvalidArgument,
            create_user(user(
                "a@example.com",
                Some(preferences("n", Kind::NumberValue(f64::NAN))),
            )),
        ),
        (
            "an infinite number in preferences",
            Code::InvalidArgument,
            create_user(user(
                "a@example.com",
                Some(preferences("n", Kind::NumberValue(f64::INFINITY))),
            )),
        ),
        ("SQL in a user id", Code::InvalidArgument, get_user("1' OR '1'='1")),
        ("a Redis glob as a user id", Code::InvalidArgument, get_user("*")),
        ("a hash tag in a product id", Code::InvalidArgument, get_product("{x}")),
        (
            "SQL in a category",
            Code::InvalidArgument,
            list_products("books'; DROP TABLE products;--"),
        ),
        (
            "a Redis glob in a category",
            Code::InvalidArgument,
            list_products("bo*ks"),
        ),
        (
            "a hash tag in a category",
            Code::InvalidArgument,
            create_product(product("{books}", "Tagged", "")),
        ),
        ("a 50 KB unknown update_mask path", Code::InvalidArgument, {
            let mut users = users.clone();
            Box::pin(async move {
                let status = users.update_user(long_mask).await.unwrap_err();
                assert!(
                    status.message().len() < 200,
                    "the message echoes {} bytes",
                    status.message().len()
                );
                Err(status)
            })
        }),
        (
            "bytes that are not protobuf",
            Code::InvalidArgument,
            Box::pin(send_raw(port, "/readthrough.v1.UserService/CreateUser", vec![0xff; 64])),
        ),
        (
            "a truncated message",
            Code::InvalidArgument,
            Box::pin(send_raw(
                port,
                "/readthrough.v1.UserService/GetUser",
                vec![0x0a, 0x7f, b'x'],
            )),
        ),
    ];
    let count = cases.len();
    for (what, expected, call) in cases {
        let status = call.await.expect_err(what);
        assert_eq!(status.code(), expected, "{what}: {status:?}");
    }
    assert_eq!(count, 32);
    assert_eq!(
        state(&mut app).await,
        before,
        "no hostile request changed PostgreSQL or Redis"
    );
}
