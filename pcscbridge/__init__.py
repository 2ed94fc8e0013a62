"""pcscbridge: the host's smart card readers for VMs, containers and sandboxes, at the PC/SC API."""
