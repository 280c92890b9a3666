"""zfs-unlock-agent: unlock OpenZFS encrypted datasets with keys from a remote key server."""

__version__ = "0.1.0"
