"""pcscbridge: the host's smart card readers for VMs, containers and sandboxes, at the PC/SC API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pcscbridge")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
