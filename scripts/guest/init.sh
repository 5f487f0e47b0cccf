#!/bin/busybox sh
# PID 1 of the snapblock test guest (copied to /init by build.sh).
#
# Attaches an NBD export with the real kernel nbd driver + nbd-client, runs one
# scenario, prints exactly one line "SNAPBLOCK-GUEST PASS" or
# "SNAPBLOCK-GUEST FAIL <reason>" and powers off. run.sh greps for that line.
#
# Per-run settings come from /snapblock/settings.env, carried by a second cpio
# that run.sh appends to the initrd. The host's NBD server is reachable only as
# 10.0.2.100:10809 (QEMU guestfwd -> socat -> server).

/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /bin
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm

# ---- defaults (overridden by settings.env) ----------------------------------
SCENARIO=fs            # fs | verify-ro | verify-rw | fio | persist
EXPORT=""              # NBD export name ("" = default export)
CONNS=1                # nbd-client -C: TCP connections (each gets its own socat)
BLOCKSIZE=4096         # nbd-client -b
NBD_TIMEOUT=30         # nbd-client -t: per-request timeout, seconds
FS_FILES="1024 3072 64 5120 7"   # fs: sizes in KiB of the random files to write
FS_SMALL_FILES=32      # fs: number of small (1-16 KiB) files, exercises metadata
MKFS_OPTS=""           # fs: extra mkfs.ext4 options
MOUNT_OPTS=""          # extra mount options (verify-ro always adds ro)
FSCK=1                 # run e2fsck -fn on the unmounted filesystem
# verify-ro of a crash-consistent snapshot (journal not replayed, and a
# read-only device cannot replay it): use FSCK=0 MOUNT_OPTS=noload.
CHECKSUMS=""           # verify-ro: sha256sum lines, paths relative to the fs root
FIO_SIZE=32M           # fio: bytes of /dev/nbd0 to write and verify
FIO_BS=4k-64k          # fio: --bsrange
FIO_IODEPTH=16
# persist: kill -9 of the server mid-load, reconnect (see scenario_persist)
PERSIST_DEAD_TIMEOUT=120  # seconds the kernel holds IO while no connection lives
PERSIST_KB=256         # size of every file the persist scenario writes
PERSIST_BEFORE=8       # files written + fsynced before the writer starts
PERSIST_MARK_AT=4      # the writer's file count at which it prints the kill marker
PERSIST_WRITER_AFTER=4 # writer files that must complete after the reconnect
PERSIST_AFTER=8        # buffered files written once the writer stopped
PERSIST_WAIT=120       # seconds to wait for the reconnect once the writer started
# shellcheck disable=SC1091 # written by run.sh
[ -f /snapblock/settings.env ] && . /snapblock/settings.env

NBD=/dev/nbd0

# Prefix with guest uptime so slow steps stand out in the console log.
log() { echo "snapblock-guest [$(cut -d" " -f1 /proc/uptime)]: $*"; }

# Print the result line once and power off. Everything ends here.
finish() {
  cd /
  echo "SNAPBLOCK-GUEST $*"
  sync
  poweroff -f
  sleep 30
}
fail() {
  log "--- failure diagnostics (dmesg tail)"
  dmesg | tail -n 40
  umount /mnt 2>/dev/null
  nbd-client -d "$NBD" >/dev/null 2>&1
  finish "FAIL $*"
}

# Run a command, echoing it, and fail with its name if it fails.
run() {
  log "\$ $*"
  "$@" || fail "'$*' exited $?"
}

# ---- boot: modules and network ---------------------------------------------
while read -r m; do
  args=""
  # max_part=0: no partition scan on attach, so the server sees only our I/O.
  [ "$m" = nbd.ko ] && args="nbds_max=2 max_part=0"
  # shellcheck disable=SC2086 # $args is a list of module parameters
  insmod "/lib/modules/snapblock/$m" $args || fail "insmod $m"
done </lib/modules/snapblock/order

ip link set lo up
ip link set eth0 up || fail "no eth0 (virtio-net missing?)"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

# ---- NBD helpers ------------------------------------------------------------
size_sectors() { cat /sys/block/nbd0/size 2>/dev/null || echo 0; }

# attach [extra nbd-client flags]: connect $NBD, retrying a few times because
# a just-disconnected device can still be busy for a moment.
attach() {
  set -- -b "$BLOCKSIZE" -C "$CONNS" -t "$NBD_TIMEOUT" "$@"
  # Without -N nbd-client warns about "oldstyle" but negotiates newstyle with
  # the default export "" (the same happens with -N "").
  [ -n "$EXPORT" ] && set -- -N "$EXPORT" "$@"
  i=0
  while :; do
    log "\$ nbd-client $* 10.0.2.100 10809 $NBD"
    nbd-client "$@" 10.0.2.100 10809 "$NBD" && [ "$(size_sectors)" -gt 0 ] && break
    i=$((i + 1))
    [ $i -ge 5 ] && fail "nbd-client attach failed"
    sleep 1
  done
  log "attached: $(($(size_sectors) / 2048)) MiB, ro=$(cat /sys/block/nbd0/ro), connections=$CONNS"
}

# detach: disconnect and wait until the kernel has torn the device down (the
# netlink disconnect is asynchronous), so the next attach starts clean.
detach() {
  run nbd-client -d "$NBD"
  i=0
  while [ "$(size_sectors)" != 0 ] || [ -e /sys/block/nbd0/pid ]; do
    i=$((i + 1))
    [ $i -ge 100 ] && fail "nbd0 still attached 10 s after nbd-client -d"
    usleep 100000
  done
}

fsck_ro() {
  [ "$FSCK" = 1 ] || return 0
  log "\$ e2fsck -fn $NBD"
  e2fsck -fn "$NBD" || fail "e2fsck -fn reported problems (exit $?)"
}

mount_fs() { # extra options
  opts=$1
  [ -n "$MOUNT_OPTS" ] && opts="${opts:+$opts,}$MOUNT_OPTS"
  run mount -t ext4 ${opts:+-o "$opts"} "$NBD" /mnt
}

# ---- scenarios --------------------------------------------------------------

# fs: mkfs, write files, record checksums, detach, reattach, verify.
# The files stay on the export, so a later verify-ro run (e.g. on a snapshot)
# can check them with the SNAPBLOCK-SUM lines printed here.
scenario_fs() {
  attach
  # shellcheck disable=SC2086 # $MKFS_OPTS is a list of options
  run mkfs.ext4 -q -F -b 4096 $MKFS_OPTS "$NBD"
  mount_fs ""
  run mkdir -p /mnt/data/small
  n=0
  for kb in $FS_FILES; do
    head -c $((kb * 1024)) /dev/urandom >/mnt/data/f$n.bin || fail "write f$n.bin"
    n=$((n + 1))
  done
  i=0
  while [ $i -lt "$FS_SMALL_FILES" ]; do
    head -c $(((i * 977) % 16384 + 1024)) /dev/urandom >/mnt/data/small/s$i.bin || fail "write s$i.bin"
    i=$((i + 1))
  done
  (cd /mnt && find data -type f | sort | xargs sha256sum) >/tmp/sums || fail "sha256sum"
  log "wrote $(wc -l </tmp/sums) files, $(du -sk /mnt/data | cut -f1) KiB"
  sed 's/^/SNAPBLOCK-SUM /' /tmp/sums
  run sync
  run umount /mnt
  fsck_ro
  detach
  # Page cache of nbd0 is gone with the device; drop the rest for good measure.
  echo 3 >/proc/sys/vm/drop_caches
  attach
  mount_fs ""
  log "\$ sha256sum -c"
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/check 2>&1 || {
    grep -v ': OK$' /tmp/check | head -n 20
    fail "checksum mismatch after reattach"
  }
  run umount /mnt
  fsck_ro
  detach
  finish PASS
}

# verify-ro: attach read-only, mount read-only, verify $CHECKSUMS.
scenario_verify_ro() {
  [ -n "$CHECKSUMS" ] || fail "verify-ro needs CHECKSUMS"
  printf '%s\n' "$CHECKSUMS" | grep -v '^$' >/tmp/sums
  attach -R
  [ "$(cat /sys/block/nbd0/ro)" = 1 ] || fail "nbd0 is not read-only after nbd-client -R"
  fsck_ro
  mount_fs ro
  log "\$ sha256sum -c ($(wc -l </tmp/sums) files)"
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/check 2>&1 || {
    grep -v ': OK$' /tmp/check | head -n 20
    fail "checksum mismatch"
  }
  run umount /mnt
  detach
  finish PASS
}

# verify-rw: attach read-write (a clone), verify $CHECKSUMS, write a new file,
# detach, reattach and verify old and new files.
scenario_verify_rw() {
  [ -n "$CHECKSUMS" ] || fail "verify-rw needs CHECKSUMS"
  printf '%s\n' "$CHECKSUMS" | grep -v '^$' >/tmp/sums
  attach
  mount_fs ""
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/check 2>&1 || {
    grep -v ': OK$' /tmp/check | head -n 20
    fail "checksum mismatch before writing"
  }
  head -c 2097152 /dev/urandom >/mnt/data/clone-new.bin || fail "write clone-new.bin"
  (cd /mnt && sha256sum data/clone-new.bin) >>/tmp/sums || fail "sha256sum"
  run sync
  run umount /mnt
  detach
  echo 3 >/proc/sys/vm/drop_caches
  attach
  mount_fs ""
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/check 2>&1 || {
    grep -v ': OK$' /tmp/check | head -n 20
    fail "checksum mismatch after reattach"
  }
  run umount /mnt
  fsck_ro
  detach
  finish PASS
}

# fio: random writes with crc32c verify on the raw device, then detach,
# reattach and verify the same data again (--verify_only) from the server.
scenario_fio() {
  # fio and its ~80 MB of libraries live on a read-only disk image (build.sh).
  [ -b /dev/vda ] || fail "no fio disk (/dev/vda) attached"
  mkdir -p /opt/fio
  run mount -t ext4 -o ro /dev/vda /opt/fio
  LD_LIBRARY_PATH=$(find /opt/fio -name '*.so*' | sed 's|/[^/]*$||' | sort -u | tr '\n' :)
  export LD_LIBRARY_PATH
  PATH=/opt/fio/usr/bin:$PATH
  fio --version >/dev/null || fail "fio does not run in the guest"
  attach
  set -- --name=snapblock --filename="$NBD" --thread --direct=1 --ioengine=libaio \
    --iodepth="$FIO_IODEPTH" --rw=randwrite --bsrange="$FIO_BS" --size="$FIO_SIZE" \
    --randrepeat=1 --verify=crc32c --verify_fatal=1 --group_reporting
  log "\$ fio $* (write + verify)"
  fio "$@" >/tmp/fio1 2>&1 || { cat /tmp/fio1; fail "fio write/verify failed"; }
  grep -E '^ *(READ|WRITE):' /tmp/fio1
  detach
  attach
  log "\$ fio --verify_only (after reattach)"
  fio "$@" --verify_only >/tmp/fio2 2>&1 || { cat /tmp/fio2; fail "fio verify after reattach failed"; }
  grep -E '^ *(READ|WRITE):' /tmp/fio2
  detach
  finish PASS
}

# persist: the server is killed (kill -9) and restarted in the middle of a
# write load; the kernel client must reconnect and lose nothing.
#
# nbd-client attaches over netlink; nbd-persist (build.sh) sets the kernel's
# dead-connection timeout, so IO waits instead of failing while no connection
# lives, and on the kernel's LINK_DEAD event connects again and hands the new
# socket over (NBD_CMD_RECONFIGURE); the kernel resends what was in flight.
# Debian 12's nbd-client 3.24 -persist cannot do this (see nbd-persist.c).
#
#  1. PERSIST_BEFORE buffered files, each written and fsynced;
#  2. a writer in the background: files written with O_DIRECT (dd
#     oflag=direct), so each is acknowledged by the server when dd returns but
#     not flushed; after PERSIST_MARK_AT of them it prints
#     "SNAPBLOCK-PERSIST kill-now" and keeps writing. The host kills the
#     server, waits, starts it again on the same port;
#  3. once nbd-persist reports the reconnect, the writer must finish
#     PERSIST_WRITER_AFTER more files; then it stops and PERSIST_AFTER more
#     buffered files are written; sync, umount, e2fsck -fn;
#  4. detach, drop caches, attach again (a fresh connection): every file whose
#     write completed (before, writer, after) must match its sha256, and
#     e2fsck -fn must still be clean.
# A server that loses acknowledged writes in the kill fails step 4 (or 3).
persist_writer() {
  n=0
  while [ ! -e /tmp/writer-stop ]; do
    f=data/w$n.bin
    head -c $((PERSIST_KB * 1024)) /dev/urandom >/tmp/w.src || { echo "writer: urandom"; exit 1; }
    dd if=/tmp/w.src of=/mnt/$f bs=64k oflag=direct 2>/tmp/w.err || {
      cat /tmp/w.err
      echo "writer: dd $f failed"
      exit 1
    }
    # dd returned: the server acknowledged every byte (O_DIRECT), no flush yet.
    echo "$(sha256sum </tmp/w.src | cut -d' ' -f1)  $f" >>/tmp/sums-writer
    n=$((n + 1))
    echo $n >/tmp/writer-count
    [ $n = "$PERSIST_MARK_AT" ] && echo "SNAPBLOCK-PERSIST kill-now (writer at $n files)"
  done
  exit 0
}

scenario_persist() {
  attach
  nbd_index=${NBD#/dev/nbd}
  nbd-persist "$nbd_index" 10.0.2.100 10809 "$EXPORT" "$PERSIST_DEAD_TIMEOUT" >/tmp/persist.log 2>&1 &
  persist_pid=$!
  i=0
  until grep -q watching /tmp/persist.log; do
    i=$((i + 1))
    if [ $i -ge 100 ] || ! kill -0 $persist_pid 2>/dev/null; then
      cat /tmp/persist.log
      fail "nbd-persist did not start"
    fi
    usleep 100000
  done
  cat /tmp/persist.log
  # shellcheck disable=SC2086 # $MKFS_OPTS is a list of options
  run mkfs.ext4 -q -F -b 4096 $MKFS_OPTS "$NBD"
  mount_fs ""
  run mkdir -p /mnt/data
  i=0
  while [ $i -lt "$PERSIST_BEFORE" ]; do
    head -c $((PERSIST_KB * 1024)) /dev/urandom >/mnt/data/b$i.bin || fail "write b$i.bin"
    sync /mnt/data/b$i.bin || fail "fsync b$i.bin"
    i=$((i + 1))
  done
  run sync
  (cd /mnt && sha256sum data/b*.bin) >/tmp/sums-before || fail "sha256sum"
  log "before the kill: $PERSIST_BEFORE files written and fsynced"

  : >/tmp/sums-writer
  echo 0 >/tmp/writer-count
  persist_writer &
  writer_pid=$!
  # Wait for the host's kill and our reconnect. The writer blocks meanwhile
  # (the kernel holds its IO), so its count stands still until the reconnect.
  i=0
  until grep -q reconnected /tmp/persist.log; do
    kill -0 $writer_pid 2>/dev/null || fail "the writer stopped before the reconnect"
    i=$((i + 1))
    [ $i -ge $((PERSIST_WAIT * 5)) ] && {
      cat /tmp/persist.log
      fail "no reconnect within ${PERSIST_WAIT}s (writer at $(cat /tmp/writer-count) files)"
    }
    usleep 200000
  done
  at_reconnect=$(cat /tmp/writer-count)
  log "reconnected; the writer is at $at_reconnect files"
  i=0
  while [ "$(cat /tmp/writer-count)" -lt $((at_reconnect + PERSIST_WRITER_AFTER)) ]; do
    kill -0 $writer_pid 2>/dev/null || fail "the writer stopped after the reconnect"
    i=$((i + 1))
    [ $i -ge 1500 ] && fail "the writer made no progress for 300 s after the reconnect"
    usleep 200000
  done
  touch /tmp/writer-stop
  wait $writer_pid || fail "the writer failed"
  log "writer: $(wc -l </tmp/sums-writer) files (O_DIRECT), $at_reconnect when the reconnect was seen"
  i=0
  while [ $i -lt "$PERSIST_AFTER" ]; do
    head -c $((PERSIST_KB * 1024)) /dev/urandom >/mnt/data/a$i.bin || fail "write a$i.bin"
    i=$((i + 1))
  done
  run sync
  (cd /mnt && sha256sum data/a*.bin) >/tmp/sums-after || fail "sha256sum"
  cat /tmp/sums-before /tmp/sums-writer /tmp/sums-after >/tmp/sums
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/check 2>&1 || {
    grep -v ': OK$' /tmp/check | head -n 20
    fail "checksum mismatch before detaching (O_DIRECT files read from the server, others maybe from the page cache)"
  }
  sed 's/^/SNAPBLOCK-SUM /' /tmp/sums
  run umount /mnt
  fsck_ro
  kill $persist_pid 2>/dev/null
  wait $persist_pid 2>/dev/null
  log "--- nbd-persist log"
  cat /tmp/persist.log
  log "--- kernel nbd messages"
  dmesg | grep -E 'nbd0|nbd:' | tail -n 20
  detach
  echo 3 >/proc/sys/vm/drop_caches
  attach
  mount_fs ""
  log "\$ sha256sum -c ($(wc -l </tmp/sums) files, read back from the server)"
  (cd /mnt && sha256sum -c /tmp/sums) >/tmp/check 2>&1 || {
    grep -v ': OK$' /tmp/check | head -n 20
    fail "checksum mismatch after reattach: $(grep -vc ': OK$' /tmp/check) of $(wc -l </tmp/sums) files"
  }
  run umount /mnt
  fsck_ro
  detach
  echo "SNAPBLOCK-PERSIST files before=$PERSIST_BEFORE writer=$(wc -l </tmp/sums-writer) writer-at-reconnect=$at_reconnect after=$PERSIST_AFTER"
  finish PASS
}

log "scenario=$SCENARIO export='$EXPORT' conns=$CONNS kernel=$(uname -r)"
case "$SCENARIO" in
  fs) scenario_fs ;;
  verify-ro) scenario_verify_ro ;;
  verify-rw) scenario_verify_rw ;;
  fio) scenario_fio ;;
  persist) scenario_persist ;;
  *) fail "unknown scenario '$SCENARIO'" ;;
esac
fail "scenario returned without a result"
