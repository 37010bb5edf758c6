#!/bin/bash
# The streaming replica of the `scale` profile. On a new volume it copies the
# primary (`pg_basebackup -R` also writes standby.signal and the
# primary_conninfo to stream from it), then runs PostgreSQL as a hot standby:
# read-only, replaying what the primary writes.
set -euo pipefail
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_basebackup -h postgres -U replicator -D "$PGDATA" -R -X stream --checkpoint=fast; do
    echo "waiting for the primary to accept a base backup"
    sleep 1
  done
  chmod 0700 "$PGDATA"
fi
exec postgres -D "$PGDATA" -c hot_standby=on
