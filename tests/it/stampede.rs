//! A cold key under a burst, measured as in production: two `readthrough serve`
//! processes with default settings, 1000 concurrent GetUser calls on one cold
//! key from two `h2load` processes, and the row reads counted by PostgreSQL
//! itself (`pg_stat_user_tables`).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use readthrough_client::proto::{GetUserRequest, user_service_client::UserServiceClient};
use sqlx::{PgPool, postgres::PgPoolOptions};

use readthrough_testkit::{Sandbox, eventually, free_port};

/// A `readthrough serve` process, killed when dropped.
struct Instance {
    child: Child,
    port: u16,
}

impl Instance {
    /// Starts `serve` on free ports, again on others if a port was taken meanwhile.
    async fn start(sandbox: &Sandbox) -> Self {
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(env!("CARGO_BIN_EXE_readthrough"))
                .arg("serve")
                .envs(sandbox.env())
                .env("GRPC_ADDR", format!("127.0.0.1:{port}"))
                .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
                .env("ADMIN_ADDR", "127.0.0.1:0")
                .env("RUST_LOG", "warn")
                // What this counts is fills: with the default 50 ms deadline, a
                // test machine busy with the other tests timed GETs out, and the
                // breaker's fallback reads were counted instead.
                .env("REDIS_TIMEOUT_MS", "1000")
                .stdout(Stdio::null())
                .spawn()
                .expect("the readthrough binary starts");
            let listening = eventually(Duration::from_secs(30), || {
                let exited = matches!(child.try_wait(), Ok(Some(_)));
                async move {
                    exited
                        || UserServiceClient::connect(format!("http://127.0.0.1:{port}"))
                            .await
                            .is_ok()
                }
            })
            .await;
            if listening && child.try_wait().is_ok_and(|status| status.is_none()) {
                return Self { child, port };
            }
            let _ = child.kill();
        }
        panic!("readthrough serve did not start in three tries");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GetUserRequest { id }` as one gRPC message (uncompressed, length-prefixed).
fn grpc_frame(id: &str) -> Vec<u8> {
    let message = prost::Message::encode_to_vec(&GetUserRequest { id: id.to_string() });
    let mut frame = vec![0];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    frame
}

/// Index and sequential scans of `users` that PostgreSQL has counted.
async fn user_reads(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'users'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_calls_on_a_cold_key_through_two_processes_reads_the_row_at_most_twice() {
    let sandbox = Sandbox::new();
    let body = std::env::temp_dir().join(format!("get-user-{}.grpc", uuid::Uuid::new_v4().simple()));
    let mut reads = Vec::new();
    for run in 1..=3 {
        let instances = [Instance::start(&sandbox).await, Instance::start(&sandbox).await];
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(sandbox.connect_options())
            .await
            .unwrap();
        let id = uuid::Uuid::new_v4();
        sqlx::query("INSERT INTO users (id, email) VALUES ($1, $2)")
            .bind(id)
            .bind(format!("burst-{run}@example.com"))
            .execute(&db)
            .await
            .unwrap();
        std::fs::write(&body, grpc_frame(&id.to_string())).unwrap();
        let before = user_reads(&db).await;

        // 10 connections x 50 streams from each of two h2load processes: 1000 calls at once.
        let bursts: Vec<Child> = instances
            .iter()
            .map(|instance| {
                Command::new("h2load")
                    .args(["-n", "500", "-c", "10", "-m", "50", "-d"])
                    .arg(&body)
                    .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
                    .arg(format!(
                        "http://127.0.0.1:{}/readthrough.v1.UserService/GetUser",
                        instance.port
                    ))
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("h2load is installed (scripts/test installs nghttp2-client)")
            })
            .collect();
        for burst in bursts {
            let output = burst.wait_with_output().unwrap();
            let report = String::from_utf8_lossy(&output.stdout);
            assert!(
                report.contains("500 succeeded"),
                "every call of the burst was answered: {report}"
            );
        }
        // PostgreSQL counts a backend's scans when it exits at the latest: end both
        // processes, and wait for their connections to be gone.
        drop(instances);
        let gone = eventually(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_one(&db)
            .await
            .unwrap()
                == 0
        })
        .await;
        assert!(gone, "the instances' database connections closed");
        reads.push(user_reads(&db).await - before);
        db.close().await;
    }
    let _ = std::fs::remove_file(&body);
    eprintln!("row reads per burst: {reads:?}");
    assert!(
        reads.iter().all(|&n| (1..=2).contains(&n)),
        "row reads per burst of 1000 cold calls: {reads:?} (at most 2 in every run)"
    );
}
