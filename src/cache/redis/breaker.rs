//! A circuit breaker around Redis, so that an outage costs each request
//! nothing instead of a deadline.
//!
//! ```text
//!            FAILURES in a row               cool-down over (or a reconnect)
//!   closed ───────────────────▶ open ─────────────────────────────────▶ half-open
//!     ▲                          ▲                                         │
//!     │                          └────────── the probe fails ──────────────┤
//!     └──────────────────────────────────── the probe answers ─────────────┘
//! ```
//!
//! Closed, commands run and a run of failures (errors that mean Redis is
//! unavailable, or deadlines) opens it. A run of deadlines only once it has
//! lasted a deadline: commands in flight together all miss it when this
//! process or Redis stalls for a moment (a busy core, a large pipeline),
//! which is one event, not an outage; an outage keeps failing commands sent
//! after the first misses. Open, every command is skipped at once
//! and the caller fails open (PostgreSQL answers). The first command after the
//! cool-down half-opens it and hands out the single probe; the others keep
//! skipping until the probe's answer closes it or opens it again.
//!
//! The closed path costs two relaxed atomic loads and no lock: it runs on
//! every Redis command.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use metrics::{Counter, Gauge};

/// A reconnect ends the cool-down, but probes stay at least this far apart: a
/// Redis that accepts connections and then answers nothing would otherwise
/// be probed (and reconnected) in a tight loop.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The breaker's state, as the `readthrough_cache_breaker_state` gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl State {
    fn from_u8(raw: u8) -> Self {
        match raw {
            0 => State::Closed,
            1 => State::HalfOpen,
            _ => State::Open,
        }
    }
}

/// What a command may do now.
pub enum Admission {
    /// Run it (closed), and report how it went.
    Run,
    /// Skip Redis: fail open at once.
    Skip,
    /// Skip Redis, and try it once with this probe (half-open).
    Probe(Probe),
}

/// How a command that ran found Redis unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// An error that says so (refused, reset, loading…).
    Error,
    /// No answer within its deadline.
    Deadline,
}

pub struct Breaker {
    state: AtomicU8,
    /// Failures in a row while closed.
    failures: AtomicU32,
    threshold: u32,
    cooldown: Duration,
    /// How long a run of deadlines must last before it opens the breaker.
    deadline: Duration,
    /// When the first failure of the current run was seen.
    run_since_ms: AtomicU64,
    /// The clock's zero: instants below are milliseconds since it.
    epoch: Instant,
    /// When it opened, coming from closed (for the log when it closes).
    opened_at_ms: AtomicU64,
    /// When it last opened, or a probe last failed.
    open_since_ms: AtomicU64,
    /// When an open breaker lets its next probe through.
    probe_at_ms: AtomicU64,
    metrics: BreakerMetrics,
}

/// Registered once (see `cache::Outcomes`).
struct BreakerMetrics {
    state: Gauge,
    to_open: Counter,
    to_half_open: Counter,
    to_closed: Counter,
}

impl Breaker {
    /// Opens after `threshold` failures in a row (lasting `deadline` when the
    /// last was a deadline); probes `cooldown` after opening.
    pub fn new(threshold: u32, cooldown: Duration, deadline: Duration) -> Self {
        let transitions =
            |to: &'static str| metrics::counter!("readthrough_cache_breaker_transitions_total", "to" => to);
        let metrics = BreakerMetrics {
            state: metrics::gauge!("readthrough_cache_breaker_state"),
            to_open: transitions("open"),
            to_half_open: transitions("half_open"),
            to_closed: transitions("closed"),
        };
        metrics.state.set(State::Closed as u8 as f64);
        Self {
            state: AtomicU8::new(State::Closed as u8),
            failures: AtomicU32::new(0),
            threshold: threshold.max(1),
            cooldown,
            deadline,
            run_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            opened_at_ms: AtomicU64::new(0),
            open_since_ms: AtomicU64::new(0),
            probe_at_ms: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether a command may run now (see `Admission`).
    #[inline]
    pub fn admit(self: &Arc<Self>) -> Admission {
        if self.state.load(Ordering::Relaxed) == State::Closed as u8 {
            return Admission::Run;
        }
        self.admit_slow()
    }

    #[cold]
    fn admit_slow(self: &Arc<Self>) -> Admission {
        match self.state() {
            State::Closed => Admission::Run,
            State::HalfOpen => Admission::Skip,
            State::Open => {
                if self.now_ms() < self.probe_at_ms.load(Ordering::Acquire) {
                    return Admission::Skip;
                }
                // Of all the commands that see the cool-down over, one wins the probe.
                if self.transition(State::Open, State::HalfOpen) {
                    tracing::debug!("redis circuit breaker half-open: probing");
                    Admission::Probe(Probe(Some(self.clone())))
                } else {
                    Admission::Skip
                }
            }
        }
    }

    /// A command that ran got an answer from Redis.
    #[inline]
    pub fn succeeded(&self) {
        // A load first: the common case (no failures) writes nothing shared.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A command that ran found Redis unavailable.
    pub fn failed(&self, how: Unavailable) {
        if self.state() != State::Closed {
            return; // a command that started before the breaker opened
        }
        let now = self.now_ms();
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures == 1 {
            self.run_since_ms.store(now, Ordering::Release);
        }
        if failures < self.threshold {
            return;
        }
        let lasted = now.saturating_sub(self.run_since_ms.load(Ordering::Acquire));
        if how == Unavailable::Deadline && lasted < self.deadline.as_millis() as u64 {
            return; // one stall so far (see the module comment)
        }
        self.probe_at_ms.store(now + self.cooldown_ms(), Ordering::Release);
        self.opened_at_ms.store(now, Ordering::Release);
        self.open_since_ms.store(now, Ordering::Release);
        if self.transition(State::Closed, State::Open) {
            tracing::warn!(
                failures = self.threshold,
                cooldown_ms = self.cooldown_ms(),
                "redis circuit breaker open: requests skip Redis and read PostgreSQL until a probe answers"
            );
        }
    }

    /// A connection to Redis was (re)established: evidence enough to probe
    /// now rather than at the end of the cool-down (but see `MIN_PROBE_INTERVAL`).
    pub fn reconnected(&self) {
        if self.state() == State::Open {
            let earliest = self.open_since_ms.load(Ordering::Acquire) + MIN_PROBE_INTERVAL.as_millis() as u64;
            self.probe_at_ms.fetch_min(earliest, Ordering::AcqRel);
        }
    }

    fn probed(&self, answered: bool) {
        if answered {
            self.failures.store(0, Ordering::Release);
            if self.transition(State::HalfOpen, State::Closed) {
                let open_ms = self.now_ms().saturating_sub(self.opened_at_ms.load(Ordering::Acquire));
                tracing::info!(open_ms, "redis answers again: circuit breaker closed");
            }
        } else {
            let now = self.now_ms();
            self.open_since_ms.store(now, Ordering::Release);
            self.probe_at_ms.store(now + self.cooldown_ms(), Ordering::Release);
            if self.transition(State::HalfOpen, State::Open) {
                tracing::debug!("redis probe failed: circuit breaker open again");
            }
        }
    }

    /// Moves from `from` to `to` if the breaker is in `from`; true if this call did.
    fn transition(&self, from: State, to: State) -> bool {
        let moved = self
            .state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            self.metrics.state.set(to as u8 as f64);
            match to {
                State::Open => &self.metrics.to_open,
                State::HalfOpen => &self.metrics.to_half_open,
                State::Closed => &self.metrics.to_closed,
            }
            .increment(1);
        }
        moved
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn cooldown_ms(&self) -> u64 {
        self.cooldown.as_millis() as u64
    }
}

/// The half-open breaker's one probe: report its outcome with `answered`.
/// Dropped unanswered (its task cancelled), it counts as failed, so the
/// breaker cannot stay half-open for want of an answer.
pub struct Probe(Option<Arc<Breaker>>);

impl Probe {
    pub fn answered(mut self, answered: bool) {
        if let Some(breaker) = self.0.take() {
            breaker.probed(answered);
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(breaker) = self.0.take() {
            breaker.probed(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_millis(30);
    const DEADLINE: Duration = Duration::from_millis(20);

    fn breaker(threshold: u32) -> Arc<Breaker> {
        Arc::new(Breaker::new(threshold, COOLDOWN, DEADLINE))
    }

    fn runs(breaker: &Arc<Breaker>) -> bool {
        matches!(breaker.admit(), Admission::Run)
    }

    fn probe(breaker: &Arc<Breaker>) -> Probe {
        match breaker.admit() {
            Admission::Probe(probe) => probe,
            _ => panic!("expected the probe, breaker {:?}", breaker.state()),
        }
    }

    /// A reconnect, and the shortest wait after it.
    fn reconnect(breaker: &Arc<Breaker>) {
        breaker.reconnected();
        std::thread::sleep(MIN_PROBE_INTERVAL + Duration::from_millis(5));
    }

    fn open(breaker: &Arc<Breaker>) {
        for _ in 0..breaker.threshold {
            breaker.failed(Unavailable::Error);
        }
        assert_eq!(breaker.state(), State::Open);
    }

    #[test]
    fn opens_after_the_set_number_of_failures_in_a_row() {
        let breaker = breaker(5);
        for _ in 0..4 {
            breaker.failed(Unavailable::Error);
            assert!(runs(&breaker), "still closed below the threshold");
        }
        breaker.failed(Unavailable::Error);
        assert_eq!(breaker.state(), State::Open);
        assert!(matches!(breaker.admit(), Admission::Skip));
    }

    #[test]
    fn deadlines_missed_together_are_one_stall_and_a_run_of_them_lasting_a_deadline_opens_it() {
        let breaker = breaker(3);
        for _ in 0..10 {
            breaker.failed(Unavailable::Deadline);
        }
        assert!(
            runs(&breaker),
            "commands in flight together missed their deadline at once"
        );
        std::thread::sleep(DEADLINE);
        breaker.failed(Unavailable::Deadline);
        assert_eq!(breaker.state(), State::Open, "deadlines still missed a deadline later");

        let breaker = self::breaker(3);
        for _ in 0..10 {
            breaker.failed(Unavailable::Deadline);
        }
        breaker.succeeded();
        std::thread::sleep(DEADLINE);
        breaker.failed(Unavailable::Deadline);
        breaker.failed(Unavailable::Deadline);
        breaker.failed(Unavailable::Deadline);
        assert!(
            runs(&breaker),
            "an answer ended the first run; the second has just begun"
        );
    }

    #[test]
    fn a_success_starts_the_count_again() {
        let breaker = breaker(3);
        for _ in 0..10 {
            breaker.failed(Unavailable::Error);
            breaker.failed(Unavailable::Error);
            breaker.succeeded();
        }
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn skips_until_the_cool_down_then_lets_exactly_one_probe_through() {
        let breaker = breaker(1);
        open(&breaker);
        assert!(matches!(breaker.admit(), Admission::Skip), "cooling down");
        std::thread::sleep(COOLDOWN + Duration::from_millis(5));
        let probes: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    let breaker = breaker.clone();
                    scope.spawn(move || {
                        (0..1000)
                            .filter_map(|_| match breaker.admit() {
                                Admission::Probe(probe) => {
                                    std::mem::forget(probe); // still in flight
                                    Some(())
                                }
                                Admission::Skip => None,
                                Admission::Run => panic!("a command ran while half-open"),
                            })
                            .count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(probes, 1, "one probe among 8000 commands");
        assert_eq!(breaker.state(), State::HalfOpen);
    }

    #[test]
    fn a_probe_that_answers_closes_it() {
        let breaker = breaker(2);
        open(&breaker);
        reconnect(&breaker);
        probe(&breaker).answered(true);
        assert_eq!(breaker.state(), State::Closed);
        breaker.failed(Unavailable::Error);
        assert!(runs(&breaker), "the count started again from zero");
    }

    #[test]
    fn a_failed_probe_opens_it_for_another_cool_down() {
        let breaker = breaker(1);
        open(&breaker);
        reconnect(&breaker);
        probe(&breaker).answered(false);
        assert_eq!(breaker.state(), State::Open);
        assert!(matches!(breaker.admit(), Admission::Skip), "a new cool-down");
        std::thread::sleep(COOLDOWN + Duration::from_millis(5));
        probe(&breaker).answered(true);
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn a_probe_dropped_without_an_answer_counts_as_failed() {
        let breaker = breaker(1);
        open(&breaker);
        reconnect(&breaker);
        drop(probe(&breaker));
        assert_eq!(breaker.state(), State::Open);
    }

    #[test]
    fn a_reconnect_ends_the_cool_down_early() {
        let breaker = Arc::new(Breaker::new(1, Duration::from_secs(3600), DEADLINE));
        breaker.failed(Unavailable::Error);
        breaker.reconnected();
        assert!(
            matches!(breaker.admit(), Admission::Skip),
            "probes stay MIN_PROBE_INTERVAL apart"
        );
        std::thread::sleep(MIN_PROBE_INTERVAL + Duration::from_millis(5));
        probe(&breaker).answered(false);
        breaker.reconnected();
        assert!(matches!(breaker.admit(), Admission::Skip), "also after a failed probe");
        std::thread::sleep(MIN_PROBE_INTERVAL + Duration::from_millis(5));
        probe(&breaker).answered(true);
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn late_answers_of_commands_started_before_it_opened_change_nothing() {
        let breaker = breaker(1);
        open(&breaker);
        breaker.succeeded();
        breaker.failed(Unavailable::Error);
        assert_eq!(breaker.state(), State::Open);
        assert!(
            matches!(breaker.admit(), Admission::Skip),
            "the cool-down was not restarted or ended"
        );
    }
}
