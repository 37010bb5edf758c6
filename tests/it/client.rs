//! `readthrough-client` against the real service: retries of UNAVAILABLE
//! (reads only, never creates), deadlines, and the example's calls. Its bearer
//! token is checked in `auth.rs`, its backoff in the crate's own unit tests.

use std::time::{Duration, Instant};

use readthrough_client::{Backoff, Client, Page};
use tonic::Code;

use readthrough_testkit::{free_port, spawn_app, spawn_app_with};

/// Many quick retries: enough to outlast an app starting up.
fn patient() -> Backoff {
    Backoff {
        retries: 100,
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    }
}

#[tokio::test]
async fn a_read_is_retried_through_unavailable_until_the_server_answers() {
    let port = free_port();
    let client = Client::builder(format!("http://127.0.0.1:{port}"))
        .backoff(patient())
        .deadline(Duration::from_secs(30))
        .connect_lazy()
        .unwrap();
    let absent = uuid::Uuid::new_v4().to_string();

    // Nothing listens yet: a call that may not retry fails at once.
    let once = client
        .with_backoff(Backoff::none())
        .get_user(&absent)
        .await
        .unwrap_err();
    assert_eq!(once.code(), Code::Unavailable, "{once:?}");
    let started = Instant::now();
    let create = client.create_user("early@example.com", None).await.unwrap_err();
    assert_eq!(create.code(), Code::Unavailable, "{create:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a create is never retried: {:?}",
        started.elapsed()
    );

    // A read keeps trying while the app starts on that port, and gets its answer.
    let read = tokio::spawn({
        let client = client.clone();
        async move { client.get_user(&absent).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = spawn_app_with(|config| config.server.grpc_addr = ([127, 0, 0, 1], port).into()).await;
    let status = read.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "answered by the server: {status:?}");
    assert_eq!(app.create_user("late@example.com").await.email, "late@example.com");
}

#[tokio::test]
async fn a_call_that_gets_no_answer_ends_at_its_deadline() {
    // A server that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let client = Client::builder(url)
        .deadline(Duration::from_secs(30))
        .connect_lazy()
        .unwrap();

    let started = Instant::now();
    let status = client
        .with_deadline(Duration::from_millis(300))
        .get_user(&uuid::Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(5)).contains(&took),
        "the per-call deadline, not the client's 30 s: {took:?}"
    );
    held.abort();
}

#[tokio::test]
async fn the_quickstart_calls_work_end_to_end() {
    let app = spawn_app().await;
    let client = Client::builder(format!("http://127.0.0.1:{}", app.grpc_port))
        .deadline(Duration::from_secs(10))
        .retries(3)
        .connect()
        .await
        .unwrap();
    for name in ["Quill", "Ink", "Paper"] {
        app.create_product("stationery", name).await;
    }

    let user = client.create_user("quickstart@example.com", None).await.unwrap();
    assert_eq!((user.email.as_str(), user.version), ("quickstart@example.com", 1));
    assert_eq!(client.get_user(&user.id).await.unwrap(), user);
    assert_eq!(client.get_user(&user.id).await.unwrap(), user);
    let taken = client.create_user("QuickStart@example.com", None).await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);

    let first = client
        .with_deadline(Duration::from_secs(2))
        .list_products("stationery", Page::Number(0), 2)
        .await
        .unwrap();
    assert_eq!(first.total_count, 3);
    let names: Vec<&str> = first.products.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["Ink", "Paper"]);
    let next = client
        .list_products("stationery", Page::After(first.next_page_token), 2)
        .await
        .unwrap();
    assert_eq!(next.products[0].name, "Quill");
    assert!(next.next_page_token.is_empty(), "the last page");
}
