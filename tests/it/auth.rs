//! Authentication and roles: bearer tokens (static and JWT), the role each
//! method needs, the admin listener apart, and loopback-only without auth.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::future::join_all;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use readthrough::{app::Application, cache::Hooks, config::ServeConfig};
use readthrough_client::proto::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient};
use sha2::{Digest, Sha256};
use tonic::{Code, Request, transport::Channel};

use readthrough_testkit::{Sandbox, TestApp, eventually, spawn_app_with, spawn_app_with_hooks};

const READER: &str = "reader-token-0123456789";
const WRITER: &str = "writer-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";
const JWT_SECRET: &str = "a shared secret of at least 32 bytes, for tests";

/// A tokens file in the test's temp dir: a reader, a writer (write only) and an operator (admin).
fn tokens_file() -> PathBuf {
    let line = |token: &str, roles: &str| {
        let hex: String = Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{hex} {roles}\n")
    };
    let path = std::env::temp_dir().join(format!("readthrough-tokens-{}", uuid::Uuid::new_v4().simple()));
    let text = format!(
        "# test tokens\n{}{}{}",
        line(READER, "read"),
        line(WRITER, "write"),
        line(OPERATOR, "admin")
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn spawn_with_tokens() -> TestApp {
    let tokens = tokens_file();
    spawn_app_with(|config| config.auth.auth_tokens_file = Some(tokens)).await
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn create(email: &str) -> CreateUserRequest {
    CreateUserRequest {
        email: email.to_string(),
        preferences: None,
    }
}

fn get(id: &str) -> GetUserRequest {
    GetUserRequest { id: id.to_string() }
}

async fn user_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated_and_reach_no_handler() {
    let mut app = spawn_with_tokens().await;
    for request in [
        Request::new(create("nobody@example.com")),
        with_token(create("nobody@example.com"), "not-a-token"),
        with_token(create("nobody@example.com"), &format!("{WRITER}x")),
    ] {
        let status = app.users.create_user(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let mut basic = Request::new(create("nobody@example.com"));
    basic
        .metadata_mut()
        .insert("authorization", format!("Basic {WRITER}").parse().unwrap());
    assert_eq!(
        app.users.create_user(basic).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    assert_eq!(user_rows(&app).await, 0, "no refused call wrote a row");
    let inserts = app.metric(r#"readthrough_db_queries_total{query="user.insert"}"#).await;
    assert_eq!(inserts, 0.0, "refused calls never reach the handler");
    let counted = app
        .metric(r#"readthrough_rpc_duration_seconds_count{service="readthrough.v1.UserService",method="CreateUser",code="UNAUTHENTICATED"}"#)
        .await;
    assert_eq!(counted, 4.0, "the RPC metrics count every refused call");
    let refused = app
        .metric("readthrough_auth_refused_total{reason=\"invalid_token\"}")
        .await;
    assert_eq!(refused, 2.0);
}

#[tokio::test]
async fn a_token_without_the_role_is_permission_denied() {
    let app = spawn_with_tokens().await;
    // The typed client sends its bearer token with every call.
    let (reader, writer) = (
        app.client.with_token(Some(READER)).unwrap(),
        app.client.with_token(Some(WRITER)).unwrap(),
    );
    let status = reader.create_user("reader@example.com", None).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(user_rows(&app).await, 0);

    let user = writer.create_user("writer@example.com", None).await.unwrap();
    // Roles do not imply each other: the writer cannot read, the reader can.
    let status = writer.get_user(&user.id).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let read = reader.get_user(&user.id).await.unwrap();
    assert_eq!(read.email, "writer@example.com");

    let admin = app.admin().await;
    let as_writer = admin.with_token(Some(WRITER)).unwrap();
    let status = as_writer.invalidate_user(&user.id, true).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = admin.invalidate_user(&user.id, true).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let as_operator = admin.with_token(Some(OPERATOR)).unwrap();
    as_operator
        .invalidate_user(&user.id, true)
        .await
        .expect("the admin role may invalidate");
}

#[tokio::test]
async fn cache_administration_is_served_on_its_own_listener_only() {
    let app = spawn_app_with(|_| {}).await;
    let id = uuid::Uuid::new_v4().to_string();
    let status = app.client.invalidate_user(&id, true).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unimplemented,
        "the data API port serves no admin calls"
    );
    let admin = app.admin().await;
    admin
        .invalidate_user(&id, true)
        .await
        .expect("the admin port serves them");
    let status = admin.get_user(&id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "the admin port serves no data API");
}

#[tokio::test]
async fn health_and_reflection_need_no_token_and_reflection_can_be_switched_off() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let ask = |port: u16, request: MessageRequest| async move {
        let mut client = ServerReflectionClient::new(channel(port).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream_once(request))
            .await?
            .into_inner();
        responses
            .message()
            .await
            .map(|response| response.and_then(|r| r.message_response))
    };
    let list_services = |port: u16| async move {
        match ask(port, MessageRequest::ListServices(String::new())).await? {
            Some(MessageResponse::ListServicesResponse(list)) => {
                Ok::<_, tonic::Status>(list.service.into_iter().map(|s| s.name).collect::<Vec<_>>())
            }
            other => panic!("not a list of services: {other:?}"),
        }
    };
    let describes = |port: u16, symbol: &str| {
        let symbol = symbol.to_string();
        async move {
            match ask(port, MessageRequest::FileContainingSymbol(symbol)).await {
                Ok(Some(MessageResponse::FileDescriptorResponse(_))) => true,
                Err(status) if status.code() == Code::NotFound => false,
                other => panic!("{other:?}"),
            }
        }
    };

    let app = spawn_with_tokens().await;
    let mut health = HealthClient::new(channel(app.grpc_port).await);
    let serving = health.check(HealthCheckRequest::default()).await.unwrap().into_inner();
    assert_eq!(serving.status, 1, "SERVING, without a token");
    let mut data = list_services(app.grpc_port)
        .await
        .expect("reflection answers without a token");
    data.sort();
    assert_eq!(
        data,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "readthrough.v1.ProductService",
            "readthrough.v1.UserService"
        ],
        "the data port lists only what it serves"
    );
    assert!(describes(app.grpc_port, "readthrough.v1.UserService").await);
    assert!(
        !describes(app.grpc_port, "readthrough.v1.CacheAdminService").await,
        "the data port does not describe the admin API"
    );
    let mut admin = list_services(app.admin_port).await.unwrap();
    admin.sort();
    assert_eq!(
        admin,
        [
            "grpc.reflection.v1.ServerReflection",
            "readthrough.v1.CacheAdminService"
        ]
    );
    assert!(!describes(app.admin_port, "readthrough.v1.UserService").await);

    let tokens = tokens_file();
    let closed = spawn_app_with(|config| {
        config.auth.auth_tokens_file = Some(tokens);
        config.server.reflection_enabled = false;
    })
    .await;
    let status = list_services(closed.grpc_port).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

/// A request stream of one message.
fn tokio_stream_once<T: Send + 'static>(message: T) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::iter([message])
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    roles: &'a [&'a str],
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

impl<'a> Claims<'a> {
    /// Valid for this service (`AUDIENCE`), issued now, until `exp`.
    fn new(exp: u64, roles: &'a [&'a str]) -> Self {
        Claims {
            sub: "svc",
            exp,
            roles,
            iat: Some(now()),
            aud: Some(AUDIENCE),
            iss: None,
        }
    }
}

const AUDIENCE: &str = "readthrough";

fn encode_hs256(claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(secret: &str, exp: u64, roles: &[&str]) -> String {
    let claims = Claims::new(exp, roles);
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwts_are_checked_for_signature_expiry_and_roles() {
    let mut app = spawn_app_with(|config| {
        config.auth.auth_jwt_secret = Some(JWT_SECRET.parse().unwrap());
        config.auth.auth_jwt_audience = Some(AUDIENCE.to_string());
    })
    .await;
    let good = hs256(JWT_SECRET, now() + 300, &["read", "write"]);
    let user = app
        .users
        .create_user(with_token(create("jwt@example.com"), &good))
        .await
        .expect("a valid token with the write role creates")
        .into_inner();

    let read_only = hs256(JWT_SECRET, now() + 300, &["read"]);
    let status = app
        .users
        .create_user(with_token(create("jwt2@example.com"), &read_only))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // The leeway is 30 s: a token expired a minute ago is refused.
    let expired = hs256(JWT_SECRET, now() - 60, &["read"]);
    let forged = hs256("another secret of at least 32 bytes, not ours", now() + 300, &["read"]);
    let unknown_role = hs256(JWT_SECRET, now() + 300, &["read", "root"]);
    // alg "none": header and claims with no signature.
    let unsigned = {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"svc","exp":{},"roles":["read"]}}"#, now() + 300));
        format!("{header}.{claims}.")
    };
    for token in [expired, forged, unknown_role, unsigned] {
        let status = app.users.get_user(with_token(get(&user.id), &token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token}");
    }
}

#[tokio::test]
async fn jwts_must_name_the_configured_audience_and_issuer_and_live_at_most_the_maximum() {
    let mut app = spawn_app_with(|config| {
        config.auth.auth_jwt_secret = Some(JWT_SECRET.parse().unwrap());
        config.auth.auth_jwt_audience = Some(AUDIENCE.to_string());
        config.auth.auth_jwt_issuer = Some("https://id.example".to_string());
        config.auth.auth_jwt_max_lifetime = Duration::from_secs(3600);
    })
    .await;
    // Each refused token differs from a valid one in one claim only.
    let valid = || Claims {
        iss: Some("https://id.example"),
        ..Claims::new(now() + 300, &["read", "write"])
    };
    let user = app
        .users
        .create_user(with_token(create("claims@example.com"), &encode_hs256(&valid())))
        .await
        .expect("audience, issuer and lifetime as configured")
        .into_inner();
    let refused = [
        ("no aud", Claims { aud: None, ..valid() }),
        (
            "another aud",
            Claims {
                aud: Some("billing"),
                ..valid()
            },
        ),
        ("no iss", Claims { iss: None, ..valid() }),
        (
            "another iss",
            Claims {
                iss: Some("https://evil.example"),
                ..valid()
            },
        ),
        ("no iat", Claims { iat: None, ..valid() }),
        (
            "exp in 2100",
            Claims {
                exp: 4_102_444_800,
                ..valid()
            },
        ),
    ];
    for (case, claims) in refused {
        let status = app
            .users
            .get_user(with_token(get(&user.id), &encode_hs256(&claims)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{case}");
    }
}

#[tokio::test]
async fn a_jwt_key_without_an_audience_refuses_to_start_unless_any_audience_is_allowed() {
    let sandbox = Sandbox::new();
    let mut config = ServeConfig::from_env();
    config.backends.database.name = Some(sandbox.database_name.clone());
    config.backends.cache.namespace = sandbox.namespace.clone();
    for addr in [
        &mut config.server.grpc_addr,
        &mut config.server.admin_addr,
        &mut config.server.metrics_addr,
    ] {
        *addr = "127.0.0.1:0".parse().unwrap();
    }
    config.auth.auth_jwt_secret = Some(JWT_SECRET.parse().unwrap());
    let error = Application::build(config.clone())
        .await
        .err()
        .expect("refused to start");
    assert!(format!("{error:#}").contains("AUTH_JWT_AUDIENCE"), "{error:#}");
    config.auth.auth_jwt_any_audience = true;
    Application::build(config)
        .await
        .expect("starts when any audience is allowed");
}

#[tokio::test]
async fn es256_jwts_are_checked_with_the_public_key_file() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public_key = std::env::temp_dir().join(format!("readthrough-jwt-{}.pem", uuid::Uuid::new_v4().simple()));
    std::fs::write(&public_key, key.public_key_pem()).unwrap();
    let mut app = spawn_app_with(|config| {
        config.auth.auth_jwt_public_key_file = Some(public_key);
        config.auth.auth_jwt_audience = Some(AUDIENCE.to_string());
    })
    .await;

    let sign = |key: &rcgen::KeyPair| {
        let claims = Claims::new(now() + 300, &["write"]);
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &encoding).unwrap()
    };
    app.users
        .create_user(with_token(create("es256@example.com"), &sign(&key)))
        .await
        .expect("signed with the key whose public half is configured");

    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let status = app
        .users
        .create_user(with_token(create("other@example.com"), &sign(&other)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // An HS256 token "signed" with the public key as its secret: the
    // algorithm confusion attack. Only ES256 is accepted.
    let pem = key.public_key_pem();
    let confused = hs256(&pem, now() + 300, &["write"]);
    let status = app
        .users
        .create_user(with_token(create("confused@example.com"), &confused))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn without_authentication_only_loopback_addresses_are_served() {
    let sandbox = Sandbox::new();
    let mut config = ServeConfig::from_env();
    config.backends.database.name = Some(sandbox.database_name.clone());
    config.backends.cache.namespace = sandbox.namespace.clone();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.server.grpc_addr = "0.0.0.0:0".parse().unwrap();
    let error = Application::build(config.clone())
        .await
        .err()
        .expect("refused to start");
    let message = format!("{error:#}");
    assert!(
        message.contains("GRPC_ADDR=0.0.0.0:0") && message.contains("INSECURE_ALLOW_UNAUTHENTICATED"),
        "{message}"
    );

    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.admin_addr = "0.0.0.0:0".parse().unwrap();
    let error = Application::build(config.clone())
        .await
        .err()
        .expect("refused to start");
    assert!(format!("{error:#}").contains("ADMIN_ADDR=0.0.0.0:0"), "{error:#}");

    let app = spawn_app_with(|config| {
        config.server.grpc_addr = "0.0.0.0:0".parse().unwrap();
        config.auth.insecure_allow_unauthenticated = true;
    })
    .await;
    app.create_user("insecure@example.com").await;

    let tokens = tokens_file();
    let mut app = spawn_app_with(|config| {
        config.server.grpc_addr = "0.0.0.0:0".parse().unwrap();
        config.auth.auth_tokens_file = Some(tokens);
    })
    .await;
    app.users
        .create_user(with_token(create("authenticated@example.com"), WRITER))
        .await
        .expect("with authentication any address is allowed");
}

#[tokio::test]
async fn one_connection_has_at_most_its_share_of_calls_in_progress() {
    // Every fill takes a second, so the calls of one connection pile up in the service.
    let (in_progress, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hooks = Hooks {
        before_fill: Some({
            let (in_progress, most) = (in_progress.clone(), most.clone());
            Arc::new(move |_key: &str| {
                let (in_progress, most) = (in_progress.clone(), most.clone());
                Box::pin(async move {
                    most.fetch_max(in_progress.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    in_progress.fetch_sub(1, Ordering::SeqCst);
                })
            })
        }),
        ..Hooks::default()
    };
    let app = spawn_app_with_hooks(hooks, |_| {}).await;
    let calls = (0..300).map(|_| {
        let mut client = app.users.clone();
        async move { client.get_user(get(&uuid::Uuid::new_v4().to_string())).await }
    });
    let busy = tokio::spawn(join_all(calls));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Another client's call is not queued behind the busy connection's 300.
    let started = Instant::now();
    let mut other = UserServiceClient::new(channel(app.grpc_port).await);
    let status = other
        .get_user(get(&uuid::Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "another connection waited {:?}",
        started.elapsed()
    );

    let outcomes = busy.await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|outcome| outcome.as_ref().unwrap_err().code() == Code::NotFound),
        "the busy client's calls wait on its side and are all served"
    );
    let most = most.load(Ordering::SeqCst);
    assert!(
        (128..=129).contains(&most),
        "{most} fills at once (128 of the busy connection, 1 other)"
    );
}

/// The public half of an EC P-256 `key` as a JWK named `kid`.
fn es256_jwk(key: &rcgen::KeyPair, kid: &str) -> serde_json::Value {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    // Uncompressed point: 0x04, then x and y, 32 bytes each.
    let point = key.public_key_raw();
    serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
    })
}

fn write_key_set(path: &std::path::Path, keys: &[serde_json::Value]) {
    // Written whole, then renamed into place, as a deployment would: never read half-written.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// A writer's ES256 JWT signed with `key`, its header naming `kid` (if any).
fn es256_token(key: &rcgen::KeyPair, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_string);
    let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &Claims::new(now() + 300, &["write"]), &encoding).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_checked_with_the_key_their_kid_names_and_keys_rotate_without_a_restart() {
    let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let new = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_key_set(&jwks, &[es256_jwk(&old, "old")]);
    let app = spawn_app_with(|config| {
        config.auth.auth_jwks_file = Some(jwks.clone());
        config.auth.auth_jwt_audience = Some(AUDIENCE.to_string());
    })
    .await;
    // One client, one connection, through every rotation.
    let users = app.users.clone();
    let accepted = |token: String| {
        let mut users = users.clone();
        async move {
            match users
                .create_user(with_token(
                    create(&format!("{}@example.com", uuid::Uuid::new_v4())),
                    &token,
                ))
                .await
            {
                Ok(_) => true,
                Err(status) if status.code() == Code::Unauthenticated => false,
                Err(status) => panic!("{status:?}"),
            }
        }
    };

    assert!(accepted(es256_token(&old, Some("old"))).await);
    assert!(
        !accepted(es256_token(&old, None)).await,
        "a token from a key set must name its key"
    );
    assert!(
        !accepted(es256_token(&new, Some("old"))).await,
        "signed with another key than its kid names"
    );
    assert!(
        !accepted(es256_token(&new, Some("new"))).await,
        "a kid the set does not hold"
    );
    let confused = jsonwebtoken::encode(
        &Header {
            kid: Some("old".to_string()),
            ..Header::new(Algorithm::HS256)
        },
        &Claims::new(now() + 300, &["write"]),
        &EncodingKey::from_secret(old.public_key_pem().as_bytes()),
    )
    .unwrap();
    assert!(!accepted(confused).await, "HS256 with the public key as its secret");

    // Rotation, step one: the new key joins; both are accepted.
    write_key_set(&jwks, &[es256_jwk(&old, "old"), es256_jwk(&new, "new")]);
    assert!(eventually(Duration::from_secs(5), || accepted(es256_token(&new, Some("new")))).await);
    assert!(
        accepted(es256_token(&old, Some("old"))).await,
        "the old key still signs meanwhile"
    );

    // Step two: the old key leaves.
    write_key_set(&jwks, &[es256_jwk(&new, "new")]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !accepted(es256_token(&old, Some("old"))).await
        })
        .await
    );
    assert!(accepted(es256_token(&new, Some("new"))).await);

    // A broken file is refused; the keys in use stay.
    std::fs::write(&jwks, "{ not json").unwrap();
    let refused = r#"readthrough_auth_key_set_reads_total{outcome="refused"}"#;
    assert!(eventually(Duration::from_secs(5), || async { app.metric(refused).await == 1.0 }).await);
    assert!(accepted(es256_token(&new, Some("new"))).await);
}

#[tokio::test]
async fn a_key_set_file_must_hold_public_keys_each_with_a_kid() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut without_kid = es256_jwk(&key, "k");
    without_kid.as_object_mut().unwrap().remove("kid");
    let symmetric = serde_json::json!({ "kty": "oct", "k": "c2VjcmV0", "kid": "s" });
    for (what, keys) in [
        ("no kid", vec![without_kid]),
        ("a symmetric key", vec![symmetric]),
        (
            "two keys with one kid",
            vec![es256_jwk(&key, "k"), es256_jwk(&key, "k")],
        ),
        ("no key", vec![]),
    ] {
        let jwks = dir.path().join("jwks.json");
        write_key_set(&jwks, &keys);
        let mut config = ServeConfig::from_env();
        config.auth.auth_jwks_file = Some(jwks);
        config.auth.auth_jwt_audience = Some(AUDIENCE.to_string());
        let error = Application::build(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("started with {what}"));
        assert!(format!("{error:#}").contains("AUTH_JWKS_FILE"), "{what}: {error:#}");
    }
    let mut config = ServeConfig::from_env();
    config.auth.auth_jwks_file = Some(dir.path().join("jwks.json"));
    config.auth.auth_jwt_secret = Some(JWT_SECRET.parse().unwrap());
    config.auth.auth_jwt_audience = Some(AUDIENCE.to_string());
    let error = Application::build(config)
        .await
        .err()
        .expect("two key sources refuse to start");
    assert!(format!("{error:#}").contains("set one of"), "{error:#}");
}
