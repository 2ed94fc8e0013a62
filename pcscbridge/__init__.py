"""pcscbridge: the host's smart card readers for VMs, containers and sandboxes, at the PC/SC API."""

__version__ = "0.1.0"
