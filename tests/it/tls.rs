//! Secure connections on every hop: gRPC over TLS (and mutual TLS), the
//! health check over TLS, PostgreSQL with `sslmode=verify-full`, Redis over
//! `rediss://` with a private CA, and Redis with an ACL user and password.
//!
//! Certificates are made at run time: a CA, a server certificate for
//! 127.0.0.1 and localhost, a client certificate, and an unrelated CA.

use std::{error::Error, path::PathBuf, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use readthrough::{
    app::Application,
    config::ServeConfig,
    ops::health::{self, HealthTls},
};
use readthrough_client::proto::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use readthrough_testkit::{
    OwnRedis, TestApp, free_port, own_postgres::OwnPostgres, redis, spawn_app_with, use_database,
};

/// Longest a refused or failed connection may take to say so.
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

/// PEM files in a temporary directory.
struct Pki {
    ca: PathBuf,
    ca_pem: String,
    other_ca_pem: String,
    server_cert: PathBuf,
    server_key: PathBuf,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let ca = certificate_authority("readthrough test CA");
        let other_ca = certificate_authority("unrelated CA");
        let server_key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(vec!["client.readthrough.test".to_string()]).unwrap();
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &ca).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, contents: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert.pem()),
            server_key: write("server.key", &server_key.serialize_pem()),
            ca_pem: ca.pem(),
            other_ca_pem: other_ca.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            dir,
        }
    }

    /// Writes `contents` to a file of this PKI's directory.
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A client that trusts this PKI's CA and presents no certificate.
    fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
    }

    fn client_with_certificate(&self) -> ClientTlsConfig {
        self.client()
            .identity(Identity::from_pem(&self.client_cert_pem, &self.client_key_pem))
    }

    /// Settings for an app whose gRPC listener serves this PKI's server certificate.
    fn serve_tls(&self, config: &mut ServeConfig) {
        config.server.tls_cert_file = Some(self.server_cert.clone());
        config.server.tls_key_file = Some(self.server_key.clone());
    }
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// An error with its causes: transport errors say what went wrong only there.
fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Connects with `tls` and creates a user, then reads it back: Ok, or why
/// not. A connection that neither works nor fails within `REFUSAL_LIMIT` is
/// a failure of the test (a hang), not a refusal.
async fn round_trip(app: &TestApp, tls: ClientTlsConfig) -> Result<(), String> {
    let attempt = async {
        let channel = app.tls_channel(tls).await.map_err(|e| chain(&e))?;
        create_and_read(channel).await
    };
    tokio::time::timeout(REFUSAL_LIMIT, attempt)
        .await
        .expect("the connection works or fails within 5 s, it does not hang")
}

async fn create_and_read(channel: Channel) -> Result<(), String> {
    let mut users = UserServiceClient::new(channel);
    let email = format!("{}@tls.example.com", uuid::Uuid::new_v4().simple());
    let created = users
        .create_user(CreateUserRequest {
            email: email.clone(),
            preferences: None,
        })
        .await
        .map_err(|status| chain(&status))?
        .into_inner();
    let read = users
        .get_user(GetUserRequest { id: created.id.clone() })
        .await
        .map_err(|status| chain(&status))?
        .into_inner();
    assert_eq!(read, created);
    assert_eq!(read.email, email);
    Ok(())
}

#[tokio::test]
async fn a_client_trusting_the_ca_talks_to_the_tls_listener() {
    let pki = Pki::new();
    let app = spawn_app_with(|config| pki.serve_tls(config)).await;

    round_trip(&app, pki.client())
        .await
        .expect("a TLS client with the right CA works");
}

#[tokio::test]
async fn a_plaintext_client_against_the_tls_listener_fails_at_once() {
    let pki = Pki::new();
    let app = spawn_app_with(|config| pki.serve_tls(config)).await;

    let started = std::time::Instant::now();
    let attempt = async {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", app.grpc_port))
            .unwrap()
            .connect()
            .await
            .map_err(|e| chain(&e))?;
        create_and_read(channel).await
    };
    let result = tokio::time::timeout(REFUSAL_LIMIT, attempt)
        .await
        .expect("a plaintext client fails within 5 s, it does not hang");
    println!("plaintext client refused after {:?}: {result:?}", started.elapsed());
    assert!(result.is_err(), "a plaintext client must not be served");
}

#[tokio::test]
async fn a_client_trusting_another_ca_refuses_the_server() {
    let pki = Pki::new();
    let app = spawn_app_with(|config| pki.serve_tls(config)).await;

    let wrong_ca = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.other_ca_pem));
    let error = round_trip(&app, wrong_ca)
        .await
        .expect_err("a client that does not trust the server's CA refuses it");
    assert!(
        error.contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_a_certificate_it_signed_are_served() {
    let pki = Pki::new();
    let app = spawn_app_with(|config| {
        pki.serve_tls(config);
        config.server.tls_client_ca_file = Some(pki.ca.clone());
    })
    .await;

    let error = round_trip(&app, pki.client())
        .await
        .expect_err("a client without a certificate is refused");
    println!("without a client certificate: {error}");
    round_trip(&app, pki.client_with_certificate())
        .await
        .expect("a client with a certificate signed by TLS_CLIENT_CA_FILE is served");
    // A certificate from another CA is refused too.
    let stranger = certificate_authority("stranger CA");
    let stranger_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["stranger.test".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let stranger_cert = params.signed_by(&stranger_key, &stranger).unwrap();
    let foreign = pki
        .client()
        .identity(Identity::from_pem(stranger_cert.pem(), stranger_key.serialize_pem()));
    round_trip(&app, foreign)
        .await
        .expect_err("a client certificate from another CA is refused");
}

#[tokio::test]
async fn the_health_command_checks_a_tls_listener() {
    let pki = Pki::new();
    let app = spawn_app_with(|config| {
        pki.serve_tls(config);
        config.server.tls_client_ca_file = Some(pki.ca.clone());
    })
    .await;
    let url = format!("https://127.0.0.1:{}", app.grpc_port);
    let timeout = Duration::from_secs(3);
    let with_certificate = HealthTls {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.file("client.pem", &pki.client_cert_pem)),
        key_file: Some(pki.file("client.key", &pki.client_key_pem)),
        ..Default::default()
    };

    health::check(&url, &with_certificate, timeout)
        .await
        .expect("SERVING over mutual TLS");
    let by_name = HealthTls {
        domain: Some("localhost".to_string()),
        ..with_certificate.clone()
    };
    health::check(&url, &by_name, timeout)
        .await
        .expect("SERVING, checking the certificate for `localhost`");
    let no_certificate = HealthTls {
        ca_file: Some(pki.ca.clone()),
        ..Default::default()
    };
    assert!(health::check(&url, &no_certificate, timeout).await.is_err());
    let plaintext = format!("http://127.0.0.1:{}", app.grpc_port);
    assert!(health::check(&plaintext, &HealthTls::default(), timeout).await.is_err());
}

#[tokio::test]
async fn tls_settings_that_cannot_work_fail_the_start() {
    let pki = Pki::new();
    let mut config = ServeConfig::from_env();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.server.migrate_on_start = false;
    config.server.tls_cert_file = Some(pki.server_cert.clone());
    let error = Application::build(config.clone()).await.err().expect("the start fails");
    assert!(format!("{error:#}").contains("TLS_KEY_FILE"), "{error:#}");

    config.server.tls_key_file = Some(pki.file("not-a-key.pem", "no key here"));
    let error = Application::build(config).await.err().expect("the start fails");
    assert!(format!("{error:#}").contains("TLS_KEY_FILE"), "{error:#}");
}

/// PostgreSQL that accepts TLS connections only (`hostssl`), with the PKI's server certificate.
async fn tls_only_postgres(pki: &Pki) -> OwnPostgres {
    OwnPostgres::init(
        &[("ssl", "on")],
        &[
            ("server.crt", pki.server_cert_pem.as_bytes()),
            ("server.key", pki.server_key_pem.as_bytes()),
            ("pg_hba.conf", b"hostssl all all 127.0.0.1/32 trust\n"),
        ],
    )
    .await
}

#[tokio::test]
async fn the_app_reaches_postgres_over_verified_tls() {
    let pki = Pki::new();
    let postgres = tls_only_postgres(&pki).await;
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        postgres.url("readthrough"),
        pki.ca.display()
    );
    let app = spawn_app_with(|config| use_database(config, &url)).await;

    let user = app.create_user("over-tls@example.com").await;
    let read = app.get_user(&user.id).await;
    assert_eq!(read, user);
    // The test's own pool uses the same URL: the session is encrypted.
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(ssl);
}

#[tokio::test]
async fn postgres_with_a_certificate_from_another_ca_fails_the_start() {
    let pki = Pki::new();
    let postgres = tls_only_postgres(&pki).await;
    let other_ca = pki.file("other-ca.pem", &pki.other_ca_pem);
    let mut config = ServeConfig::from_env();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.backends.database.url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        postgres.url("readthrough"),
        other_ca.display()
    )
    .parse()
    .unwrap();

    let started = std::time::Instant::now();
    let error = Application::build(config)
        .await
        .err()
        .expect("a server the CA did not sign is refused");
    let error = format!("{error:#}");
    println!("refused after {:?}: {error}", started.elapsed());
    assert!(
        error.contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );
}

/// How many clients are subscribed to `channel` on the Redis behind `redis`.
async fn subscribers(redis: &mut impl redis::aio::ConnectionLike, channel: &str) -> i64 {
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(redis)
        .await
        .unwrap();
    count
}

/// A user read twice through `app` is a miss and then a hit, stored in the
/// Redis behind `redis`, where a sibling's event subscription (it has a near
/// cache) connects the same way.
async fn cache_works_through(app: &mut TestApp, redis: &mut (impl redis::aio::ConnectionLike + Clone + Send + Sync)) {
    let user = app
        .create_user(&format!("{}@cache.example.com", uuid::Uuid::new_v4().simple()))
        .await;
    for _ in 0..2 {
        app.client.get_user(&user.id).await.unwrap();
    }
    assert_eq!(
        app.metric(r#"readthrough_cache_misses_total{entity="user"}"#).await,
        1.0
    );
    assert_eq!(app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await, 1.0);
    let key = app.keys.user(readthrough::domain::UserId::parse(&user.id).unwrap());
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(redis).await.unwrap();
    assert_eq!(exists, 1, "{key} is cached in this Redis");
    let _sibling = app
        .spawn_sibling_with(|config| config.backends.cache.near_cache_enabled = true)
        .await;
    let events = app.keys.events();
    let subscribed = readthrough_testkit::eventually(Duration::from_secs(5), || {
        let (mut redis, events) = (redis.clone(), events.clone());
        async move { subscribers(&mut redis, &events).await >= 1 }
    })
    .await;
    assert!(subscribed, "the event subscription connects to this Redis too");
}

#[tokio::test]
async fn the_cache_works_through_redis_over_tls_with_a_private_ca() {
    let pki = Pki::new();
    let port = free_port();
    let (cert, key, ca) = (
        pki.server_cert.to_str().unwrap(),
        pki.server_key.to_str().unwrap(),
        pki.ca.to_str().unwrap(),
    );
    let tls_port = port.to_string();
    let _redis = OwnRedis::start_with_args(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
            "--tls-auth-clients",
            "no",
        ],
    )
    .await;
    let url = format!("rediss://127.0.0.1:{port}");
    let mut app = spawn_app_with(|config| {
        config.backends.cache.redis_url = url.parse().unwrap();
        config.backends.cache.redis_tls_ca_file = Some(pki.ca.clone());
    })
    .await;

    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pki.ca_pem.clone().into_bytes()),
    };
    let mut tls_redis = redis::Client::build_with_tls(url.as_str(), certificates)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("the test reaches its TLS Redis");
    cache_works_through(&mut app, &mut tls_redis).await;
}

#[tokio::test]
async fn the_cache_works_through_redis_as_an_acl_user() {
    let port = free_port();
    // No default user: every connection must log in as `readthrough`.
    let _redis = OwnRedis::start_with_args(
        port,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "readthrough",
            "on",
            ">s3cret",
            "~*",
            "&*",
            "+@all",
        ],
    )
    .await;
    let url = format!("redis://readthrough:s3cret@127.0.0.1:{port}");
    let mut app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;

    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let refused = async {
        let mut connection = anonymous.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut connection).await
    };
    assert!(refused.await.is_err(), "Redis refuses a client that does not log in");
    let mut logged_in = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    cache_works_through(&mut app, &mut logged_in).await;
}
