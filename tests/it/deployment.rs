//! The container setup (`docker-compose.yml`, `Dockerfile`, `.dockerignore`)
//! agrees with what the service reads and needs: compose passes only
//! variables the service reads, with values it accepts; every long-running
//! service has a health check; and each service waits for what it uses.
//!
//! No Docker engine is involved: the files are parsed. The variables the
//! service reads come from clap itself, so a setting renamed in
//! `src/config.rs` fails here instead of being silently ignored by a
//! running container.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::PathBuf,
};

use clap::{Args, CommandFactory, Parser};
use readthrough::config::{ServeConfig, TelemetryConfig};
use yaml_serde::Value;

/// Read outside clap, by the log filter (`EnvFilter`).
const READ_OUTSIDE_CLAP: &[&str] = &["RUST_LOG"];

/// What `cargo build` needs from the build context besides the workspace's
/// members (read from `Cargo.toml`).
const BUILD_INPUTS: &[&str] = &["Cargo.toml", "Cargo.lock", "build.rs", "migrations", "src", ".cargo"];

/// The workspace's members, from `members = [...]` in `Cargo.toml`: cargo
/// refuses to build if one is missing (`client` also holds the protos).
fn workspace_members() -> Vec<String> {
    let manifest = read_project_file("Cargo.toml");
    let line = manifest
        .lines()
        .find(|line| line.starts_with("members = ["))
        .expect("Cargo.toml lists the workspace's members");
    line["members = [".len()..]
        .trim_end_matches(']')
        .split(',')
        .map(|member| member.trim().trim_matches('"').to_string())
        .filter(|member| !member.is_empty())
        .collect()
}

/// The instances of the service in compose.
const INSTANCES: &[&str] = &["readthrough", "readthrough-a", "readthrough-b"];

pub fn read_project_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// docker-compose.yml, with its YAML merges (`<<: *anchor`) applied as compose applies them.
pub fn compose() -> Value {
    let mut compose: Value = yaml_serde::from_str(&read_project_file("docker-compose.yml"))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"));
    compose
        .apply_merge()
        .unwrap_or_else(|e| panic!("docker-compose.yml has a bad merge: {e}"));
    compose
}

fn services(compose: &Value) -> BTreeMap<String, &Value> {
    compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has services")
        .iter()
        .map(|(name, service)| (name.as_str().unwrap().to_string(), service))
        .collect()
}

/// A one-shot job (`restart: "no"`), which others wait to complete.
fn one_shot(service: &Value) -> bool {
    service.get("restart").and_then(Value::as_str) == Some("no")
}

/// A YAML scalar as compose would pass it on; `None` for anything else.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A service's `environment:` map.
fn environment(service: &Value, name: &str) -> BTreeMap<String, String> {
    let Some(env) = service.get("environment") else {
        return BTreeMap::new();
    };
    env.as_mapping()
        .unwrap_or_else(|| panic!("`{name}`'s environment must be a map (KEY: value): {env:?}"))
        .iter()
        .map(|(key, value)| {
            let value = scalar(value).unwrap_or_else(|| panic!("`{name}`'s {key:?} is not a scalar: {value:?}"));
            (key.as_str().unwrap().to_string(), value)
        })
        .collect()
}

/// A service's `depends_on:` as dependency → condition.
fn depends_on(service: &Value, name: &str) -> BTreeMap<String, String> {
    let Some(depends_on) = service.get("depends_on") else {
        return BTreeMap::new();
    };
    depends_on
        .as_mapping()
        .unwrap_or_else(|| {
            panic!(
                "`{name}`'s depends_on must be a map with conditions (a plain list waits \
                 only for the containers to start, not to be ready): {depends_on:?}"
            )
        })
        .iter()
        .map(|(dependency, how)| {
            let condition = how.get("condition").and_then(Value::as_str).unwrap_or_default();
            (dependency.as_str().unwrap().to_string(), condition.to_string())
        })
        .collect()
}

/// Every variable the service reads: the `env = "..."` of each argument of
/// `serve` and of the global telemetry settings, and RUST_LOG.
fn variables_the_service_reads() -> BTreeSet<String> {
    let telemetry = TelemetryConfig::augment_args(clap::Command::new("readthrough"));
    let serve = ServeConfig::command();
    serve
        .get_arguments()
        .chain(telemetry.get_arguments())
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .chain(READ_OUTSIDE_CLAP.iter().map(|v| v.to_string()))
        .collect()
}

/// The host of a `scheme://[user[:password]@]host[:port][/path]` URL.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    host_port.split(':').next().unwrap_or(host_port)
}

/// A service's bind mounts as (source relative to the repository, target).
pub fn mounts(service: &Value) -> Vec<(String, String)> {
    service
        .get("volumes")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(scalar)
        .filter_map(|volume| {
            let mut parts = volume.split(':');
            Some((
                parts.next()?.trim_start_matches("./").to_string(),
                parts.next()?.to_string(),
            ))
        })
        .collect()
}

#[test]
fn compose_passes_only_variables_the_service_reads_with_values_it_accepts() {
    let compose = compose();
    let services = services(&compose);
    let reads = variables_the_service_reads();
    assert!(
        reads.contains("DATABASE_URL") && reads.contains("LOG_FORMAT"),
        "clap reported no DATABASE_URL or LOG_FORMAT; is `env` still set in src/config.rs? {reads:?}"
    );
    for name in INSTANCES {
        let passed = environment(services[*name], name);
        let unknown: Vec<&String> = passed.keys().filter(|key| !reads.contains(*key)).collect();
        assert!(
            unknown.is_empty(),
            "{name} sets {unknown:?}, which the service never reads (a typo or a renamed setting?)"
        );
        // Each value, as the flag it backs (flags win over the test's own environment).
        let mut argv = vec!["readthrough".to_string()];
        for arg in ServeConfig::command().get_arguments() {
            let Some(value) = arg.get_env().and_then(|env| passed.get(&*env.to_string_lossy())) else {
                continue;
            };
            argv.push(format!("--{}={value}", arg.get_long().expect("a --flag")));
        }
        let config = ServeConfig::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{name} would reject its compose environment ({argv:?}):\n{e}"));
        // The defaults are loopback, which in a container is the container itself.
        for (variable, address) in [
            ("GRPC_ADDR", config.server.grpc_addr),
            ("ADMIN_ADDR", config.server.admin_addr),
            ("METRICS_ADDR", config.server.metrics_addr),
        ] {
            assert!(
                address.ip().is_unspecified(),
                "{name}'s {variable} listens on {address}"
            );
        }
    }
}

#[test]
fn every_long_running_service_has_a_health_check() {
    let compose = compose();
    for (name, service) in services(&compose) {
        if one_shot(service) {
            continue;
        }
        let healthcheck = service
            .get("healthcheck")
            .unwrap_or_else(|| panic!("`{name}` has no healthcheck, so nothing can wait for it"));
        assert!(
            healthcheck.get("test").is_some() && healthcheck.get("disable").is_none(),
            "`{name}`'s healthcheck runs nothing: {healthcheck:?}"
        );
        if name.starts_with("readthrough") {
            assert_eq!(
                healthcheck
                    .get("test")
                    .and_then(Value::as_sequence)
                    .map(|test| test.iter().filter_map(scalar).collect::<Vec<_>>()),
                Some(vec!["CMD".into(), "readthrough".into(), "health".into()]),
                "{name} is checked by the binary's own health command"
            );
        }
    }
}

/// Each service waits until what it depends on is ready: healthy, or for a
/// one-shot job, done. And every instance depends on each PostgreSQL and
/// Redis its URLs name (through a one-shot that waits for them, as the
/// cluster's creation waits for its nodes).
#[test]
fn every_service_waits_for_what_it_uses() {
    let compose = compose();
    let services = services(&compose);
    for (name, service) in &services {
        for (dependency, condition) in depends_on(service, name) {
            let needed = match services.get(&dependency) {
                Some(dependency) if one_shot(dependency) => "service_completed_successfully",
                Some(_) => "service_healthy",
                None => panic!("{name} depends on `{dependency}`, which compose does not define"),
            };
            assert_eq!(condition, needed, "{name} waits for {dependency}");
        }
    }
    for name in INSTANCES {
        let service = services[*name];
        let mut waits_for: BTreeSet<String> = BTreeSet::new();
        let mut next: Vec<String> = depends_on(service, name).into_keys().collect();
        while let Some(dependency) = next.pop() {
            if waits_for.insert(dependency.clone()) {
                next.extend(depends_on(services[&dependency], &dependency).into_keys());
            }
        }
        let env = environment(service, name);
        let urls = ["DATABASE_URL", "DATABASE_READ_URLS", "REDIS_URL", "REDIS_CLUSTER_URLS"]
            .iter()
            .filter_map(|variable| env.get(*variable))
            .flat_map(|urls| urls.split(','));
        for url in urls {
            let host = url_host(url);
            assert!(waits_for.contains(host), "{name} uses {host} but does not wait for it");
        }
        if env.get("MIGRATE_ON_START").map(String::as_str) == Some("false") {
            assert!(waits_for.contains("migrate"), "{name} serves before migrations ran");
        }
    }
}

#[test]
fn compose_publishes_ports_on_the_hosts_loopback_only() {
    let compose = compose();
    for (name, service) in services(&compose) {
        for port in service.get("ports").and_then(Value::as_sequence).into_iter().flatten() {
            let published = scalar(port).unwrap_or_default();
            assert!(
                published.starts_with("127.0.0.1:"),
                "{name} publishes {port:?} beyond the host's loopback (write \"127.0.0.1:host:container\")"
            );
        }
    }
}

/// Dockerfile instructions: keyword in upper case, then its arguments, with
/// `\` continuation lines joined and comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = read_project_file("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let logical = std::mem::take(&mut current);
        let (keyword, args) = logical.split_once(char::is_whitespace).unwrap_or((&logical, ""));
        instructions.push((keyword.to_ascii_uppercase(), args.trim().to_string()));
    }
    instructions
}

#[test]
fn dockerfile_builds_in_one_stage_and_runs_the_binary_as_non_root_in_another() {
    let instructions = dockerfile();
    let last_from = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("the Dockerfile has a FROM");
    let (build, run) = instructions.split_at(last_from);
    assert!(
        build
            .iter()
            .any(|(keyword, args)| keyword == "RUN" && args.contains("cargo build") && args.contains("--release")),
        "a build stage runs `cargo build --release`"
    );
    let last = |wanted: &str| {
        run.iter()
            .rev()
            .find(|(keyword, _)| keyword == wanted)
            .map(|(_, args)| args.replace(['"', ',', '[', ']'], ""))
            .unwrap_or_else(|| panic!("the final stage has no {wanted}"))
    };
    assert!(last("ENTRYPOINT").contains("readthrough"));
    assert!(last("HEALTHCHECK").contains("CMD readthrough health"));
    let user = last("USER");
    assert!(!matches!(user.split(':').next(), Some("root" | "0")), "runs as {user}");
}

#[test]
fn the_docker_build_context_has_what_cargo_build_needs() {
    let copied: BTreeSet<String> = dockerfile()
        .iter()
        .filter(|(keyword, _)| keyword == "COPY")
        .flat_map(|(_, args)| {
            let words: Vec<&str> = args.split_whitespace().filter(|word| !word.starts_with("--")).collect();
            // Every word but the last (the destination) is a source.
            words[..words.len().saturating_sub(1)]
                .iter()
                .map(|word| word.trim_start_matches("./").trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let ignored: Vec<String> = read_project_file(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.trim_matches('/').to_string())
        .collect();
    assert!(ignored.contains(&"target".to_string()), ".dockerignore drops target/");
    let members = workspace_members();
    assert!(members.contains(&"client".to_string()), "{members:?}");
    for input in BUILD_INPUTS.iter().copied().chain(members.iter().map(String::as_str)) {
        assert!(
            copied.contains(input) || copied.contains("."),
            "the Dockerfile never copies {input}"
        );
        assert!(
            !ignored.iter().any(|pattern| pattern == input),
            ".dockerignore drops {input}"
        );
    }
}

#[test]
fn the_image_keeps_admin_and_metrics_on_loopback_and_compose_guards_metrics_with_a_token() {
    let instructions = dockerfile();
    let last_from = instructions.iter().rposition(|(keyword, _)| keyword == "FROM").unwrap();
    for (keyword, args) in &instructions[last_from..] {
        if keyword == "ENV" {
            assert!(
                !args.contains("ADMIN_ADDR") && !args.contains("METRICS_ADDR"),
                "the image moves a listener off loopback: ENV {args}"
            );
        }
    }

    let compose = compose();
    let services = services(&compose);
    let prometheus: Value = yaml_serde::from_str(&read_project_file("deploy/prometheus.yml")).unwrap();
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["authorization"]["type"].as_str(), Some("Bearer"));
    let sent = job["authorization"]["credentials_file"]
        .as_str()
        .expect("Prometheus sends a token");
    let prometheus_file = mounts(services["prometheus"])
        .into_iter()
        .find(|(_, inside)| inside == sent)
        .map(|(host, _)| host)
        .expect("the token Prometheus sends is mounted");
    for name in INSTANCES {
        let env = environment(services[*name], name);
        let required = env
            .get("METRICS_TOKEN_FILE")
            .expect("metrics beyond loopback need a token");
        let instance_file = mounts(services[*name])
            .into_iter()
            .find(|(_, inside)| inside == required)
            .map(|(host, _)| host)
            .unwrap_or_else(|| panic!("{name}'s METRICS_TOKEN_FILE is not mounted"));
        assert_eq!(
            instance_file, prometheus_file,
            "{name} requires the token Prometheus sends"
        );
    }
}
