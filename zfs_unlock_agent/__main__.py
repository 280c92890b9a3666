from zfs_unlock_agent.cli import main

raise SystemExit(main())
