#!/usr/bin/env bash
# Install QEMU >= 10 (qemu-system-x86) on Debian 12 from bookworm-backports.
# Debian 12's own QEMU 7.2 corrupts guests that write memory during live migration,
# so the QEMU driver refuses anything older than 10. Idempotent; run as root or with sudo.
set -euo pipefail

MIN_MAJOR=10
SOURCES_FILE=/etc/apt/sources.list.d/backports.sources

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -- "$0" "$@"
fi

installed_major() {
    command -v qemu-system-x86_64 >/dev/null || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

if [ "$(installed_major)" -ge "$MIN_MAJOR" ]; then
    echo "install_qemu: $(qemu-system-x86_64 --version | head -1) already installed"
    exit 0
fi

. /etc/os-release
if [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
    echo "install_qemu: written for Debian 12 (bookworm), found '${PRETTY_NAME:-unknown}'." >&2
    echo "install_qemu: install qemu-system-x86 >= $MIN_MAJOR with your distribution's tools." >&2
    exit 1
fi

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install_qemu: adding bookworm-backports to $SOURCES_FILE"
    cat >"$SOURCES_FILE" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86

if [ "$(installed_major)" -lt "$MIN_MAJOR" ]; then
    echo "install_qemu: installed $(qemu-system-x86_64 --version | head -1), need >= $MIN_MAJOR" >&2
    exit 1
fi
echo "install_qemu: $(qemu-system-x86_64 --version | head -1)"
