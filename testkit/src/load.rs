//! A steady read load over warm users, for the fault tests.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use readthrough_client::proto::GetUserRequest;
use tokio::task::JoinHandle;

use crate::TestApp;

/// Concurrent readers: fewer than DATABASE_FALLBACK_LIMIT (8), so that no
/// read that falls back to PostgreSQL is shed.
pub const READERS: usize = 4;

/// Users created and read once (cached), returning their ids.
pub async fn warm_users(app: &mut TestApp, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let id = app.create_user(&format!("reader{n}@example.com")).await.id;
        app.client.get_user(&id).await.unwrap();
        ids.push(id);
    }
    ids
}

/// One GetUser of a load: when it started, how long it took, and its error if it failed.
pub struct Read {
    pub started: Instant,
    pub took: Duration,
    pub error: Option<String>,
}

/// `READERS` tasks reading `ids` in turn, one call at a time each, until `finish`.
pub struct Load {
    stop: Arc<AtomicBool>,
    readers: Vec<JoinHandle<Vec<Read>>>,
}

impl Load {
    pub fn start(app: &TestApp, ids: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let readers = (0..READERS)
            .map(|reader| {
                let (mut users, ids, stop) = (app.users.clone(), ids.to_vec(), stop.clone());
                tokio::spawn(async move {
                    let mut reads = Vec::new();
                    let mut next = reader;
                    while !stop.load(Ordering::Relaxed) {
                        let id = ids[next % ids.len()].clone();
                        next += READERS;
                        let started = Instant::now();
                        let answer = users.get_user(GetUserRequest { id: id.clone() }).await;
                        let took = started.elapsed();
                        let error = match answer {
                            Ok(user) if user.get_ref().id == id => None,
                            Ok(user) => Some(format!("asked for {id}, got {}", user.get_ref().id)),
                            Err(status) => Some(format!("{status:?}")),
                        };
                        reads.push(Read { started, took, error });
                    }
                    reads
                })
            })
            .collect();
        Self { stop, readers }
    }

    /// Stops the readers (each finishes its call) and returns every read.
    pub async fn finish(mut self) -> Vec<Read> {
        self.stop.store(true, Ordering::Relaxed);
        let mut reads = Vec::new();
        for reader in std::mem::take(&mut self.readers) {
            reads.extend(reader.await.unwrap());
        }
        reads
    }
}

/// Stops the readers if a test panics before `finish`.
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
