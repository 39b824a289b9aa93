#!/usr/bin/env bash
# Installs the system packages the demo, the tests and the benchmarks need, when missing.
# Needs root (or passwordless sudo) to install; prints what is missing otherwise.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo  || need+=(libnbd-bin)
have nbdcopy  || need+=(libnbd-bin)
have nbdfuse  || need+=(libnbd-bin)
have nbdkit   || need+=(nbdkit)
have qemu-io  || need+=(qemu-utils)
have qemu-img || need+=(qemu-utils)
have qemu-storage-daemon || need+=(qemu-utils)   # the bench's replicating peer
have fio      || need+=(fio)
have promtool || need+=(prometheus)   # `promtool check metrics` on both endpoints
have chromium || need+=(chromium)     # the replica's console, rendered headless
have systemd-analyze || need+=(systemd)   # `systemd-analyze verify` on the units
have man      || need+=(man-db)           # verify checks the units' man pages
have taskset  || need+=(util-linux)
have mkfs.ext4 || need+=(e2fsprogs)
have fusermount3 || need+=(fuse3)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
# shellcheck disable=SC2207
need=($(printf '%s\n' "${need[@]}" | sort -u))
echo "installing: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if have sudo; then SUDO="sudo -n"; else
    echo "error: these packages are missing and installing them needs root: ${need[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Some Debian releases ship qemu-storage-daemon in qemu-system-common
# rather than qemu-utils.
if ! have qemu-storage-daemon; then
  echo "installing: qemu-system-common (for qemu-storage-daemon)"
  $SUDO apt-get install -y -qq --no-install-recommends qemu-system-common
fi
