#!/usr/bin/env bash
# Install the Debian packages the test suite and benchmarks use, only if missing.
set -euo pipefail
PKGS=(nbdkit fio libnbd-bin python3-libnbd fuse3 e2fsprogs qemu-system-x86 qemu-utils qemu-block-extra socat
      nbd-server nbd-client busybox-static kmod cpio openssl iproute2 util-linux gnuplot-nox)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
