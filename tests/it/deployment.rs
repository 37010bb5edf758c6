//! The container setup (`docker-compose.yml`, `Dockerfile`, `.dockerignore`)
//! agrees with what the service actually reads and needs.
//!
//! No Docker engine is involved: the files are parsed and checked as text.
//! The variables the service reads come from clap itself, so a setting
//! renamed in `src/config.rs` fails here instead of being silently ignored
//! by a running container.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::PathBuf,
};

use clap::{CommandFactory, Parser};
use readthrough::{
    api::{Authenticator, Role},
    config::ServeConfig,
};
use serde_yaml::Value;

/// Variables read outside clap, by the logging setup: `RUST_LOG` (`EnvFilter`) and `LOG_FORMAT`.
const READ_OUTSIDE_CLAP: &[&str] = &["RUST_LOG", "LOG_FORMAT"];

/// What compose must pass for the service to reach its databases and be reachable.
const REQUIRED_VARIABLES: &[&str] = &["DATABASE_URL", "REDIS_URL", "GRPC_ADDR", "ADMIN_ADDR", "METRICS_ADDR"];

/// What `cargo build` needs from the build context (Cargo.toml declares a
/// `[[bench]]` and the `bench` and `client` workspace members, so they must be
/// there too; `client` holds the protos).
const BUILD_INPUTS: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "build.rs",
    "client",
    "migrations",
    "src",
    "benches",
    "bench",
    ".cargo",
];

pub fn read_project_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// docker-compose.yml, with its YAML merges (`<<: *anchor`) applied as compose applies them.
pub fn compose() -> Value {
    let mut compose: Value = serde_yaml::from_str(&read_project_file("docker-compose.yml"))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"));
    compose
        .apply_merge()
        .unwrap_or_else(|e| panic!("docker-compose.yml has a bad merge: {e}"));
    compose
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .get("services")
        .and_then(|services| services.get(name))
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
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

/// A service's `environment:` map; `None` values are `KEY:` with no value
/// (taken from the shell running compose).
fn environment(service: &Value, name: &str) -> BTreeMap<String, Option<String>> {
    let Some(env) = service.get("environment") else {
        return BTreeMap::new();
    };
    let map = env
        .as_mapping()
        .unwrap_or_else(|| panic!("`{name}`'s environment must be a map (KEY: value), not a list: {env:?}"));
    map.iter()
        .map(|(key, value)| {
            let key = key
                .as_str()
                .unwrap_or_else(|| panic!("`{name}` has a non-string environment key {key:?}"))
                .to_string();
            let value = match value {
                Value::Null => None,
                other => Some(scalar(other).unwrap_or_else(|| panic!("`{name}`'s {key} is not a scalar: {other:?}"))),
            };
            (key, value)
        })
        .collect()
}

/// Every variable the service reads: the `env = "..."` of each `serve` argument, plus RUST_LOG.
fn variables_the_service_reads() -> BTreeSet<String> {
    ServeConfig::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .chain(READ_OUTSIDE_CLAP.iter().map(|v| v.to_string()))
        .collect()
}

/// `command:` as a list of words, whether compose gives it as a string or a list.
fn command_words(service: &Value, name: &str) -> Vec<String> {
    command_words_of(service.get("command"), name)
}

fn command_words_of(command: Option<&Value>, name: &str) -> Vec<String> {
    match command {
        Some(Value::String(line)) => line.split_whitespace().map(str::to_string).collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| scalar(item).unwrap_or_else(|| panic!("`{name}`'s command has a non-scalar {item:?}")))
            .flat_map(|item| item.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect(),
        Some(other) => panic!("`{name}`'s command is neither a string nor a list: {other:?}"),
        None => panic!("`{name}` has no command"),
    }
}

/// The words after each occurrence of `option`, up to the next `--option`.
fn option_values(words: &[String], option: &str) -> Vec<Vec<String>> {
    words
        .iter()
        .enumerate()
        .filter(|(_, word)| *word == option)
        .map(|(at, _)| {
            words[at + 1..]
                .iter()
                .take_while(|word| !word.starts_with("--"))
                .cloned()
                .collect()
        })
        .collect()
}

/// The container side of each published port.
fn container_ports(service: &Value, name: &str) -> Vec<u16> {
    let Some(ports) = service.get("ports").and_then(Value::as_sequence) else {
        panic!("`{name}` publishes no ports");
    };
    ports
        .iter()
        .filter_map(|port| match port {
            // "50051", "50051:50051", "127.0.0.1:50051:50051", "50051:50051/tcp"
            Value::String(s) => s.rsplit(':').next()?.split('/').next()?.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            // Long syntax: { target: 50051, published: "50051" }
            Value::Mapping(_) => port
                .get("target")
                .and_then(scalar)
                .and_then(|target| target.parse().ok()),
            _ => None,
        })
        .collect()
}

/// The host of a `scheme://[user[:password]@]host[:port][/path]` URL.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    host_port.split(':').next().unwrap_or(host_port)
}

#[test]
fn compose_defines_postgres_redis_and_readthrough() {
    let compose = compose();
    for name in ["postgres", "redis", "readthrough"] {
        service(&compose, name);
    }
    assert!(
        service(&compose, "readthrough").get("build").is_some(),
        "readthrough should be built from this repository (`build: .`)"
    );
}

#[test]
fn every_service_has_a_healthcheck() {
    let compose = compose();
    for (name, probe) in [
        ("postgres", "pg_isready"),
        ("redis", "redis-cli"),
        ("readthrough", "readthrough health"),
        ("postgres-replica", "pg_isready"),
        ("redis-node-1", "redis-cli"),
        ("redis-node-2", "redis-cli"),
        ("redis-node-3", "redis-cli"),
        ("readthrough-a", "readthrough health"),
        ("readthrough-b", "readthrough health"),
    ] {
        let healthcheck = service(&compose, name)
            .get("healthcheck")
            .unwrap_or_else(|| panic!("`{name}` has no healthcheck, so nothing can wait for it"));
        assert_ne!(
            healthcheck.get("disable").and_then(Value::as_bool),
            Some(true),
            "`{name}`'s healthcheck is disabled"
        );
        let test = match healthcheck.get("test") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Sequence(items)) => items.iter().filter_map(scalar).collect::<Vec<_>>().join(" "),
            other => panic!("`{name}`'s healthcheck has no usable `test`: {other:?}"),
        };
        assert!(
            test.contains(probe),
            "`{name}`'s healthcheck should run `{probe}`, runs `{test}`"
        );
        if name.starts_with("redis") {
            assert!(
                test.ends_with(" ping"),
                "redis's healthcheck should PING, runs `{test}`"
            );
        }
    }
}

#[test]
fn readthrough_starts_after_postgres_and_redis_are_healthy() {
    let compose = compose();
    let depends_on = service(&compose, "readthrough")
        .get("depends_on")
        .unwrap_or_else(|| panic!("readthrough has no depends_on"));
    assert!(
        depends_on.is_mapping(),
        "readthrough's depends_on must be a map with conditions (a plain list only waits \
         for the containers to start, not to be ready): {depends_on:?}"
    );
    for dependency in ["postgres", "redis"] {
        let condition = depends_on
            .get(dependency)
            .unwrap_or_else(|| panic!("readthrough does not depend on `{dependency}`"))
            .get("condition")
            .and_then(Value::as_str);
        assert_eq!(
            condition,
            Some("service_healthy"),
            "readthrough should wait for `{dependency}` to be healthy"
        );
    }
}

#[test]
fn every_redis_is_configured_as_a_bounded_cache_that_keeps_nothing_on_disk() {
    let compose = compose();
    for name in ["redis", "redis-node-1", "redis-node-2", "redis-node-3"] {
        redis_is_a_bounded_cache_that_keeps_nothing_on_disk(service(&compose, name), name);
    }
}

fn redis_is_a_bounded_cache_that_keeps_nothing_on_disk(redis: &Value, name: &str) {
    let words = command_words(redis, name);
    let single =
        |option: &str| -> Option<String> { option_values(&words, option).last().map(|values| values.join(" ")) };

    let maxmemory = single("--maxmemory").unwrap_or_else(|| panic!("redis command sets no --maxmemory: {words:?}"));
    assert!(
        !maxmemory.is_empty() && maxmemory != "0",
        "redis --maxmemory must be a limit (0 means unbounded), is `{maxmemory}`"
    );
    assert_eq!(
        single("--maxmemory-policy").as_deref(),
        Some("allkeys-lru"),
        "redis should evict least recently used keys when full: {words:?}"
    );
    // A restart that reloaded a snapshot or an append-only file would bring back
    // entries whose deletion it lost (up to a second of acknowledged DELs), and
    // their outbox rows are gone: the cache must come back empty.
    assert_eq!(
        single("--appendonly").as_deref(),
        Some("no"),
        "redis must not keep an append-only file: {words:?}"
    );
    let saves = option_values(&words, "--save");
    assert!(
        !saves.is_empty()
            && saves
                .iter()
                .all(|save| matches!(save.join(" ").as_str(), "\"\"" | "''")),
        "redis must turn RDB snapshots off with --save \"\": {words:?}"
    );
    assert!(redis.get("volumes").is_none(), "{name} keeps no volume: {redis:?}");
}

#[test]
fn compose_passes_only_variables_the_service_reads() {
    let compose = compose();
    let reads = variables_the_service_reads();
    assert!(
        reads.contains("DATABASE_URL") && reads.contains("GRPC_ADDR"),
        "clap reported no DATABASE_URL or GRPC_ADDR; is `env` still set in src/config.rs? {reads:?}"
    );
    for name in ["readthrough", "readthrough-a", "readthrough-b"] {
        let passed = environment(service(&compose, name), name);
        let unknown: Vec<&String> = passed.keys().filter(|key| !reads.contains(*key)).collect();
        assert!(
            unknown.is_empty(),
            "{name}'s compose environment sets {unknown:?}, which the service never reads \
             (a typo or a renamed setting?); it reads {reads:?}"
        );
    }
}

/// `docker compose --profile scale up readthrough-a readthrough-b`: two
/// instances on a Redis Cluster of the profile's nodes, reading misses from
/// the profile's PostgreSQL replica, each started once what it uses is ready.
#[test]
fn the_scale_profile_runs_two_instances_on_a_redis_cluster_and_a_postgres_replica() {
    let compose = compose();
    let nodes = ["redis-node-1", "redis-node-2", "redis-node-3"];
    let scaled = [
        "postgres-replica",
        "redis-cluster-create",
        "readthrough-a",
        "readthrough-b",
    ];
    for name in nodes.iter().chain(&scaled) {
        let profiles = service(&compose, name).get("profiles").and_then(Value::as_sequence);
        assert_eq!(
            profiles.map(|p| p.iter().filter_map(scalar).collect::<Vec<_>>()),
            Some(vec!["scale".to_string()]),
            "{name} belongs to the `scale` profile only"
        );
    }
    for name in nodes {
        let words = command_words(service(&compose, name), name);
        assert_eq!(
            option_values(&words, "--cluster-enabled")
                .last()
                .map(|v| v.join(" "))
                .as_deref(),
            Some("yes"),
            "{name} runs in cluster mode: {words:?}"
        );
    }
    let create = service_script(service(&compose, "redis-cluster-create"), "redis-cluster-create");
    assert!(
        create.contains("--cluster create"),
        "redis-cluster-create creates the cluster: {create}"
    );
    for node in nodes {
        assert!(create.contains(node), "redis-cluster-create joins {node}: {create}");
    }
    let replica = service_script(service(&compose, "postgres-replica"), "postgres-replica");
    assert!(
        replica.contains("pg_basebackup -h postgres -U replicator") && replica.contains(" -R "),
        "postgres-replica streams from postgres as `replicator`: {replica}"
    );
    let replication = read_project_file("deploy/postgres-replication.sh");
    assert!(
        replication.contains("CREATE ROLE replicator WITH REPLICATION")
            && replication.contains("host replication replicator"),
        "the primary lets `replicator` stream: {replication}"
    );

    for name in ["readthrough-a", "readthrough-b"] {
        let readthrough = service(&compose, name);
        assert!(
            readthrough.get("build").is_some(),
            "{name} is built from this repository"
        );
        let passed = environment(readthrough, name);
        let seeds = passed["REDIS_CLUSTER_URLS"].clone().unwrap_or_default();
        let hosts: Vec<&str> = seeds.split(',').map(url_host).collect();
        assert_eq!(hosts, nodes, "{name}'s REDIS_CLUSTER_URLS name every node");
        assert!(
            seeds.split(',').all(|url| url.contains(":dev-redis-password@")),
            "{name}'s REDIS_CLUSTER_URLS carry the nodes' password: {seeds}"
        );
        let read_urls = passed["DATABASE_READ_URLS"].clone().unwrap_or_default();
        assert_eq!(
            url_host(&read_urls),
            "postgres-replica",
            "{name} reads misses from the replica"
        );
        assert_eq!(
            url_host(passed["DATABASE_URL"].as_deref().unwrap_or_default()),
            "postgres"
        );
        let depends_on = readthrough.get("depends_on").unwrap();
        for (dependency, condition) in [
            ("migrate", "service_completed_successfully"),
            ("postgres", "service_healthy"),
            ("postgres-replica", "service_healthy"),
            ("redis-cluster-create", "service_completed_successfully"),
        ] {
            assert_eq!(
                depends_on
                    .get(dependency)
                    .and_then(|d| d.get("condition"))
                    .and_then(Value::as_str),
                Some(condition),
                "{name} waits for {dependency}"
            );
        }
    }
    let ports: Vec<Vec<u16>> = ["readthrough-a", "readthrough-b"]
        .map(|name| container_ports(service(&compose, name), name))
        .into();
    assert_eq!(ports[0], ports[1], "both instances serve on the same container ports");
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

/// The script a service runs: the file under ./deploy mounted where its entrypoint runs it.
fn service_script(service: &Value, name: &str) -> String {
    let entrypoint = command_words_of(service.get("entrypoint"), name);
    let script = entrypoint
        .iter()
        .find(|word| word.ends_with(".sh"))
        .unwrap_or_else(|| panic!("{name}'s entrypoint runs no script: {entrypoint:?}"));
    let source = mounts(service)
        .into_iter()
        .find_map(|(source, target)| (&target == script).then_some(source))
        .unwrap_or_else(|| panic!("{name} does not mount {script}"));
    read_project_file(&source)
}

#[test]
fn compose_passes_the_connection_and_listen_addresses() {
    let compose = compose();
    let passed = environment(service(&compose, "readthrough"), "readthrough");
    for variable in REQUIRED_VARIABLES {
        assert!(
            matches!(passed.get(*variable), Some(Some(value)) if !value.is_empty()),
            "readthrough's compose environment must set {variable}; it sets {:?}",
            passed.keys().collect::<Vec<_>>()
        );
    }

    // The defaults point at 127.0.0.1, which inside a container is the container itself.
    for (variable, host) in [("DATABASE_URL", "postgres"), ("REDIS_URL", "redis")] {
        let url = passed[variable].as_deref().unwrap_or_default();
        assert_eq!(
            url_host(url),
            host,
            "{variable} should point at the `{host}` compose service"
        );
    }
    // Listening on loopback inside a container is unreachable from outside it.
    for variable in ["GRPC_ADDR", "ADMIN_ADDR", "METRICS_ADDR"] {
        let raw = passed[variable].as_deref().unwrap_or_default();
        let addr: SocketAddr = raw
            .parse()
            .unwrap_or_else(|e| panic!("{variable}={raw} is not an address: {e}"));
        assert!(
            addr.ip().is_unspecified(),
            "{variable}={raw} should listen on all interfaces (0.0.0.0)"
        );
    }
}

#[test]
fn compose_migrates_in_a_step_of_its_own_and_serves_as_a_role_that_is_not_a_superuser() {
    let compose = compose();
    let migrate = service(&compose, "migrate");
    assert_eq!(command_words(migrate, "migrate"), ["migrate"]);
    let readthrough = service(&compose, "readthrough");
    let condition = readthrough
        .get("depends_on")
        .and_then(|depends_on| depends_on.get("migrate"))
        .and_then(|migrate| migrate.get("condition"))
        .and_then(Value::as_str);
    assert_eq!(condition, Some("service_completed_successfully"));
    let serve = environment(readthrough, "readthrough");
    assert_eq!(serve["MIGRATE_ON_START"].as_deref(), Some("false"));
    let url = serve["DATABASE_URL"].clone().unwrap_or_default();
    assert_eq!(
        environment(migrate, "migrate")["DATABASE_URL"].as_deref(),
        Some(url.as_str()),
        "migrations and the service use the same role"
    );
    let user = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['@', ':']).next())
        .unwrap_or_default()
        .to_string();
    assert_ne!(user, "postgres", "the service does not connect as the superuser");

    // The postgres image runs the mounted script when its data directory is new.
    let script = mounts(service(&compose, "postgres"))
        .into_iter()
        .find_map(|(source, target)| target.starts_with("/docker-entrypoint-initdb.d/").then_some(source))
        .expect("postgres mounts an init script");
    let sql = read_project_file(&script);
    assert!(
        sql.contains(&format!("CREATE ROLE {user} LOGIN")) && sql.contains("NOSUPERUSER"),
        "{script} creates {user} without superuser rights: {sql}"
    );
    assert!(
        sql.contains(&format!("OWNER {user}")),
        "{user} owns its database: {sql}"
    );
}

#[test]
fn compose_publishes_ports_on_the_hosts_loopback_only() {
    let compose = compose();
    let services = compose.get("services").and_then(Value::as_mapping).unwrap();
    for (name, service) in services {
        let Some(ports) = service.get("ports").and_then(Value::as_sequence) else {
            continue;
        };
        for port in ports {
            let published = match port {
                Value::String(s) => s.clone(),
                other => panic!("{name:?}: write ports as \"127.0.0.1:host:container\", not {other:?}"),
            };
            assert!(
                published.starts_with("127.0.0.1:"),
                "{name:?} publishes {published} beyond the host's loopback"
            );
        }
    }
}

#[test]
fn compose_redis_requires_the_password_the_service_uses() {
    let compose = compose();
    let words = command_words(service(&compose, "redis"), "redis");
    let password = option_values(&words, "--requirepass")
        .last()
        .and_then(|values| values.first().cloned())
        .unwrap_or_else(|| panic!("redis sets no --requirepass: {words:?}"));
    let passed = environment(service(&compose, "readthrough"), "readthrough");
    let url = passed["REDIS_URL"].clone().unwrap_or_default();
    assert!(
        url.contains(&format!(":{password}@")),
        "REDIS_URL should carry redis's password: {url}"
    );
}

#[test]
fn compose_authenticates_calls_with_the_development_token() {
    let compose = compose();
    let readthrough = service(&compose, "readthrough");
    let passed = environment(readthrough, "readthrough");
    let tokens_path = passed
        .get("AUTH_TOKENS_FILE")
        .cloned()
        .flatten()
        .expect("compose sets AUTH_TOKENS_FILE");
    let volumes: Vec<String> = readthrough
        .get("volumes")
        .and_then(Value::as_sequence)
        .map(|volumes| volumes.iter().filter_map(scalar).collect())
        .unwrap_or_default();
    let source = volumes
        .iter()
        .find_map(|volume| {
            let mut parts = volume.split(':');
            let (source, target) = (parts.next()?, parts.next()?);
            (target == tokens_path).then(|| source.to_string())
        })
        .unwrap_or_else(|| panic!("no volume mounts {tokens_path}: {volumes:?}"));

    let mut config = ServeConfig::try_parse_from(["readthrough"]).unwrap();
    config.auth.auth_tokens_file = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(source));
    let authenticator = Authenticator::from_config(&config.auth)
        .expect("the tokens file loads")
        .expect("it lists tokens");
    let roles = authenticator
        .authenticate(Some(b"Bearer dev-token"))
        .expect("the README's development token is listed");
    for role in [Role::Read, Role::Write, Role::Admin] {
        assert!(roles.contains(role), "the development token lacks {role}");
    }
}

#[test]
fn compose_environment_values_are_accepted_by_the_service() {
    let compose = compose();
    for name in ["readthrough", "readthrough-a", "readthrough-b"] {
        let passed = environment(service(&compose, name), name);
        // Hand each value to clap as the flag it backs: flags win over the test's own environment.
        let mut argv = vec!["readthrough".to_string()];
        for arg in ServeConfig::command().get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let Some(Some(value)) = passed.get(&*env.to_string_lossy()) else {
                continue;
            };
            let long = arg
                .get_long()
                .unwrap_or_else(|| panic!("{env:?} backs an argument without a --flag"));
            argv.push(format!("--{long}={value}"));
        }
        match ServeConfig::try_parse_from(&argv) {
            Ok(config) if name != "readthrough" => {
                assert_eq!(config.config.redis_cluster_urls.len(), 3, "{name} has three seed nodes");
                assert_eq!(config.config.database_read_urls.len(), 1, "{name} has one replica");
            }
            Ok(_) => {}
            Err(e) => panic!("{name} would reject its compose environment ({argv:?}):\n{e}"),
        }
    }
}

#[test]
fn compose_publishes_the_grpc_and_metrics_ports() {
    let compose = compose();
    let readthrough = service(&compose, "readthrough");
    let published = container_ports(readthrough, "readthrough");
    assert!(
        published.contains(&50051),
        "readthrough should publish the gRPC port 50051; publishes {published:?}"
    );
    let passed = environment(readthrough, "readthrough");
    for variable in ["GRPC_ADDR", "ADMIN_ADDR", "METRICS_ADDR"] {
        let Some(Some(raw)) = passed.get(variable) else {
            continue; // compose_passes_the_connection_and_listen_addresses reports it
        };
        let Ok(addr) = raw.parse::<SocketAddr>() else {
            continue;
        };
        assert!(
            published.contains(&addr.port()),
            "{variable}={raw}, but port {} is not published ({published:?})",
            addr.port()
        );
    }
}

/// One Dockerfile instruction: keyword in upper case, then its arguments,
/// with `\` continuation lines joined and comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = read_project_file("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
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
        let (keyword, args) = logical
            .split_once(char::is_whitespace)
            .unwrap_or((logical.as_str(), ""));
        instructions.push((keyword.to_ascii_uppercase(), args.trim().to_string()));
    }
    instructions
}

fn final_stage(instructions: &[(String, String)]) -> &[(String, String)] {
    let last_from = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("the Dockerfile has no FROM");
    &instructions[last_from..]
}

#[test]
fn dockerfile_is_a_multi_stage_build() {
    let stages = dockerfile().iter().filter(|(keyword, _)| keyword == "FROM").count();
    assert!(
        stages >= 2,
        "the Dockerfile should build in one stage and run in another (found {stages} FROM)"
    );
}

#[test]
fn dockerfile_checks_health_with_the_binary_itself() {
    let instructions = dockerfile();
    let healthcheck = instructions
        .iter()
        .find(|(keyword, _)| keyword == "HEALTHCHECK")
        .map(|(_, args)| args.clone())
        .expect("the Dockerfile has no HEALTHCHECK");
    let command: String = healthcheck
        .chars()
        .filter(|c| !matches!(c, '"' | ',' | '[' | ']'))
        .collect();
    assert!(
        command.contains("CMD readthrough health"),
        "HEALTHCHECK should run `readthrough health`: {healthcheck}"
    );
}

#[test]
fn dockerfile_builds_the_release_binary() {
    let instructions = dockerfile();
    let last_from = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("the Dockerfile has no FROM");
    let builds = instructions[..last_from]
        .iter()
        .any(|(keyword, args)| keyword == "RUN" && args.contains("cargo build") && args.contains("--release"));
    assert!(
        builds,
        "a build stage of the Dockerfile should `RUN cargo build --release`"
    );
}

#[test]
fn dockerfile_copies_what_the_build_needs() {
    let sources: BTreeSet<String> = dockerfile()
        .iter()
        .filter(|(keyword, _)| keyword == "COPY")
        .flat_map(|(_, args)| {
            let words: Vec<&str> = args.split_whitespace().filter(|word| !word.starts_with("--")).collect();
            // Every word but the last (the destination) is a source.
            let sources = words.len().saturating_sub(1);
            words[..sources]
                .iter()
                .map(|&word| {
                    let word = word.strip_prefix("./").unwrap_or(word);
                    word.trim_end_matches('/').to_string()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if sources.contains(".") || sources.contains("") {
        return; // `COPY . .` takes the whole (filtered) context
    }
    let missing: Vec<&&str> = BUILD_INPUTS.iter().filter(|input| !sources.contains(**input)).collect();
    assert!(
        missing.is_empty(),
        "the Dockerfile never copies {missing:?}, which `cargo build` needs; it copies {sources:?}"
    );
}

#[test]
fn dockerignore_keeps_the_build_inputs_and_drops_target() {
    let patterns: Vec<String> = read_project_file(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect();
    assert!(
        patterns.iter().any(|p| p == "target"),
        ".dockerignore should drop target/ (gigabytes of local build output): {patterns:?}"
    );
    for input in BUILD_INPUTS {
        assert!(
            !patterns.iter().any(|p| p == input),
            ".dockerignore drops {input}, which the build needs"
        );
    }
}

#[test]
fn dockerfile_final_stage_runs_readthrough_as_non_root() {
    let instructions = dockerfile();
    let stage = final_stage(&instructions);
    let entrypoint = stage
        .iter()
        .rev()
        .find(|(keyword, _)| keyword == "ENTRYPOINT")
        .map(|(_, args)| args.as_str())
        .expect("the Dockerfile's final stage has no ENTRYPOINT");
    assert!(
        entrypoint.contains("readthrough"),
        "the final stage's ENTRYPOINT should run readthrough, runs {entrypoint}"
    );
    let user = stage
        .iter()
        .rev()
        .find(|(keyword, _)| keyword == "USER")
        .map(|(_, args)| args.as_str())
        .expect("the Dockerfile's final stage sets no USER, so the service runs as root");
    let name = user.split(':').next().unwrap_or(user);
    assert!(
        name != "root" && name != "0",
        "the final stage should run as a non-root user, runs as `{user}`"
    );
}
