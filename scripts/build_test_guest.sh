#!/usr/bin/env bash
# Build the QEMU test guest into guest-images/ (git-ignored) from Debian packages:
#   guest-images/vmlinuz            Debian's cloud kernel, extracted from its .deb (nothing installed on the host)
#   guest-images/initramfs.cpio.gz  busybox-static + memwriter (scripts/guest/memwriter.c, compiled here)
#   guest-images/manifest.txt       what went in, for the test and benchmark reports
# The guest boots straight into memwriter, which fills memory, keeps writing it and checks it,
# reporting on ttyS0. Kernel parameters: memwriter.mib=, memwriter.rate=, memwriter.check_s=.
# Idempotent: downloaded packages are kept in guest-images/cache/; the initramfs is rebuilt each run.
# Needs apt-get, dpkg-deb and gcc with static libc (Debian: gcc, libc6-dev).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${GUEST_IMAGES_DIR:-$ROOT/guest-images}"
CACHE="$OUT/cache"
KERNEL_META=linux-image-cloud-amd64

mkdir -p "$CACHE"

download() { # download <package>: fetch its .deb into the cache once, print its path
    local package="$1" deb
    deb="$(ls "$CACHE"/"${package}"_*.deb 2>/dev/null | head -1 || true)"
    if [ -z "$deb" ]; then
        (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$package" >&2)
        deb="$(ls "$CACHE"/"${package}"_*.deb | head -1)"
    fi
    echo "$deb"
}

kernel_package() { # the versioned kernel package the cloud metapackage points at
    apt-cache depends "$KERNEL_META" | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1
}

extract_kernel() {
    local deb="$1" unpacked="$CACHE/kernel"
    rm -rf "$unpacked" && mkdir -p "$unpacked"
    dpkg-deb -x "$deb" "$unpacked"
    cp "$(ls "$unpacked"/boot/vmlinuz-* | head -1)" "$OUT/vmlinuz"
    rm -rf "$unpacked"
}

build_initramfs() {
    local busybox_deb="$1" tree="$CACHE/initramfs" unpacked="$CACHE/busybox"
    rm -rf "$tree" "$unpacked" && mkdir -p "$tree"/{bin,dev,proc,sys,tmp} "$unpacked"
    dpkg-deb -x "$busybox_deb" "$unpacked"
    cp "$unpacked/bin/busybox" "$tree/bin/busybox"
    gcc -static -O2 -Wall -Wextra -o "$tree/bin/memwriter" "$ROOT/scripts/guest/memwriter.c"
    cat >"$tree/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
echo "guest-init: booted in $(/bin/busybox cut -d' ' -f1 /proc/uptime) s"
/bin/memwriter
echo "guest-init: memwriter exited with $?"
exec /bin/busybox sh
INIT
    chmod +x "$tree/init"
    (cd "$tree" && find . | "$tree/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$OUT/initramfs.cpio.gz.new"
    mv "$OUT/initramfs.cpio.gz.new" "$OUT/initramfs.cpio.gz"
    rm -rf "$tree" "$unpacked"
}

ensure_compiler() { # a fresh Debian has no gcc; install it when we may
    printf 'int main(void){return 0;}' | gcc -static -x c -o /dev/null - 2>/dev/null && return 0
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev >&2
    else
        echo "build_test_guest: needs gcc with static libc: apt-get install gcc libc6-dev" >&2
        exit 1
    fi
}

main() {
    local kernel_pkg kernel_deb busybox_deb
    ensure_compiler
    kernel_pkg="$(kernel_package)"
    [ -n "$kernel_pkg" ] || { echo "build_test_guest: cannot resolve $KERNEL_META" >&2; exit 1; }
    kernel_deb="$(download "$kernel_pkg")"
    busybox_deb="$(download busybox-static)"
    [ -s "$OUT/vmlinuz" ] && [ "$OUT/vmlinuz" -nt "$kernel_deb" ] || extract_kernel "$kernel_deb"
    build_initramfs "$busybox_deb"
    {
        echo "kernel: $(basename "$kernel_deb")"
        echo "busybox: $(basename "$busybox_deb")"
        echo "memwriter: $(sha256sum "$ROOT/scripts/guest/memwriter.c" | cut -c1-16)"
        echo "built: $(date -u +%FT%TZ)"
    } >"$OUT/manifest.txt"
    echo "build_test_guest: $OUT/vmlinuz $OUT/initramfs.cpio.gz"
}

main "$@"
