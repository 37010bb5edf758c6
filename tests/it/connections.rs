//! Bounded connections: sockets that connect and say nothing are refused
//! past the per-address cap and closed at the preface timeout, and they
//! keep neither a gRPC client nor Prometheus out.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use readthrough::app::Application;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use readthrough_testkit::{eventually, spawn_app_with};

/// Where the silent sockets come from: another loopback address than the
/// real clients' 127.0.0.1, as an attacker's would be.
const ELSEWHERE: [u8; 4] = [127, 0, 0, 2];

/// `count` connections to `port` from `ELSEWHERE` that never send a byte.
async fn silent_sockets(port: u16, count: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ELSEWHERE, 0))).unwrap();
        sockets.push(socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap());
    }
    sockets
}

/// How long the service takes to answer a health check on a new connection,
/// the best of five (one slow run on a busy machine says nothing of the service).
async fn fastest_new_client(port: u16) -> Duration {
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .expect("a new client connects");
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .expect("a new client is answered");
        fastest = fastest.min(started.elapsed());
    }
    fastest
}

/// Whether every socket is closed by the server (end of stream or reset)
/// before `limit`; what the server sent first (its HTTP/2 settings) is skipped.
async fn all_closed_within(sockets: Vec<TcpStream>, limit: Duration) -> bool {
    let reads = sockets.into_iter().map(|mut socket| async move {
        let mut sink = Vec::new();
        tokio::time::timeout(limit, socket.read_to_end(&mut sink)).await.is_ok()
    });
    futures_util::future::join_all(reads)
        .await
        .into_iter()
        .all(|closed| closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_silent_sockets_keep_no_client_out_and_are_closed_at_the_preface_timeout() {
    let app = spawn_app_with(|config| {
        config.server.connection_preface_timeout = Duration::from_millis(1000);
        config.server.max_client_connections_per_peer = 100;
    })
    .await;
    let opened = Instant::now();
    let sockets = silent_sockets(app.grpc_port, 500).await;

    let fastest = fastest_new_client(app.grpc_port).await;
    assert!(
        fastest < Duration::from_millis(100),
        "a new client was answered after {fastest:?}"
    );

    let limit = Duration::from_millis(1000 + 2000) - opened.elapsed().min(Duration::from_millis(1000));
    assert!(
        all_closed_within(sockets, limit).await,
        "every silent socket is closed within the preface timeout (and some slack)"
    );
    let [refused, timed_out] = app
        .metrics(&[
            r#"readthrough_connections_refused_total{listener="grpc",reason="per_peer"}"#,
            r#"readthrough_connections_timed_out_total{listener="grpc",phase="first_bytes"}"#,
        ])
        .await[..]
    else {
        unreachable!()
    };
    assert_eq!(
        refused, 400.0,
        "over the cap of 100 from one address, closed as they came"
    );
    assert_eq!(timed_out, 100.0, "the 100 admitted closed at the preface timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_new_connections_are_closed_and_the_open_ones_still_served() {
    let app = spawn_app_with(|config| config.server.max_client_connections = 3).await;
    // The test's own client holds one; two more silent ones fill the listener.
    let held = silent_sockets(app.grpc_port, 2).await;
    let open = r#"readthrough_connections_open{listener="grpc"}"#;
    assert!(eventually(Duration::from_secs(5), || async { app.metric(open).await == 3.0 }).await);
    let refused = silent_sockets(app.grpc_port, 5).await;
    assert!(
        all_closed_within(refused, Duration::from_secs(2)).await,
        "the ones over the cap are closed"
    );
    app.get_user(&app.create_user("still@example.com").await.id).await;
    assert_eq!(
        app.metric(r#"readthrough_connections_refused_total{listener="grpc",reason="max"}"#)
            .await,
        5.0
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_the_metrics_port_keep_no_scrape_out() {
    let app = spawn_app_with(|_| {}).await;
    let sockets = silent_sockets(app.metrics_port, 100).await;
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let text = app.metrics_text().await;
        assert!(text.contains("readthrough_connections_open"), "{text}");
        fastest = fastest.min(started.elapsed());
    }
    assert!(
        fastest < Duration::from_millis(100),
        "a scrape was answered after {fastest:?}"
    );
    assert!(
        all_closed_within(sockets, Duration::from_secs(3)).await,
        "idle sockets are closed within the metrics listener's 1 s"
    );
}

/// `GET /metrics` on `port`, with `token` as a bearer token if given: the status line.
async fn scrape_status(port: u16, token: Option<&str>) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_beyond_loopback_need_a_token_or_the_insecure_switch() {
    let mut config = readthrough::config::ServeConfig::from_env();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "0.0.0.0:0".parse().unwrap();
    let error = Application::build(config.clone())
        .await
        .err()
        .expect("metrics on every address without a token refuse to start");
    let message = format!("{error:#}");
    assert!(
        message.contains("METRICS_ADDR=0.0.0.0:0") && message.contains("METRICS_TOKEN_FILE"),
        "{message}"
    );

    let token = "a-metrics-token-of-some-length";
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("metrics-token");
    std::fs::write(&token_file, token).unwrap();
    let app = spawn_app_with(|config| {
        config.server.metrics_addr = "0.0.0.0:0".parse().unwrap();
        config.server.metrics_token_file = Some(token_file.clone());
    })
    .await;
    assert!(scrape_status(app.metrics_port, None).await.contains("401"));
    assert!(
        scrape_status(app.metrics_port, Some("a-wrong-token-of-some-length"))
            .await
            .contains("401")
    );
    assert!(scrape_status(app.metrics_port, Some(token)).await.contains("200"));

    let app = spawn_app_with(|config| {
        config.server.metrics_addr = "0.0.0.0:0".parse().unwrap();
        config.auth.insecure_allow_unauthenticated = true;
    })
    .await;
    assert!(scrape_status(app.metrics_port, None).await.contains("200"));
}
