"""The real-OpenZFS scenarios, one module each (`run(ctx) -> str`, a STRATEGY docstring),
run by tests/vm/guest/runner.py in the order of SCENARIOS below.

This is the one list: the host's tests/vm/test_real_zfs.py reads it too, so this module
names the cases and imports none of them (nor the harness).
"""

SCENARIOS: tuple[str, ...] = (
    "enroll_unlock_mount",
    "server_down_then_up",
    "backup_restore",
    "zfs_as_the_agent_expects",
    "volume_link_and_wrong_key",
    "unlock_all_two_pools",
    "key_formats",
    "wrong_key_partial",
    "verify_mismatch",
    "migrate_from_file",
    "migrate_from_passphrase",
    "migrate_from_native_https",
    "enroll_interrupted",
    "export_import_rename",
    "rotate_keys",
    "zfs_list_cache_warning",
    # The key server is lost and rebuilt from a backup: the scenarios after it (the
    # benchmark) meet the rebuilt one.
    "total_loss_recovery_kit",
    # The benchmark, not a behaviour test, last: it adds the key server's certificate to
    # the guest's trust store, which migrate_from_native_https needs it not to be in.
    "bench_native_vs_agent",
)
