//! Redis servers of a test's own: one Redis, a Sentinel group, a Redis Cluster.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::redis;
use crate::{eventually, free_cluster_port, free_port};

/// A Redis server of the test's own, on a free port, killed when dropped. It
/// saves nothing: started again, it is empty, as a restarted cache is. It
/// works in a directory of its own, so that the files Redis writes anyway
/// (a replica's copy of its master, a cluster node's state) neither land in
/// the checkout nor get loaded by the next server.
pub struct OwnRedis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Arguments after the usual ones, kept for `start_again`.
    extra: Vec<String>,
    pub url: String,
}

impl OwnRedis {
    pub async fn start() -> Self {
        Self::start_with_args(free_port(), &[]).await
    }

    /// A redis-server with `extra` arguments after the usual ones (a later
    /// one wins: `--port 0 --tls-port <port>` serves only TLS), ready once
    /// `port` accepts connections; `url` is the plain `redis://` form.
    pub async fn start_with_args(port: u16, extra: &[&str]) -> Self {
        Self::try_start_with_args(port, extra).await.unwrap()
    }

    /// `start_with_args`, telling instead of panicking when the server does
    /// not come up as ours (another process took the port meanwhile).
    pub async fn try_start_with_args(port: u16, extra: &[&str]) -> Result<Self, String> {
        let mut own = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|arg| arg.to_string()).collect(),
            url: format!("redis://127.0.0.1:{port}"),
        };
        own.try_start_again().await?;
        Ok(own)
    }

    /// Starts the server (again, after `kill`) on the same port and with the
    /// same arguments, and waits until it accepts connections.
    pub async fn start_again(&mut self) {
        self.try_start_again().await.unwrap()
    }

    async fn try_start_again(&mut self) -> Result<(), String> {
        self.kill();
        let port = self.port;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.path().to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services installs it)");
        self.child = Some(child);
        // A TCP connect, not a Redis client: the server may want TLS or a password.
        let up = eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        if !up {
            return Err(format!(
                "own redis-server did not start on port {port} with {:?}",
                self.extra
            ));
        }
        let exited = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten());
        match exited {
            None => Ok(()),
            Some(status) => Err(format!(
                "own redis-server on port {port} exited ({status}): the port answers for another"
            )),
        }
    }

    /// The server's process id, to tell it from another listening on its port.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

impl OwnRedis {
    /// A replica of the Redis at `master_port`, once it has its master's data.
    pub async fn replica_of(master_port: u16) -> Self {
        let replica = Self::start_with_args(free_port(), &["--replicaof", "127.0.0.1", &master_port.to_string()]).await;
        let synced = eventually(Duration::from_secs(10), || async {
            replica.info("replication").await.contains("master_link_status:up")
        })
        .await;
        assert!(synced, "the replica synced with its master");
        replica
    }

    /// This replica was made a primary: started again, it starts as one.
    pub fn promoted(&mut self) {
        if let Some(at) = self.extra.iter().position(|arg| arg == "--replicaof") {
            self.extra.drain(at..(at + 3).min(self.extra.len()));
        }
    }

    /// A client connection to this server.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// `INFO <section>`, or "" when the server does not answer.
    pub async fn info(&self, section: &str) -> String {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return String::new();
        };
        let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
            return String::new();
        };
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut connection)
            .await
            .unwrap_or_default()
    }
}

/// A Redis Sentinel of the test's own (`redis-server --sentinel`) on a free
/// port, watching the primary at `master_port` under the name `mymaster`,
/// with a 1 s down-after; killed when dropped.
pub struct OwnSentinel {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl OwnSentinel {
    pub async fn start(master_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n\
                 sentinel parallel-syncs mymaster 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services installs it)");
        let up = eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(up, "sentinel listens on {port}");
        Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// `SENTINEL <args…>` asked of this sentinel.
    pub async fn ask<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let mut connection = redis::Client::open(self.url.as_str())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        redis::cmd("SENTINEL").arg(args).query_async(&mut connection).await.ok()
    }

    /// The port of the primary this sentinel names now.
    pub async fn master_port(&self) -> Option<u16> {
        let address: Vec<String> = self.ask(&["get-master-addr-by-name", "mymaster"]).await?;
        address.get(1)?.parse().ok()
    }
}

impl Drop for OwnSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of the test's own: three masters and three replicas
/// (`redis-cli --cluster create --cluster-replicas 1`) on free ports. Every
/// node is killed when dropped.
pub struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
    /// `REDIS_CLUSTER_URLS`: every node.
    pub urls: Vec<String>,
}

impl OwnCluster {
    /// Starts a cluster, trying fresh ports a few times: ports are picked
    /// free but only taken when a node starts, and every node needs two
    /// (its port and its bus port, 10000 above), so another process
    /// starting meanwhile can take one.
    pub async fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match Self::try_start().await {
                Ok(cluster) => return cluster,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("no Redis Cluster started in 5 tries: {failures:#?}");
    }

    async fn try_start() -> Result<Self, String> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_cluster_port();
            // The cluster state file is kept in the node's own directory.
            let args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"];
            let node = OwnRedis::try_start_with_args(port, &args).await?;
            let answering = process_id(&node.url).await;
            if answering != node.pid() {
                return Err(format!("port {port} answers for process {answering:?}, not our node"));
            }
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed (scripts/services installs redis-server)");
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            ));
        }
        let cluster = Self {
            urls: nodes.iter().map(|node| node.url.clone()).collect(),
            nodes,
        };
        let ready = eventually(Duration::from_secs(20), || async {
            let mut states = Vec::new();
            for node in &cluster.nodes {
                states.push(cluster_state(&node.url).await);
            }
            states.iter().all(|ok| *ok)
        })
        .await;
        if !ready {
            return Err("not every node reports cluster_state:ok within 20 s".to_string());
        }
        Ok(cluster)
    }

    /// The index in `nodes` of the master that serves `key`'s slot now.
    pub async fn master_of(&self, key: &str) -> usize {
        let mut redis = self.connection().await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut redis)
            .await
            .unwrap();
        // <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges...>
        let port = nodes
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| {
                fields[2].contains("master")
                    && fields[8..].iter().any(|range| {
                        let (first, last) = range.split_once('-').unwrap_or((range, range));
                        matches!((first.parse::<u16>(), last.parse::<u16>()), (Ok(first), Ok(last)) if (first..=last).contains(&slot))
                    })
            })
            .map(|fields| fields[1].split(['@', ':']).nth(1).unwrap().parse::<u16>().unwrap())
            .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{nodes}"));
        self.nodes.iter().position(|node| node.port == port).unwrap()
    }

    /// A client of the whole cluster, for tests that look inside it.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls.clone())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }
}

/// The `process_id` the Redis at `url` reports, if it answers.
pub(crate) async fn process_id(url: &str) -> Option<u32> {
    let mut connection = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// Whether the node at `url` says `cluster_state:ok` and knows six nodes,
/// and, if it is a replica, has its master's data: a replica that has never
/// synced is not promoted when its master fails.
pub(crate) async fn cluster_state(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    let replication: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    let synced = replication.contains("role:master") || replication.contains("master_link_status:up");
    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6") && synced
}
