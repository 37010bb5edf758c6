#!/bin/bash
# Run once by the postgres image when its data directory is new
# (/docker-entrypoint-initdb.d): the role the replica of the `scale` profile
# streams as, and leave for it to connect from the compose network.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
  -c "CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'dev-replicator-password'"
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
