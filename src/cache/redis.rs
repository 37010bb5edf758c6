//! Redis access that fails open: every call has a deadline, and a failed or
//! slow call returns `None` so the caller answers from PostgreSQL instead.
//! After a run of failures the circuit breaker (see `cache::breaker`) skips
//! Redis altogether until a probe finds it answering again.
//!
//! Failures are counted per operation and logged at most once per
//! `LOG_INTERVAL`, so an outage does not turn into a log line per request.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool_redis::redis::{
    self, ErrorKind, RetryMethod,
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot},
};
use tracing::Instrument;

use super::{
    Bump, Kind, WriteMarks,
    breaker::{Admission, Breaker, Probe},
    connections::{self, Connections, Handle, Target},
};
use crate::{config::CacheConfig, telemetry::Throttle};

const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often the event subscription checks that its connection still answers.
const SUBSCRIPTION_PING_INTERVAL: Duration = Duration::from_secs(1);
/// How much of the keyspace one SCAN step walks (COUNT: a hint to Redis, not a limit).
const SCAN_COUNT: u64 = 1000;

/// Stores a value only while the caller still holds the entry's fill lease, then
/// releases the lease. A write deletes the lease together with the entry, so a
/// reader that loaded the row before the write cannot cache the old version.
/// KEYS: entry, lease. ARGV: token, value, ttl seconds.
const GUARDED_SET: &str = include_str!("scripts/guarded_set.lua");

/// Writes a category list's head: its first ids (score = position), its
/// metadata, and drops any directory, while the caller holds the list's lease.
/// KEYS: ids, meta, dir, lease. ARGV: token, meta, ttl seconds, then the ids in order.
const GUARDED_LIST_HEAD: &str = include_str!("scripts/guarded_list_head.lua");

/// Adds ids to a category list at positions from `first`, only while its
/// metadata is still exactly what the caller read (the same generation). The
/// ids key takes the metadata's remaining time to live if it has none of its own.
/// KEYS: ids, meta. ARGV: meta, first position, then the ids in order.
const GUARDED_LIST_CHUNK: &str = include_str!("scripts/guarded_list_chunk.lua");

/// Sets a value only while another key holds exactly the expected bytes, with
/// that key's remaining time to live. KEYS: target, guard. ARGV: expected, value.
const GUARDED_SET_BESIDE: &str = include_str!("scripts/guarded_set_beside.lua");

/// Moves each kind named to a new epoch, one above both its current epoch
/// and the floor given for it (the highest the caller has seen: a failover
/// may have lost the latest bumps), unless the last bump is less than the
/// spacing old (measured with the Redis server's clock, the one every
/// instance shares), or the reason, when one is given, was acted on already
/// (every instance notices the same failover). KEYS: the epochs hash. ARGV:
/// spacing ms, reason ('' for none), then each kind and its floor.
/// Returns {0, user, product, list} when bumped (or the reason was acted
/// on), {ms to wait} when too soon.
const BUMP_EPOCHS: &str = include_str!("scripts/bump_epochs.lua");

/// Records a write's WAL position in its marker unless the marker holds a
/// later one already (the relay may carry out an older write after a newer
/// one's writer did). Positions are fixed-width hex, so they compare as
/// strings. KEYS: marker. ARGV: position, ttl ms.
const MARK_WRITE: &str = include_str!("scripts/mark_write.lua");

/// Deletes a lease only if it is still the caller's. KEYS: lease. ARGV: token.
const RELEASE: &str = include_str!("scripts/release.lua");

/// Reads a key or, when it is missing, takes its lease, in one step: no fill
/// can land between a miss and the lease taken after it (which would load
/// the value a second time). KEYS: key, lease. ARGV: token, ms.
/// Returns {1, value}, {2} when leased, {0} when another holds the lease.
const GET_OR_LEASE: &str = include_str!("scripts/get_or_lease.lua");

/// Extends a lease only if it is still the caller's. KEYS: lease. ARGV: token, ms.
const EXTEND: &str = include_str!("scripts/extend.lua");

/// What a subscription delivers.
pub enum Delivery<'a> {
    /// Subscribed (again): from now on every message arrives.
    Subscribed,
    /// The subscription dropped: messages may be missed until `Subscribed`.
    Lost,
    Message(&'a [u8]),
}

/// What `get_or_lease` found.
pub enum Lookup {
    Found(Vec<u8>),
    /// The key was missing and the caller now holds its lease.
    Leased,
    /// The key was missing and another caller holds its lease.
    Busy,
}

/// One value to store under a lease.
pub struct GuardedFill<'a> {
    pub key: &'a str,
    pub lease_key: &'a str,
    pub token: &'a str,
    pub value: Vec<u8>,
    pub ttl_secs: u64,
}

/// Part of a cached category list, read in one round trip.
#[derive(Debug)]
pub struct ListPageRaw {
    /// (member, score) of the members scored `start..=stop`, in order.
    pub members: Vec<(String, f64)>,
    pub meta: Option<Vec<u8>>,
}

pub struct RedisClient {
    /// For pub/sub, which needs a connection of its own: the Redis, or each
    /// seed node of a cluster (PUBLISH reaches every node's subscribers), tried
    /// in turn.
    subscribers: Vec<redis::Client>,
    next_subscriber: AtomicUsize,
    /// Whether `connections` lead to a Redis Cluster.
    cluster: bool,
    connections: Arc<Connections>,
    timeout: Duration,
    errors: ErrorLog,
    breaker: Arc<Breaker>,
}

impl RedisClient {
    /// Sets up the connections without connecting, so the service starts while Redis is down.
    pub fn new(config: &CacheConfig) -> anyhow::Result<Self> {
        let tls_ca = config.redis_tls_ca_file.as_deref();
        let nodes = if config.redis_cluster_urls.is_empty() {
            vec![connections::connection_info(config.redis_url.expose(), tls_ca)?]
        } else {
            config
                .redis_cluster_urls
                .iter()
                .map(|url| connections::connection_info(url.expose(), tls_ca))
                .collect::<anyhow::Result<_>>()?
        };
        // The subscription connects as the shared connections do: same TLS, same ACL user.
        let subscribers = nodes
            .iter()
            .map(|info| redis::Client::open(info.clone()).map_err(|e| anyhow::anyhow!("invalid Redis URL: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let cluster = !config.redis_cluster_urls.is_empty();
        let target = if cluster {
            Target::Cluster(nodes)
        } else {
            Target::Single(Box::new(nodes.into_iter().next().expect("one node")))
        };
        let breaker = Arc::new(Breaker::new(
            config.redis_breaker_failures,
            Duration::from_millis(config.redis_breaker_cooldown_ms),
        ));
        Ok(Self {
            subscribers,
            next_subscriber: AtomicUsize::new(0),
            cluster,
            connections: Connections::new(target, usize::from(config.redis_connections), breaker.clone())?,
            timeout: config.redis_timeout(),
            errors: ErrorLog::default(),
            breaker,
        })
    }

    /// GET for one key, MGET for several (against a cluster, a GET per key
    /// in one pipeline per slot); `None` when Redis could not answer.
    pub async fn get_many(&self, keys: &[String]) -> Option<Vec<Option<Vec<u8>>>> {
        match keys {
            [] => Some(Vec::new()),
            [key] => self.run("get", redis::cmd("GET").arg(key)).await.map(|v| vec![v]),
            _ if self.cluster => self.run_on_each("mget", keys, "GET").await,
            _ => self.run("mget", redis::cmd("MGET").arg(keys)).await,
        }
    }

    /// SET with an expiry for each entry, in one round trip.
    pub async fn set_many(&self, entries: &[(String, Vec<u8>, u64)]) -> Option<()> {
        let sets = entries.iter().map(|(key, value, ttl_secs)| {
            let set = redis::cmd("SET").arg(key).arg(value).arg("EX").arg(ttl_secs).clone();
            (key.as_str(), set)
        });
        self.run_each::<redis::Value>("set", sets.collect()).await.map(drop)
    }

    /// Deletes the keys in one round trip, one DEL per key so that no command
    /// spans two Redis Cluster slots.
    pub async fn delete(&self, keys: &[String]) -> Option<()> {
        self.run_on_each::<redis::Value>("del", keys, "DEL").await.map(drop)
    }

    /// Which of `keys` exist, in order: one EXISTS per key, in one round trip.
    pub async fn exists_each(&self, keys: &[String]) -> Option<Vec<bool>> {
        let replies: Vec<i64> = self.run_on_each("exists", keys, "EXISTS").await?;
        Some(replies.into_iter().map(|n| n == 1).collect())
    }

    /// Deletes the keys (UNLINK: the memory is freed in the background), one
    /// command per key in one round trip; true where the key existed.
    pub async fn unlink_each(&self, keys: &[String]) -> Option<Vec<bool>> {
        let replies: Vec<i64> = self.run_on_each("unlink", keys, "UNLINK").await?;
        Some(replies.into_iter().map(|n| n == 1).collect())
    }

    /// Walks the keyspace with `SCAN cursor MATCH pattern COUNT 1000` (never
    /// KEYS), on every master of a cluster, and calls `on_batch` with each
    /// step's keys. Each step is its own call with its own deadline; `None`
    /// when one fails. A key may be reported twice if Redis resizes its table
    /// (or a cluster moves a slot) meanwhile.
    pub async fn scan_matching(&self, pattern: &str, mut on_batch: impl FnMut(Vec<String>)) -> Option<()> {
        let nodes = if self.cluster {
            self.masters().await?.into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
                let (next, found): (u64, Vec<String>) = match &node {
                    None => self.run("scan", &scan).await?,
                    Some(node) => self.run_at("scan", node, scan).await?,
                };
                if !found.is_empty() {
                    on_batch(found);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Some(())
    }

    /// The cluster's masters, as `CLUSTER NODES` lists them: (host, port).
    async fn masters(&self) -> Option<Vec<(String, u16)>> {
        let nodes: String = self
            .run("cluster_nodes", &redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        Some(masters_of(&nodes))
    }

    /// Each master that serves slots, as `<node id>:<config epoch>`: a
    /// failover (or a resharding) makes a new one. `None` when not on a
    /// cluster or the cluster did not answer.
    pub async fn slot_owners(&self) -> Option<Vec<String>> {
        if !self.cluster {
            return None;
        }
        let nodes: String = self
            .run("cluster_nodes", &redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        Some(slot_owners_of(&nodes))
    }

    /// Runs `cmd` on one node of the cluster, within the deadline.
    async fn run_at<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        (host, port): &(String, u16),
        cmd: redis::Cmd,
    ) -> Option<T> {
        self.with_deadline(operation, async {
            let mut checked = self.connections.get().ok_or_else(Failure::not_connected)?;
            let Handle::Cluster(connection) = &mut checked.connection else {
                return Err(Failure::not_connected());
            };
            let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            let value = connection
                .route_command(cmd, at)
                .await
                .map_err(|error| self.failed(&checked, error))?;
            redis::from_redis_value(value).map_err(|error| Failure {
                unavailable: false,
                message: error.to_string(),
            })
        })
        .await
    }

    /// Every kind's epoch (by `Kind`; 0 for one never bumped).
    pub async fn read_epochs(&self, key: &str) -> Option<[u64; 3]> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg(&Kind::ALL.map(Kind::label)[..]);
        let epochs: Vec<Option<u64>> = self.run("epochs", &cmd).await?;
        epochs_by_kind(&epochs)
    }

    /// Bumps the epochs of `kinds` unless the last bump is less than `spacing` old.
    pub async fn bump_epochs(
        &self,
        key: &str,
        spacing: Duration,
        floors: &[(Kind, u64)],
        reason: Option<&str>,
    ) -> Option<Bump> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(BUMP_EPOCHS)
            .arg(1)
            .arg(key)
            .arg(spacing.as_millis() as u64)
            .arg(reason.unwrap_or(""));
        for (kind, floor) in floors {
            cmd.arg(kind.label()).arg(floor);
        }
        let reply: Vec<Option<u64>> = self.run("epochs", &cmd).await?;
        match reply.split_first()? {
            (Some(0), epochs) => epochs_by_kind(epochs).map(Bump::Done),
            (Some(wait_ms), _) => Some(Bump::TooSoon(Duration::from_millis(*wait_ms))),
            (None, _) => None,
        }
    }

    /// The members at positions `start..=stop` (by score) and the list's
    /// metadata, in one round trip.
    pub async fn read_list_page(&self, ids_key: &str, meta_key: &str, start: u64, stop: u64) -> Option<ListPageRaw> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(ids_key)
            .arg(start)
            .arg(stop)
            .arg("BYSCORE")
            .arg("WITHSCORES")
            .cmd("GET")
            .arg(meta_key);
        let (members, meta) = self.run_pipe("list_read", &pipe).await?;
        Some(ListPageRaw { members, meta })
    }

    /// Takes each lease that nobody holds (`SET NX PX`); true where this caller got it.
    pub async fn acquire_leases(&self, lease_keys: &[String], token: &str, ttl: Duration) -> Option<Vec<bool>> {
        let sets = lease_keys.iter().map(|key| {
            let mut set = redis::cmd("SET");
            set.arg(key).arg(token).arg("NX").arg("PX").arg(ttl.as_millis() as u64);
            (key.as_str(), set)
        });
        let replies: Vec<Option<String>> = self.run_each("lease", sets.collect()).await?;
        Some(replies.into_iter().map(|reply| reply.is_some()).collect())
    }

    /// `key`'s value, or else its lease if nobody holds it (see `GET_OR_LEASE`).
    pub async fn get_or_lease(&self, key: &str, lease_key: &str, token: &str, ttl: Duration) -> Option<Lookup> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GET_OR_LEASE)
            .arg(2)
            .arg(key)
            .arg(lease_key)
            .arg(token)
            .arg(ttl.as_millis() as u64);
        let (outcome, value): (i64, Option<Vec<u8>>) =
            match self.run::<Vec<redis::Value>>("lease", &cmd).await?.as_slice() {
                [outcome] => (redis::from_redis_value_ref(outcome).ok()?, None),
                [outcome, value] => (
                    redis::from_redis_value_ref(outcome).ok()?,
                    redis::from_redis_value_ref(value).ok()?,
                ),
                _ => return None,
            };
        match (outcome, value) {
            (1, Some(value)) => Some(Lookup::Found(value)),
            (2, _) => Some(Lookup::Leased),
            _ => Some(Lookup::Busy),
        }
    }

    /// Stores each value whose lease is still held; true where it was stored.
    pub async fn fill_guarded(&self, fills: &[GuardedFill<'_>]) -> Option<Vec<bool>> {
        let fills = fills.iter().map(|fill| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(GUARDED_SET)
                .arg(2)
                .arg(fill.key)
                .arg(fill.lease_key)
                .arg(fill.token)
                .arg(&fill.value)
                .arg(fill.ttl_secs);
            (fill.key, cmd)
        });
        let stored: Vec<i64> = self.run_each("fill", fills.collect()).await?;
        Some(stored.into_iter().map(|s| s == 1).collect())
    }

    /// Gives leases (key, token) back early, each if it is still the caller's.
    pub async fn release_leases(&self, leases: &[(String, String)]) {
        let releases = leases.iter().map(|(key, token)| {
            let release = redis::cmd("EVAL").arg(RELEASE).arg(1).arg(key).arg(token).clone();
            (key.as_str(), release)
        });
        self.run_each::<redis::Value>("release", releases.collect()).await;
    }

    /// Sets the leases (key, token) that are still the caller's to expire `ttl`
    /// from now; true where it did.
    pub async fn extend_leases(&self, leases: &[(String, String)], ttl: Duration) -> Option<Vec<bool>> {
        let extends = leases.iter().map(|(key, token)| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(EXTEND).arg(1).arg(key).arg(token).arg(ttl.as_millis() as u64);
            (key.as_str(), cmd)
        });
        let extended: Vec<i64> = self.run_each("extend", extends.collect()).await?;
        Some(extended.into_iter().map(|e| e == 1).collect())
    }

    /// Replaces a category list's head and metadata if the lease is still held
    /// (see `GUARDED_LIST_HEAD`); `keys` are ids, meta, dir, lease.
    pub async fn write_list_head(
        &self,
        keys: [&str; 4],
        token: &str,
        meta: &[u8],
        ids: &[String],
        ttl_secs: u64,
    ) -> Option<bool> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GUARDED_LIST_HEAD)
            .arg(4)
            .arg(&keys[..])
            .arg(token)
            .arg(meta)
            .arg(ttl_secs)
            .arg(ids);
        self.run::<i64>("list_write", &cmd).await.map(|stored| stored == 1)
    }

    /// Adds ids at positions from `first` while the metadata is `meta` (see
    /// `GUARDED_LIST_CHUNK`); `keys` are ids, meta.
    pub async fn write_list_chunk(&self, keys: [&str; 2], meta: &[u8], first: u64, ids: &[String]) -> Option<bool> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GUARDED_LIST_CHUNK)
            .arg(2)
            .arg(&keys[..])
            .arg(meta)
            .arg(first)
            .arg(ids);
        self.run::<i64>("list_write", &cmd).await.map(|stored| stored == 1)
    }

    /// Sets `key` to `value` while `guard` holds `expected`, expiring with it.
    pub async fn set_beside(&self, key: &str, guard: &str, expected: &[u8], value: &[u8]) -> Option<bool> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GUARDED_SET_BESIDE)
            .arg(2)
            .arg(key)
            .arg(guard)
            .arg(expected)
            .arg(value);
        self.run::<i64>("list_write", &cmd).await.map(|stored| stored == 1)
    }

    /// Deletes each group of keys with one DEL (a group shares a hash slot) and
    /// publishes the messages on `channel`, in one round trip. In a cluster
    /// any node takes a PUBLISH and passes it to every node's subscribers.
    pub async fn delete_and_publish(
        &self,
        groups: &[Vec<String>],
        marks: Option<WriteMarks<'_>>,
        mark_ttl: Duration,
        channel: &str,
        messages: &[Vec<u8>],
    ) -> Option<()> {
        let marks = marks.into_iter().flat_map(|marks| {
            let position = marks.position.to_marker();
            marks.keys.iter().map(move |key| {
                let mark = redis::cmd("EVAL")
                    .arg(MARK_WRITE)
                    .arg(1)
                    .arg(key)
                    .arg(&position)
                    .arg(mark_ttl.as_millis() as u64)
                    .clone();
                (key.as_str(), mark)
            })
        });
        let deletes = groups
            .iter()
            .filter_map(|group| Some((group.first()?.as_str(), redis::cmd("DEL").arg(group).clone())));
        let publishes = messages
            .iter()
            .map(|message| (channel, redis::cmd("PUBLISH").arg(channel).arg(message).clone()));
        self.run_each::<redis::Value>("del", marks.chain(deletes).chain(publishes).collect())
            .await
            .map(drop)
    }

    /// Calls `on` with each message published on `channel`, forever,
    /// resubscribing after a lost connection. The subscription is PINGed every
    /// `SUBSCRIPTION_PING_INTERVAL`: a half-open connection (a peer gone
    /// without a reset) delivers nothing and reports nothing, so without an
    /// answer in time the connection counts as lost and is replaced.
    pub async fn subscribe(&self, channel: &str, mut on: impl FnMut(Delivery<'_>)) {
        loop {
            match self.open_subscription(channel).await {
                Ok(pubsub) => {
                    on(Delivery::Subscribed);
                    let (mut sink, mut messages) = pubsub.split();
                    let mut ping = tokio::time::interval(SUBSCRIPTION_PING_INTERVAL);
                    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            message = futures_util::StreamExt::next(&mut messages) => match message {
                                Some(message) => on(Delivery::Message(message.get_payload_bytes())),
                                None => break,
                            },
                            _ = ping.tick() => {
                                let answer = tokio::time::timeout(self.subscription_timeout(), sink.ping::<redis::Value>()).await;
                                if !matches!(answer, Ok(Ok(_))) {
                                    self.errors.report("subscribe", "no answer to PING on the subscription");
                                    break;
                                }
                            }
                        }
                    }
                    metrics::counter!("readthrough_event_subscription_lost_total").increment(1);
                    on(Delivery::Lost);
                }
                Err(error) => self.errors.report("subscribe", &error),
            }
            // While Redis is gone: one attempt a second, logged once per `LOG_INTERVAL`.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A new subscription to `channel`, within `CONNECT_TIMEOUT`: a Redis that
    /// accepts connections but never answers would otherwise hold it forever.
    async fn open_subscription(&self, channel: &str) -> Result<redis::aio::PubSub, String> {
        let turn = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let client = &self.subscribers[turn % self.subscribers.len()];
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(connections::CONNECT_TIMEOUT, subscribe).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("not subscribed within {:?}", connections::CONNECT_TIMEOUT)),
        }
    }

    /// How long the subscription's PING may take: generous, since a false
    /// alarm empties the near caches.
    fn subscription_timeout(&self) -> Duration {
        self.timeout.max(SUBSCRIPTION_PING_INTERVAL)
    }

    /// Connects (see `Connections::connect_all`): up front, so the first
    /// requests do not queue behind connection setup; retrying in the
    /// background while Redis is down.
    pub async fn open_connections(&self) {
        self.connections.connect_all().await;
    }

    /// How many of the shared connections are up.
    pub fn connected(&self) -> usize {
        self.connections.connected()
    }

    /// Whether the circuit breaker is letting commands through (closed).
    pub fn breaker_closed(&self) -> bool {
        self.breaker.state() == super::breaker::State::Closed
    }

    /// `run_each` with the command `name` on each key.
    async fn run_on_each<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        keys: &[String],
        name: &str,
    ) -> Option<Vec<T>> {
        let commands = keys
            .iter()
            .map(|key| {
                let mut cmd = redis::cmd(name);
                cmd.arg(key);
                (key.as_str(), cmd)
            })
            .collect();
        self.run_each(operation, commands).await
    }

    /// Sends `commands`, each with the key that routes it, in one round trip:
    /// one pipeline to a single Redis; to a cluster, one pipeline per hash
    /// slot (a pipeline may not span slots), sent concurrently, each with its
    /// own deadline. The replies come back in the order of `commands`.
    async fn run_each<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        commands: Vec<(&str, redis::Cmd)>,
    ) -> Option<Vec<T>> {
        if commands.is_empty() {
            return Some(Vec::new());
        }
        let count = commands.len();
        if !self.cluster {
            let mut pipe = redis::pipe();
            for (_, cmd) in commands {
                pipe.add_command(cmd);
            }
            return self.run_pipe(operation, &pipe).await;
        }
        let mut by_slot: HashMap<Slot, (Vec<usize>, redis::Pipeline)> = HashMap::new();
        for (index, (key, cmd)) in commands.into_iter().enumerate() {
            let (indices, pipe) = by_slot
                .entry(Slot::for_key(key))
                .or_insert_with(|| (Vec::new(), redis::pipe()));
            indices.push(index);
            pipe.add_command(cmd);
        }
        let sent = by_slot.into_values().map(|(indices, pipe)| async move {
            let replies: Vec<T> = self.run_pipe(operation, &pipe).await?;
            Some(indices.into_iter().zip(replies))
        });
        let mut ordered: Vec<Option<T>> = (0..count).map(|_| None).collect();
        for replies in futures_util::future::join_all(sent).await {
            for (index, reply) in replies? {
                ordered[index] = Some(reply);
            }
        }
        ordered.into_iter().collect()
    }

    async fn run<T: redis::FromRedisValue>(&self, operation: &'static str, cmd: &redis::Cmd) -> Option<T> {
        self.with_deadline(operation, async {
            let mut checked = self.connections.get().ok_or_else(Failure::not_connected)?;
            cmd.query_async::<T>(&mut checked.connection)
                .await
                .map_err(|error| self.failed(&checked, error))
        })
        .await
    }

    async fn run_pipe<T: redis::FromRedisValue>(&self, operation: &'static str, pipe: &redis::Pipeline) -> Option<T> {
        self.with_deadline(operation, async {
            let mut checked = self.connections.get().ok_or_else(Failure::not_connected)?;
            pipe.query_async::<T>(&mut checked.connection)
                .await
                .map_err(|error| self.failed(&checked, error))
        })
        .await
    }

    fn failed(&self, checked: &connections::Checked, error: redis::RedisError) -> Failure {
        self.connections.report_error(checked, &error);
        Failure {
            unavailable: means_unavailable(&error),
            message: error.to_string(),
        }
    }

    async fn with_deadline<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, Failure>>,
    ) -> Option<T> {
        match self.breaker.admit() {
            Admission::Run => {}
            Admission::Skip => return skipped(operation),
            Admission::Probe(probe) => {
                self.spawn_probe(probe);
                return skipped(operation);
            }
        }
        let started = std::time::Instant::now();
        let span = tracing::debug_span!(
            "redis",
            otel.kind = "client",
            db.system = "redis",
            db.operation = operation
        );
        let outcome = tokio::time::timeout(self.timeout, call).instrument(span).await;
        crate::telemetry::histogram("readthrough_redis_duration_seconds", "operation", operation)
            .record(started.elapsed().as_secs_f64());
        let failure = match outcome {
            Ok(Ok(value)) => {
                self.breaker.succeeded();
                return Some(value);
            }
            Ok(Err(failure)) => failure,
            Err(_) => Failure {
                unavailable: true,
                message: format!("timed out after {:?}", self.timeout),
            },
        };
        if failure.unavailable {
            self.breaker.failed();
        } else {
            // Redis answered, with an error about this command alone.
            self.breaker.succeeded();
        }
        metrics::counter!("readthrough_cache_errors_total", "operation" => operation).increment(1);
        self.errors.report(operation, &failure.message);
        None
    }

    /// PINGs Redis in the background, within the usual deadline, and tells
    /// the half-open breaker the outcome. No request waits for it.
    fn spawn_probe(&self, probe: Probe) {
        let (connections, timeout) = (self.connections.clone(), self.timeout);
        tokio::spawn(async move {
            let Some(mut checked) = connections.get() else {
                return probe.answered(false);
            };
            let ping = redis::cmd("PING");
            let answered =
                match tokio::time::timeout(timeout, ping.query_async::<redis::Value>(&mut checked.connection)).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(error)) => {
                        connections.report_error(&checked, &error);
                        false
                    }
                    // A silent connection may be half-open, with nobody at the other end
                    // any more: make a new one, which then probes again when it connects.
                    Err(_) => {
                        connections.replace(&checked);
                        false
                    }
                };
            probe.answered(answered);
        });
    }
}

/// Why a command got no value.
struct Failure {
    /// Redis is unreachable or cannot serve (as opposed to refusing this one command).
    unavailable: bool,
    message: String,
}

impl Failure {
    fn not_connected() -> Self {
        Self {
            unavailable: true,
            message: NOT_CONNECTED.to_string(),
        }
    }
}

/// Whether an error means Redis cannot serve right now (the connection is
/// gone, or the server says it is loading, busy or down), which counts
/// towards opening the breaker; an error about the command itself (a wrong
/// type, a script error) does not.
/// The (host, port) of each master that is not failing in a `CLUSTER NODES`
/// reply (`<id> <host>:<port>@<bus port> <flags> …`).
fn masters_of(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let is_live_master = flags.split(',').any(|f| f == "master") && !flags.contains("fail");
            let (host, port) = address.split('@').next()?.rsplit_once(':')?;
            is_live_master.then(|| Some((host.to_string(), port.parse().ok()?)))?
        })
        .collect()
}

/// The slot-serving masters of `CLUSTER NODES` output (see `slot_owners`):
/// `<id> <address> <flags> <master> <ping> <pong> <config epoch> <link> <slots...>`.
fn slot_owners_of(nodes: &str) -> Vec<String> {
    let mut owners: Vec<String> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let serves_slots = fields.len() > 8 && fields[2].split(',').any(|flag| flag == "master");
            serves_slots.then(|| format!("{}:{}", fields[0], fields[6]))
        })
        .collect();
    owners.sort();
    owners
}

/// Epochs in `Kind` order, a missing one (never bumped) as 0.
fn epochs_by_kind(epochs: &[Option<u64>]) -> Option<[u64; 3]> {
    match epochs {
        [user, product, list] => Some([user, product, list].map(|epoch| epoch.unwrap_or(0))),
        _ => None,
    }
}

fn means_unavailable(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || matches!(error.retry_method(), RetryMethod::WaitAndRetry)
        || (error.kind() == ErrorKind::Extension && error.code() == Some("BUSY"))
}

/// A command the open breaker did not send: the caller fails open at once.
#[cold]
fn skipped<T>(operation: &'static str) -> Option<T> {
    metrics::counter!("readthrough_cache_skipped_total", "operation" => operation).increment(1);
    None
}

const NOT_CONNECTED: &str = "not connected (reconnecting)";

/// Logs the first Redis error of each interval and how many followed it unlogged.
#[derive(Default)]
struct ErrorLog(Throttle);

impl ErrorLog {
    fn report(&self, operation: &str, error: &str) {
        if let Some(suppressed) = self.0.pass(LOG_INTERVAL) {
            tracing::warn!(
                operation,
                error,
                suppressed,
                "redis unavailable; serving from PostgreSQL"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use deadpool_redis::redis::{ErrorKind, RedisError, ServerErrorKind};

    use super::{masters_of, means_unavailable, slot_owners_of};

    #[test]
    fn masters_are_the_live_master_lines_of_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7003@17003 slave a1 0 1 4 connected
d4 127.0.0.1:7002@17002 master,fail - 0 1 3 disconnected
";
        assert_eq!(
            masters_of(nodes),
            [("127.0.0.1".to_string(), 7000), ("127.0.0.1".to_string(), 7001)]
        );
    }

    #[test]
    fn slot_owners_are_the_masters_with_slots_and_their_config_epochs() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922 10923
c3 127.0.0.1:7003@17003 slave a1 0 1 4 connected
d4 127.0.0.1:7002@17002 master,fail - 0 1 3 disconnected
";
        assert_eq!(slot_owners_of(nodes), ["a1:1", "b2:2"]);
    }

    #[test]
    fn only_errors_that_say_redis_cannot_serve_count_towards_the_breaker() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(means_unavailable(&RedisError::from(reset)));
        assert!(means_unavailable(&RedisError::from((ErrorKind::Io, "broken pipe"))));
        let loading = ErrorKind::Server(ServerErrorKind::BusyLoading);
        assert!(means_unavailable(&RedisError::from((loading, "loading the dataset"))));

        let wrong_type = ErrorKind::Server(ServerErrorKind::ResponseError);
        assert!(!means_unavailable(&RedisError::from((wrong_type, "WRONGTYPE"))));
        let undecodable = ErrorKind::UnexpectedReturnType;
        assert!(!means_unavailable(&RedisError::from((
            undecodable,
            "not a bulk string"
        ))));
    }
}
