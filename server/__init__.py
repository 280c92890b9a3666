"""zfs-unlock-server: the key server that releases dataset keys to enrolled hosts."""
