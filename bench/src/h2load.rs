//! h2load (nghttp2) as the load generator for requests that do not vary: a
//! gRPC call is an HTTP/2 POST whose body is one length-prefixed protobuf
//! message, written to a file once.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use prost::Message;

use crate::stats::Latencies;

/// One request h2load sends over and over.
pub struct Call {
    /// e.g. `/readthrough.v1.UserService/GetUser`.
    pub path: &'static str,
    body: PathBuf,
}

impl Call {
    pub fn new(path: &'static str, message: &impl Message, dir: &std::path::Path, name: &str) -> anyhow::Result<Self> {
        let payload = message.encode_to_vec();
        let mut framed = Vec::with_capacity(5 + payload.len());
        framed.push(0); // not compressed
        framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        framed.extend_from_slice(&payload);
        let body = dir.join(format!("{name}.bin"));
        std::fs::write(&body, framed)?;
        Ok(Self { path, body })
    }

    pub fn body_path(&self) -> PathBuf {
        self.body.clone()
    }
}

/// How hard h2load pushes: `connections` × `streams` requests in flight.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub connections: u32,
    pub streams: u32,
}

impl Load {
    /// The standard load: 16 connections × 32 concurrent streams.
    pub const STANDARD: Load = Load {
        connections: 16,
        streams: 32,
    };
    /// One client, one call at a time: latency on an idle machine.
    pub const SINGLE: Load = Load {
        connections: 1,
        streams: 1,
    };
}

#[derive(Debug, Clone)]
pub struct Run {
    pub requests: u64,
    /// HTTP-level failures h2load saw (gRPC errors are counted by the service).
    pub failed: u64,
    pub seconds: f64,
    pub latencies: Latencies,
}

impl Run {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// Runs h2load against `port`, sending `body` to `path`, for `duration`, or
/// until `requests` are done when given.
pub fn run_file(
    port: u16,
    path: &str,
    body: &std::path::Path,
    load: Load,
    duration: Duration,
    requests: Option<u64>,
) -> anyhow::Result<Run> {
    let log = tempfile_path("h2load-log");
    let mut command = Command::new("h2load");
    command
        .args(["-c", &load.connections.to_string(), "-m", &load.streams.to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(body)
        .arg(format!("--log-file={}", log.display()));
    match requests {
        Some(n) => command.args(["-n", &n.to_string()]),
        None => command.args(["-D", &duration.as_secs().max(1).to_string()]),
    };
    command.arg(format!("http://127.0.0.1:{port}{path}"));
    let output = command.output().context("running h2load (scripts/bench installs it)")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        bail!("h2load failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    }
    let seconds = parse_finished_in(&text).context("h2load printed no `finished in`")?;
    let (succeeded, failed) = parse_requests(&text).context("h2load printed no request counts")?;
    let latencies = read_log(&log)?;
    let _ = std::fs::remove_file(&log);
    Ok(Run {
        requests: succeeded,
        failed,
        seconds,
        latencies,
    })
}

/// `finished in 5.00s, 52575.00 req/s, 8.02MB/s` (also `ms`).
fn parse_finished_in(text: &str) -> Option<f64> {
    let rest = text.lines().find_map(|line| line.strip_prefix("finished in "))?;
    let value = rest.split(',').next()?.trim();
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|ms| ms / 1000.0);
    }
    value.strip_suffix('s')?.parse().ok()
}

/// `requests: 100000 total, 100000 started, 100000 done, 99990 succeeded, 10 failed, ...`
fn parse_requests(text: &str) -> Option<(u64, u64)> {
    let rest = text.lines().find_map(|line| line.strip_prefix("requests: "))?;
    let number = |word: &str| {
        rest.split(',')
            .map(str::trim)
            .find_map(|part| part.strip_suffix(word)?.trim().parse::<u64>().ok())
    };
    Some((number("succeeded")?, number("failed")?))
}

/// h2load's log: one line per request, tab-separated: start (µs), status, duration (µs).
fn read_log(path: &std::path::Path) -> anyhow::Result<Latencies> {
    let text = std::fs::read_to_string(path).context("reading h2load's log")?;
    Ok(Latencies::from_micros(
        text.lines()
            .filter_map(|line| line.split('\t').nth(2)?.trim().parse::<u64>().ok())
            .collect(),
    ))
}

pub fn tempfile_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("readthrough-bench-{}-{name}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_summaries() {
        let text = "finished in 5.00s, 52575.00 req/s, 8.02MB/s\n\
                    requests: 262875 total, 262875 started, 262875 done, 262870 succeeded, 5 failed, 0 errored, 0 timeout\n";
        assert_eq!(parse_finished_in(text), Some(5.0));
        assert_eq!(parse_requests(text), Some((262_870, 5)));
        assert_eq!(parse_finished_in("finished in 879.07ms, 2275 req/s"), Some(0.87907));
    }
}
