#!/bin/sh
# First start on an empty data directory: initdb with the role from POSTGRES_USER/POSTGRES_PASSWORD, the
# database POSTGRES_DB, password authentication over the network; then run the server in the foreground.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [ "$db" != postgres ]; then
        pg_ctl --wait --silent -o "-c listen_addresses=''" start
        createdb --username="$user" "$db"
        pg_ctl --wait --silent --mode=fast stop
    fi
    echo "postgres-entrypoint: initialised $PGDATA (role $user, database $db)"
fi
exec "$@"
