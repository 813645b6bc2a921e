#!/usr/bin/env bash
# build-image.sh: the Debian 12 guest for the VM test, from Debian's packages only.
#
#   tests/vm/build-image.sh OUTDIR
#
# Writes OUTDIR/{rootfs.img,vmlinuz,initrd.img,id_ed25519}: an ext4 root with systemd as PID 1
# (cgroup v2, Debian 12's default), the cloud kernel, sshd taking the key for root and for
# `alice` (a sudoer: the non-root install path), and pip pointed at /opt/wheelhouse (no index),
# which run.sh fills with the project's wheels. No bootloader: qemu boots the kernel directly.
# run.sh caches OUTDIR under /var/cache/appliance-vm keyed by this file's hash.
set -euo pipefail
OUT=${1:?usage: build-image.sh OUTDIR}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PKGS=systemd,systemd-sysv,dbus,udev,linux-image-cloud-amd64,initramfs-tools,python3,python3-venv,sudo,openssh-server,procps,iproute2,util-linux,kmod,ca-certificates,passwd
[ "$(id -u)" -eq 0 ] || { echo "build-image.sh: needs root (debootstrap)" >&2; exit 1; }
for t in debootstrap mkfs.ext4 ssh-keygen; do
    command -v "$t" >/dev/null || { echo "build-image.sh: no $t: apt-get install debootstrap e2fsprogs openssh-client" >&2; exit 1; }
done
mkdir -p "$OUT"
ROOT=$OUT/root.tmp
rm -rf "$ROOT" && mkdir -p "$ROOT"
debootstrap --variant=minbase --include="$PKGS" bookworm "$ROOT" "$MIRROR"

echo appliance-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 appliance-vm\n' > "$ROOT/etc/hosts"
printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' > "$ROOT/etc/fstab"
# DHCP from qemu's user-mode network on whatever the NIC is called
mkdir -p "$ROOT/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' > "$ROOT/etc/systemd/network/10-dhcp.network"
chroot "$ROOT" systemctl enable systemd-networkd ssh >/dev/null 2>&1
chroot "$ROOT" systemctl mask systemd-networkd-wait-online apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
# root logs in on the serial console without a password (a throwaway test guest)
chroot "$ROOT" passwd -d root >/dev/null
# the test's ssh key, for root and for alice (a sudoer, as on a workstation)
rm -f "$OUT/id_ed25519" "$OUT/id_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -C appliance-vm -f "$OUT/id_ed25519"
chroot "$ROOT" useradd -m -s /bin/bash -G sudo alice
echo 'alice ALL=(ALL) NOPASSWD: ALL' > "$ROOT/etc/sudoers.d/alice" && chmod 0440 "$ROOT/etc/sudoers.d/alice"
for h in root home/alice; do
    mkdir -p "$ROOT/$h/.ssh" && cp "$OUT/id_ed25519.pub" "$ROOT/$h/.ssh/authorized_keys"
    chmod 700 "$ROOT/$h/.ssh" && chmod 600 "$ROOT/$h/.ssh/authorized_keys"
done
chroot "$ROOT" chown -R alice:alice /home/alice/.ssh
printf 'PermitRootLogin prohibit-password\nUseDNS no\n' > "$ROOT/etc/ssh/sshd_config.d/vm.conf"
# pip installs only from the wheelhouse run.sh copies in (no index needed inside the guest)
mkdir -p "$ROOT/opt/wheelhouse"
printf '[global]\nno-index = true\nfind-links = /opt/wheelhouse\n' > "$ROOT/etc/pip.conf"
# sshd's host keys are made once here (so each boot is quick)
chroot "$ROOT" ssh-keygen -A >/dev/null

cp -L "$ROOT/vmlinuz" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
cp -L "$ROOT/initrd.img" "$OUT/initrd.img.tmp" && mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
chroot "$ROOT" apt-get clean
rm -f "$OUT/rootfs.img.tmp"
mkfs.ext4 -q -L root -d "$ROOT" "$OUT/rootfs.img.tmp" 6G
mv "$OUT/rootfs.img.tmp" "$OUT/rootfs.img"
rm -rf "$ROOT"
echo "build-image.sh: $OUT ready"
