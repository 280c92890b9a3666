"""zfs-unlock-server: the key server that releases dataset keys to enrolled hosts.

This folder is server/ in the source tree and installs as the package zfs_unlock_server
(pyproject.toml maps the one to the other; .typecheck/ shows mypy the same name).
"""

__version__ = "0.1.0"  # the project's version (pyproject.toml); a test keeps them equal
