#!/usr/bin/env bash
# Run one scenario in a throw-away QEMU guest whose kernel nbd driver attaches
# an export of ANY NBD server reachable from this host.
#
#   scripts/guest/run.sh --port PORT [--host 127.0.0.1] [--export NAME]
#        [--conns N] [--scenario fs|verify-ro|verify-rw|fio|persist] [--timeout SEC]
#        [--log FILE] [--set KEY=VALUE]... [--checksums FILE]
#        [--sums-out FILE] [--verbose]
#
# Scenarios (implemented in init.sh, see its defaults for --set knobs):
#   fs         nbd-client -C N, mkfs.ext4, mount, write random files, sha256,
#              sync, umount, e2fsck, nbd-client -d, reattach, mount, verify.
#              The files stay on the export; --sums-out saves their checksums.
#   verify-ro  nbd-client -R, e2fsck optional (FSCK=1), mount -o ro and
#              sha256sum -c the list from --checksums (e.g. a --sums-out file),
#              e.g. against a snapshot export.
#   fio        fio --verify=crc32c on raw /dev/nbd0, detach, reattach,
#              fio --verify_only.
#   persist    nbd-client + nbd-persist (reconnects), mkfs, mount, a writer;
#              the guest prints "SNAPBLOCK-PERSIST kill-now" mid-load: the
#              caller kills the server and restarts it on the same port; the
#              guest reconnects, keeps writing, e2fsck, reattach, verify all.
#
# Exit status: 0 only if the guest printed "SNAPBLOCK-GUEST PASS"; 1 on FAIL,
# timeout or no result (the console tail is shown); 2 on usage errors.
#
# Why QEMU: this host's kernel has no nbd module. The guest runs Debian's
# kernel under TCG (-cpu max: ext4's crc32c wants SSE4.2; KVM here is not
# usable). Its only network path is a QEMU guestfwd: each guest TCP connection
# to 10.0.2.100:10809 spawns its own `socat STDIO TCP:HOST:PORT`, so -C 4
# gives the server 4 real TCP connections from 127.0.0.1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

usage() { sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "guest/run: ERROR: $*" >&2; exit 2; }

host=127.0.0.1 port="" export_name="" conns=1 scenario=fs timeout_s=180
log="" checksums="" sums_out="" verbose=0
smp=${GUEST_SMP:-2} mem=${GUEST_MEM:-1024}
sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --export) export_name=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --scenario) scenario=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --set) sets+=("$2"); shift 2 ;;
    --checksums) checksums=$2; shift 2 ;;
    --sums-out) sums_out=$2; shift 2 ;;
    --verbose|-v) verbose=1; shift ;;
    -h|--help) usage ;;
    *) echo "guest/run: unknown argument '$1'" >&2; usage ;;
  esac
done
[[ "$port" =~ ^[0-9]+$ ]] || die "--port PORT is required"
[[ "$conns" =~ ^[1-9][0-9]*$ ]] || die "--conns must be a positive integer"
case "$scenario" in fs|verify-ro|verify-rw|fio|persist) ;; *) die "unknown scenario '$scenario'" ;; esac
[[ "$host" =~ ^[A-Za-z0-9._-]+$ ]] || die "--host must be a hostname or IPv4 address"
# No pipe into `grep -q` here: it exits at the first match and, with pipefail, printf's
# SIGPIPE on a long CHECKSUMS value made this check fail at random.
has_checksums_set() {
  local kv
  for kv in "${sets[@]+"${sets[@]}"}"; do [[ $kv == CHECKSUMS=* ]] && return 0; done
  return 1
}
if { [ "$scenario" = verify-ro ] || [ "$scenario" = verify-rw ]; } && [ -z "$checksums" ] &&
  ! has_checksums_set; then
  die "verify-ro needs --checksums FILE (or --set CHECKSUMS=...)"
fi

for t in qemu-system-x86_64 socat timeout cpio; do
  command -v "$t" >/dev/null 2>&1 ||
    die "missing tool '$t' (apt-get install qemu-system-x86 socat coreutils cpio)"
done

guest=$("$here/build.sh")
if [ "$scenario" = fio ] && [ ! -f "$guest/fio.img" ]; then
  die "the guest was built without fio (install fio on the host and rebuild)"
fi

if [ -z "$log" ]; then
  mkdir -p "$repo/.cache/guest-logs"
  # Keep a week of console logs.
  find "$repo/.cache/guest-logs" -name '*.log' -mtime +7 -delete 2>/dev/null || true
  log="$repo/.cache/guest-logs/$(date +%Y%m%d-%H%M%S)-$scenario-p$port-$$.log"
fi
mkdir -p "$(dirname "$log")"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/snapblock-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- per-run settings: a small cpio appended to the initrd -------------------
shquote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
mkdir -p "$tmp/settings/snapblock"
{
  echo "SCENARIO=$(shquote "$scenario")"
  echo "EXPORT=$(shquote "$export_name")"
  echo "CONNS=$conns"
  [ -n "$checksums" ] && echo "CHECKSUMS=$(shquote "$(cat "$checksums")")"
  for kv in "${sets[@]+"${sets[@]}"}"; do
    k=${kv%%=*}
    if ! [[ "$k" =~ ^[A-Z_][A-Z0-9_]*$ ]] || [ "$k" = "$kv" ]; then
      die "--set wants KEY=VALUE, got '$kv'"
    fi
    echo "$k=$(shquote "${kv#*=}")"
  done
} >"$tmp/settings/snapblock/settings.env"
(cd "$tmp/settings" && find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet) >"$tmp/settings.cpio"

# Linux unpacks concatenated archives; an uncompressed one must start at a
# 4-byte aligned offset (zeros in between are skipped), so pad each piece.
pad512() { local n; n=$(stat -c %s "$1"); head -c $(((512 - n % 512) % 512)) /dev/zero; }
{
  cat "$guest/initrd.cpio.gz"; pad512 "$guest/initrd.cpio.gz"
  cat "$tmp/settings.cpio"
} >"$tmp/initrd"

# The uncompressed vmlinux boots ~3 s faster under TCG (no xz unpacking).
kernel=$guest/vmlinuz
[ -f "$guest/vmlinux" ] && kernel=$guest/vmlinux

# nodelay: the guest's NBD requests are small; don't let Nagle delay them.
# (",," is QEMU's escape for a literal comma inside -netdev.)
# -lf /dev/null: slirp gives the command the guest's socket as stdin, stdout
# AND stderr, so a socat diagnostic (e.g. "E connect(...): Connection refused"
# when the server is down or was killed) would reach the guest's NBD client as
# protocol bytes; the kernel then logs "Wrong magic (0x32303236)" ("2026").
fwd="guestfwd=tcp:10.0.2.100:10809-cmd:socat -lf /dev/null STDIO TCP:$host:$port,,nodelay"
# shellcheck disable=SC2054 # commas are QEMU option syntax, not array separators
qemu=(
  qemu-system-x86_64 -accel tcg -cpu max -smp "$smp" -m "$mem"
  -nodefaults -display none -no-reboot
  -kernel "$kernel" -initrd "$tmp/initrd"
  -append "console=ttyS0 panic=-1 loglevel=4 mitigations=off"
  -serial stdio
  -netdev "user,id=n0,restrict=on,$fwd" -device virtio-net-pci,netdev=n0
)
if [ "$scenario" = fio ]; then
  qemu+=(-drive "file=$guest/fio.img,format=raw,if=virtio,readonly=on")
fi

echo "guest/run: scenario=$scenario server=$host:$port export='$export_name' conns=$conns log=$log" >&2
t0=$(date +%s.%N)
set +e
if [ "$verbose" = 1 ]; then
  timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
else
  timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null >"$log" 2>&1
  rc=$?
fi
set -e
secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')

result=$(tr -d '\r' <"$log" | grep -aoE 'SNAPBLOCK-GUEST (PASS|FAIL.*)' | head -n 1 || true)
if [ -n "$sums_out" ]; then
  tr -d '\r' <"$log" | sed -n 's/^SNAPBLOCK-SUM //p' >"$sums_out"
fi

if [ "$result" = "SNAPBLOCK-GUEST PASS" ]; then
  echo "SNAPBLOCK-GUEST PASS ($scenario, ${secs}s, log $log)"
  exit 0
fi
if [ -z "$result" ]; then
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result="SNAPBLOCK-GUEST FAIL timeout after ${timeout_s}s"
  else
    result="SNAPBLOCK-GUEST FAIL no result line (qemu exit $rc)"
  fi
fi
if [ "$verbose" != 1 ]; then
  echo "guest/run: ---- last 60 lines of $log" >&2
  tail -n 60 "$log" | tr -d '\r' >&2
  echo "guest/run: ----" >&2
fi
echo "$result ($scenario, ${secs}s, log $log)"
exit 1
