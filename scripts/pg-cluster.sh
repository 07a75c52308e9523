#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and benchmarks, without Docker.
#
#   eval "$(scripts/pg-cluster.sh start DIR)"  # new cluster in DIR (absent or empty)
#   scripts/pg-cluster.sh pause DIR           # stop the server, keep its data
#   scripts/pg-cluster.sh resume DIR          # start it again, same port and data
#   scripts/pg-cluster.sh stop DIR            # stop the server and delete DIR
#
# `start` prints, on stdout and in DIR/env.sh, shell lines exporting
#   LINKID_TEST_PG_URL  postgres://linkid_test:PASSWORD@127.0.0.1:PORT/postgres
#                       (a superuser with a random password; scram-sha-256)
#   LINKID_TEST_PG_CA   DIR/ca.crt, the CA of the server's certificate (CN and
#                       DNS name localhost, IP 127.0.0.1), for sslmode=verify-full
#   LINKID_TEST_PG_DIR  DIR
# Everything else goes to stderr. The server listens on 127.0.0.1 only (a free
# port below the ephemeral range) and on a unix socket in DIR; TCP needs the
# password, with or without TLS. fsync stays on: a test may crash it.
#
# Needs initdb and pg_ctl: from PATH, else the newest /usr/lib/postgresql/*/bin,
# else (as root, or with sudo) Debian's postgresql package is installed. The
# package's default "main" cluster is stopped; it is never used. PostgreSQL
# refuses to run as root: as root, DIR belongs to the `postgres` system user
# and the server runs as that user, so DIR's parents must be searchable by it
# (anything under /tmp is).
#
# Settings (environment): PG_BINDIR (where initdb and pg_ctl are),
# PG_START_TIMEOUT=60 (seconds to wait for the server to accept connections).
set -euo pipefail

prog=$(basename "$0")
say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

START_TIMEOUT=${PG_START_TIMEOUT:-60}
MARKER=.linkid-pg-cluster
ROLE=linkid_test

# libpq settings of the caller must not steer our own psql and pg_isready.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PG' | grep -v '^PG_' || true)

is_root() { [[ $(id -u) -eq 0 ]]; }

# as_server CMD...: run CMD as the user the server runs as, from /.
as_server() {
    if is_root; then
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u postgres -- "$@")
        else
            (cd / && su postgres -s /bin/sh -c 'exec "$@"' sh "$@")
        fi
    else
        (cd / && "$@")
    fi
}

# ---------------------------------------------------------------- binaries
find_bindir() {
    local d
    if [[ -n ${PG_BINDIR:-} ]]; then
        echo "$PG_BINDIR"
        return 0
    fi
    # (through symlinks: psql and postgres are next to the real initdb)
    if d=$(command -v initdb 2>/dev/null) && d=$(dirname "$(readlink -f "$d")") && [[ -x $d/pg_ctl ]]; then
        echo "$d"
        return 0
    fi
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; then
        echo "$d"
        return 0
    fi
    return 1
}

install_postgresql() {
    local sudo=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 ||
            die "PostgreSQL (initdb, pg_ctl) is not installed and this is neither root nor has sudo: install Debian's postgresql package (or set PG_BINDIR) and run again"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "PostgreSQL (initdb, pg_ctl) is not installed and there is no apt-get: install PostgreSQL (or set PG_BINDIR) and run again"
    say "installing PostgreSQL (Debian's postgresql package)"
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    # postgresql-common may have made and started a default cluster; we never
    # use it, so stop it.
    if command -v pg_lsclusters >/dev/null 2>&1; then
        local ver name _
        while read -r ver name _; do
            "${sudo[@]}" pg_ctlcluster "$ver" "$name" stop >&2 2>&1 || true
        done < <(pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1, $2}')
    fi
}

BINDIR=
need_binaries() {
    if [[ -n ${PG_BINDIR:-} && ! ( -x $PG_BINDIR/initdb && -x $PG_BINDIR/pg_ctl ) ]]; then
        die "PG_BINDIR=$PG_BINDIR has no initdb and pg_ctl"
    fi
    BINDIR=$(find_bindir) || { install_postgresql; BINDIR=$(find_bindir) || die "installed postgresql, but still no initdb and pg_ctl"; }
    PSQL=$BINDIR/psql
    [[ -x $PSQL ]] || PSQL=$(command -v psql) || die "no psql next to $BINDIR/initdb nor on PATH"
    PG_ISREADY=$BINDIR/pg_isready
    [[ -x $PG_ISREADY ]] || PG_ISREADY=$(command -v pg_isready) || die "no pg_isready next to $BINDIR/initdb nor on PATH"
    command -v openssl >/dev/null 2>&1 || die "openssl is needed for the server's certificate"
    if is_root; then
        id postgres >/dev/null 2>&1 ||
            die "running as root needs the 'postgres' system user (PostgreSQL refuses to run as root); install Debian's postgresql package or run as another user"
    fi
}

# ---------------------------------------------------------------- helpers
abs_dir() { # an absolute path without resolving symlinks of the last part
    local d=$1
    [[ $d == /* ]] || d=$PWD/$d
    echo "${d%/}"
}

check_cluster_dir() { # a directory this script made
    [[ -f $DIR/$MARKER && -d $DIR/data ]] || die "$DIR is not a cluster made by $prog start"
}

port_busy() { # something listens on 127.0.0.1:PORT
    if command -v ss >/dev/null 2>&1; then
        ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() { # a free port below the ephemeral range, so that no outgoing
    # connection takes it while the server is paused
    local lo=20000 hi eph i p
    eph=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    hi=$((eph - 1))
    (( hi > lo + 1000 )) || { lo=10000; hi=$((eph - 1)); }
    for ((i = 0; i < 200; i++)); do
        p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo + 1)))
        port_busy "$p" || { echo "$p"; return 0; }
    done
    die "found no free port on 127.0.0.1 between $lo and $hi"
}

server_running() {
    [[ -f $DIR/data/postmaster.pid ]] || return 1
    as_server "$BINDIR/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1
}

show_log() {
    if [[ -f $DIR/postgres.log ]]; then
        say "last lines of $DIR/postgres.log:"
        tail -n 40 "$DIR/postgres.log" >&2 || true
    fi
}

# detached CMD...: run CMD with no file descriptors but 0, 1 and 2, so that
# the server never holds a pipe of its caller open (e.g. that of "$(...)").
detached() {
    (
        local fd
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [[ $fd -gt 2 && $fd -ne 255 ]] && eval "exec $fd>&-"
        done 2>/dev/null
        "$@"
    )
}

# start_server PORT: start, and wait until TCP connections are accepted.
# Returns 2 when the port was taken (the caller may try another one).
start_server() {
    local port=$1 started=$SECONDS logged=0
    [[ -f $DIR/postgres.log ]] && logged=$(wc -c <"$DIR/postgres.log")
    if ! detached as_server "$BINDIR/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -o "-p $port" \
        -w -t "$START_TIMEOUT" start >/dev/null 2>"$DIR/pg_ctl.err"; then
        # (only what this start logged)
        if tail -c +$((logged + 1)) "$DIR/postgres.log" 2>/dev/null |
            grep -qi 'could not bind\|address already in use\|could not create any TCP/IP sockets'; then
            return 2
        fi
        cat "$DIR/pg_ctl.err" >&2 || true
        show_log
        die "the server in $DIR did not start"
    fi
    # pg_ctl -w saw the postmaster ready; make sure TCP answers too.
    until as_server "$PG_ISREADY" -q -h 127.0.0.1 -p "$port" -d postgres -t 1; do
        if (( SECONDS - started > START_TIMEOUT )); then
            show_log
            die "the server in $DIR does not accept connections on 127.0.0.1:$port after ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

stop_server() {
    server_running || return 0
    as_server "$BINDIR/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >/dev/null 2>&1 ||
        as_server "$BINDIR/pg_ctl" -D "$DIR/data" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
        { show_log; die "could not stop the server in $DIR"; }
}

make_certificates() { # in DIR: ca.crt, server.crt, server.key (CA key discarded)
    local tmp=$DIR/tls.tmp
    mkdir -m 0700 "$tmp"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 30 \
        -keyout "$tmp/ca.key" -out "$DIR/ca.crt" -subj "/CN=linkid test CA (throwaway)" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>"$tmp/openssl.log" || { cat "$tmp/openssl.log" >&2; die "openssl could not make the CA"; }
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -keyout "$DIR/server.key" -out "$tmp/server.csr" -subj "/CN=localhost" \
        2>"$tmp/openssl.log" || { cat "$tmp/openssl.log" >&2; die "openssl could not make the server key"; }
    cat >"$tmp/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
    openssl x509 -req -in "$tmp/server.csr" -CA "$DIR/ca.crt" -CAkey "$tmp/ca.key" \
        -set_serial "0x$(openssl rand -hex 8)" -days 30 -sha256 -extfile "$tmp/server.ext" \
        -out "$DIR/server.crt" 2>"$tmp/openssl.log" ||
        { cat "$tmp/openssl.log" >&2; die "openssl could not sign the server certificate"; }
    rm -rf "$tmp"
    chmod 0644 "$DIR/ca.crt" "$DIR/server.crt"
    chmod 0600 "$DIR/server.key"
}

# ---------------------------------------------------------------- commands
create_cluster() {
    need_binaries
    if [[ -e $DIR ]]; then
        [[ -d $DIR ]] || die "$DIR exists and is not a directory"
        [[ -z $(ls -A "$DIR") ]] || die "$DIR is not empty (start makes a new cluster in an absent or empty directory)"
    else
        mkdir -p "$DIR"
    fi
    local sock_len=$((${#DIR} + 17))
    (( sock_len < 108 )) || die "$DIR is too long a path for the server's unix socket; use a shorter one (e.g. under /tmp)"
    chmod 0700 "$DIR"
    touch "$DIR/$MARKER"
    if is_root; then
        chown postgres: "$DIR"
        as_server test -w "$DIR" ||
            die "the postgres user cannot reach $DIR: its parent directories must be searchable by others (use one under /tmp)"
    fi

    local t0=$SECONDS
    say "new cluster in $DIR ($("$BINDIR/postgres" --version 2>/dev/null || echo "$BINDIR"))"
    # --no-sync: a cluster that a crash could damage is one nobody keeps.
    as_server "$BINDIR/initdb" -D "$DIR/data" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 --no-sync >"$DIR/initdb.log" 2>&1 ||
        { cat "$DIR/initdb.log" >&2; die "initdb failed"; }

    make_certificates
    if is_root; then chown postgres: "$DIR/server.key" "$DIR/server.crt" "$DIR/ca.crt"; fi

    local sockdir=${DIR//\'/\'\'}
    cat >>"$DIR/data/postgresql.conf" <<EOF

# ---- $prog: a throwaway server for tests
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sockdir'
max_connections = 400
shared_buffers = 32MB
# durable: a test may kill the server and expects committed data back
fsync = on
synchronous_commit = on
full_page_writes = on
# short queries only; JIT would only add latency
jit = off
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '$sockdir/server.crt'
ssl_key_file = '$sockdir/server.key'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    cat >"$DIR/data/pg_hba.conf" <<'EOF'
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  scram-sha-256
EOF
    if is_root; then chown postgres: "$DIR/data/postgresql.conf" "$DIR/data/pg_hba.conf"; fi

    local port tries rc
    for ((tries = 0; ; tries++)); do
        port=$(pick_port)
        rc=0
        start_server "$port" || rc=$?
        [[ $rc -eq 0 ]] && break
        (( tries < 5 )) || { show_log; die "could not bind a port on 127.0.0.1"; }
        say "port $port was taken; trying another"
    done
    # From now on the port is part of the cluster (resume uses it).
    echo "port = $port" >>"$DIR/data/postgresql.conf"
    echo "$port" >"$DIR/port"

    local password
    password=$(openssl rand -hex 24)
    as_server "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$port" -U postgres -d postgres >/dev/null <<EOF ||
CREATE ROLE $ROLE SUPERUSER LOGIN PASSWORD '$password';
EOF
        { show_log; die "could not create the role $ROLE"; }

    local url="postgres://$ROLE:$password@127.0.0.1:$port/postgres"
    {
        printf 'export LINKID_TEST_PG_URL=%q\n' "$url"
        printf 'export LINKID_TEST_PG_CA=%q\n' "$DIR/ca.crt"
        printf 'export LINKID_TEST_PG_DIR=%q\n' "$DIR"
    } >"$DIR/env.sh"
    chmod 0600 "$DIR/env.sh"
    say "PostgreSQL ready on 127.0.0.1:$port (plain and TLS) and in $DIR, after $((SECONDS - t0)) s"
}

cmd_start() {
    create_cluster >&2 # only the export lines go to stdout
    cat "$DIR/env.sh"
}

cmd_pause() {
    [[ -d $DIR ]] || die "$DIR does not exist"
    check_cluster_dir
    need_binaries
    if ! server_running; then
        say "the server in $DIR is already stopped"
        return 0
    fi
    stop_server
    say "paused the server in $DIR (data kept; resume with: $prog resume $DIR)"
}

cmd_resume() {
    [[ -d $DIR ]] || die "$DIR does not exist"
    check_cluster_dir
    need_binaries
    local port
    port=$(cat "$DIR/port" 2>/dev/null) || die "$DIR has no port file: was it started?"
    if server_running; then
        say "the server in $DIR is already running (port $port)"
        return 0
    fi
    local rc=0
    start_server "$port" || rc=$?
    if [[ $rc -eq 2 ]]; then
        show_log
        die "port $port on 127.0.0.1 is taken by another process; cannot resume $DIR there"
    fi
    say "resumed the server in $DIR on 127.0.0.1:$port"
}

cmd_stop() {
    if [[ ! -e $DIR ]]; then
        say "$DIR does not exist; nothing to stop"
        return 0
    fi
    if [[ -d $DIR && -z $(ls -A "$DIR") ]]; then
        rmdir "$DIR" # a start that failed before it began
        return 0
    fi
    [[ -f $DIR/$MARKER ]] || die "$DIR was not made by $prog start; not deleting it"
    if [[ -f $DIR/data/postmaster.pid ]]; then
        need_binaries
        stop_server
    fi
    rm -rf "$DIR"
    say "stopped and deleted $DIR"
}

case ${1:-} in
    -h | --help | help) usage; exit 0 ;;
    start | stop | pause | resume)
        [[ $# -eq 2 && -n $2 ]] || { usage >&2; exit 2; }
        DIR=$(abs_dir "$2")
        "cmd_$1"
        ;;
    *) usage >&2; exit 2 ;;
esac
