//! Single flight: concurrent calls for one key inside this process share one execution.
//!
//! A shared result says from when it is known to be current (`Fresh::as_of`).
//! A caller that joined after that instant does not take it: a write may have
//! been acknowledged between the two, and that caller must see it.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Mutex, MutexGuard},
    time::Instant,
};

use tokio::sync::broadcast;

/// How often a caller joins a flight before it reads alone (after failures).
pub const FLIGHT_ATTEMPTS: usize = 3;

/// A result, and the instant from which it is known to reflect every write
/// acknowledged before it.
#[derive(Debug, Clone)]
pub struct Fresh<V> {
    pub value: V,
    pub as_of: Instant,
}

/// What a caller of `SingleFlight::run` gets.
#[derive(Debug, PartialEq)]
pub enum Joined<V> {
    /// The flight's value, current for this caller.
    Loaded(V),
    /// The flight's load failed: each caller then reads for itself, to
    /// report its own error.
    Failed,
    /// The flight was cancelled, or its result predates this caller's arrival.
    Missed,
}

/// A flight's result as its waiters receive it: `None` when the load failed.
type Shared<V> = Fresh<Option<V>>;

pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, broadcast::Sender<Shared<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `work` (`None`: the load failed) unless a call for `key` is
    /// already running, in which case its result is awaited and shared.
    /// `Missed` when that call was cancelled or
    /// its result is older than `joined`, when the caller arrived: the caller
    /// then looks again itself, or runs again with the same `joined`. A call
    /// running by then began after the caller arrived, so its result serves
    /// the caller: one burst of callers costs at most two executions.
    pub async fn run(&self, key: K, joined: Instant, work: impl Future<Output = Option<Fresh<V>>>) -> Joined<V> {
        let waiting = {
            let mut calls = self.lock();
            match calls.get(&key) {
                Some(leader) => Some(leader.subscribe()),
                None => {
                    calls.insert(key.clone(), broadcast::channel(1).0);
                    None
                }
            }
        };
        match waiting {
            Some(mut result) => match result.recv().await {
                Ok(shared) if shared.as_of >= joined => shared.value.map_or(Joined::Failed, Joined::Loaded),
                _ => Joined::Missed,
            },
            None => {
                let leader = Leader {
                    flight: self,
                    key: Some(key),
                };
                let shared = match work.await {
                    Some(fresh) => Fresh {
                        value: Some(fresh.value),
                        as_of: fresh.as_of,
                    },
                    None => Fresh {
                        value: None,
                        as_of: Instant::now(),
                    },
                };
                let value = shared.value.clone();
                leader.finish(shared);
                value.map_or(Joined::Failed, Joined::Loaded)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, broadcast::Sender<Shared<V>>>> {
        self.calls.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Removes the call when the leader finishes or is dropped (cancelled), which
/// also closes the channel of any waiter still listening.
struct Leader<'a, K: Eq + Hash + Clone, V: Clone> {
    flight: &'a SingleFlight<K, V>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone, V: Clone> Leader<'_, K, V> {
    fn finish(mut self, value: Shared<V>) {
        if let Some(sender) = self.key.take().and_then(|key| self.flight.lock().remove(&key)) {
            let _ = sender.send(value);
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Leader<'_, K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.flight.lock().remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_one_execution() {
        let flight = Arc::new(SingleFlight::<&str, usize>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let (flight, runs) = (flight.clone(), runs.clone());
                tokio::spawn(async move {
                    flight
                        .run("key", Instant::now(), async {
                            let as_of = Instant::now();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Some(Fresh {
                                value: runs.fetch_add(1, Ordering::SeqCst) + 100,
                                as_of: as_of + Duration::from_secs(1),
                            })
                        })
                        .await
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), Joined::Loaded(100));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flight.lock().is_empty(), "finished calls are forgotten");
    }

    #[tokio::test]
    async fn a_result_older_than_the_caller_is_not_shared_with_it() {
        let flight = Arc::new(SingleFlight::<&str, &str>::new());
        let leader = {
            let flight = flight.clone();
            tokio::spawn(async move {
                flight
                    .run("key", Instant::now(), async {
                        let as_of = Instant::now();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some(Fresh {
                            value: "read before the follower came",
                            as_of,
                        })
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let follower = flight
            .run("key", Instant::now(), async {
                Some(Fresh {
                    value: "own read",
                    as_of: Instant::now(),
                })
            })
            .await;
        assert_eq!(follower, Joined::Missed, "the follower must look again");
        assert_eq!(leader.await.unwrap(), Joined::Loaded("read before the follower came"));
    }

    #[tokio::test]
    async fn waiters_look_again_when_the_leader_is_cancelled() {
        let flight = Arc::new(SingleFlight::<&str, &str>::new());
        let leader = {
            let flight = flight.clone();
            tokio::spawn(async move {
                flight
                    .run("key", Instant::now(), std::future::pending::<Option<Fresh<&str>>>())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = {
            let flight = flight.clone();
            tokio::spawn(async move {
                flight
                    .run("key", Instant::now(), async {
                        Some(Fresh {
                            value: "own",
                            as_of: Instant::now(),
                        })
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        assert_eq!(waiter.await.unwrap(), Joined::Missed);
    }

    #[tokio::test]
    async fn callers_turned_away_by_an_older_result_share_the_next_run() {
        let flight = Arc::new(SingleFlight::<&str, usize>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let run = |flight: Arc<SingleFlight<&'static str, usize>>, runs: Arc<AtomicUsize>| async move {
            let joined = Instant::now();
            loop {
                let work = async {
                    let started = Instant::now();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    // Known current only as of its start, like a load whose fill was refused.
                    Some(Fresh {
                        value: runs.fetch_add(1, Ordering::SeqCst),
                        as_of: started,
                    })
                };
                if let Joined::Loaded(value) = flight.run("key", joined, work).await {
                    return value;
                }
            }
        };
        let first = tokio::spawn(run(flight.clone(), runs.clone()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late: Vec<_> = (0..50)
            .map(|_| tokio::spawn(run(flight.clone(), runs.clone())))
            .collect();
        assert_eq!(first.await.unwrap(), 0);
        for caller in late {
            assert_eq!(caller.await.unwrap(), 1, "every late caller takes the second run");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_load_is_shared_as_failed() {
        let flight = Arc::new(SingleFlight::<&str, &str>::new());
        let leader = {
            let flight = flight.clone();
            tokio::spawn(async move {
                flight
                    .run("key", Instant::now(), async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        None
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = flight
            .run("key", Instant::now(), async {
                Some(Fresh {
                    value: "own",
                    as_of: Instant::now(),
                })
            })
            .await;
        assert_eq!(
            waiter,
            Joined::Failed,
            "the waiter reads for itself, to report its own error"
        );
        assert_eq!(leader.await.unwrap(), Joined::Failed);
    }
}
