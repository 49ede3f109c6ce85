#!/usr/bin/env bash
# Cluster mode on one machine, in one command: a PostgreSQL registry, three kframe
# replicas on loopback ports and HAProxy in front (examples/cluster/haproxy.cfg),
# until Ctrl-C (or SIGTERM), which stops them all. Everything lives in target/cluster
# (KFRAME_CLUSTER_DIR to move it); a second run reuses its database and secrets.
#
#   examples/cluster/run.sh          # HAProxy on 127.0.0.1:8090 (KFRAME_CLUSTER_PORT)
#
# It needs PostgreSQL (initdb, pg_ctl) and HAProxy; as root it installs HAProxy
# with apt when missing and runs PostgreSQL as the postgres user (initdb refuses root).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=$(realpath -m "${KFRAME_CLUSTER_DIR:-target/cluster}")
front_port=${KFRAME_CLUSTER_PORT:-8090}
pg_port=$((front_port + 1))
replica_ports=($((front_port + 2)) $((front_port + 3)) $((front_port + 4)))

if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    [ "$(id -u)" = 0 ] || { echo "install HAProxy first (apt-get install haproxy)" >&2; exit 1; }
    apt-get update -qq && apt-get install -y -qq haproxy >/dev/null
fi
haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)
pg_bin=${KFRAME_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$pg_bin/initdb" ] || { echo "no PostgreSQL found (set KFRAME_PG_BIN to its bin directory)" >&2; exit 1; }

# Build kframe and its plugins (release), as scripts/run.sh does.
source scripts/setup.sh
./scripts/build-plugins.sh
cargo build --release --quiet -p kframe
kframe=$PWD/target/release/kframe

mkdir -p "$dir"
as_pg=()
if [ "$(id -u)" = 0 ]; then
    as_pg=(runuser -u postgres --)
fi
if [ ! -d "$dir/pg" ]; then
    mkdir -p "$dir/pg"
    [ ${#as_pg[@]} -eq 0 ] || chown postgres:postgres "$dir/pg"
    "${as_pg[@]}" "$pg_bin/initdb" -A trust -U kframe -E UTF8 -D "$dir/pg/data" >"$dir/initdb.log"
fi
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w \
    -o "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1" start >/dev/null
registry="postgres://kframe@127.0.0.1:$pg_port/postgres"

# One master secret and one admin token for every replica, made once, mode 0600.
if [ ! -f "$dir/secrets/master.key" ]; then
    (umask 077 && mkdir -p "$dir/secrets" &&
        head -c 32 /dev/urandom >"$dir/secrets/master.key" &&
        echo "kfa-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/secrets/admin.token")
fi

pids=()
stop() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$dir/pg/data" -w -m fast stop >/dev/null 2>&1 || true
}
trap stop EXIT
trap 'exit 130' INT TERM

for i in 0 1 2; do
    name=$(printf "\\x$(printf %x $((97 + i)))")
    "$kframe" serve --registry "$registry" --secrets-dir "$dir/secrets" --data-dir "$dir/data-$name" \
        --replica-name "$name" --addr "127.0.0.1:${replica_ports[$i]}" >"$dir/replica-$name.log" 2>&1 &
    pids+=($!)
done
for port in "${replica_ports[@]}"; do
    for _ in $(seq 1 100); do
        curl -sf "127.0.0.1:$port/health" >/dev/null && break
        sleep 0.2
    done
    curl -sf "127.0.0.1:$port/health" >/dev/null || { echo "a replica did not start; see $dir/replica-*.log" >&2; exit 1; }
done
KFRAME_LISTEN="127.0.0.1:$front_port" \
    KFRAME_REPLICA_A="127.0.0.1:${replica_ports[0]}" KFRAME_REPLICA_B="127.0.0.1:${replica_ports[1]}" \
    KFRAME_REPLICA_C="127.0.0.1:${replica_ports[2]}" \
    "$haproxy" -db -f examples/cluster/haproxy.cfg >"$dir/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do
    curl -sf "127.0.0.1:$front_port/health" >/dev/null && break
    sleep 0.1
done

cat <<MSG
kframe cluster: HAProxy on http://127.0.0.1:$front_port -> replicas a, b, c on ports ${replica_ports[*]}
registry $registry; logs and data in $dir; Ctrl-C stops everything.
try:
    admin=\$(cat $dir/secrets/admin.token)
    curl -s 127.0.0.1:$front_port/admin/tenants -H "Authorization: Bearer \$admin" -d '{"name":"alice"}'
    curl -si 127.0.0.1:$front_port/v1/completions -H "Authorization: Bearer kf_1_..." \\
        -d '{"prompt":"user secret of rosa 8493 . query secret of rosa","max_tokens":1,"temperature":0}'
    # x-kframe-replica in the answer names the replica; alice always gets the same one
MSG
wait -n "${pids[@]}"
echo "a process of the cluster exited; see $dir" >&2
