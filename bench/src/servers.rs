//! The processes under test: readthrough (the release binary) and the floor,
//! each started on free local ports and stopped (SIGTERM, then kill) on drop.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A server process and where to reach it.
pub struct Server {
    pub grpc_port: u16,
    /// Prometheus endpoint (readthrough only).
    pub metrics_port: Option<u16>,
    child: Child,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first: readthrough drains and exits; the floor stops on it too.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

/// The built binaries (`scripts/bench` builds them).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"));
    dir.join(name)
}

/// Runs `readthrough <args>` to completion with `env`.
pub fn run_readthrough(args: &[&str], env: &[(String, String)]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new(binary("readthrough"))
        .args(args)
        .envs(env.iter().cloned())
        .env("RUST_LOG", "warn")
        .status()
        .with_context(|| format!("running readthrough {args:?}"))?;
    if !status.success() {
        bail!("readthrough {args:?} failed: {status}");
    }
    Ok(started.elapsed())
}

/// Starts `readthrough serve` with `env` (plus its ports) and waits until it accepts.
pub fn start_readthrough(env: &[(String, String)]) -> anyhow::Result<Server> {
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let child = Command::new(binary("readthrough"))
        .arg("serve")
        .envs(env.iter().cloned())
        .env("GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting readthrough serve")?;
    let server = Server {
        grpc_port,
        metrics_port: Some(metrics_port),
        child,
    };
    wait_for_port(grpc_port)?;
    Ok(server)
}

/// Starts the floor server and waits until it accepts.
pub fn start_floor() -> anyhow::Result<Server> {
    let grpc_port = free_port();
    let child = Command::new(binary("floor"))
        .arg(format!("127.0.0.1:{grpc_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the floor server")?;
    let server = Server {
        grpc_port,
        metrics_port: None,
        child,
    };
    wait_for_port(grpc_port)?;
    Ok(server)
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listened on 127.0.0.1:{port} within 60 s")
}
