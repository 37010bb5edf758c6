//! Where the cache lives (one Redis, a Sentinel-managed primary, or a Redis
//! Cluster) and what follows from it: how commands are routed, and what a
//! cluster's `CLUSTER NODES` says of its masters.

use std::{collections::HashMap, path::Path};

use anyhow::Context;
use deadpool_redis::redis::{
    self, ConnectionInfo, IntoConnectionInfo,
    cluster_routing::Slot,
    io::tcp::TcpSettings,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

use crate::config::CacheConfig;

/// Where the cache lives, as the configuration says: parsed once, and the
/// one place that knows how commands are routed there.
#[derive(Clone)]
pub enum Topology {
    Single(Box<ConnectionInfo>),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<ConnectionInfo>),
    /// The primary that these sentinels name `master`; `node` says how to
    /// log in to it (the credentials of `REDIS_URL`).
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
        node: Box<ConnectionInfo>,
    },
}

impl Topology {
    /// A client of the sentinels, asking for the primary of `master`.
    pub fn sentinel_client(
        sentinels: &[ConnectionInfo],
        master: &str,
        node: &ConnectionInfo,
    ) -> anyhow::Result<SentinelClient> {
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(node.redis_settings().clone())
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        SentinelClient::build(sentinels.to_vec(), master, Some(node), SentinelServerType::Master)
            .map_err(|e| anyhow::anyhow!("invalid REDIS_SENTINEL_URLS: {e}"))
    }

    /// Where `config` puts the cache: a cluster, a Sentinel-managed primary, or one Redis.
    pub fn from_config(config: &CacheConfig) -> anyhow::Result<Topology> {
        let tls_ca = config.redis_tls_ca_file.as_deref();
        let info = |url: &crate::config::SecretUrl| connection_info(url.expose(), tls_ca);
        Ok(if !config.redis_cluster_urls.is_empty() {
            Topology::Cluster(
                config
                    .redis_cluster_urls
                    .iter()
                    .map(info)
                    .collect::<anyhow::Result<_>>()?,
            )
        } else if !config.redis_sentinel_urls.is_empty() {
            Topology::Sentinel {
                sentinels: config
                    .redis_sentinel_urls
                    .iter()
                    .map(info)
                    .collect::<anyhow::Result<_>>()?,
                master: config.redis_sentinel_master.clone(),
                node: Box::new(info(&config.redis_url)?),
            }
        } else {
            Topology::Single(Box::new(info(&config.redis_url)?))
        })
    }

    /// Whether this is a Redis Cluster, where a command's keys must share a
    /// hash slot and a pipeline may not span slots.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Topology::Cluster(_))
    }

    /// `commands` (each with the key that routes it) as the pipelines that
    /// carry them, each with the positions of its commands: one pipeline to a
    /// single Redis; one per hash slot to a cluster.
    pub fn pipelines(&self, commands: Vec<(&str, redis::Cmd)>) -> Vec<(Vec<usize>, redis::Pipeline)> {
        if !self.is_cluster() {
            let count = commands.len();
            let mut pipe = redis::pipe();
            for (_, cmd) in commands {
                pipe.add_command(cmd);
            }
            return vec![((0..count).collect(), pipe)];
        }
        let mut by_slot: HashMap<Slot, (Vec<usize>, redis::Pipeline)> = HashMap::new();
        for (index, (key, cmd)) in commands.into_iter().enumerate() {
            let (indices, pipe) = by_slot
                .entry(Slot::for_key(key))
                .or_insert_with(|| (Vec::new(), redis::pipe()));
            indices.push(index);
            pipe.add_command(cmd);
        }
        by_slot.into_values().collect()
    }
}

pub(super) fn client(info: &redis::ConnectionInfo) -> anyhow::Result<redis::Client> {
    redis::Client::open(info.clone()).map_err(|e| anyhow::anyhow!("invalid Redis URL: {e}"))
}

/// The URL's connection settings, with `TCP_NODELAY`: without it a command
/// written while an earlier one is unacknowledged waits for the delayed ACK
/// (Nagle's algorithm), tens of milliseconds on an otherwise idle link.
///
/// A `rediss://` URL connects with TLS, trusting the system's roots, or only
/// the CA in `tls_ca_file` when given. User and password in the URL
/// authenticate as that ACL user.
pub fn connection_info(url: &str, tls_ca_file: Option<&Path>) -> anyhow::Result<ConnectionInfo> {
    let info = url
        .into_connection_info()
        .map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))?;
    let info = match tls_ca_file {
        None => info,
        Some(path) => {
            let root_cert =
                std::fs::read(path).with_context(|| format!("reading REDIS_TLS_CA_FILE {}", path.display()))?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(info, certificates)
                .map_err(|e| anyhow::anyhow!("REDIS_TLS_CA_FILE {}: {e}", path.display()))?
                .get_connection_info()
                .clone()
        }
    };
    Ok(info.set_tcp_settings(TcpSettings::default().set_nodelay(true)))
}

/// The (host, port) of each master that is not failing in a `CLUSTER NODES`
/// reply (`<id> <host>:<port>@<bus port> <flags> …`).
pub(super) fn masters_of(nodes: &str) -> Vec<(String, u16)> {
    live_nodes(nodes, |flags| flags.split(',').any(|f| f == "master"))
}

/// The (host, port) of each node not known to be failing, master or replica.
pub(super) fn nodes_of(nodes: &str) -> Vec<(String, u16)> {
    live_nodes(nodes, |_| true)
}

fn live_nodes(nodes: &str, wanted: impl Fn(&str) -> bool) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let live = wanted(flags) && !flags.contains("fail") && !flags.contains("noaddr");
            let (host, port) = address.split('@').next()?.rsplit_once(':')?;
            live.then(|| Some((host.to_string(), port.parse().ok()?)))?
        })
        .collect()
}

/// The slot-serving masters of `CLUSTER NODES` output (see `slot_owners`):
/// `<id> <address> <flags> <master> <ping> <pong> <config epoch> <link> <slots...>`.
pub(super) fn slot_owners_of(nodes: &str) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::{masters_of, slot_owners_of};

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
}
