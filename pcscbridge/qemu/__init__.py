"""The QEMU front-end: a host reader's card in a VM's emulated CCID reader (usb-ccid with
ccid-card-passthru), fed over QEMU's chardev in the VSCard protocol, through the host service.
"""

DEFAULT_IDLE_RELEASE = 0.3  # seconds without a guest command before the host transaction ends
