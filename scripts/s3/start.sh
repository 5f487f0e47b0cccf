#!/usr/bin/env bash
# Start (or reuse) a single-node Ceph cluster with a RADOS Gateway on loopback:
# the real S3 endpoint snapblock's backup tests and benchmarks run against.
#
#   scripts/s3/start.sh DATA_DIR
#
# All state lives under DATA_DIR (config, mon store, a sparse bluestore file,
# logs, pid files). Daemons: ceph-mon (mon.a), ceph-osd (osd.0, bluestore on a
# file), radosgw (client.rgw.a); no mgr (data paths work without it). Each runs
# in the foreground (-f) in its own session, backgrounded here, its exact PID in
# DATA_DIR/run/<name>.pid.
#
# On success DATA_DIR/env holds `export` lines:
#   S3_ENDPOINT S3_REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
#   CEPH_CONF (so `rbd`/`ceph`/`rados` reach this cluster) S3_RBD_POOL S3_SERVER
# and the same lines are printed on stdout (progress goes to stderr).
#
# Idempotent: with everything running it only rewrites DATA_DIR/env; with an
# existing but stopped cluster it restarts the missing daemons (a few seconds);
# with an empty DATA_DIR it bootstraps (7-17 s on a busy 2-core box once the
# packages are installed; installing them takes ~85 s more).
#
# Settings (environment):
#   S3_MON_PORT, S3_RGW_PORT  ports for a new cluster (default: free ones picked
#                             at bootstrap); kept in DATA_DIR/ports for restarts
#   S3_ACCESS_KEY, S3_SECRET_KEY, S3_REGION   credentials written to env
#   S3_OSD_SIZE               bluestore file size, sparse (default 32G)
#   S3_OSD_MEMORY             osd_memory_target in bytes (default 1 GiB)
#   S3_RBD_POOL               pool for `rbd` images, "" to skip (default rbd)
#   S3_TIMEOUT                seconds to wait for each daemon (default 60)
#   S3_LEASE, S3_LEASE_PID    record a lease DATA_DIR/leases/$S3_LEASE held by
#                             process S3_LEASE_PID (see stop.sh --release);
#                             without S3_LEASE the cluster is pinned (kept up
#                             until a plain stop.sh)
#
# Pitfalls handled here are numbered after /work/shared/notes/s3.md.
set -euo pipefail

PKGS=(ceph-mon ceph-osd ceph-common radosgw curl)
MON_ID=a
OSD_ID=0
RGW_NAME=client.rgw.a

log() { echo "s3/start: $*" >&2; }
die() { echo "s3/start: ERROR: $*" >&2; exit 1; }

[ $# -eq 1 ] || { echo "usage: $0 DATA_DIR" >&2; exit 2; }
mkdir -p "$1"
D=$(cd "$1" && pwd)
CONF=$D/ceph.conf
T=${S3_TIMEOUT:-60}
ACCESS_KEY=${S3_ACCESS_KEY:-snapblock-test-access}
SECRET_KEY=${S3_SECRET_KEY:-snapblock-test-secret-0123456789abcdef}
REGION=${S3_REGION:-us-east-1}
RBD_POOL=${S3_RBD_POOL-rbd}
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# --- Debian packages (apt-get update only when something is missing) ---------
installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PKGS[@]}" 2>/dev/null || true)
missing=()
for p in "${PKGS[@]}"; do
  grep -qx "$p installed" <<<"$installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq -o DPkg::Lock::Timeout=300
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  log "packages installed ($(elapsed) s)"
fi

# One start at a time per DATA_DIR (parallel test workers share a cluster).
mkdir -p "$D/run" "$D/log" "$D/leases" "$D/crash"
exec 9>"$D/.lock"
flock -w 300 9 || die "another start/stop holds $D/.lock"

# --- helpers -----------------------------------------------------------------
# A daemon is running if its pid file names a live process with the right name
# (guards against a stale pid file whose PID was reused).
comm_of() { case $1 in rgw) echo radosgw ;; *) echo "ceph-$1" ;; esac; }
pid_of() { # name (mon|osd|rgw) -> prints its pid if running
  local f=$D/run/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ -d "/proc/$pid" ] && grep -qx "$(comm_of "$1")" "/proc/$pid/comm" 2>/dev/null &&
    ! grep -q '^State:.*zombie' "/proc/$pid/status" && echo "$pid"
}
running() { pid_of "$1" >/dev/null; }

# Is 127.0.0.1:PORT in use? Listening (pitfall 8: a `ceph` command pointed at
# another cluster's mon talks to it without complaint) or held by any socket,
# such as a client's ephemeral port, which also makes a later bind fail. Not
# TIME-WAIT: our own daemons' closed connections linger so for a minute after a
# stop, and the daemons bind with SO_REUSEADDR (a CI run once refused to restart
# the mon over them).
port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
  command -v ss >/dev/null && [ -n "$(ss -Htan exclude time-wait "sport = :$1" 2>/dev/null)" ]
}
# Picked ports lie below the kernel's ephemeral range, so no outgoing
# connection or port-0 listener of another process can take them between a
# stop and the next start (a CI run once lost rgw's port that way).
pick_port() {
  local p i lo
  lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$lo" -gt 12000 ] 2>/dev/null || lo=32768
  for i in $(seq 1 200); do
    p=$((lo - 10000 + RANDOM % 10000))
    port_busy "$p" || { echo "$p"; return; }
  done
  die "no free port found"
}

tail_log() { # name
  local f=$D/log/$1.log
  echo "---- last lines of $f" >&2
  [ -f "$f" ] && tail -n 30 "$f" >&2 || echo "(no log)" >&2
  [ -s "$D/log/$1.out" ] && { echo "---- $D/log/$1.out" >&2; tail -n 15 "$D/log/$1.out" >&2; }
  true
}

# Debian builds Ceph without tcmalloc: glibc malloc mmaps and unmaps every 4 MiB
# object buffer, and page faults are dear in this VM (~17 us each). Keeping big
# blocks in the heap cuts the OSD's CPU per GiB written about 3x (8.6 -> 2.8 s).
MALLOC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824

# start_daemon NAME CMD... : run CMD (with -f) in its own session, record its pid.
start_daemon() {
  local name=$1; shift
  # setsid without a fork (we are not a group leader): $! is the daemon itself,
  # and the daemon survives the test runner's process group.
  # 9>&-: the daemon must not inherit (and so hold) the start/stop lock.
  GLIBC_TUNABLES=$MALLOC_TUNABLES setsid "$@" </dev/null >>"$D/log/$name.out" 2>&1 9>&- &
  echo $! >"$D/run/$name.pid"
  STARTED+=" $name"
  sleep 0.05
  [ -d "/proc/$!" ] || { tail_log "$name"; die "$name exited at once"; }
}

C() { timeout "${CT:-20}" ceph -c "$CONF" --connect-timeout 10 "$@"; }   # pitfall 7

STARTED=""   # daemons started (or found running) by this run: watched while waiting
wait_for() { # what cmd... : poll cmd until it succeeds; fail if a daemon dies
  local what=$1 n deadline=$((SECONDS + T)); shift
  until "$@" >/dev/null 2>&1; do
    for n in $STARTED; do
      running $n || { tail_log $n; die "$n is not running (while waiting for $what)"; }
    done
    ((SECONDS < deadline)) || { for n in $STARTED; do tail_log $n; done; die "timed out after ${T}s waiting for $what"; }
    sleep 0.2
  done
}

write_env() {
  cat >"$D/env.tmp" <<EOF
export S3_ENDPOINT='http://127.0.0.1:$RGW_PORT'
export S3_REGION='$REGION'
export AWS_ACCESS_KEY_ID='$ACCESS_KEY'
export AWS_SECRET_ACCESS_KEY='$SECRET_KEY'
export CEPH_CONF='$CONF'
export S3_RBD_POOL='$(cat "$D/rbd_pool" 2>/dev/null || true)'
export S3_SERVER='ceph-rgw'
EOF
  mv "$D/env.tmp" "$D/env"
  # A leased start (test helper) is stopped by the last `stop.sh --release`; a
  # start by hand pins the cluster until a plain `stop.sh`.
  if [ -n "${S3_LEASE:-}" ]; then echo "${S3_LEASE_PID:-$PPID}" >"$D/leases/$S3_LEASE"; else touch "$D/pinned"; fi
  cat "$D/env"
}

rgw_ok() { curl -sf -m 2 -o /dev/null "http://127.0.0.1:$RGW_PORT/"; }

# --- already running? --------------------------------------------------------
if [ -f "$D/ports" ]; then
  . "$D/ports"
  if running mon && running osd && running rgw && rgw_ok &&
     [ "$(cat "$D/user" 2>/dev/null)" = "$ACCESS_KEY $SECRET_KEY" ]; then
    log "already running (S3 on 127.0.0.1:$RGW_PORT)"
    write_env
    exit 0
  fi
fi

rm -f "$D/pinned"   # (re)started now: pinned again below unless leased

# --- bootstrap: config, mon store, osd --------------------------------------
if [ ! -f "$D/bootstrapped" ]; then
  log "bootstrapping a new cluster in $D"
  # Leftovers of an interrupted bootstrap: start over (nothing in them is data).
  for n in rgw osd mon; do
    if pid=$(pid_of "$n"); then kill -9 "$pid"; fi
  done
  sleep 0.2
  rm -rf "$D/mon" "$D/osd" "$D/rgw" "$D/ports" "$D/rbd_pool" "$D/user" "$D/monmap" "$CONF" "$D/run"/* "$D/log"/*
  MON_PORT=${S3_MON_PORT:-$(pick_port)}
  RGW_PORT=${S3_RGW_PORT:-$(pick_port)}
  while [ "$RGW_PORT" = "$MON_PORT" ]; do RGW_PORT=$(pick_port); done
  for p in "$MON_PORT" "$RGW_PORT"; do   # pitfall 8 (given ports; picked ones are free)
    port_busy "$p" && die "port 127.0.0.1:$p is taken by another process; choose other S3_MON_PORT/S3_RGW_PORT"
  done
  printf 'MON_PORT=%s\nRGW_PORT=%s\n' "$MON_PORT" "$RGW_PORT" >"$D/ports"
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mkdir -p "$D/mon" "$D/osd/ceph-$OSD_ID" "$D/rgw"
  cat >"$CONF" <<EOF
# Generated by scripts/s3/start.sh: a throwaway single-node test cluster.
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$MON_PORT
# pitfall 6: loopback only, msgr2 only
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv6 = false
# pitfall 1: no cephx on a loopback test cluster
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
# pitfall 11: every path under the data dir
run_dir = $D/run
crash_dir = $D/crash
mon_cluster_log_file = $D/log/cluster.log
# pitfalls 4, 5: one OSD, size-1 pools, few PGs
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
osd_crush_chooseleaf_type = 0
# Log as usual, but keep no level-5 history in memory (formatting it costs CPU).
debug_osd = 1/1
debug_bluestore = 1/1
debug_bluefs = 1/1
debug_bdev = 1/1
debug_rocksdb = 1/1
debug_rgw = 1/1
debug_rados = 0/0
debug_objecter = 0/0
debug_monc = 0/0
debug_auth = 0/0
debug_asok = 0/0
debug_tp = 0/0
debug_none = 0/0

[mon]
mon_data = $D/mon/ceph-\$id
log_file = $D/log/mon.log
# pitfall 3: radosgw creates ~8 pools at first start, each a map change
paxos_propose_interval = 0.1
# pitfall 11: start on a fuller disk
mon_data_avail_crit = 1
mon_data_avail_warn = 2

[osd]
osd_data = $D/osd/ceph-\$id
log_file = $D/log/osd.log
osd_objectstore = bluestore
# pitfall 2: a sparse file; no bluestore_block_path (symlink loop at mkfs)
bluestore_block_create = true
bluestore_block_size = ${S3_OSD_SIZE:-32G}
osd_memory_target = ${S3_OSD_MEMORY:-1073741824}
# 2 shards, not 5 (hdd default): each shard opens the block file at start (~0.3 s)
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 2

[client]
# pitfall 1: without this radosgw (and librados clients) hang at auth
ms_mon_client_mode = crc secure

[$RGW_NAME]
log_file = $D/log/rgw.log
rgw_data = $D/rgw
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT
# pitfall 10: reclaim deleted space after 30 s, not 2 h
rgw_gc_obj_min_wait = 30
rgw_gc_processor_period = 30
EOF
  monmaptool --create --fsid "$fsid" --addv "$MON_ID" "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i "$MON_ID" --monmap "$D/monmap" >"$D/log/mon-mkfs.out" 2>&1 \
    || { cat "$D/log/mon-mkfs.out" >&2; tail_log mon; die "ceph-mon --mkfs failed"; }
  # Format the OSD (~4 s) while the mon starts: with the fsid in ceph.conf and
  # --no-mon-config, mkfs needs no monitor.
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$osd_uuid" --no-mon-config \
    >"$D/log/osd-mkfs.out" 2>&1 9>&- &
  mkfs_job=$!
fi

. "$D/ports"
# rgw's port lives only in the config, so a taken one is replaced rather than
# fatal (the mon's is baked into the monmap).
if ! running rgw && [ -z "${S3_RGW_PORT:-}" ] && port_busy "$RGW_PORT"; then
  old_port=$RGW_PORT
  RGW_PORT=$(pick_port)
  while [ "$RGW_PORT" = "$MON_PORT" ]; do RGW_PORT=$(pick_port); done
  sed -i "s/^rgw_frontends = beast endpoint=127.0.0.1:.*/rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT/" "$CONF"
  printf 'MON_PORT=%s\nRGW_PORT=%s\n' "$MON_PORT" "$RGW_PORT" >"$D/ports"
  log "rgw port $old_port is taken; moved to $RGW_PORT"
fi
for n in mon rgw; do
  port=$([ $n = mon ] && echo "$MON_PORT" || echo "$RGW_PORT")
  if ! running $n && port_busy "$port"; then
    die "$n port 127.0.0.1:$port is taken by another process (pitfall 8); free it or remove $D"
  fi
done

# --- mon, then osd, then rgw --------------------------------------------------
for n in mon osd rgw; do running $n && STARTED+=" $n"; done
running mon || start_daemon mon ceph-mon -f -c "$CONF" -i "$MON_ID"
if [ -n "${mkfs_job:-}" ]; then
  C osd new "$osd_uuid" "$OSD_ID" >/dev/null 2>"$D/log/osd-new.out" \
    || { cat "$D/log/osd-new.out" >&2; tail_log mon; die "ceph osd new failed (is the mon up?)"; }
  log "mon up ($(elapsed) s)"
  wait "$mkfs_job" || { tail -n 20 "$D/log/osd-mkfs.out" >&2; tail_log osd; die "ceph-osd --mkfs failed"; }
  log "osd formatted ($(elapsed) s)"
fi
if ! running osd; then
  osd_log_size=$(stat -c %s "$D/log/osd.log" 2>/dev/null || echo 0)
  start_daemon osd ceph-osd -f -c "$CONF" -i "$OSD_ID"
  # Up = the OSD logged its boot (cheaper than polling `ceph osd dump`). radosgw
  # started before that waits ~3 s longer: its objecter retries on a 5 s tick.
  # (no grep -q: with pipefail, tail's SIGPIPE would turn a match into a failure)
  osd_booted() { tail -c +$((osd_log_size + 1)) "$D/log/osd.log" | grep "state: booting -> active" >/dev/null; }
  wait_for "osd.$OSD_ID to boot" osd_booted
  log "osd up ($(elapsed) s)"
fi
running rgw || start_daemon rgw radosgw -f -c "$CONF" -n "$RGW_NAME"
if [ -n "$RBD_POOL" ] && [ ! -f "$D/rbd_pool" ]; then
  ( C osd pool create "$RBD_POOL" 8 8 replicated >/dev/null 2>&1 &&
    C osd pool application enable "$RBD_POOL" rbd >/dev/null 2>&1 &&
    echo "$RBD_POOL" >"$D/rbd_pool" ) 9>&- &
  rbd_job=$!
fi
wait_for "radosgw to answer on 127.0.0.1:$RGW_PORT" rgw_ok
log "rgw up ($(elapsed) s)"
if [ -n "${rbd_job:-}" ]; then
  wait "$rbd_job" || log "WARNING: could not create pool '$RBD_POOL' (rbd images unavailable)"
fi

# --- S3 user (once) ------------------------------------------------------------
if [ "$(cat "$D/user" 2>/dev/null)" != "$ACCESS_KEY $SECRET_KEY" ]; then
  admin() { timeout 60 radosgw-admin -c "$CONF" -n client.admin "$@" 2>&1; }
  out=$(admin user create --uid snapblock --display-name snapblock --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY") \
    || out=$(admin key create --uid snapblock --key-type s3 --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY") \
    || { echo "$out" >&2; tail_log rgw; die "radosgw-admin user create failed"; }
  echo "$ACCESS_KEY $SECRET_KEY" >"$D/user"
fi
touch "$D/bootstrapped"
log "ready: S3 on http://127.0.0.1:$RGW_PORT, CEPH_CONF=$CONF ($(elapsed) s)"
write_env
