from zfs_unlock_agent.cli import run

run()
