//! What the dependencies and the service count: readthrough's `/metrics`,
//! Redis `INFO commandstats`, and the CPU time of a process.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
};

use deadpool_redis::redis;

/// One scrape of a Prometheus text endpoint.
pub struct Metrics(String);

impl Metrics {
    pub fn scrape(port: u16) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(Self(text))
    }

    /// The sum of the samples of `name` whose labels contain every one of `labels`.
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
                (metric == name && labels.iter().all(|label| rest.contains(label)))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .fold(0.0, |sum, value| sum + value)
    }
}

/// What a run changed in readthrough's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheCounts {
    pub hits: f64,
    pub near_hits: f64,
    pub misses: f64,
    pub errors: f64,
    /// RPCs that ended with another code than OK, leaving out CANCELLED:
    /// the load generator resets the calls still in flight when a run ends.
    pub failed_rpcs: f64,
    pub shed: f64,
}

impl CacheCounts {
    pub fn between(before: &Metrics, after: &Metrics) -> Self {
        let delta = |name: &str, labels: &[&str]| after.sum(name, labels) - before.sum(name, labels);
        let rpcs = delta("readthrough_rpc_duration_seconds_count", &[]);
        Self {
            hits: delta("readthrough_cache_hits_total", &[]),
            near_hits: delta("readthrough_near_cache_hits_total", &[]),
            misses: delta("readthrough_cache_misses_total", &[]),
            errors: delta("readthrough_cache_errors_total", &[]),
            failed_rpcs: rpcs
                - delta("readthrough_rpc_duration_seconds_count", &["code=\"OK\""])
                - delta("readthrough_rpc_duration_seconds_count", &["code=\"CANCELLED\""]),
            shed: delta("readthrough_requests_shed_total", &[]),
        }
    }

    /// Lookups answered by a cache (near or Redis), of all lookups.
    pub fn hit_rate(&self) -> f64 {
        let answered = self.hits + self.near_hits;
        let all = answered + self.misses;
        if all == 0.0 { 0.0 } else { answered / all }
    }
}

/// Redis's own count of the commands it ran, by command, since `reset`.
pub struct RedisStats {
    conn: redis::aio::MultiplexedConnection,
}

impl RedisStats {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
        Ok(Self { conn })
    }

    pub async fn reset(&mut self) -> anyhow::Result<()> {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Calls per command since `reset`, leaving out this probe's own.
    pub async fn calls(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await?;
        Ok(info
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .filter(|(name, _)| name != "info" && !name.starts_with("config"))
            .collect())
    }
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = fields
        .get(11..13)
        .map_or(0.0, |t| t.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}
