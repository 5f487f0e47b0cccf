#!/usr/bin/env bash
# Build (or reuse) the tiny QEMU guest used by scripts/guest/run.sh.
#
# Output: prints the directory holding the guest on stdout (progress goes to
# stderr). The directory contains
#   vmlinuz         Debian's own kernel (the one linux-image-amd64 depends on)
#   initrd.cpio.gz  busybox-static + nbd-client + mke2fs/e2fsck + modules + /init
#                   + nbd-persist (built here from nbd-persist.c)
#   vmlinux         the same kernel uncompressed, if it supports PVH boot
#   fio.img         optional: read-only ext4 image with fio and its libraries,
#                   attached as a virtio disk for the "fio" scenario only
#   manifest.txt    what went in
#
# Cache: .cache/guest/<key>/, where key hashes the kernel package version, the
# host package versions we copy binaries from, and this script + init.sh.
# A cached build is reused in ~0.1 s. Only the kernel download needs the
# network (Debian's apt); with no usable apt metadata the newest previous
# build is reused with a warning.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${SNAPBLOCK_GUEST_CACHE:-$repo/.cache/guest}

# Kernel modules we need, and their dependencies (resolved by modprobe).
# nbd: the client driver under test; ext4: the filesystem (pulls jbd2, mbcache,
# crc16, crc32c); virtio: the NIC; dm-*: for crash-consistency tests later.
MODULES=(virtio_pci virtio_net virtio_blk nbd crc32c_intel ext4 dm_mod dm_flakey dm_log_writes)
# Host binaries copied into the initramfs together with the libraries ldd lists.
BINARIES=(/usr/sbin/nbd-client /usr/sbin/mke2fs /usr/sbin/e2fsck)
# Host packages those binaries (and busybox) come from: part of the cache key.
HOST_PKGS=(busybox-static nbd-client e2fsprogs fio libc6)

log() { echo "guest/build: $*" >&2; }
die() { echo "guest/build: ERROR: $*" >&2; exit 1; }

need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || die "missing tool '$t' (apt-get install busybox-static nbd-client e2fsprogs kmod cpio fio)"
  done
}
need apt-cache apt-get dpkg dpkg-query depmod modprobe cpio gzip ldd sha256sum flock cc
[ -x /bin/busybox ] || die "missing /bin/busybox (apt-get install busybox-static)"
# The guest has no libc of its own except what we copy: busybox must be static.
if ldd /bin/busybox >/dev/null 2>&1; then die "/bin/busybox is dynamic; install busybox-static"; fi
for b in "${BINARIES[@]}"; do [ -x "$b" ] || die "missing $b (apt-get install nbd-client e2fsprogs)"; done

mkdir -p "$cache"

# --- cache key ---------------------------------------------------------------
# One apt-cache call (~1 s): "Depends: linux-image-6.1.0-NN-amd64 (= 6.1.x-y)".
read -r kpkg kver_pkg < <(
  apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
    sed -n 's/^Depends: \(linux-image-[^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n 1
) || true
if [ -z "${kpkg:-}" ] || [ -z "${kver_pkg:-}" ]; then
  # Offline or no apt lists: fall back to the newest previous build if any.
  if [ -e "$cache/latest/vmlinuz" ]; then
    log "WARNING: cannot resolve linux-image-amd64 via apt-cache; reusing $(readlink -f "$cache/latest")"
    readlink -f "$cache/latest"
    exit 0
  fi
  die "cannot resolve linux-image-amd64 via apt-cache (run apt-get update)"
fi

key=$(
  {
    echo "$kpkg $kver_pkg"
    dpkg-query -W "${HOST_PKGS[@]}" 2>/dev/null || true
    sha256sum "$here/build.sh" "$here/init.sh" "$here/nbd-persist.c" | awk '{print $1}'
  } | sha256sum | cut -c1-16
)
out="$cache/$key"

if [ -e "$out/manifest.txt" ]; then
  echo "$out"
  exit 0
fi

# Serialise concurrent builds (e.g. several vitest workers); re-check after
# getting the lock because another builder may have finished meanwhile.
exec 9>"$cache/.lock"
flock 9
if [ -e "$out/manifest.txt" ]; then
  echo "$out"
  exit 0
fi

log "building guest $key ($kpkg $kver_pkg) in $out"
t0=$(date +%s)
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Find the compressed payload inside a bzImage and unpack it to an ELF file
# (what the kernel's scripts/extract-vmlinux does).
extract_vmlinux() { # bzImage out
  local magic cmd off
  for magic in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
    cmd=${magic%%:*}
    command -v "$cmd" >/dev/null 2>&1 || continue
    for off in $(LC_ALL=C grep -aboP "${magic#*:}" "$1" | cut -d: -f1 | head -n 3); do
      tail -c +$((off + 1)) "$1" | "$cmd" -dc >"$2" 2>/dev/null || true
      [ "$(head -c 4 "$2" 2>/dev/null)" = $'\x7fELF' ] && return 0
    done
  done
  rm -f "$2"
  return 1
}

# --- kernel ------------------------------------------------------------------
# Cached on its own (kernel-<pkg>-<version>-<modules hash>/) so that editing
# init.sh or this script does not re-download and re-extract 70 MB.
# (bump kformat when the layout of this directory changes)
kformat=2
kdir="$cache/kernel-$kpkg-$kver_pkg-$(printf '%s\n' "$kformat" "${MODULES[@]}" | sha256sum | cut -c1-8)"
if [ ! -e "$kdir/order" ]; then
  kwork="$work/kernel"
  mkdir -p "$kwork/out/modules"
  (
    cd "$kwork"
    # APT::Sandbox::User=root: as root, apt cannot drop to _apt for a cwd it can't write.
    apt-get -q -o APT::Sandbox::User=root download "$kpkg=$kver_pkg" >&2 ||
      die "apt-get download $kpkg=$kver_pkg failed"
  )
  dpkg -x "$kwork"/linux-image-*.deb "$kwork/k"
  kver=$(ls "$kwork/k/lib/modules")
  [ -f "$kwork/k/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $kpkg"
  cp "$kwork/k/boot/vmlinuz-$kver" "$kwork/out/vmlinuz"
  # Under TCG, decompressing the xz bzImage costs ~3 s per boot. QEMU can
  # boot the uncompressed ELF vmlinux directly (PVH entry) if the kernel has
  # CONFIG_PVH, so unpack it once here; run.sh prefers vmlinux when present.
  if grep -q '^CONFIG_PVH=y' "$kwork/k/boot/config-$kver"; then
    extract_vmlinux "$kwork/out/vmlinuz" "$kwork/out/vmlinux" ||
      log "note: could not extract vmlinux; guests boot the (slower) bzImage"
  fi
  echo "$kver" >"$kwork/out/release"
  depmod -b "$kwork/k" "$kver" # the .deb ships no modules.dep
  # Modules in dependency order, de-duplicated; decompressed so busybox insmod
  # can load them whatever compression the kernel package uses.
  for m in "${MODULES[@]}"; do
    modprobe -d "$kwork/k" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r path; do
    name=$(basename "$path")
    dst="$kwork/out/modules"
    case "$name" in
      *.ko.xz) need xz; xz -dc "$path" >"$dst/${name%.xz}"; name=${name%.xz} ;;
      *.ko.zst) need zstd; zstd -qdc "$path" >"$dst/${name%.zst}"; name=${name%.zst} ;;
      *.ko.gz) gzip -dc "$path" >"$dst/${name%.gz}"; name=${name%.gz} ;;
      *) cp "$path" "$dst/$name" ;;
    esac
    echo "$name" >>"$kwork/out/order.tmp"
  done
  grep -q '^nbd\.ko$' "$kwork/out/order.tmp" || die "nbd.ko not found in $kpkg"
  grep -q '^ext4\.ko$' "$kwork/out/order.tmp" || die "ext4.ko not found in $kpkg"
  mv "$kwork/out/order.tmp" "$kwork/out/order"
  rm -rf "$kdir"
  mv "$kwork/out" "$kdir"
  rm -rf "$kwork"
fi
kver=$(cat "$kdir/release")

# --- initramfs tree ----------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,snapblock,lib/modules}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$here/init.sh" "$root/init"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
cp -r "$kdir/modules" "$root/lib/modules/snapblock"
cp "$kdir/order" "$root/lib/modules/snapblock/order"

# Copy a binary and every shared library ldd reports, at the same paths.
copy_with_libs() { # root binary...
  local dst=$1 b lib
  shift
  for b in "$@"; do
    mkdir -p "$dst$(dirname "$b")"
    cp -L "$b" "$dst$b"
    for lib in $(ldd "$b" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}'); do
      [ -e "$dst$lib" ] && continue
      mkdir -p "$dst$(dirname "$lib")"
      cp -L "$lib" "$dst$lib"
    done
  done
}
copy_with_libs "$root" "${BINARIES[@]}"
ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
# nbd-persist: netlink persist mode (reconnect after the server went away) for
# a device nbd-client attached; Debian 12's nbd-client 3.24 has none (see the
# comment at the top of nbd-persist.c). Static: the guest has only the
# libraries copied above. The C toolchain is the one the native addon needs.
cc -O2 -Wall -static -o "$root/usr/sbin/nbd-persist" "$here/nbd-persist.c" >&2 ||
  die "cannot compile nbd-persist.c (needs gcc and libc6-dev, as the native addon does)"

mk_cpio() { # dir -> newc archive on stdout
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
}

mkdir -p "$work/out"
# Hard links (same filesystem): the kernel files are large and never modified.
ln "$kdir/vmlinuz" "$work/out/vmlinuz" 2>/dev/null || cp "$kdir/vmlinuz" "$work/out/vmlinuz"
if [ -f "$kdir/vmlinux" ]; then
  ln "$kdir/vmlinux" "$work/out/vmlinux" 2>/dev/null || cp "$kdir/vmlinux" "$work/out/vmlinux"
fi
mk_cpio "$root" | gzip -1 >"$work/out/initrd.cpio.gz"

# --- optional fio add-on -----------------------------------------------------
# Debian's fio links ~80 MB of libraries (ceph, icu, ...). As an extra initrd
# archive they cost ~4 s of unpacking per boot under TCG, so they go into a
# read-only ext4 image instead, attached as a virtio disk for the fio scenario
# only; init.sh mounts it on /opt/fio and runs fio via LD_LIBRARY_PATH.
fio_note="fio: not available"
if command -v fio >/dev/null 2>&1; then
  fioroot="$work/fioroot"
  copy_with_libs "$fioroot" "$(command -v fio)"
  kb=$(du -sk "$fioroot" | cut -f1)
  mke2fs -q -F -t ext4 -O ^has_journal -L snapblock-fio -d "$fioroot" \
    "$work/out/fio.img" "$((kb * 12 / 10 + 8192))k" >&2 # stdout is for the result path
  fio_note="fio: $(fio --version) (fio.img $(du -sh --apparent-size "$work/out/fio.img" | cut -f1))"
fi

{
  echo "key=$key"
  echo "kernel_package=$kpkg $kver_pkg"
  echo "kernel=$kver"
  echo "boot: $([ -f "$work/out/vmlinux" ] && echo "vmlinux (PVH, uncompressed)" || echo "vmlinuz (bzImage)")"
  echo "$fio_note"
  echo "host_packages:"; dpkg-query -W "${HOST_PKGS[@]}" 2>/dev/null | sed 's/^/  /' || true
  echo "modules:"; sed 's/^/  /' "$kdir/order"
  echo "initrd: $(du -sh "$work/out/initrd.cpio.gz" | cut -f1)"
} >"$work/out/manifest.txt"

# Publish atomically, then drop older builds (each is ~100 MB with fio).
mv "$work/out" "$out"
ln -sfn "$key" "$cache/latest"
for d in "$cache"/*/; do
  d=${d%/}
  [ "$d" = "$out" ] || [ "$d" = "$kdir" ] || [ -L "$d" ] || rm -rf "$d"
done
log "built in $(($(date +%s) - t0)) s"
echo "$out"
