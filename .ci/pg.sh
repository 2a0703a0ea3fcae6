# shellcheck shell=bash
# A throwaway PostgreSQL server for sagaflow's tests, for CI and developers alike.
#
#     source .ci/pg.sh
#     pg_start                  # prints and exports SAGAFLOW_PG_DSN
#     python -m pytest -q -m postgres
#     pg_stop                   # stops the server and deletes its files
#
# pg_start finds initdb/pg_ctl (PATH, then /usr/lib/postgresql/*/bin, newest first). If
# there are none and we are root, it installs Debian's `postgresql` package; otherwise it
# says what to install. It creates a cluster in a fresh temporary directory, listening on a
# unix socket in that directory and on 127.0.0.1 at a free port, with trust authentication
# (nothing but loopback and the socket can reach it), and creates the database
# `sagaflow_test`. PostgreSQL refuses to run as root, so as root the server runs as the
# `postgres` system user (created if missing); as anyone else it runs as you.
#
# The server is tuned for throwaway test data (fsync=off): process crashes lose nothing,
# only an OS crash could. This file is meant to be sourced; it sets no shell options.
#
# Exported after pg_start: SAGAFLOW_PG_DSN, PG_BIN, PG_TMPDIR (data, socket and log.txt),
# PG_PORT.

PG_DATABASE=${PG_DATABASE:-sagaflow_test}

_pg_log() { printf 'pg.sh: %s\n' "$*" >&2; }

# Print the directory holding initdb and pg_ctl, or fail.
_pg_find_bin() {
    local dir
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dir=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
        if [[ -x $dir/initdb ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    fi
    # Debian puts the server binaries off PATH; take the newest major version.
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn); do
        if [[ -x $dir/initdb && -x $dir/pg_ctl ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    return 1
}

_pg_install() {
    if [[ $(id -u) -ne 0 ]]; then
        _pg_log "no PostgreSQL server found; install one (Debian: apt-get install postgresql)"
        return 1
    fi
    _pg_log "no PostgreSQL server found; installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || return 1
    apt-get install -y -q --no-install-recommends postgresql >&2 || return 1
}

# Run a command as the server's owner (see the header), in a directory it can read.
_pg_as_owner() {
    if [[ $(id -u) -ne 0 ]]; then
        (cd "$PG_TMPDIR" && "$@")
    elif command -v runuser >/dev/null 2>&1; then
        (cd "$PG_TMPDIR" && runuser -u postgres -- "$@")
    else
        local quoted
        quoted=$(printf '%q ' "$@")
        (cd "$PG_TMPDIR" && su postgres -s /bin/sh -c "$quoted")
    fi
}

_pg_free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# Start the server and export SAGAFLOW_PG_DSN. If it cannot, it cleans up after itself
# and returns non-zero.
pg_start() {
    if [[ -n ${PG_TMPDIR:-} && -d ${PG_TMPDIR:-} ]]; then
        _pg_log "already started in $PG_TMPDIR (pg_stop first)"
        return 1
    fi
    local rc=0
    _pg_start || rc=$?
    if ((rc != 0)); then
        pg_stop
    fi
    return "$rc"
}

_pg_start() {
    PG_BIN=$(_pg_find_bin) || { _pg_install && PG_BIN=$(_pg_find_bin); } || {
        _pg_log "initdb/pg_ctl not found even after installing postgresql"
        return 1
    }
    export PG_BIN
    # As root, the postgres user must reach the directory: /tmp, not root's own TMPDIR.
    local base=${TMPDIR:-/tmp}
    if [[ $(id -u) -eq 0 ]]; then
        base=/tmp
    fi
    PG_TMPDIR=$(mktemp -d "$base/sagaflow-pg.XXXXXX") || return 1
    export PG_TMPDIR
    if [[ $(id -u) -eq 0 ]]; then
        if ! id -u postgres >/dev/null 2>&1; then
            _pg_log "creating the postgres system user"
            useradd --system --user-group --no-create-home --home-dir /nonexistent \
                --shell /bin/sh postgres || return 1
        fi
        chown postgres: "$PG_TMPDIR" || return 1
    fi
    # The socket path must stay short (about 100 bytes): a long TMPDIR would break it.
    if ((${#PG_TMPDIR} > 80)); then
        _pg_log "PG_TMPDIR path too long for a unix socket: $PG_TMPDIR (set TMPDIR=/tmp)"
        return 1
    fi

    _pg_as_owner "$PG_BIN/initdb" --pgdata="$PG_TMPDIR/data" --username=postgres \
        --auth=trust --encoding=UTF8 --locale=C --no-sync >"$PG_TMPDIR/initdb.txt" 2>&1 || {
        cat "$PG_TMPDIR/initdb.txt" >&2
        _pg_log "initdb failed"
        return 1
    }

    # A free port can be taken by someone else before the server binds it: try a few.
    local attempt
    for attempt in 1 2 3 4 5; do
        PG_PORT=$(_pg_free_port) || {
            _pg_log "python3 could not find a free port"
            return 1
        }
        if _pg_as_owner "$PG_BIN/pg_ctl" --pgdata="$PG_TMPDIR/data" \
            --log="$PG_TMPDIR/log.txt" --wait --timeout=60 --silent \
            -o "-p $PG_PORT -k $PG_TMPDIR -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200" \
            start; then
            break
        fi
        _pg_log "start on port $PG_PORT failed (attempt $attempt):"
        tail -n 5 "$PG_TMPDIR/log.txt" >&2 2>/dev/null || true
        PG_PORT=
    done
    if [[ -z ${PG_PORT:-} ]]; then
        _pg_log "could not start the server"
        return 1
    fi
    export PG_PORT

    _pg_as_owner "$PG_BIN/createdb" --host="$PG_TMPDIR" --port="$PG_PORT" \
        --username=postgres "$PG_DATABASE" || {
        _pg_log "createdb $PG_DATABASE failed"
        return 1
    }
    export SAGAFLOW_PG_DSN="postgresql://postgres@127.0.0.1:$PG_PORT/$PG_DATABASE"
    _pg_log "PostgreSQL $("$PG_BIN/pg_ctl" --version | awk '{print $3}') up: SAGAFLOW_PG_DSN=$SAGAFLOW_PG_DSN"
}

# Stop the server started by pg_start and delete its files. Safe to call twice, or after
# a pg_start that failed half-way.
pg_stop() {
    if [[ -z ${PG_TMPDIR:-} ]]; then
        return 0
    fi
    if [[ -f $PG_TMPDIR/data/postmaster.pid ]]; then
        _pg_as_owner "$PG_BIN/pg_ctl" --pgdata="$PG_TMPDIR/data" --mode=fast --wait \
            --timeout=60 --silent stop || _pg_log "pg_ctl stop failed (see $PG_TMPDIR/log.txt)"
    fi
    rm -rf -- "$PG_TMPDIR"
    unset PG_TMPDIR PG_PORT SAGAFLOW_PG_DSN
}
