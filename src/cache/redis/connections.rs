//! The Redis connections every request shares.
//!
//! A multiplexed connection carries any number of concurrent commands, so a
//! request never waits for a connection of its own: it clones a handle to one
//! of a few long-lived connections, its lanes (round robin), and sends its command. There
//! is no checkout on the hot path, and so no PING/UNWATCH recycle round trip
//! per command (what `deadpool_redis::Pool::get` does) and no wait for a free
//! connection inside a command's deadline.
//!
//! deadpool-redis still makes every connection: a lane whose connection broke
//! (Redis restarted, a socket reset) is emptied and refilled in the background
//! by a task that asks the pool for a new one, with backoff, until it succeeds.
//! Meanwhile requests use the other lanes, or fail open when none is connected.
//! A new connection tells the circuit breaker, which then probes at once
//! instead of waiting out its cool-down.
//!
//! Against a Redis Cluster (`REDIS_CLUSTER_URLS`) each lane holds a redis-rs
//! cluster connection instead: itself multiplexed, it keeps one connection
//! per node, routes each command by its key's hash slot, follows MOVED and
//! ASK, and refreshes the slot map after a failover. It is made by redis-rs's
//! `ClusterClient` directly rather than deadpool-redis's cluster pool, whose
//! manager cannot set TCP_NODELAY, the connect timeout or a private CA.
//! Behind Redis Sentinel (`REDIS_SENTINEL_URLS`) each new connection asks the
//! sentinels for the current primary (and checks that it says it is one),
//! through redis-rs's `SentinelClient`, for the same reason.
//!
//! Every new connection runs the `Connected` hook before any command uses
//! it: the cache loads its scripts there and checks which server it reached
//! (see `cache::epochs`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool_redis::{
    Connection, Manager, Pool, Runtime,
    redis::{
        self, AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value,
        aio::{ConnectionLike, MultiplexedConnection},
        cluster::{ClusterClient, ClusterClientBuilder},
        cluster_async::ClusterConnection,
        io::tcp::TcpSettings,
        sentinel::SentinelClient,
    },
};

use super::{Topology, breaker::Breaker};

/// Opening one connection may take longer than one command's deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
/// Short, so that hits come back within about a second of Redis's return; an
/// attempt against a closed port costs next to nothing.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// Run on every new connection before any command uses it; an error drops
/// the connection, and the lane tries again.
pub type Connected = Arc<dyn Fn(Handle) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A connection to one Redis, or to a whole Redis Cluster.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // cloned per command: a box would cost an allocation each time
pub enum Handle {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Single(connection) => connection.req_packed_command(cmd),
            Handle::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Single(connection) => connection.get_db(),
            Handle::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Makes connections; it holds none itself.
enum Factory {
    /// Each connection is taken out of the pool at once.
    Single(Pool),
    Cluster(Box<ClusterClient>),
    Sentinel(Box<tokio::sync::Mutex<SentinelClient>>),
}

impl Factory {
    async fn connect(&self) -> Result<Handle, String> {
        match self {
            Factory::Single(pool) => match pool.get().await {
                Ok(pooled) => Ok(Handle::Single(Connection::take(pooled))),
                Err(error) => Err(error.to_string()),
            },
            Factory::Cluster(client) => {
                match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection()).await {
                    Ok(Ok(connection)) => Ok(Handle::Cluster(connection)),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err(format!("no cluster connection within {CONNECT_TIMEOUT:?}")),
                }
            }
            Factory::Sentinel(client) => {
                let connect = async { client.lock().await.get_async_connection_with_config(&settings()).await };
                match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(Ok(connection)) => Ok(Handle::Single(connection)),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err(format!(
                        "no connection to the sentinels' primary within {CONNECT_TIMEOUT:?}"
                    )),
                }
            }
        }
    }
}

/// No response timeout of redis-rs's own (500 ms by default): every call has
/// its deadline already, and a second, shorter one would cut it.
fn settings() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None)
}

/// A connection handle and which lane (and which connection of that lane) it came from.
pub struct Checked {
    pub connection: Handle,
    lane: usize,
    generation: u64,
}

pub struct Connections {
    factory: Factory,
    lanes: Box<[Lane]>,
    next: AtomicUsize,
    /// Told of every new connection; none for background work.
    breaker: Option<Arc<Breaker>>,
    connected: Connected,
}

#[derive(Default)]
struct Lane {
    state: RwLock<LaneState>,
    /// A task is (re)connecting this lane.
    connecting: AtomicBool,
    /// The first connection attempt has ended (either way).
    tried: AtomicBool,
}

#[derive(Default)]
struct LaneState {
    connection: Option<Handle>,
    /// Bumped on every new connection, so a late failure report about an old
    /// connection does not discard its replacement.
    generation: u64,
}

impl Connections {
    /// Connects nothing yet: see `connect_all`.
    pub fn new(
        topology: &Topology,
        count: usize,
        breaker: Option<Arc<Breaker>>,
        connected: Connected,
    ) -> anyhow::Result<Arc<Self>> {
        let factory = match topology {
            Topology::Single(info) => {
                let manager = Manager::new_with_config((**info).clone(), settings())
                    .map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))?;
                let pool = Pool::builder(manager)
                    .max_size(count)
                    .wait_timeout(Some(CONNECT_TIMEOUT))
                    .create_timeout(Some(CONNECT_TIMEOUT))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| anyhow::anyhow!("cannot set up Redis connections: {e}"))?;
                Factory::Single(pool)
            }
            Topology::Cluster(seeds) => {
                // The same: REDIS_TIMEOUT_MS is the deadline. A command whose
                // node fails is retried on the new owner of its slot (within it).
                let client = ClusterClientBuilder::new(seeds.iter().cloned())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(Duration::from_secs(3600))
                    .overall_response_timeout(None)
                    .tcp_settings(TcpSettings::default().set_nodelay(true))
                    .build()
                    .map_err(|e| anyhow::anyhow!("invalid REDIS_CLUSTER_URLS: {e}"))?;
                Factory::Cluster(Box::new(client))
            }
            Topology::Sentinel {
                sentinels,
                master,
                node,
            } => Factory::Sentinel(Box::new(tokio::sync::Mutex::new(Topology::sentinel_client(
                sentinels, master, node,
            )?))),
        };
        Ok(Arc::new(Self {
            factory,
            lanes: (0..count.max(1)).map(|_| Lane::default()).collect(),
            next: AtomicUsize::new(0),
            breaker,
            connected,
        }))
    }

    /// Starts connecting every lane in the background (lanes that cannot
    /// connect keep retrying with backoff) and waits until each has tried
    /// once, at most `CONNECT_TIMEOUT`: a service starting next to a healthy
    /// Redis serves its first request from the cache, and one starting while
    /// Redis is down starts anyway.
    pub async fn connect_all(self: &Arc<Self>) {
        for lane in 0..self.lanes.len() {
            self.reconnect(lane);
        }
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        while !self.lanes.iter().all(|lane| lane.tried.load(Ordering::Acquire))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A handle to a connected lane, taking lanes in turn; `None` when none is connected.
    pub fn get(&self) -> Option<Checked> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.lanes.len()).find_map(|offset| {
            let lane = (start + offset) % self.lanes.len();
            let state = self.lanes[lane].state.read().unwrap_or_else(|p| p.into_inner());
            state.connection.as_ref().map(|connection| Checked {
                connection: connection.clone(),
                lane,
                generation: state.generation,
            })
        })
    }

    /// Reports that a command on `checked` failed with `error`: if the error
    /// means the connection is gone, the lane is emptied and reconnected.
    pub fn report_error(self: &Arc<Self>, checked: &Checked, error: &redis::RedisError) {
        if error.is_unrecoverable_error() || error.is_connection_dropped() || error.is_io_error() {
            self.replace(checked);
        }
    }

    /// Empties `checked`'s lane and reconnects it, unless that connection was
    /// replaced already: for a connection that is gone, or one that stays
    /// silent (half-open: its peer vanished without a reset).
    pub fn replace(self: &Arc<Self>, checked: &Checked) {
        {
            let mut state = self.lanes[checked.lane]
                .state
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if state.generation != checked.generation || state.connection.is_none() {
                return; // already replaced, or being replaced
            }
            state.connection = None;
        }
        self.reconnect(checked.lane);
    }

    /// Replaces every connection: background work's, after a deadline
    /// missed (the connection may be half-open, and no breaker probes it).
    pub fn replace_all(self: &Arc<Self>) {
        for lane in 0..self.lanes.len() {
            let generation = {
                let state = self.lanes[lane].state.read().unwrap_or_else(|p| p.into_inner());
                match &state.connection {
                    Some(_) => state.generation,
                    None => continue,
                }
            };
            let mut state = self.lanes[lane].state.write().unwrap_or_else(|p| p.into_inner());
            if state.generation == generation && state.connection.take().is_some() {
                drop(state);
                self.reconnect(lane);
            }
        }
    }

    /// Fills `lane` in the background unless a task is already at it.
    fn reconnect(self: &Arc<Self>, lane: usize) {
        if self.lanes[lane].connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = RECONNECT_FIRST_DELAY;
            loop {
                match this.connect().await {
                    Ok(connection) => {
                        let mut state = this.lanes[lane].state.write().unwrap_or_else(|p| p.into_inner());
                        state.connection = Some(connection);
                        state.generation += 1;
                        if let Some(breaker) = &this.breaker {
                            breaker.reconnected();
                        }
                        break;
                    }
                    Err(error) => {
                        this.lanes[lane].tried.store(true, Ordering::Release);
                        tracing::debug!(%error, lane, "cannot connect to Redis; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                    }
                }
            }
            this.lanes[lane].tried.store(true, Ordering::Release);
            this.lanes[lane].connecting.store(false, Ordering::Release);
        });
    }

    /// A new connection, once the `Connected` hook has run on it.
    async fn connect(&self) -> Result<Handle, String> {
        let connection = self.factory.connect().await?;
        match tokio::time::timeout(CONNECT_TIMEOUT, (self.connected)(connection.clone())).await {
            Ok(Ok(())) => Ok(connection),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(format!("a new connection was not set up within {CONNECT_TIMEOUT:?}")),
        }
    }

    pub fn connected(&self) -> usize {
        self.lanes
            .iter()
            .filter(|lane| {
                lane.state
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .connection
                    .is_some()
            })
            .count()
    }
}
