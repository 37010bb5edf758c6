//! `docs/benchmarks.md`: the machine, the commit, the command, every figure
//! of the run, and the issue's targets with the measured value of each.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, process::Command, time::Duration};

use crate::{
    probe::CacheCounts,
    stats::{Latencies, median},
};

/// One run: how many calls, in how long, how fast, and what it cost.
#[derive(Debug, Clone)]
pub struct Measured {
    pub requests: u64,
    pub seconds: f64,
    pub latencies: Latencies,
    /// CPU seconds the server process used during the run.
    pub cpu: f64,
    pub http_failures: u64,
    /// Calls that ended with a non-OK code, as the client saw them.
    pub rpc_errors: BTreeMap<String, u64>,
    /// readthrough's own counters, and Redis's command counts (readthrough runs only).
    pub service: Option<(CacheCounts, BTreeMap<String, u64>)>,
}

impl Measured {
    pub fn new(requests: u64, seconds: f64, latencies: Latencies, cpu: f64) -> Self {
        Self {
            requests,
            seconds,
            latencies,
            cpu,
            http_failures: 0,
            rpc_errors: BTreeMap::new(),
            service: None,
        }
    }

    pub fn with_http_failures(mut self, failed: u64) -> Self {
        self.http_failures = failed;
        self
    }

    pub fn with_rpc_errors(mut self, errors: BTreeMap<String, u64>) -> Self {
        self.rpc_errors = errors;
        self
    }

    pub fn with_service(mut self, counts: CacheCounts, commands: BTreeMap<String, u64>) -> Self {
        self.service = Some((counts, commands));
        self
    }

    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// CPU microseconds of the server per call.
    fn cpu_per_call(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.cpu * 1e6 / self.requests as f64
        }
    }

    /// Redis commands per call, all commands together.
    pub fn commands_per_call(&self) -> Option<f64> {
        let (_, commands) = self.service.as_ref()?;
        Some(commands.values().sum::<u64>() as f64 / self.requests.max(1) as f64)
    }

    fn commands_breakdown(&self) -> String {
        let Some((_, commands)) = &self.service else {
            return String::new();
        };
        commands
            .iter()
            .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / self.requests.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Failed calls of every kind: HTTP, gRPC codes seen by the client, non-OK RPCs counted by the service.
    fn failures(&self) -> f64 {
        let service = self.service.as_ref().map_or(0.0, |(counts, _)| counts.failed_rpcs);
        self.http_failures as f64 + self.rpc_errors.values().sum::<u64>() as f64 + service
    }
}

/// A target of the issue and what was measured.
pub struct Target {
    name: String,
    measured: f64,
    /// Inclusive bounds.
    low: f64,
    high: f64,
}

impl Target {
    pub fn at_most(name: &str, measured: f64, bound: f64) -> Self {
        Self::between(name, measured, f64::NEG_INFINITY, bound)
    }

    pub fn at_least(name: &str, measured: f64, bound: f64) -> Self {
        Self::between(name, measured, bound, f64::INFINITY)
    }

    pub fn between(name: &str, measured: f64, low: f64, high: f64) -> Self {
        Self {
            name: name.to_string(),
            measured,
            low,
            high,
        }
    }

    fn met(&self) -> bool {
        (self.low..=self.high).contains(&self.measured)
    }

    fn bound(&self) -> String {
        match (self.low.is_finite(), self.high.is_finite()) {
            (false, _) => format!("≤ {}", self.high),
            (_, false) => format!("≥ {}", self.low),
            _ => format!("{} to {}", self.low, self.high),
        }
    }
}

/// What readthrough counted over some runs: cache outcomes and Redis commands per call.
pub struct Totals {
    pub counts: CacheCounts,
    pub commands_per_call: f64,
}

pub struct Report {
    output: PathBuf,
    run: Duration,
    rounds: usize,
    products: u32,
    sections: String,
    targets: Vec<Target>,
    /// Findings worth stating beside the targets.
    notes: Vec<String>,
    profile: Option<String>,
}

impl Report {
    pub fn new(output: &std::path::Path, run: Duration, rounds: usize, products: u32) -> Self {
        Self {
            output: output.to_path_buf(),
            run,
            rounds,
            products,
            sections: String::new(),
            targets: Vec::new(),
            notes: Vec::new(),
            profile: None,
        }
    }

    pub fn target(&mut self, target: Target) {
        self.targets.push(target);
    }

    pub fn note(&mut self, note: &str) {
        self.notes.push(note.to_string());
    }

    pub fn seed(&mut self, took: Duration, outbox_left: i64) {
        let _ = writeln!(
            self.sections,
            "### Seed\n\n`readthrough seed --users 10000 --products {} --categories 1` took {:.1} s and left \
             {outbox_left} outbox rows for the relay.\n",
            self.products,
            took.as_secs_f64()
        );
    }

    pub fn after_start(&mut self, per_second: Vec<(f64, f64)>, relayed: f64) {
        let mut text = String::from(
            "### The first seconds of `serve` after the seed\n\nWarm GetUser (one hot id, h2load 16 × 32), one-second runs \
             from the moment `serve` accepted connections:\n\n| seconds since start | calls/s |\n|---|---|\n",
        );
        for (at, rate) in &per_second {
            let _ = writeln!(text, "| {at:.1} | {rate:.0} |");
        }
        let _ = writeln!(text, "\nOutbox rows the relay processed meanwhile: {relayed:.0}.\n");
        self.sections.push_str(&text);
    }

    /// readthrough and the floor side by side, per round, with the medians;
    /// the median of the per-round ratios.
    pub fn compare(&mut self, title: &str, pairs: &[(Measured, Measured)]) -> f64 {
        let ours = median(pairs.iter().map(|(ours, _)| ours.throughput()));
        let floor = median(pairs.iter().map(|(_, floor)| floor.throughput()));
        let ratios = median(pairs.iter().map(|(ours, floor)| ours.throughput() / floor.throughput()));
        let mut text = format!("### {title}\n\n");
        text.push_str(
            "| round | readthrough calls/s | floor calls/s | ratio | readthrough p50 / p99 ms | floor p50 / p99 ms | \
             readthrough CPU µs/call | floor CPU µs/call |\n|---|---|---|---|---|---|---|---|\n",
        );
        for (round, (o, f)) in pairs.iter().enumerate() {
            let _ = writeln!(
                text,
                "| {} | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} | {:.1} |",
                round + 1,
                o.throughput(),
                f.throughput(),
                o.throughput() / f.throughput(),
                o.latencies.p50(),
                o.latencies.p99(),
                f.latencies.p50(),
                f.latencies.p99(),
                o.cpu_per_call(),
                f.cpu_per_call()
            );
        }
        let _ = writeln!(
            text,
            "\nMedians: readthrough {ours:.0} calls/s, floor {floor:.0} calls/s; median of the per-round ratios **{ratios:.2}**.\n"
        );
        let ours_runs: Vec<Measured> = pairs.iter().map(|(o, _)| o.clone()).collect();
        text.push_str(&counters_line(&ours_runs));
        self.sections.push_str(&text);
        ratios
    }

    /// readthrough alone, per round, with the medians.
    pub fn single(&mut self, title: &str, runs: &[Measured]) {
        let mut text = format!("### {title}\n\n");
        text.push_str("| round | calls/s | p50 ms | p99 ms | CPU µs/call |\n|---|---|---|---|---|\n");
        for (round, run) in runs.iter().enumerate() {
            let _ = writeln!(
                text,
                "| {} | {:.0} | {:.2} | {:.2} | {:.1} |",
                round + 1,
                run.throughput(),
                run.latencies.p50(),
                run.latencies.p99(),
                run.cpu_per_call()
            );
        }
        let _ = writeln!(
            text,
            "\nMedians: {:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms.\n",
            median(runs.iter().map(Measured::throughput)),
            median(runs.iter().map(|r| r.latencies.p50())),
            median(runs.iter().map(|r| r.latencies.p99()))
        );
        if runs.iter().any(|r| r.service.is_some()) {
            text.push_str(&counters_line(runs));
        }
        self.sections.push_str(&text);
    }

    pub fn near_cache_lag(&mut self, lags: &Latencies) {
        let _ = writeln!(
            self.sections,
            "### Near-cache invalidation lag across two instances\n\nFor 200 users: read on instance B (now in its near \
             cache), update on instance A, then read on B until the new version shows. From A's acknowledgement to that \
             read: p50 **{:.2} ms**, p99 **{:.2} ms** (each includes one GetUser round trip).\n",
            lags.p50(),
            lags.p99()
        );
    }

    /// Write latency with an empty outbox and with `long` rows in it, per round.
    pub fn outbox_writes(&mut self, rounds: &[(Latencies, Latencies)], long: i64) {
        let _ = writeln!(
            self.sections,
            "### A user update's database time, empty outbox and {long} rows in the outbox\n\n\
             `store::users::update` (the UPDATE, the lookup of the transaction's own outbox rows, the commit), \
             timed in the harness's own process against the bench database while no instance runs, so no relay \
             drains the outbox.\n\n| round | empty p50 / p99 ms | long p50 / p99 ms | ratio of p50 |\n|---|---|---|---|"
        );
        let mut ratios = Vec::new();
        for (n, (empty, long)) in rounds.iter().enumerate() {
            let ratio = long.p50() / empty.p50();
            ratios.push(ratio);
            let _ = writeln!(
                self.sections,
                "| {} | {:.3} / {:.3} | {:.3} / {:.3} | {ratio:.2} |",
                n + 1,
                empty.p50(),
                empty.p99(),
                long.p50(),
                long.p99()
            );
        }
        let ratio = median(ratios);
        let _ = writeln!(self.sections, "\nMedian ratio of p50: **{ratio:.2}**.\n");
        self.target(Target::at_most(
            &format!("user update latency (p50) with {long} outbox rows ÷ with none"),
            ratio,
            1.2,
        ));
    }

    /// A section written elsewhere (`events`), as Markdown.
    pub fn section(&mut self, markdown: &str) {
        self.sections.push_str(markdown);
    }

    /// Seconds of each run.
    pub fn run_seconds(&self) -> u64 {
        self.run.as_secs()
    }

    pub fn profile(&mut self, text: String) {
        self.profile = Some(text);
    }

    pub fn write(self) -> anyhow::Result<()> {
        let mut out = String::new();
        out.push_str("# Benchmarks\n\nWritten by `scripts/bench` (do not edit by hand; run it again).\n\n");
        let _ = writeln!(
            out,
            "- **Command:** `scripts/bench` (BENCH_SECONDS={}, BENCH_ROUNDS={}, BENCH_PRODUCTS={})",
            self.run.as_secs(),
            self.rounds,
            self.products
        );
        let _ = writeln!(out, "- **Commit:** {}", commit());
        let _ = writeln!(out, "- **Date:** {}", shell("date -u +%Y-%m-%dT%H:%MZ"));
        let _ = writeln!(out, "- **Machine:** {}", machine());
        out.push_str(
            "- **How:** the release binary as its own process, on its own database and Redis namespace, driven over \
             loopback by h2load (nghttp2) or by the harness's load generator (tonic clients, its own process); the floor \
             (`bench/src/bin/floor.rs`: a bare tonic server answering GetUser with a constant User, no I/O, with \
             readthrough's allocator and runtime settings) is measured in the same way, alternating round by round. Client, servers, PostgreSQL and Redis share the machine's cores, \
             so ratios compare like with like; absolute figures vary from run to run by ±20 %.\n\n",
        );
        out.push_str("## Targets\n\n| measure | target | measured | |\n|---|---|---|---|\n");
        for target in &self.targets {
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {} |",
                target.name,
                target.bound(),
                target.measured,
                if target.met() { "met" } else { "**not met**" }
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "\n{note}");
        }
        out.push_str("\n## Runs\n\n");
        out.push_str(&self.sections);
        out.push_str("## Profile of the warm GetUser path\n\n### Before (commit 358fc6c)\n\n```text\n");
        out.push_str(include_str!("../profile-before.txt"));
        out.push_str("```\n\n### After (this run)\n\n");
        match &self.profile {
            Some(text) => {
                out.push_str(
                    "`perf record -F 999 -g -p <readthrough>` during a warm GetUser run (h2load 16 × 32):\n\n```text\n",
                );
                out.push_str(text);
                out.push_str("```\n");
            }
            None => out.push_str("Not profiled in this run (BENCH_PROFILE=0).\n"),
        }
        if let Some(parent) = self.output.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&self.output, out)?;
        Ok(())
    }
}

/// readthrough's counters over some runs.
pub fn totals(runs: &[Measured]) -> Totals {
    let all = merged(runs);
    Totals {
        commands_per_call: all.commands_per_call().unwrap_or(0.0),
        counts: all.service.map(|(counts, _)| counts).unwrap_or_default(),
    }
}

/// Hit rate, Redis errors, Redis commands per call and failed calls, over the runs.
fn counters_line(runs: &[Measured]) -> String {
    let all = merged(runs);
    let total = all.service.as_ref().map(|(counts, _)| *counts).unwrap_or_default();
    format!(
        "Over these runs: cache hit rate {:.4} ({:.0} hits, {:.0} near-cache hits, {:.0} misses), {:.0} Redis errors, \
         {:.0} requests shed, {:.0} failed calls; Redis commands per call {:.3} ({}).\n\n",
        total.hit_rate(),
        total.hits,
        total.near_hits,
        total.misses,
        total.errors,
        total.shed,
        all.failures(),
        all.commands_per_call().unwrap_or(0.0),
        all.commands_breakdown()
    )
}

/// The runs as one: their calls, failures and counters added up.
fn merged(runs: &[Measured]) -> Measured {
    let mut total = CacheCounts::default();
    let mut commands: BTreeMap<String, u64> = BTreeMap::new();
    let mut requests = 0;
    for run in runs {
        if let Some((counts, calls)) = &run.service {
            total.hits += counts.hits;
            total.near_hits += counts.near_hits;
            total.misses += counts.misses;
            total.errors += counts.errors;
            total.failed_rpcs += counts.failed_rpcs;
            total.shed += counts.shed;
            for (name, n) in calls {
                *commands.entry(name.clone()).or_default() += n;
            }
        }
        requests += run.requests;
    }
    Measured {
        requests,
        seconds: 1.0,
        latencies: Latencies::default(),
        cpu: 0.0,
        http_failures: runs.iter().map(|r| r.http_failures).sum(),
        rpc_errors: runs
            .iter()
            .flat_map(|r| r.rpc_errors.clone())
            .fold(BTreeMap::new(), |mut all, (code, n)| {
                *all.entry(code).or_default() += n;
                all
            }),
        service: Some((total, commands)),
    }
}

fn shell(command: &str) -> String {
    Command::new("sh")
        .args(["-c", command])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The commit the binaries were built from: call once before building
/// them, so that edits made while the benchmark runs do not count.
pub fn commit() -> &'static str {
    static COMMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COMMIT.get_or_init(working_tree_commit)
}

fn working_tree_commit() -> String {
    let head = shell("git rev-parse --short HEAD");
    let dirty = !shell("git status --porcelain --untracked-files=no").is_empty();
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

fn machine() -> String {
    format!(
        "{} cores ({}), {} of memory, {}; PostgreSQL {}, Redis {}",
        shell("nproc"),
        shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'"),
        shell("free -h | awk '/^Mem:/ {print $2}'"),
        shell("uname -sr"),
        shell("psql --version | awk '{print $3}'"),
        shell("redis-server --version | sed 's/.*v=\\([^ ]*\\).*/\\1/'")
    )
}
