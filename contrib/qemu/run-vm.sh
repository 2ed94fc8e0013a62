#!/bin/sh
# A VM with the host's card in its emulated CCID reader, fed by `pcscbridge qemu`.
#   contrib/qemu/run-vm.sh NAME DISK [more QEMU arguments]
# then, on the same host (in any order: each side waits for the other):
#   pcscbridge qemu --vm-name NAME --chardev unix:/run/pcscbridge/qemu/NAME.sock --reader 'PATTERN'
# or the unit contrib/systemd/pcscbridge-qemu@.service.
#
# The CCID part is the four lines after the disk: QEMU listens on the chardev (server=on,
# wait=off: the VM starts without waiting for pcscbridge); usb-ccid is a full-speed USB device
# (qemu-xhci or UHCI take it, EHCI alone refuses it); ccid-card-passthru is its card, fed over
# the chardev. For a second reader, repeat the chardev and both devices with other ids.
# Tested with QEMU 7.2 (Debian 12) under TCG (QEMU_ACCEL=tcg); KVM changes nothing for the
# reader. CCID_DIR: where the socket goes (default /run/pcscbridge/qemu).
set -eu
name=$1 disk=$2
shift 2
dir=${CCID_DIR:-/run/pcscbridge/qemu}
mkdir -p "$dir"
exec qemu-system-x86_64 -name "$name" -machine q35 -accel "${QEMU_ACCEL:-kvm}" -m 2048 \
	-drive file="$disk",if=virtio,format=raw \
	-device qemu-xhci,id=xhci \
	-chardev socket,id=ccid,path="$dir/$name.sock",server=on,wait=off \
	-device usb-ccid,id=ccid0,bus=xhci.0 \
	-device ccid-card-passthru,chardev=ccid,bus=ccid0.0 \
	"$@"
