//! The Grafana dashboard (`deploy/grafana/dashboards/readthrough.json`) and
//! the compose Prometheus and Grafana that show it: every metric the
//! dashboard queries is one the service exports, so a renamed metric fails
//! here instead of leaving an empty panel.

use std::{collections::BTreeSet, fs, path::PathBuf};

use serde_json::Value;

use crate::deployment::{compose, mounts, read_project_file};

/// Every `*.rs` file under `dir`, recursively.
fn rust_files(dir: PathBuf) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}

/// The names `src/` registers metrics under: the first argument of
/// `counter!`, `gauge!`, `histogram!` and `telemetry::histogram`.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in rust_files(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")) {
        let source = fs::read_to_string(&file).unwrap();
        for macro_call in ["counter!(", "gauge!(", "histogram!(", "histogram("] {
            for (at, _) in source.match_indices(macro_call) {
                let rest = source[at + macro_call.len()..].trim_start();
                if let Some(name) = rest.strip_prefix('"').and_then(|rest| rest.split('"').next())
                    && name.starts_with("readthrough_")
                {
                    names.insert(name.to_string());
                }
            }
        }
    }
    names
}

/// The metric names a PromQL expression reads; a histogram's series
/// (`_bucket`, `_count`, `_sum`) by the histogram's name.
fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("readthrough_"))
        .map(|word| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix).filter(|name| name.ends_with("_seconds")))
                .unwrap_or(word)
                .to_string()
        })
        .collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read_project_file("deploy/grafana/dashboards/readthrough.json"))
        .expect("the dashboard is JSON")
}

#[test]
fn every_metric_the_dashboard_queries_is_one_the_service_exports() {
    let exported = exported_metrics();
    assert!(
        exported.contains("readthrough_cache_hits_total") && exported.contains("readthrough_rpc_duration_seconds"),
        "the source scan finds the metrics: {exported:?}"
    );
    let panels = dashboard()["panels"]
        .as_array()
        .cloned()
        .expect("the dashboard has panels");
    let mut queried = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} queries something");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            let names = metrics_in(expr);
            assert!(!names.is_empty(), "panel {title:?} reads a readthrough metric: {expr}");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "panel {title:?} queries {name}, which the service does not export"
                );
                queried.insert(name);
            }
        }
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some("prometheus"),
            "panel {title:?} uses the provisioned datasource"
        );
    }
    let titles: Vec<&str> = panels.iter().filter_map(|panel| panel["title"].as_str()).collect();
    for wanted in [
        "hit rate",
        "RPC rate",
        "RPC latency",
        "Redis latency",
        "PostgreSQL latency",
        "Errors",
        "Outbox",
        "events",
    ] {
        assert!(
            titles.iter().any(|title| title.contains(wanted)),
            "a panel shows {wanted}: {titles:?}"
        );
    }
    assert!(queried.len() >= 15, "the dashboard covers the service: {queried:?}");
}

#[test]
fn compose_runs_prometheus_on_every_instance_and_grafana_with_the_dashboard() {
    let compose = compose();
    let services = &compose["services"];
    let prometheus_config = mounts(&services["prometheus"])
        .into_iter()
        .find(|(_, target)| target == "/etc/prometheus/prometheus.yml")
        .map(|(source, _)| read_project_file(&source))
        .expect("prometheus mounts its configuration");
    for instance in ["readthrough", "readthrough-a", "readthrough-b"] {
        let metrics_addr = services[instance]["environment"]["METRICS_ADDR"]
            .as_str()
            .unwrap_or_default();
        let port = metrics_addr.rsplit(':').next().unwrap();
        assert!(
            prometheus_config.contains(&format!("\"{instance}:{port}\"")),
            "prometheus scrapes {instance} on its METRICS_ADDR port {port}: {prometheus_config}"
        );
    }

    let grafana = mounts(&services["grafana"]);
    let dashboards_dir = grafana
        .iter()
        .find(|(source, _)| source == "deploy/grafana/dashboards")
        .map(|(_, target)| target.clone())
        .expect("grafana mounts the dashboards");
    assert!(
        grafana
            .iter()
            .any(|(source, target)| source == "deploy/grafana/provisioning" && target == "/etc/grafana/provisioning"),
        "grafana mounts its provisioning: {grafana:?}"
    );
    let provider = read_project_file("deploy/grafana/provisioning/dashboards/readthrough.yml");
    assert!(
        provider.contains(&format!("path: {dashboards_dir}")),
        "the dashboard provider reads the mounted directory {dashboards_dir}: {provider}"
    );
    let datasource = read_project_file("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(
        datasource.contains("uid: prometheus") && datasource.contains("url: http://prometheus:9090"),
        "the datasource is the compose Prometheus, under the uid the dashboard names: {datasource}"
    );
}

#[test]
fn metric_names_are_read_out_of_queries() {
    assert_eq!(
        metrics_in("histogram_quantile(0.99, sum by (le) (rate(readthrough_rpc_duration_seconds_bucket[1m])))"),
        ["readthrough_rpc_duration_seconds"]
    );
    assert_eq!(
        metrics_in("rate(readthrough_outbox_relayed_total[5m]) / readthrough_db_queries_total"),
        ["readthrough_outbox_relayed_total", "readthrough_db_queries_total"]
    );
}
