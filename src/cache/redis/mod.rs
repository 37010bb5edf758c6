//! The cache's Redis commands, by what they do for the cache. How they run
//! (deadline, breaker, fail open) is `execute.rs`; where they go (one Redis,
//! Sentinel, a cluster) is `topology.rs`; the shared connections are
//! `connections.rs`, the circuit breaker `breaker.rs`, the Lua `scripts/`.
//!
//! Two clients are made: one for requests, whose connections every request
//! shares, behind the breaker; and one for background work (the outbox
//! relay's batches, giving leases back), on a connection of its own and
//! outside the breaker, so a large batch neither queues requests' commands
//! behind it nor counts against Redis when it misses its deadline.

mod breaker;
pub mod connections;
mod execute;
mod scripts;
mod topology;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool_redis::redis::{
    self,
    cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo},
};

use super::{Bump, Kind, WriteMarks};
use crate::{config::CacheConfig, store::replicas::Lsn};
use breaker::Breaker;
use connections::{Connected, Connections, Handle};
use execute::Executor;
pub use execute::is_read_only;
pub use topology::Topology;

/// How often the event subscription checks that its connection still answers.
const SUBSCRIPTION_PING_INTERVAL: Duration = Duration::from_secs(1);
/// How much of the keyspace one SCAN step walks (COUNT: a hint to Redis, not a limit).
const SCAN_COUNT: u64 = 1000;
/// Key groups per DEL on a single node: a few hundred keys, deleted in well
/// under a millisecond, so reads queued behind the command wait little.
const GROUPS_PER_DELETE: usize = 64;

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

/// What a client is for (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Requests,
    Background,
}

/// Where pub/sub connects: it needs a connection of its own.
enum Subscribers {
    /// The Redis, or each seed node of a cluster (PUBLISH reaches every
    /// node's subscribers), tried in turn.
    Nodes(Vec<redis::Client>),
    /// Whichever server the sentinels name primary now.
    Sentinel(Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>),
}

pub struct RedisClient {
    topology: Topology,
    subscribers: Subscribers,
    next_subscriber: AtomicUsize,
    exec: Executor,
}

impl RedisClient {
    /// Sets up the connections without connecting, so the service starts
    /// while Redis is down. `connected` runs on each new connection first.
    pub fn new(
        config: &CacheConfig,
        topology: &Topology,
        purpose: Purpose,
        connected: Connected,
    ) -> anyhow::Result<Self> {
        // The subscription connects as the shared connections do: same TLS, same ACL user.
        let subscribers = match topology {
            Topology::Single(info) => Subscribers::Nodes(vec![topology::client(info)?]),
            Topology::Cluster(nodes) => {
                Subscribers::Nodes(nodes.iter().map(topology::client).collect::<anyhow::Result<_>>()?)
            }
            Topology::Sentinel {
                sentinels,
                master,
                node,
            } => {
                let sentinels = Topology::sentinel_client(sentinels, master, node)?;
                Subscribers::Sentinel(Box::new(tokio::sync::Mutex::new(sentinels)))
            }
        };
        let (count, breaker) = match purpose {
            Purpose::Requests => (
                usize::from(config.redis_connections),
                Some(Arc::new(Breaker::new(
                    config.redis_breaker_failures,
                    config.redis_breaker_cooldown,
                    config.redis_timeout,
                ))),
            ),
            Purpose::Background => (1, None),
        };
        let connections = Connections::new(topology, count, breaker.clone(), connected)?;
        Ok(Self {
            topology: topology.clone(),
            subscribers,
            next_subscriber: AtomicUsize::new(0),
            exec: Executor::new(connections, config.redis_timeout, breaker),
        })
    }

    /// The deadline of requests' calls (`REDIS_TIMEOUT_MS`).
    pub fn timeout(&self) -> Duration {
        self.exec.timeout
    }

    /// GET for one key, MGET for several (against a cluster, a GET per key
    /// in one pipeline per slot); `None` when Redis could not answer.
    pub async fn get_many(&self, keys: &[String]) -> Option<Vec<Option<Vec<u8>>>> {
        match keys {
            [] => Some(Vec::new()),
            [key] => self.exec.run("get", redis::cmd("GET").arg(key)).await.map(|v| vec![v]),
            _ if self.topology.is_cluster() => self.run_on_each("mget", keys, "GET").await,
            _ => self.exec.run("mget", redis::cmd("MGET").arg(keys)).await,
        }
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
        let nodes = if self.topology.is_cluster() {
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
                    None => self.exec.run("scan", &scan).await?,
                    Some(node) => self.exec.run_at("scan", node, scan).await?,
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
            .exec
            .run("cluster_nodes", &redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        Some(topology::masters_of(&nodes))
    }

    /// Each master that serves slots, as `<node id>:<config epoch>`, as any
    /// node sees it: a failover (or a resharding) makes a new one. Every node
    /// is asked, since one may learn of a promotion later than another
    /// (gossip). `None` when not on a cluster or no node answered.
    pub async fn slot_owners(&self) -> Option<Vec<String>> {
        if !self.topology.is_cluster() {
            return None;
        }
        let nodes: String = self
            .exec
            .run("cluster_nodes", &redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        let views = futures_util::future::join_all(topology::nodes_of(&nodes).into_iter().map(|node| async move {
            self.exec
                .run_at::<String>("cluster_nodes", &node, redis::cmd("CLUSTER").arg("NODES").clone())
                .await
        }))
        .await;
        let mut owners: Vec<String> = std::iter::once(nodes)
            .chain(views.into_iter().flatten())
            .flat_map(|view| topology::slot_owners_of(&view))
            .collect();
        owners.sort();
        owners.dedup();
        Some(owners)
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
        self.run_each(operation, commands, self.exec.timeout).await
    }

    /// Sends `commands`, each with the key that routes it, in one round trip
    /// within `timeout`: one pipeline to a single Redis; to a cluster, one
    /// pipeline per hash slot (a pipeline may not span slots), sent
    /// concurrently, each with its own deadline. The replies come back in the
    /// order of `commands`.
    async fn run_each<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        commands: Vec<(&str, redis::Cmd)>,
        timeout: Duration,
    ) -> Option<Vec<T>> {
        if commands.is_empty() {
            return Some(Vec::new());
        }
        let count = commands.len();
        let pipelines = self.topology.pipelines(commands);
        if let [(_, pipe)] = &pipelines[..] {
            // One pipeline carries the commands in their order.
            return self.exec.run_pipe_within(operation, pipe, timeout).await;
        }
        let sent = pipelines.into_iter().map(|(indices, pipe)| async move {
            let replies: Vec<T> = self.exec.run_pipe_within(operation, &pipe, timeout).await?;
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

    /// Every kind's epoch (by `Kind`; 0 for one never bumped) and the WAL
    /// position of the newest write a bump of it retired.
    pub async fn read_epochs(&self, key: &str) -> Option<EpochsRead> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key)
            .arg(&Kind::ALL.map(Kind::label)[..])
            .arg(&Kind::ALL.map(lsn_field)[..]);
        let fields: Vec<Option<Vec<u8>>> = self.exec.run("epochs", &cmd).await?;
        let (epochs, positions) = fields.split_at_checked(Kind::ALL.len())?;
        let epochs: Vec<Option<u64>> = epochs
            .iter()
            .map(|field| {
                field
                    .as_ref()
                    .and_then(|bytes| std::str::from_utf8(bytes).ok()?.parse().ok())
            })
            .collect();
        Some(EpochsRead {
            epochs: epochs_by_kind(&epochs)?,
            positions: [0, 1, 2].map(|i| positions.get(i)?.as_deref().and_then(Lsn::from_marker)),
        })
    }

    /// Bumps the epochs of `kinds` (see `scripts::BUMP_EPOCHS`) unless the
    /// last bump is less than `spacing` old, recording `position` as the
    /// newest write they retire. Sent as requests' calls are, or on
    /// `connection` (a new one, before anything else uses it).
    pub async fn bump_epochs(&self, bump: &EpochBump<'_>) -> Option<Bump> {
        let cmd = bump.command();
        let reply: Vec<Option<u64>> = self.exec.run("epochs", &cmd).await?;
        bump_outcome(&reply)
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
        let (members, meta) = self.exec.run_pipe("list_read", &pipe).await?;
        Some(ListPageRaw { members, meta })
    }

    /// Takes each lease that nobody holds (`SET NX PX`); true where this caller got it.
    pub async fn acquire_leases(&self, lease_keys: &[String], token: &str, ttl: Duration) -> Option<Vec<bool>> {
        let sets = lease_keys.iter().map(|key| {
            let mut set = redis::cmd("SET");
            set.arg(key).arg(token).arg("NX").arg("PX").arg(ttl.as_millis() as u64);
            (key.as_str(), set)
        });
        let replies: Vec<Option<String>> = self.run_each("lease", sets.collect(), self.exec.timeout).await?;
        Some(replies.into_iter().map(|reply| reply.is_some()).collect())
    }

    /// `key`'s value, or else its lease if nobody holds it (see `GET_OR_LEASE`).
    pub async fn get_or_lease(&self, key: &str, lease_key: &str, token: &str, ttl: Duration) -> Option<Lookup> {
        let mut cmd = scripts::GET_OR_LEASE.call(2);
        cmd.arg(key).arg(lease_key).arg(token).arg(ttl.as_millis() as u64);
        let (outcome, value): (i64, Option<Vec<u8>>) =
            match self.exec.run::<Vec<redis::Value>>("lease", &cmd).await?.as_slice() {
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
            let mut cmd = scripts::GUARDED_SET.call(2);
            cmd.arg(fill.key)
                .arg(fill.lease_key)
                .arg(fill.token)
                .arg(&fill.value)
                .arg(fill.ttl_secs);
            (fill.key, cmd)
        });
        let stored: Vec<i64> = self.run_each("fill", fills.collect(), self.exec.timeout).await?;
        Some(stored.into_iter().map(|s| s == 1).collect())
    }

    /// Gives leases (key, token) back early, each if it is still the
    /// caller's; `None` when Redis did not answer.
    pub async fn release_leases(&self, leases: &[(String, String)]) -> Option<()> {
        let releases = leases.iter().map(|(key, token)| {
            let release = scripts::RELEASE.call(1).arg(key).arg(token).clone();
            (key.as_str(), release)
        });
        self.run_each::<redis::Value>("release", releases.collect(), self.exec.timeout)
            .await
            .map(drop)
    }

    /// Sets the leases (key, token) that are still the caller's to expire `ttl`
    /// from now; true where it did.
    pub async fn extend_leases(&self, leases: &[(String, String)], ttl: Duration) -> Option<Vec<bool>> {
        let extends = leases.iter().map(|(key, token)| {
            let mut cmd = scripts::EXTEND.call(1);
            cmd.arg(key).arg(token).arg(ttl.as_millis() as u64);
            (key.as_str(), cmd)
        });
        let extended: Vec<i64> = self.run_each("extend", extends.collect(), self.exec.timeout).await?;
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
        let mut cmd = scripts::GUARDED_LIST_HEAD.call(4);
        cmd.arg(&keys[..]).arg(token).arg(meta).arg(ttl_secs).arg(ids);
        self.exec.run::<i64>("list_write", &cmd).await.map(|stored| stored == 1)
    }

    /// Adds ids at positions from `first` while the metadata is `meta` (see
    /// `GUARDED_LIST_CHUNK`); `keys` are ids, meta.
    pub async fn write_list_chunk(&self, keys: [&str; 2], meta: &[u8], first: u64, ids: &[String]) -> Option<bool> {
        let mut cmd = scripts::GUARDED_LIST_CHUNK.call(2);
        cmd.arg(&keys[..]).arg(meta).arg(first).arg(ids);
        self.exec.run::<i64>("list_write", &cmd).await.map(|stored| stored == 1)
    }

    /// Sets `key` to `value` while `guard` holds `expected`, expiring with it.
    pub async fn set_beside(&self, key: &str, guard: &str, expected: &[u8], value: &[u8]) -> Option<bool> {
        let mut cmd = scripts::GUARDED_SET_BESIDE.call(2);
        cmd.arg(key).arg(guard).arg(expected).arg(value);
        self.exec.run::<i64>("list_write", &cmd).await.map(|stored| stored == 1)
    }

    /// Records `marks`, deletes each group of keys with one DEL (a group
    /// shares a hash slot) and publishes the messages on `channel`, within
    /// `timeout`. One Redis runs them in order, in one round trip. A cluster
    /// runs each slot's commands in order but the slots' pipelines
    /// concurrently, so there the messages are published only once every
    /// delete is confirmed: a receiver that reads the key on hearing of the
    /// change must not find it still there. Any node takes a PUBLISH and
    /// passes it to every node's subscribers.
    pub async fn delete_and_publish(
        &self,
        groups: &[Vec<String>],
        marks: Option<WriteMarks<'_>>,
        mark_ttl: Duration,
        channel: &str,
        messages: &[Vec<u8>],
        timeout: Duration,
    ) -> Option<()> {
        let writes = self.marks_and_deletes(groups, marks, mark_ttl);
        if !self.topology.is_cluster() {
            let all = writes.into_iter().chain(publishes(channel, messages)).collect();
            return self.run_each::<redis::Value>("del", all, timeout).await.map(drop);
        }
        let started = tokio::time::Instant::now();
        self.run_each::<redis::Value>("del", writes, timeout).await?;
        self.publish(channel, messages, timeout.saturating_sub(started.elapsed()))
            .await
    }

    /// Records `marks` and deletes each group of keys, as `delete_and_publish`
    /// does, then asks whether anyone subscribes to `channel`: whoever
    /// subscribed before the deletes ran must hear of them, and whoever
    /// subscribes later cannot have read what they removed. A relay batch
    /// publishes thousands of events that, without a near cache or another
    /// subscriber, go nowhere. On a cluster, where `PUBSUB NUMSUB` counts one
    /// node's subscribers only, the answer is always yes.
    pub async fn delete_and_ask_subscribed(
        &self,
        groups: &[Vec<String>],
        marks: Option<WriteMarks<'_>>,
        mark_ttl: Duration,
        channel: &str,
        timeout: Duration,
    ) -> Option<bool> {
        let mut writes = self.marks_and_deletes(groups, marks, mark_ttl);
        if self.topology.is_cluster() {
            return self
                .run_each::<redis::Value>("del", writes, timeout)
                .await
                .map(|_| true);
        }
        let mut ask = redis::cmd("PUBSUB");
        ask.arg("NUMSUB").arg(channel);
        writes.push((channel, ask));
        let replies = self.run_each::<redis::Value>("del", writes, timeout).await?;
        // `[channel, count]`; anything else: publish anyway.
        Some(match replies.last() {
            Some(redis::Value::Array(reply)) => !matches!(reply.get(1), Some(redis::Value::Int(0))),
            _ => true,
        })
    }

    /// Publishes `messages` on `channel` within `timeout`.
    pub async fn publish(&self, channel: &str, messages: &[Vec<u8>], timeout: Duration) -> Option<()> {
        self.run_each::<redis::Value>("publish", publishes(channel, messages).collect(), timeout)
            .await
            .map(drop)
    }

    /// The commands that record `marks` and delete `groups`. Each group goes
    /// in one DEL, so no fill lands between an entry and its lease. A single
    /// node takes many groups per DEL (a relay batch deletes thousands); on
    /// a cluster a DEL's keys must share a slot, as one group's do (one hash
    /// tag).
    fn marks_and_deletes<'a>(
        &self,
        groups: &'a [Vec<String>],
        marks: Option<WriteMarks<'a>>,
        mark_ttl: Duration,
    ) -> Vec<(&'a str, redis::Cmd)> {
        let marks = marks.into_iter().flat_map(|marks| {
            let position = marks.position.to_marker();
            marks.keys.iter().map(move |key| {
                let mut mark = scripts::MARK_WRITE.call(1);
                mark.arg(key).arg(&position).arg(mark_ttl.as_millis() as u64);
                (key.as_str(), mark)
            })
        });
        let per_delete = if self.topology.is_cluster() {
            1
        } else {
            GROUPS_PER_DELETE
        };
        let deletes = groups.chunks(per_delete).filter_map(|chunk| {
            let mut delete = redis::cmd("DEL");
            delete.arg(chunk);
            Some((chunk.first()?.first()?.as_str(), delete))
        });
        marks.chain(deletes).collect()
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
                                    self.exec.report("subscribe", "no answer to PING on the subscription");
                                    break;
                                }
                            }
                        }
                    }
                    metrics::counter!("readthrough_event_subscription_lost_total").increment(1);
                    on(Delivery::Lost);
                }
                Err(error) => self.exec.report("subscribe", &error),
            }
            // While Redis is gone: one attempt a second, logged once per `LOG_INTERVAL`.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A new subscription to `channel`, within `CONNECT_TIMEOUT`: a Redis that
    /// accepts connections but never answers would otherwise hold it forever.
    async fn open_subscription(&self, channel: &str) -> Result<redis::aio::PubSub, String> {
        let subscribe = async {
            let client = match &self.subscribers {
                Subscribers::Nodes(nodes) => {
                    let turn = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
                    nodes[turn % nodes.len()].clone()
                }
                Subscribers::Sentinel(sentinels) => sentinels.lock().await.async_get_client().await?,
            };
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
        self.exec.timeout.max(SUBSCRIPTION_PING_INTERVAL)
    }

    /// Connects (see `Connections::connect_all`): up front, so the first
    /// requests do not queue behind connection setup; retrying in the
    /// background while Redis is down.
    pub async fn open_connections(&self) {
        self.exec.connections.connect_all().await;
    }

    /// How many of the shared connections are up.
    pub fn connected(&self) -> usize {
        self.exec.connections.connected()
    }

    /// Whether the circuit breaker is letting commands through (closed);
    /// always, for background work.
    pub fn breaker_closed(&self) -> bool {
        self.exec.breaker_closed()
    }
}

/// Epochs in `Kind` order, a missing one (never bumped) as 0.
fn epochs_by_kind(epochs: &[Option<u64>]) -> Option<[u64; 3]> {
    match epochs {
        [user, product, list] => Some([user, product, list].map(|epoch| epoch.unwrap_or(0))),
        _ => None,
    }
}

/// The field of the epochs hash that holds the WAL position of the newest
/// write a bump of `kind` retired.
fn lsn_field(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "user:lsn",
        Kind::Product => "product:lsn",
        Kind::List => "list:lsn",
    }
}

/// The epochs as read from Redis (see `RedisClient::read_epochs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochsRead {
    /// By `Kind`.
    pub epochs: [u64; 3],
    /// By `Kind`: the newest write a bump retired, when replicas are read.
    pub positions: [Option<Lsn>; 3],
}

/// A bump of epochs (see `scripts::BUMP_EPOCHS`).
pub struct EpochBump<'a> {
    pub key: &'a str,
    pub spacing: Duration,
    /// The epoch each kind must go beyond: the highest the caller knows.
    pub floors: &'a [(Kind, u64)],
    /// Acted on once however many callers give it; `server`: this server's identity.
    pub reason: Option<&'a str>,
    /// The newest write the bump retires, when replicas are read.
    pub position: Option<Lsn>,
}

impl EpochBump<'_> {
    fn command(&self) -> redis::Cmd {
        let mut cmd = scripts::BUMP_EPOCHS.call(1);
        cmd.arg(self.key)
            .arg(self.spacing.as_millis() as u64)
            .arg(self.reason.unwrap_or(""))
            .arg(self.position.map(Lsn::to_marker).unwrap_or_default());
        for (kind, floor) in self.floors {
            cmd.arg(kind.label()).arg(floor);
        }
        cmd
    }

    /// Runs the bump on `connection` directly: a new connection, before any
    /// request uses it (see `cache::epochs`).
    pub async fn on(&self, connection: &mut Handle) -> Result<Option<Bump>, redis::RedisError> {
        let reply: Vec<Option<u64>> = self.command().query_async(connection).await?;
        Ok(bump_outcome(&reply))
    }
}

fn bump_outcome(reply: &[Option<u64>]) -> Option<Bump> {
    match reply.split_first()? {
        (Some(0), epochs) => epochs_by_kind(epochs).map(Bump::Done),
        (Some(wait_ms), _) => Some(Bump::TooSoon(Duration::from_millis(*wait_ms))),
        (None, _) => None,
    }
}

/// Loads every script (see `scripts`): on a cluster, into every master.
pub async fn load_scripts(connection: &mut Handle) -> Result<(), redis::RedisError> {
    match connection {
        Handle::Single(single) => {
            let mut pipe = redis::pipe();
            for script in scripts::all() {
                pipe.add_command(script.load());
            }
            pipe.query_async::<redis::Value>(single).await.map(drop)
        }
        Handle::Cluster(cluster) => {
            let everywhere =
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded)));
            for script in scripts::all() {
                cluster.route_command(script.load(), everywhere.clone()).await?;
            }
            Ok(())
        }
    }
}

/// One PUBLISH of each message on `channel`.
fn publishes<'a>(channel: &'a str, messages: &'a [Vec<u8>]) -> impl Iterator<Item = (&'a str, redis::Cmd)> {
    messages.iter().map(move |message| {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(channel).arg(message);
        (channel, publish)
    })
}
