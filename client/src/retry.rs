//! When and how long to wait before trying a call again.
//!
//! Only `UNAVAILABLE` is retried, and only for calls that may run twice (see
//! [`Retry`]). The waits grow exponentially, are capped, and carry jitter so
//! that many clients failing together do not come back together. Every wait
//! and every attempt fits in the call's deadline: a retry that could not
//! finish in time is not started, and the last status is returned instead.

use std::{
    collections::hash_map::RandomState,
    error::Error,
    future::Future,
    hash::{BuildHasher, Hasher},
    time::Duration,
};

use tokio::time::{Instant, sleep, timeout};
use tonic::{Code, Status, TimeoutExpired};

/// Retries of `UNAVAILABLE` with exponential backoff and jitter.
///
/// The wait before retry `n` (0-based) is drawn uniformly between half and
/// all of `min(initial × 2ⁿ, max)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Retries after the first attempt; 0 turns retrying off.
    pub retries: u32,
    /// The wait before the first retry (before jitter).
    pub initial: Duration,
    /// The longest wait between two attempts (before jitter).
    pub max: Duration,
}

impl Default for Backoff {
    /// 3 retries, waiting about 50 ms, 100 ms and 200 ms; waits at most 2 s.
    fn default() -> Self {
        Self {
            retries: 3,
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// No retries: every call is attempted once.
    pub fn none() -> Self {
        Self {
            retries: 0,
            ..Self::default()
        }
    }

    /// The longest wait before retry `retry` (0-based), or `None` when the
    /// retries are used up.
    pub fn ceiling(&self, retry: u32) -> Option<Duration> {
        if retry >= self.retries {
            return None;
        }
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        Some(self.initial.saturating_mul(factor).min(self.max))
    }

    /// The wait before retry `retry` (0-based), jittered: between half and
    /// all of [`Backoff::ceiling`].
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        let ceiling = self.ceiling(retry)?;
        Some(ceiling / 2 + ceiling.mul_f64(random_fraction() / 2.0))
    }
}

/// Whether a call may be sent again after `UNAVAILABLE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Reads, and writes whose repetition changes nothing more.
    Idempotent,
    /// Writes that could take effect twice (or report a conflict with their
    /// own first attempt): sent once.
    Once,
}

/// Runs `attempt` until it succeeds, fails with anything but `UNAVAILABLE`,
/// the retries are used up, or `deadline` has passed. `attempt` gets the time
/// left, for the request's `grpc-timeout`; past it the attempt is dropped
/// (cancelling the call) and the result is `DEADLINE_EXCEEDED`.
pub(crate) async fn run<T, F, Fut>(
    backoff: &Backoff,
    retry: Retry,
    deadline: Duration,
    mut attempt: F,
) -> Result<T, Status>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let end = Instant::now() + deadline;
    let mut retries = 0;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let passed = || Status::deadline_exceeded(format!("deadline of {deadline:?} passed"));
        let status = match timeout(left, attempt(left)).await {
            Ok(Err(status)) if status.code() == Code::Unavailable => status,
            Ok(Err(status)) if timed_out(&status) => return Err(passed()),
            Ok(result) => return result,
            Err(_) => return Err(passed()),
        };
        let wait = match (retry, backoff.delay(retries)) {
            (Retry::Idempotent, Some(wait)) => wait,
            _ => return Err(status),
        };
        // A retry that would start after the deadline could only fail: the
        // caller learns why the last attempt failed instead.
        if Instant::now() + wait >= end {
            return Err(status);
        }
        sleep(wait).await;
        retries += 1;
    }
}

/// Whether tonic's channel ended the call at its `grpc-timeout`: it says so
/// with CANCELLED (caused by `TimeoutExpired`), where gRPC specifies
/// DEADLINE_EXCEEDED, which is what [`run`] answers instead.
fn timed_out(status: &Status) -> bool {
    let mut cause = status.source();
    while let Some(error) = cause {
        if error.is::<TimeoutExpired>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// A number in [0, 1), different on every call: `RandomState` is seeded
/// randomly per process and changes with every instance, which is enough to
/// spread retries apart (no cryptographic use).
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    fn backoff(retries: u32) -> Backoff {
        Backoff {
            retries,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        }
    }

    #[test]
    fn waits_double_up_to_the_cap_and_stop_after_the_retries() {
        let ceilings: Vec<_> = (0..7).map(|retry| backoff(6).ceiling(retry)).collect();
        let ms = |ms| Some(Duration::from_millis(ms));
        assert_eq!(ceilings, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000), None]);
        assert_eq!(Backoff::none().ceiling(0), None);
        assert_eq!(backoff(100).ceiling(90), ms(1000), "no overflow far out");
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_ceiling_and_varies() {
        let waits: Vec<_> = (0..200).map(|_| backoff(3).delay(2).unwrap()).collect();
        assert!(
            waits
                .iter()
                .all(|wait| (Duration::from_millis(200)..=Duration::from_millis(400)).contains(wait))
        );
        let first = waits[0];
        assert!(waits.iter().any(|wait| *wait != first), "jittered: {waits:?}");
    }

    /// An attempt that fails with `codes` in turn (then succeeds), counting calls.
    fn failing(
        codes: Vec<Code>,
    ) -> (
        Arc<AtomicU32>,
        impl FnMut(Duration) -> std::future::Ready<Result<u32, Status>>,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let attempt = move |_left| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(match codes.get(call as usize) {
                Some(code) => Err(Status::new(*code, "failed")),
                None => Ok(call),
            })
        };
        (calls, attempt)
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_until_an_answer() {
        let (calls, attempt) = failing(vec![Code::Unavailable, Code::Unavailable]);
        let result = run(&backoff(3), Retry::Idempotent, Duration::from_secs(10), attempt).await;
        assert_eq!(result.unwrap(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn other_codes_are_not_retried() {
        for code in [
            Code::NotFound,
            Code::Aborted,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            let (calls, attempt) = failing(vec![code]);
            let result = run(&backoff(3), Retry::Idempotent, Duration::from_secs(10), attempt).await;
            assert_eq!(result.unwrap_err().code(), code);
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{code:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_run_out() {
        let (calls, attempt) = failing(vec![Code::Unavailable; 10]);
        let result = run(&backoff(3), Retry::Idempotent, Duration::from_secs(60), attempt).await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 4, "the first attempt and 3 retries");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_may_not_repeat_are_sent_once() {
        let (calls, attempt) = failing(vec![Code::Unavailable]);
        let result = run(&backoff(3), Retry::Once, Duration::from_secs(10), attempt).await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_starts_past_the_deadline() {
        // Waits of 50-100, 100-200, 200-400 ms... within 250 ms at most two retries fit.
        let (calls, attempt) = failing(vec![Code::Unavailable; 10]);
        let started = Instant::now();
        let result = run(&backoff(10), Retry::Idempotent, Duration::from_millis(250), attempt).await;
        assert_eq!(
            result.unwrap_err().code(),
            Code::Unavailable,
            "the last attempt's status"
        );
        assert!(started.elapsed() < Duration::from_millis(250));
        assert!((2..=3).contains(&calls.load(Ordering::SeqCst)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_channels_own_timeout_is_deadline_exceeded() {
        let result: Result<(), _> = run(&backoff(3), Retry::Idempotent, Duration::from_secs(1), |_| {
            let mut status = Status::cancelled("Timeout expired");
            status.set_source(std::sync::Arc::new(TimeoutExpired(())));
            std::future::ready(Err(status))
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::DeadlineExceeded);
        let (_, attempt) = failing(vec![Code::Cancelled]);
        let cancelled = run(&backoff(3), Retry::Idempotent, Duration::from_secs(1), attempt).await;
        assert_eq!(
            cancelled.unwrap_err().code(),
            Code::Cancelled,
            "a cancellation of another cause stays one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_the_deadline_is_cancelled() {
        let started = Instant::now();
        let result: Result<(), _> = run(
            &backoff(3),
            Retry::Idempotent,
            Duration::from_millis(300),
            |left| async move {
                assert!(left <= Duration::from_millis(300));
                sleep(Duration::from_secs(60)).await;
                Ok(())
            },
        )
        .await;
        assert_eq!(result.unwrap_err().code(), Code::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
