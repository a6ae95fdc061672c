#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests that tune one study from many
# processes (tests/schedules/test_distributed_tune.py). CI and developers use the same script:
#
#   export TWILIGHT_TEST_PG_URL=$(.ci/postgres.sh start)   # prints the server's URL
#   python -m pytest tests/schedules
#   .ci/postgres.sh stop
#
#   start   install PostgreSQL if missing (apt-get), create a cluster and start it on
#           127.0.0.1 at a free port; print postgresql://USER:PASSWORD@127.0.0.1:PORT/postgres
#           (already running: print its URL again)
#   url     print the URL of the running server
#   stop    stop the server and delete its cluster
#
# The cluster lives in $TWILIGHT_PG_DIR (default: a folder under /tmp named after this
# checkout, so worktrees do not share one). initdb refuses to run as root: as root the server
# runs as the unprivileged user $TWILIGHT_PG_USER (default: postgres, created if missing).
# The password is random per cluster and stays in the cluster folder (mode 600).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd -P)
dir=${TWILIGHT_PG_DIR:-/tmp/twilight-pg-$(printf %s "$repo" | sha256sum | cut -c1-12)}
os_user=${TWILIGHT_PG_USER:-postgres}
db_user=twilight

find_bin() {  # the directory holding initdb and pg_ctl, or nothing
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(command -v pg_ctl)"
        return
    fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

install() {
    [ -n "$(find_bin)" ] && return
    if [ "$(id -u)" != 0 ]; then
        echo "postgres.sh: PostgreSQL server binaries not found; install them (apt-get install" \
             "postgresql) or run this script as root" >&2
        exit 1
    fi
    echo "postgres.sh: installing PostgreSQL with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    }
}

as_owner() {  # run a command as the cluster's owner (root cannot own a cluster)
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$os_user" -- "$@"
    else
        "$@"
    fi
}

url() {
    echo "postgresql://$db_user:$(cat "$dir/password")@127.0.0.1:$(cat "$dir/port")/postgres"
}

running() {
    [ -f "$dir/port" ] && as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

start() {
    install
    bin=$(find_bin)
    if running; then
        url
        return
    fi
    if [ "$(id -u)" = 0 ] && ! id "$os_user" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$os_user"
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    chmod 700 "$dir"
    python3 -c 'import secrets; print(secrets.token_hex(12))' > "$dir/password"
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        > "$dir/port"
    [ "$(id -u)" = 0 ] && chown -R "$os_user" "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -U "$db_user" --pwfile="$dir/password" \
        --auth=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        exit 1
    }
    # fsync off and a small footprint: a test server whose data may be lost on a crash
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $(cat "$dir/port") -c listen_addresses=127.0.0.1 -k $dir -c fsync=off \
            -c synchronous_commit=off -c full_page_writes=off -c max_connections=60 \
            -c shared_buffers=32MB" start >/dev/null || {
        cat "$dir/server.log" >&2
        exit 1
    }
    url
}

stop() {
    bin=$(find_bin)
    if [ -n "$bin" ] && [ -d "$dir/data" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) bin=$(find_bin); running && url || { echo "postgres.sh: not running" >&2; exit 1; } ;;
    *) echo "usage: $0 start|url|stop" >&2; exit 2 ;;
esac
