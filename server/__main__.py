from zfs_unlock_server.cli import main

raise SystemExit(main())
