#!/bin/bash
# Joins the `scale` profile's three Redis nodes into a cluster of three
# masters, unless they form one already. redis-cli takes addresses, not
# names. REDISCLI_AUTH holds the password.
set -euo pipefail
nodes=(redis-node-1 redis-node-2 redis-node-3)
if redis-cli -h "${nodes[0]}" cluster info | grep -q '^cluster_state:ok'; then
  echo "the cluster exists"
  exit 0
fi
addresses=()
for node in "${nodes[@]}"; do
  addresses+=("$(getent hosts "$node" | cut -d' ' -f1):6379")
done
redis-cli --cluster create "${addresses[@]}" --cluster-replicas 0 --cluster-yes
until redis-cli -h "${nodes[0]}" cluster info | grep -q '^cluster_state:ok'; do sleep 0.5; done
