//! The fence: what a writer does when it cannot confirm its invalidation.
//!
//! A write is acknowledged only once its invalidation is done, by its writer
//! or by any instance's outbox relay. When neither can do it in time (Redis
//! is unreachable from everyone, say) the writer fences its outbox rows in
//! PostgreSQL instead, and every instance checks for fenced rows every
//! `FENCE_POLL` (see `service::written`): while any stand for a kind, no
//! instance uses what Redis holds of that kind. An instance uses Redis only
//! while its last check was sent less than `FENCE_TRUST` ago, so a writer
//! that waits `FENCE_TRUST` (plus a poll) after fencing knows that every
//! instance has either seen the fence or stopped trusting Redis. The rows go
//! (and the fence with them) once a relay carries them out, or a bump of
//! their kinds retires what they cover.
//!
//! A check that cannot reach PostgreSQL keeps the last answer: during a
//! PostgreSQL outage nothing can be written, and cached reads go on. What
//! that leaves open is an instance cut off from PostgreSQL but not from
//! Redis while another is cut off from Redis but not from PostgreSQL.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::Kind;

/// How long after it was sent a fence check is relied on.
pub const FENCE_TRUST: Duration = Duration::from_secs(1);
/// How often every instance checks for fenced rows.
pub const FENCE_POLL: Duration = Duration::from_millis(200);
const _: () = assert!(FENCE_POLL.as_millis() * 2 < FENCE_TRUST.as_millis());

/// What this instance last learned of the fence, and when.
pub struct Fence {
    /// One bit per `Kind`.
    fenced: AtomicU8,
    /// When the check that confirmed `fenced` was sent, in µs since `origin` (0: never).
    confirmed_at: AtomicU64,
    origin: Instant,
    /// Told of each kind newly fenced (near caches empty themselves).
    on_raise: OnceLock<Box<dyn Fn(Kind) + Send + Sync>>,
}

impl Default for Fence {
    fn default() -> Self {
        Self {
            fenced: AtomicU8::new(0),
            confirmed_at: AtomicU64::new(0),
            origin: Instant::now(),
            on_raise: OnceLock::new(),
        }
    }
}

impl Fence {
    /// Whether what Redis holds of `kind` may be used now.
    pub fn trusts(&self, kind: Kind) -> bool {
        self.trusts_at(kind, Instant::now())
    }

    fn trusts_at(&self, kind: Kind, now: Instant) -> bool {
        let confirmed_at = self.confirmed_at.load(Ordering::Acquire);
        confirmed_at != 0
            && self.micros(now) < confirmed_at + FENCE_TRUST.as_micros() as u64
            && self.fenced.load(Ordering::Acquire) & bit(kind) == 0
    }

    /// Calls `on_raise` with each kind fenced from now on.
    pub fn on_raise(&self, on_raise: impl Fn(Kind) + Send + Sync + 'static) {
        let _ = self.on_raise.set(Box::new(on_raise));
    }

    /// Records a check sent at `sent`: the kinds fenced then, or `None` when
    /// PostgreSQL could not be asked (the last answer stands).
    pub fn confirm(&self, sent: Instant, fenced: Option<&[Kind]>) {
        if let Some(kinds) = fenced {
            let bits = kinds.iter().fold(0, |bits, &kind| bits | bit(kind));
            let before = self.fenced.swap(bits, Ordering::AcqRel);
            if let Some(on_raise) = self.on_raise.get() {
                Kind::ALL
                    .into_iter()
                    .filter(|&kind| bits & !before & bit(kind) != 0)
                    .for_each(on_raise);
            }
        }
        self.confirmed_at.fetch_max(self.micros(sent).max(1), Ordering::AcqRel);
    }

    fn micros(&self, instant: Instant) -> u64 {
        instant.saturating_duration_since(self.origin).as_micros() as u64
    }
}

fn bit(kind: Kind) -> u8 {
    1 << kind as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_trusted_before_the_first_check_or_after_the_trust_lapses() {
        let fence = Fence::default();
        assert!(!fence.trusts(Kind::User));
        fence.confirm(Instant::now(), Some(&[]));
        assert!(fence.trusts(Kind::User));
        assert!(!fence.trusts_at(Kind::User, Instant::now() + FENCE_TRUST + Duration::from_millis(1)));
    }

    #[test]
    fn a_fenced_kind_is_not_trusted_and_an_unanswered_check_keeps_the_last_answer() {
        let fence = Fence::default();
        fence.confirm(Instant::now(), Some(&[Kind::Product, Kind::List]));
        assert!(fence.trusts(Kind::User));
        assert!(!fence.trusts(Kind::Product));
        assert!(!fence.trusts(Kind::List));
        fence.confirm(Instant::now(), None);
        assert!(!fence.trusts(Kind::Product), "PostgreSQL unreachable: still fenced");
        fence.confirm(Instant::now(), Some(&[]));
        assert!(fence.trusts(Kind::Product));
    }

    #[test]
    fn newly_fenced_kinds_are_told() {
        let fence = Fence::default();
        let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = told.clone();
        fence.on_raise(move |kind| sink.lock().unwrap().push(kind));
        fence.confirm(Instant::now(), Some(&[Kind::User]));
        fence.confirm(Instant::now(), Some(&[Kind::User, Kind::Product]));
        assert_eq!(*told.lock().unwrap(), [Kind::User, Kind::Product]);
    }
}
