# shellcheck shell=bash
# A throwaway Redis server for sagaflow's tests, for CI and developers alike.
#
#     source .ci/redis.sh
#     redis_start               # prints and exports SAGAFLOW_REDIS_URL
#     python -m pytest -q tests/test_redis.py
#     redis_stop                # stops the server and deletes its files
#
# redis_start finds redis-server on PATH. If there is none and we are root, it installs
# Debian's `redis-server` package; otherwise it says what to install. The server listens
# on 127.0.0.1 only, at a free port, keeps nothing on disk (no RDB snapshots, no AOF) and
# runs in the background with its pid file and log in a fresh temporary directory. This
# file is meant to be sourced; it sets no shell options.
#
# Exported after redis_start: SAGAFLOW_REDIS_URL, REDIS_TMPDIR (pid file and log.txt),
# REDIS_PORT.

_redis_log() { printf 'redis.sh: %s\n' "$*" >&2; }

_redis_install() {
    if [[ $(id -u) -ne 0 ]]; then
        _redis_log "no redis-server found; install one (Debian: apt-get install redis-server)"
        return 1
    fi
    _redis_log "no redis-server found; installing Debian's redis-server package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || return 1
    apt-get install -y -q --no-install-recommends redis-server >&2 || return 1
}

_redis_free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# Start the server and export SAGAFLOW_REDIS_URL. If it cannot, it cleans up after
# itself and returns non-zero.
redis_start() {
    if [[ -n ${REDIS_TMPDIR:-} && -d ${REDIS_TMPDIR:-} ]]; then
        _redis_log "already started in $REDIS_TMPDIR (redis_stop first)"
        return 1
    fi
    local rc=0
    _redis_start || rc=$?
    if ((rc != 0)); then
        redis_stop
    fi
    return "$rc"
}

_redis_start() {
    if ! command -v redis-server >/dev/null 2>&1; then
        _redis_install || return 1
        command -v redis-server >/dev/null 2>&1 || {
            _redis_log "redis-server not found even after installing it"
            return 1
        }
    fi
    REDIS_TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/sagaflow-redis.XXXXXX") || return 1
    export REDIS_TMPDIR
    # A free port can be taken by someone else before the server binds it: try a few.
    local attempt
    for attempt in 1 2 3 4 5; do
        REDIS_PORT=$(_redis_free_port) || {
            _redis_log "python3 could not find a free port"
            return 1
        }
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
            --dir "$REDIS_TMPDIR" --pidfile "$REDIS_TMPDIR/redis.pid" \
            --logfile "$REDIS_TMPDIR/log.txt" --daemonize yes >/dev/null || true
        local waited
        for waited in $(seq 1 100); do
            if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
                export REDIS_PORT
                export SAGAFLOW_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
                _redis_log "$(redis-server --version | awk '{print $1, $2, $3}') up: SAGAFLOW_REDIS_URL=$SAGAFLOW_REDIS_URL"
                return 0
            fi
            sleep 0.05
        done
        _redis_log "start on port $REDIS_PORT failed (attempt $attempt):"
        tail -n 5 "$REDIS_TMPDIR/log.txt" >&2 2>/dev/null || true
        _redis_kill
    done
    REDIS_PORT=
    _redis_log "could not start the server"
    return 1
}

_redis_kill() {
    local pid
    if [[ -f $REDIS_TMPDIR/redis.pid ]]; then
        pid=$(cat "$REDIS_TMPDIR/redis.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        rm -f -- "$REDIS_TMPDIR/redis.pid"
    fi
}

# Stop the server started by redis_start and delete its files. Safe to call twice, or
# after a redis_start that failed half-way.
redis_stop() {
    if [[ -z ${REDIS_TMPDIR:-} ]]; then
        return 0
    fi
    _redis_kill
    rm -rf -- "$REDIS_TMPDIR"
    unset REDIS_TMPDIR REDIS_PORT SAGAFLOW_REDIS_URL
}
