#!/usr/bin/env bash
# Build the OS image guest into guest-images/ (git-ignored), from Debian's packages only:
#   guest-images/guest-os.qcow2          a bootable disk image (qcow2, 64 MiB virtual, ~20 MiB allocated):
#       MBR      syslinux's mbr.bin, partition 1 active
#       vda1     FAT16 "MXBOOT": syslinux (ldlinux.sys), Debian's cloud kernel, a small initramfs that
#                loads the virtio/fw_cfg modules and switches to the root file system
#       vda2     ext4 "mxroot": busybox-static, /sbin/init (a shell script), guestload
#                (scripts/guest/guestload.c, compiled here), /etc/guestload.conf (its defaults)
#       vda3     the raw data area guestload writes its sequence-numbered blocks to (16 MiB)
#   guest-images/guest-os.manifest.txt   what went in, the build's input hash and its times
# SeaBIOS boots it from its own disk (no -kernel): MBR -> syslinux -> kernel + initramfs -> /sbin/init
# on vda2 -> guestload. guestload's per-guest parameters come from QEMU's fw_cfg
# (opt/org.matrixoe/guestload, written by the agent), over the image's defaults.
# Idempotent: the .debs are kept in guest-images/cache/ (shared with build_test_guest.sh), and
# the image is rebuilt only when an input changed (the script, guestload's sources, a package).
# Needs, on the build host: gcc + static libc, dosfstools, mtools, syslinux + syslinux-common,
# fdisk (sfdisk), e2fsprogs (mkfs.ext4 -d), qemu-utils (qemu-img); installed when run as root.
# Nothing is mounted and no loop device is used, so it also runs in an unprivileged container.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${GUEST_IMAGES_DIR:-$ROOT/guest-images}"
CACHE="$OUT/cache"
IMAGE="$OUT/guest-os.qcow2"
MANIFEST="$OUT/guest-os.manifest.txt"
KERNEL_META=linux-image-cloud-amd64
SYSLINUX_DIR=/usr/lib/syslinux
BOOT_MIB=24 ROOT_MIB=8 DATA_MIB=16 DISK_MIB=64 # partitions start at 1 MiB, in this order
# Modules the initramfs loads, in dependency order (the cloud kernel builds them as modules).
MODULES=(
    drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
    drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko
    net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko
    drivers/firmware/qemu_fw_cfg.ko drivers/input/evdev.ko drivers/acpi/button.ko
)
HOST_PACKAGES=(gcc libc6-dev dosfstools mtools syslinux syslinux-common fdisk e2fsprogs qemu-utils)

log() { echo "build_guest_image: $*" >&2; }

ensure_tools() { # install what is missing when we may; say what is needed otherwise
    local missing=()
    printf 'int main(void){return 0;}' | gcc -static -x c -o /dev/null - 2>/dev/null || missing+=(gcc libc6-dev)
    command -v mkfs.fat >/dev/null || missing+=(dosfstools)
    command -v mcopy >/dev/null || missing+=(mtools)
    command -v syslinux >/dev/null || missing+=(syslinux)
    [ -f "$SYSLINUX_DIR/mbr/mbr.bin" ] || missing+=(syslinux-common)
    command -v sfdisk >/dev/null || [ -x /usr/sbin/sfdisk ] || [ -x /sbin/sfdisk ] || missing+=(fdisk)
    command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing tools; install them with: apt-get install ${missing[*]}"
        exit 1
    fi
    log "installing ${missing[*]}"
    local target=()
    # qemu-img from the same QEMU as qemu-system-x86 (bookworm-backports) when that source exists.
    if [[ " ${missing[*]} " == *" qemu-utils "* ]] && apt-cache policy qemu-utils | grep -q bookworm-backports; then
        target=(-t bookworm-backports)
    fi
    local install=(apt-get install -y -q --no-install-recommends "${target[@]}" "${missing[@]}")
    # A fresh machine may not have fetched the package lists yet.
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2 || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2; }
}

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

inputs_hash() { # everything the image is made of; a change rebuilds it
    {
        cat "$0" "$ROOT/scripts/guest/guestload.c" "$ROOT/scripts/guest/pages.h"
        basename "$1"
        basename "$2"
        dpkg-query -W -f='${Version}\n' syslinux-common 2>/dev/null || true
    } | sha256sum | cut -c1-16
}

check_module_order() { # check_module_order <dir>: each module's dependencies come before it in MODULES
    local dir="$1" loaded=" " module name dependency
    for module in "${MODULES[@]}"; do
        name="$(basename "$module" .ko)"
        for dependency in $(tr '\0' '\n' <"$dir/$name.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
            [[ "$loaded" == *" $dependency "* ]] || { log "module $name needs $dependency first"; exit 1; }
        done
        loaded+="$name "
    done
}

build_initramfs() { # build_initramfs <work> <kernel tree> <busybox>: the early userspace, gzip'd cpio
    local work="$1" kernel="$2" busybox="$3" tree="$1/initramfs" version module
    version="$(ls "$kernel/lib/modules")"
    mkdir -p "$tree"/{bin,dev,proc,sys,newroot,lib/modules}
    cp "$busybox" "$tree/bin/busybox"
    for module in "${MODULES[@]}"; do
        cp "$kernel/lib/modules/$version/kernel/$module" "$tree/lib/modules/"
    done
    check_module_order "$tree/lib/modules"
    printf '%s\n' "${MODULES[@]##*/}" >"$tree/lib/modules/load-order"
    cat >"$tree/init" <<'INIT'
#!/bin/busybox sh
# Load the virtio drivers, find the root file system by its label, switch to it.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for module in $(/bin/busybox cat /lib/modules/load-order); do
    /bin/busybox insmod "/lib/modules/$module" || echo "initramfs: insmod $module failed"
done
root=""
for _ in $(/bin/busybox seq 100); do
    root="$(/bin/busybox findfs LABEL=mxroot 2>/dev/null)" && break
    /bin/busybox usleep 50000
done
[ -n "$root" ] || { echo "initramfs: no file system labelled mxroot"; exec /bin/busybox sh; }
/bin/busybox mount -t ext4 -o rw,noatime "$root" /newroot || exec /bin/busybox sh
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc /sys
exec /bin/busybox switch_root /newroot /sbin/init
INIT
    chmod +x "$tree/init"
    (cd "$tree" && find . | "$tree/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -6 >"$work/initrd.gz"
}

build_root() { # build_root <work> <busybox>: the ext4 root file system's tree
    local work="$1" busybox="$2" tree="$1/root" applet
    mkdir -p "$tree"/{bin,sbin,usr/bin,etc/acpi/PWRF,dev,proc,sys,run,tmp,root}
    cp "$busybox" "$tree/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
    done
    gcc -static -O2 -Wall -Wextra -o "$tree/usr/bin/guestload" "$ROOT/scripts/guest/guestload.c" -lpthread
    strip "$tree/usr/bin/guestload"
    cat >"$tree/etc/guestload.conf" <<'CONF'
# guestload's defaults; the agent's fw_cfg file (opt/org.matrixoe/guestload) overrides any of them.
mib=64
rate=1000
check_s=2
disk_rate=200
disk_depth=4
hb_ms=10
cmd=/dev/ttyS1
CONF
    cat >"$tree/etc/acpi/PWRF/00000080" <<'POWER'
#!/bin/sh
echo "guest-os: power button: powering off"
sync
poweroff -f
POWER
    chmod +x "$tree/etc/acpi/PWRF/00000080"
    echo "matrixoe-guest" >"$tree/etc/hostname"
    cat >"$tree/sbin/init" <<'INIT'
#!/bin/busybox sh
# The guest OS's init: mounts, the power button, the network card, then guestload for ever.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=0755 run /run
hostname -F /etc/hostname
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/org.matrixoe/guestload/raw
value() { cat /etc/guestload.conf "$FWCFG" 2>/dev/null | sed -n "s/^$1=//p" | tail -1; }
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid  # the power button powers off
disk="$(findfs LABEL=mxroot)"
echo "disk=${disk%[0-9]}3" >/run/guestload.auto
ip link set lo up
if ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up
    address="$(value ip)" gateway="$(value gateway)"
    [ -n "$address" ] && ip addr add "$address" dev eth0
    [ -n "$gateway" ] && ip route add default via "$gateway"
    echo "guest-os: eth0 $(cat /sys/class/net/eth0/address) ${address:-no address}"
fi
echo "guest-os: booted in $(cut -d' ' -f1 /proc/uptime) s"
guestload /run/guestload.auto /etc/guestload.conf "$FWCFG"
echo "guest-os: guestload exited with $?"
exec sh
INIT
    chmod +x "$tree/sbin/init"
}

build_boot() { # build_boot <work> <vmlinuz>: the FAT boot partition with syslinux, kernel, initramfs
    local work="$1" vmlinuz="$2" part="$1/boot.part"
    rm -f "$part"
    mkfs.fat -C -F 16 -n MXBOOT -h 2048 "$part" $((BOOT_MIB * 1024)) >/dev/null
    cat >"$work/syslinux.cfg" <<'CFG'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
    LINUX /vmlinuz
    INITRD /initrd.gz
    APPEND console=ttyS0 panic=-1 quiet cryptomgr.notests
CFG
    mcopy -i "$part" "$vmlinuz" ::/vmlinuz
    mcopy -i "$part" "$work/initrd.gz" ::/initrd.gz
    mcopy -i "$part" "$work/syslinux.cfg" ::/syslinux.cfg
    syslinux --install "$part"
}

assemble() { # assemble <work>: MBR, three partitions, data area zeroed; qcow2 out
    local work="$1" disk="$1/disk.raw" sfdisk
    sfdisk="$(command -v sfdisk || echo /usr/sbin/sfdisk)"
    truncate -s "${DISK_MIB}M" "$disk"
    "$sfdisk" --quiet "$disk" <<TABLE
label: dos
start=1MiB, size=${BOOT_MIB}MiB, type=e, bootable
size=${ROOT_MIB}MiB, type=83
size=${DATA_MIB}MiB, type=da
TABLE
    dd if="$SYSLINUX_DIR/mbr/mbr.bin" of="$disk" bs=440 count=1 conv=notrunc status=none
    dd if="$work/boot.part" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
    mkfs.ext4 -q -F -L mxroot -d "$work/root" -O ^has_journal,^metadata_csum \
        -E root_owner=0:0,offset=$(((1 + BOOT_MIB) * 1024 * 1024)) "$disk" "${ROOT_MIB}M"
    qemu-img convert -q -f raw -O qcow2 "$disk" "$IMAGE.partial"
    mv "$IMAGE.partial" "$IMAGE"
}

main() {
    local started kernel_pkg kernel_deb busybox_deb hash
    started=$(date +%s%N)
    ensure_tools
    mkdir -p "$CACHE"
    kernel_pkg="$(kernel_package)"
    [ -n "$kernel_pkg" ] || { log "cannot resolve $KERNEL_META"; exit 1; }
    kernel_deb="$(download "$kernel_pkg")"
    busybox_deb="$(download busybox-static)"
    hash="$(inputs_hash "$kernel_deb" "$busybox_deb")"
    if [ -s "$IMAGE" ] && grep -qx "inputs: $hash" "$MANIFEST" 2>/dev/null; then
        log "$IMAGE is up to date (inputs $hash)"
        return 0
    fi
    WORK="$(mktemp -d "$OUT/.build-XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    local work="$WORK"
    mkdir -p "$work/kernel" "$work/busybox"
    # Only the kernel and the few modules the initramfs loads (the whole package is ~90 MiB).
    dpkg-deb --fsys-tarfile "$kernel_deb" | tar -xf - -C "$work/kernel" --wildcards './boot/vmlinuz-*' \
        "${MODULES[@]/#/./lib/modules/*/kernel/}"
    dpkg-deb -x "$busybox_deb" "$work/busybox"
    build_initramfs "$work" "$work/kernel" "$work/busybox/bin/busybox"
    build_root "$work" "$work/busybox/bin/busybox"
    build_boot "$work" "$(ls "$work"/kernel/boot/vmlinuz-* | head -1)"
    assemble "$work"
    {
        echo "inputs: $hash"
        echo "kernel: $(basename "$kernel_deb")"
        echo "busybox: $(basename "$busybox_deb")"
        echo "syslinux: $(dpkg-query -W -f='${Version}' syslinux-common 2>/dev/null || echo unknown)"
        echo "guestload: $(sha256sum "$ROOT/scripts/guest/guestload.c" | cut -c1-16)"
        echo "layout: vda1 FAT16 ${BOOT_MIB} MiB boot, vda2 ext4 ${ROOT_MIB} MiB root, vda3 ${DATA_MIB} MiB data"
        echo "allocated: $(du -k "$IMAGE" | cut -f1) KiB of ${DISK_MIB} MiB"
        echo "built: $(date -u +%FT%TZ) in $((($(date +%s%N) - started) / 1000000)) ms"
    } >"$MANIFEST"
    log "$IMAGE ($(du -h "$IMAGE" | cut -f1) allocated)"
}

main "$@"
