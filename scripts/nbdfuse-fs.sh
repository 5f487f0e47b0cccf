#!/usr/bin/env bash
# Host-side end-to-end check of an NBD export through a real kernel block
# device, for hosts without the nbd kernel module:
#
#   scripts/nbdfuse-fs.sh HOST PORT [EXPORT]
#
#   nbdfuse exposes the export as a file  ->  losetup --direct-io=on turns it
#   into /dev/loopN  ->  mkfs.ext4, mount, write files, sha256, sync, umount,
#   tear everything down, drop caches, attach again (new NBD connections),
#   mount, verify sha256, fio --verify=crc32c on a file in the mount,
#   umount, e2fsck -fn.
#
# Needs root and /dev/fuse. Env: NBDFUSE_CONNS=N passes -C N to nbdfuse
# (nbdfuse's default is 4 if the server advertises multi-conn),
# FIO_SIZE (default 64M), KEEP_WORKDIR=1 keeps the temp dir for debugging.
# Prints "NBDFUSE-FS PASS" or "NBDFUSE-FS FAIL <step>"; exit 0 only on PASS.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
host=$1 port=$2 export_name=${3-}

log() { echo "nbdfuse-fs: $*" >&2; }
# The EXIT trap prints the FAIL line with $step once setup is done.
step=""
die() { step=$*; exit 1; }
early_die() { echo "NBDFUSE-FS FAIL $*"; exit 1; }

for t in nbdfuse fusermount3 losetup mkfs.ext4 e2fsck mount umount sha256sum fio; do
  command -v "$t" >/dev/null 2>&1 ||
    early_die "missing tool '$t' (apt-get install libnbd-bin fuse3 e2fsprogs fio util-linux)"
done
[ "$(id -u)" = 0 ] || early_die "must run as root (losetup, mount)"
[ -c /dev/fuse ] || early_die "/dev/fuse is missing"

# nbd://HOST:PORT/EXPORT with the export name percent-encoded.
urlencode() {
  local LC_ALL=C # byte-wise, so UTF-8 names become %XX%XX
  local s=$1 out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case "$c" in
      [A-Za-z0-9._~-]) out+=$c ;;
      *) out+=$(printf '%%%02X' "'$c") ;;
    esac
  done
  printf '%s' "$out"
}
uri="nbd://$host:$port/$(urlencode "$export_name")"

work=$(mktemp -d "${TMPDIR:-/tmp}/snapblock-nbdfuse.XXXXXX")
fuse_dir=$work/fuse disk=$work/fuse/disk mnt=$work/mnt
mkdir -p "$fuse_dir" "$mnt"
fuse_pid="" loopdev="" mounted=0

# ---- attach / detach, in the only order that works --------------------------
attach() {
  step="nbdfuse $uri"
  rm -f "$work/nbdfuse.pid"
  nbdfuse ${NBDFUSE_CONNS:+-C "$NBDFUSE_CONNS"} -P "$work/nbdfuse.pid" "$disk" "$uri" \
    2>>"$work/nbdfuse.log" &
  fuse_pid=$!
  # -P writes the pidfile only once nbdfuse has connected and is serving.
  local i
  for ((i = 0; i < 200; i++)); do
    [ -s "$work/nbdfuse.pid" ] && break
    kill -0 "$fuse_pid" 2>/dev/null || { fuse_pid=""; die "nbdfuse exited ($uri)"; }
    sleep 0.05
  done
  [ -s "$work/nbdfuse.pid" ] || die "nbdfuse not ready after 10 s"
  step="losetup"
  # Direct I/O: the loop device must not hide reads behind the host page cache.
  loopdev=$(losetup --direct-io=on -f --show "$disk")
  log "attached $uri as $loopdev ($(($(blockdev --getsize64 "$loopdev") >> 20)) MiB, dio=$(losetup -n -O DIO -l "$loopdev" | tr -d ' '))"
}

mount_fs() {
  step="mount"
  mount -t ext4 "$loopdev" "$mnt"
  mounted=1
}

umount_fs() {
  if [ "$mounted" = 1 ]; then
    step="umount"
    umount "$mnt"
    mounted=0
  fi
}

# umount -> losetup -d -> fusermount3 -u -> wait for nbdfuse. Any other order
# leaves a busy loop device or a dead FUSE mount behind.
detach() {
  umount_fs
  if [ -n "$loopdev" ]; then
    step="losetup -d"
    losetup -d "$loopdev"
    loopdev=""
  fi
  if [ -n "$fuse_pid" ]; then
    step="fusermount3 -u"
    local i
    # The loop driver may close the backing file a moment after losetup -d.
    for ((i = 0; i < 50; i++)); do
      fusermount3 -u "$fuse_dir" 2>/dev/null && break
      sleep 0.1
    done
    for ((i = 0; i < 100; i++)); do
      kill -0 "$fuse_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$fuse_pid" 2>/dev/null; then
      kill "$fuse_pid" 2>/dev/null || true
      fuse_pid=""
      die "nbdfuse did not exit after fusermount3 -u"
    fi
    wait "$fuse_pid" 2>/dev/null || true
    fuse_pid=""
  fi
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [ "$mounted" = 1 ] && umount "$mnt"
  [ -n "$loopdev" ] && losetup -d "$loopdev"
  if [ -n "$fuse_pid" ]; then
    for _ in 1 2 3 4 5 6 7 8 9 10; do fusermount3 -u "$fuse_dir" 2>/dev/null && break; sleep 0.2; done
    for _ in $(seq 50); do kill -0 "$fuse_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$fuse_pid" 2>/dev/null
  fi
  if [ "$rc" != 0 ] && [ -s "$work/nbdfuse.log" ]; then
    log "---- nbdfuse stderr"; tail -n 20 "$work/nbdfuse.log" >&2
  fi
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
  # set -e ends the run at the first failing command; $step says where.
  [ "$rc" = 0 ] || echo "NBDFUSE-FS FAIL ${step:-unknown step} (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'step="interrupted during: $step"; exit 130' INT TERM

t0=$SECONDS
# ---- 1: make a filesystem and write data ------------------------------------
attach
step="mkfs.ext4"
mkfs.ext4 -q -F "$loopdev"
mount_fs
step="write files"
mkdir -p "$mnt/data/small"
n=0
for kb in 1024 4096 64 16384 7; do
  head -c $((kb * 1024)) /dev/urandom >"$mnt/data/f$n.bin"
  n=$((n + 1))
done
for ((i = 0; i < 32; i++)); do
  head -c $(((i * 977) % 16384 + 1024)) /dev/urandom >"$mnt/data/small/s$i.bin"
done
(cd "$mnt" && find data -type f | sort | xargs sha256sum) >"$work/sums"
step="sync"
sync
log "wrote $(wc -l <"$work/sums") files, $(du -sk "$mnt/data" | cut -f1) KiB"

# ---- 2: tear down, drop caches, attach again, verify ------------------------
detach
step="drop caches"
echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || log "warning: cannot drop caches"
attach
mount_fs
step="verify sha256 after reattach"
(cd "$mnt" && sha256sum --quiet -c "$work/sums") >"$work/check.log" 2>&1 ||
  { head -n 20 "$work/check.log" >&2; false; }

# ---- 3: fio with verification on a file in the mounted filesystem -----------
step="fio --verify=crc32c"
fio --verify_state_save=0 --name=nbdfuse-verify --filename="$mnt/fio.dat" --size="${FIO_SIZE:-64M}" \
  --rw=randwrite --bsrange=4k-64k --direct=1 --ioengine=libaio --iodepth=16 \
  --randrepeat=1 --verify=crc32c --verify_fatal=1 --group_reporting \
  >"$work/fio.log" 2>&1 || { cat "$work/fio.log" >&2; false; }
grep -E '^ *(READ|WRITE):' "$work/fio.log" >&2 || true

umount_fs
step="e2fsck -fn"
e2fsck -fn "$loopdev" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log" >&2; false; }
detach
echo "NBDFUSE-FS PASS ($uri, $((SECONDS - t0)) s)"
