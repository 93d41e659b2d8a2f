#!/usr/bin/env bash
# Install libvirt >= 11 (daemon, QEMU/storage/network drivers, virsh, headers) on Debian 12 from
# bookworm-backports, and what the libvirt-python binding needs to build (gcc, pkg-config, Python headers).
# Debian 12's own libvirt 9.0 predates QEMU 10 (scripts/install_qemu.sh), so only backports' will do.
# Only the libvirt packages come from backports (pkg/bookworm-backports): `-t bookworm-backports` would
# also pull backports' systemd 254 over the system's 252 through systemd-container.
# No recommends: they add swtpm, passt and every storage backend. No daemon is started or enabled:
# devtools/libvirt_hosts.py starts its own. Idempotent; run as root or with sudo.
set -euo pipefail

MIN_MAJOR=11
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-storage
          libvirt-daemon-driver-network libvirt-clients libvirt-dev)
BUILD_PACKAGES=(gcc pkg-config python3-dev)

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -- "$0" "$@"
fi

installed_major() {
    # Prints the installed libvirt's major version (0 when a package is missing).
    local package
    for package in "${PACKAGES[@]}" "${BUILD_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || { echo 0; return; }
    done
    pkg-config --modversion libvirt | cut -d. -f1
}

if [ "$(installed_major)" -ge "$MIN_MAJOR" ]; then
    echo "install_libvirt: libvirt $(pkg-config --modversion libvirt) already installed"
    exit 0
fi

bash "$(dirname "$0")/install_qemu.sh"   # QEMU 10 and the bookworm-backports source

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
    "${PACKAGES[@]/%//bookworm-backports}" "${BUILD_PACKAGES[@]}"

if [ "$(installed_major)" -lt "$MIN_MAJOR" ]; then
    echo "install_libvirt: installed libvirt $(pkg-config --modversion libvirt), need >= $MIN_MAJOR" >&2
    exit 1
fi
echo "install_libvirt: libvirt $(pkg-config --modversion libvirt) ($(virsh --version) virsh)"
