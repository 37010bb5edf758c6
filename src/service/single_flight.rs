//! Single flight: concurrent calls for one key inside this process share one execution.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Mutex, MutexGuard},
};

use tokio::sync::broadcast;

pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, broadcast::Sender<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `work` unless a call for `key` is already running, in which case
    /// its result is awaited and shared. If that call is cancelled, the waiters
    /// run `work` themselves.
    pub async fn run(&self, key: K, work: impl Future<Output = V>) -> V {
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
                Ok(value) => value,
                Err(_) => work.await,
            },
            None => {
                let leader = Leader {
                    flight: self,
                    key: Some(key),
                };
                let value = work.await;
                leader.finish(value.clone());
                value
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, broadcast::Sender<V>>> {
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
    fn finish(mut self, value: V) {
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
                        .run("key", async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            runs.fetch_add(1, Ordering::SeqCst) + 100
                        })
                        .await
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), 100);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flight.lock().is_empty(), "finished calls are forgotten");
    }

    #[tokio::test]
    async fn waiters_run_the_work_when_the_leader_is_cancelled() {
        let flight = Arc::new(SingleFlight::<&str, &str>::new());
        let leader = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run("key", std::future::pending()).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run("key", async { "own" }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        assert_eq!(waiter.await.unwrap(), "own");
    }
}
