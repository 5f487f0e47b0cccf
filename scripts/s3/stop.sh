#!/usr/bin/env bash
# Stop the daemons scripts/s3/start.sh started for DATA_DIR (by their pid files).
#
#   scripts/s3/stop.sh DATA_DIR [--release LEASE] [--purge]
#
#   --release LEASE  drop DATA_DIR/leases/LEASE first and stop only if no other
#                    live process still holds a lease (test files share a cluster)
#                    and nobody started it by hand (DATA_DIR/pinned)
#   --purge          also delete DATA_DIR once everything is stopped
#
# Tolerant of partial state: missing or stale pid files are skipped; a pid file
# is trusted only if its process has the expected name. SIGTERM, then SIGKILL
# after 10 s. The data stays (a later start.sh restarts on it in seconds).
set -euo pipefail

log() { echo "s3/stop: $*" >&2; }
[ $# -ge 1 ] || { echo "usage: $0 DATA_DIR [--release LEASE] [--purge]" >&2; exit 2; }
[ -d "$1" ] || { log "nothing to stop: $1 does not exist"; exit 0; }
D=$(cd "$1" && pwd); shift
release="" purge=0
while [ $# -gt 0 ]; do
  case $1 in
    --release) release=$2; shift 2 ;;
    --purge) purge=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

exec 9>"$D/.lock"
flock -w 120 9 || { log "timed out waiting for $D/.lock"; exit 1; }

if [ -n "$release" ]; then
  rm -f "$D/leases/$release"
  holders=0
  for f in "$D"/leases/*; do
    [ -f "$f" ] || continue
    if [ -d "/proc/$(cat "$f")" ]; then holders=$((holders + 1)); else rm -f "$f"; fi
  done
  if ((holders > 0)); then log "still used by $holders other lease(s); leaving it running"; exit 0; fi
  if [ -f "$D/pinned" ]; then log "started by hand (pinned): leaving it running"; exit 0; fi
fi
rm -f "$D/pinned"

comm_of() { case $1 in rgw) echo radosgw ;; *) echo "ceph-$1" ;; esac; }
live() { [ -d "/proc/$1" ] && ! grep -q '^State:.*zombie' "/proc/$1/status" 2>/dev/null; }
# stop NAME... : SIGTERM the named daemons, wait for them, SIGKILL after 10 s
stop() {
  local n f pid pids=() alive=()
  for n in "$@"; do
    f=$D/run/$n.pid
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if live "$pid" && grep -qx "$(comm_of "$n")" "/proc/$pid/comm" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid") && log "stopping $n (pid $pid)"
    fi
  done
  for _ in $(seq 1 100); do
    alive=()
    for pid in "${pids[@]}"; do live "$pid" && alive+=("$pid"); done
    ((${#alive[@]})) || return 0
    sleep 0.1
  done
  for pid in "${alive[@]}"; do log "pid $pid ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; done
}
# One at a time, in reverse start order: radosgw shutting down needs the OSD
# (else it ignores SIGTERM), an OSD stopping without its mon waits 5 s.
stop rgw
stop osd
stop mon
rm -f "$D"/run/{mon,osd,rgw}.pid

if ((purge)); then rm -rf "$D"; log "removed $D"; fi
exit 0
