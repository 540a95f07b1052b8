#!/bin/sh
# Ready means: accepting connections for the database, and no data checksum failures
# (the same test as Immich's postgres image).
set -eu
user=${POSTGRES_USER:-${DB_USERNAME:-postgres}}
db=${POSTGRES_DB:-${DB_DATABASE_NAME:-$user}}
pg_isready -q -h /var/run/postgresql -U "$user" -d "$db"
failures=$(psql -h /var/run/postgresql -U "$user" -d "$db" -tAc \
  "SELECT COALESCE(SUM(checksum_failures), 0) FROM pg_stat_database")
[ "$failures" = 0 ]
