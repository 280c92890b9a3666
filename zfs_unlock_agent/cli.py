"""zfs-unlock-agent: the command line. The only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from zfs_unlock_agent import __version__, config
from zfs_unlock_agent.errors import (
    EX_IOERR,
    EX_LOCKED,
    EX_OK,
    EX_SOFTWARE,
    EX_USAGE,
    AgentError,
    BadKit,
    OutputFailed,
    UsageError,
)
from zfs_unlock_agent.keyclient import KeyClient
from zfs_unlock_agent.log import log
from zfs_unlock_agent.unlock import RootResult, Unlocker, exit_code, read_machine_id, select_roots
from zfs_unlock_agent.zfs import TYPABLE_KEYFORMATS, Zfs
from zfs_unlock_common import validate

Command = Callable[[argparse.Namespace], int]

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def _output(text: str) -> None:
    """One line of the command's output on standard output. Output that cannot be
    written (a closed pipe, a full disk) fails the command with EX_IOERR."""
    try:
        sys.stdout.write(text + "\n")
    except OSError as exc:
        raise OutputFailed(f"cannot write the output: {exc.strerror}") from None


def _load(args: argparse.Namespace, check_files: bool = True) -> config.Config:
    return config.load(args.config, check_files)


def _client_factory(cfg: config.Config) -> Callable[[], KeyClient]:
    return lambda: KeyClient(
        cfg.trusted_servers(), cfg.client_certificate, cfg.client_key, cfg.network
    )


def _unlocker(cfg: config.Config) -> Unlocker:
    return Unlocker(
        Zfs(cfg.zfs),
        _client_factory(cfg),
        read_machine_id(cfg.machine_id_file),
        cfg.zfs.volume_link_timeout,
        cfg.zfs.zvol_dir,
    )


def cmd_unlock(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.deadline is not None:
        cfg = cfg._replace(network=cfg.network._replace(deadline=args.deadline))
    unlocker = _unlocker(cfg)
    inventory = unlocker.zfs.inventory()
    roots = select_roots(inventory, cfg, args.dataset, args.all)
    if not roots:
        log.info("no managed encryption roots found; nothing to do")
        return EX_OK
    return exit_code(unlocker.unlock(inventory, roots, mount=not args.no_mount))


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = _load(args)
    unlocker = _unlocker(cfg)
    inventory = unlocker.zfs.inventory()
    roots = select_roots(inventory, cfg, args.dataset, not args.dataset)
    if not roots:
        log.info("no managed encryption roots found; nothing to verify")
        return EX_OK
    return exit_code(unlocker.verify(inventory, roots))


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    zfs = Zfs(cfg.zfs)
    inventory = zfs.inventory()
    roots = select_roots(inventory, cfg, [], True)
    rows = []
    for root in roots:
        members = inventory.members(root.name)
        rows.append(
            {
                "encryption_root": root.name,
                "pool_guid": inventory.pool_guid(root),
                "dataset_guid": root.guid,
                "keystatus": root.keystatus,
                "keyformat": root.keyformat,
                "keylocation": root.keylocation,
                "mounted": [m.name for m in members if m.mounted],
                "not_mounted": [m.name for m in members if m.wants_mount and not m.mounted],
            }
        )
    if args.json:
        _output(json.dumps(rows, indent=2))
    else:
        for row in rows:
            _output(
                f"{row['encryption_root']:<40} {row['keystatus']:<12} {row['keyformat']:<10}"
                f" mounted {len(row['mounted'])}, unmounted {len(row['not_mounted'])}"
            )
    locked = [r for r in rows if r["keystatus"] != "available"]
    return EX_LOCKED if locked else EX_OK


def cmd_identity(args: argparse.Namespace) -> int:
    return _enrollment_steps(_load(args, check_files=False), args.name)


def cmd_setup(args: argparse.Namespace) -> int:
    from zfs_unlock_agent import setup  # noqa: PLC0415 - a first run's code, not unlock's

    pairs = setup.server_pairs(args.server, args.pin)
    setup.write_config(args.config, setup.render_config(pairs), args.force)
    print(f"# wrote {args.config} ({len(pairs)} server(s))", file=sys.stderr)
    return _enrollment_steps(_load(args, check_files=False), args.name)


def _enrollment_steps(cfg: config.Config, name: str | None) -> int:
    """Make the host's identity (once) and tell the admin how to enroll it: the steps on
    standard error, the key server's command alone on standard output."""
    from zfs_unlock_agent import setup  # noqa: PLC0415

    machine_id = read_machine_id(cfg.machine_id_file)
    host = validate.label(name or socket.gethostname().split(".")[0], "host name")
    identity = setup.make_identity(cfg.client_key, host)
    if identity.created:
        print(
            f"# wrote {identity.key} (0400; it never leaves this host) and {identity.csr}",
            file=sys.stderr,
        )
    else:
        print(
            f"# client key {identity.key} exists; not replaced; wrote {identity.csr} for it",
            file=sys.stderr,
        )
    pools: list[str] = []
    try:
        inventory = Zfs(cfg.zfs).inventory()
        pools = sorted(inventory.pool_guids.values())
        for pool, guid in sorted(inventory.pool_guids.items()):
            print(f"# pool {pool}: guid {guid}", file=sys.stderr)
    except AgentError as exc:
        print(f"# pools unknown: {exc}", file=sys.stderr)
    print(f"# machine-id: {machine_id}", file=sys.stderr)
    print(
        "# to enroll this host:\n"
        f"#   1. copy {identity.csr} to the key server as {host}.csr\n"
        f"#   2. there, run the line below: it writes the host's certificate to {host}.crt\n"
        f"#   3. copy {host}.crt back here as {cfg.client_certificate},"
        " then run: zfs-unlock-agent check",
        file=sys.stderr,
    )
    _output(setup.host_add_line(host, machine_id, pools))
    return EX_OK


def cmd_check(args: argparse.Namespace) -> int:
    from zfs_unlock_agent.check import check_servers  # noqa: PLC0415 - not on the unlock path

    cfg = _load(args)
    machine_id = read_machine_id(cfg.machine_id_file)
    pools: dict[str, str] = {}
    managed: list[str] = []
    try:
        inventory = Zfs(cfg.zfs).inventory()
        pools = {guid: pool for pool, guid in inventory.pool_guids.items()}
        roots = select_roots(inventory, cfg, [], True, on_missing=log.debug)
        managed = sorted({inventory.pool_guid(root) for root in roots})
    except AgentError as exc:
        log.warning("cannot list the pools (%s); their permissions are not compared", exc)
    return check_servers(cfg, machine_id, pools, managed, _output)


def cmd_needs_prompt(args: argparse.Namespace) -> int:
    """ExecCondition= of OpenZFS's zfs-load-key@ROOT units (see systemd/): exit 1 (skip the
    prompt) for a root the agent manages whose key is not loaded yet; it gets the key from
    the daemon, now or when the server answers. With [datasets] openzfs_prompt = "answer",
    a root whose key can be typed keeps its prompt: the password agent answers it with the
    server's key, racing the console. A loaded key (a root the initramfs opened) exits 0:
    the unit then finds nothing to do and succeeds, and the mounts bound to it stay. Any
    doubt exits 0: the prompt appears, never a lock-out."""
    try:
        cfg = _load(args, check_files=False)
        inventory = Zfs(cfg.zfs).inventory()
        root = inventory.root_of(validate.dataset_name(args.dataset))
        managed = {r.name for r in select_roots(inventory, cfg, [], True, on_missing=log.debug)}
    except (AgentError, validate.InvalidInput) as exc:
        log.warning("%s; leaving the prompt to OpenZFS", exc)
        return EX_OK
    if root.name in managed and root.keystatus != "available":
        if cfg.datasets.openzfs_prompt == "answer" and root.keyformat in TYPABLE_KEYFORMATS:
            log.info("%s: prompt kept; the password agent answers it", root.name)
            return EX_OK
        log.info("%s is managed by zfs-unlock-agent: no prompt", root.name)
        return 1
    return EX_OK


def cmd_configcheck(args: argparse.Namespace) -> int:
    cfg = _load(args)
    read_machine_id(cfg.machine_id_file)
    config.client_context(cfg.client_certificate, cfg.client_key)  # they form a usable pair
    _output(f"{args.config}: ok ({len(cfg.servers)} server(s))")
    return EX_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    # Imported here: the one-shot commands do not pay for select, signal handling and sdnotify.
    from zfs_unlock_agent.daemon import Daemon, Signals  # noqa: PLC0415
    from zfs_unlock_agent.notify import Notifier  # noqa: PLC0415
    from zfs_unlock_agent.udev import PoolDiskWatch  # noqa: PLC0415

    cfg = _load(args)
    signals = Signals()
    try:
        return Daemon(cfg, Notifier(), signals, PoolDiskWatch()).run()
    finally:
        signals.close()


def cmd_password_agent(args: argparse.Namespace) -> int:
    from zfs_unlock_agent.passwordagent import PasswordAgent  # noqa: PLC0415

    cfg = _load(args)
    agent = PasswordAgent(
        cfg,
        Zfs(cfg.zfs),
        lambda deadline: KeyClient(
            cfg.trusted_servers(),
            cfg.client_certificate,
            cfg.client_key,
            cfg.network._replace(deadline=deadline),
        ),
        read_machine_id(cfg.machine_id_file),
        idle=args.idle,
    )
    return agent.run()


def cmd_boot_unlock(args: argparse.Namespace) -> int:
    from zfs_unlock_agent.bootrace import GRACE_SECONDS, BootRace, Race, any_prompt  # noqa: PLC0415

    cfg = _load(args)

    def client(race: Race, report: Callable[[str], None], deadline: float) -> KeyClient:
        def pause(seconds: float) -> None:  # a pause that the end of the race cuts short
            race.over.wait(seconds)

        return KeyClient(
            cfg.trusted_servers(),
            cfg.client_certificate,
            cfg.client_key,
            cfg.network._replace(deadline=deadline),
            sleep=pause,
            report=report,
        )

    unlocker = _unlocker(cfg)
    inventory = unlocker.zfs.inventory()
    managed = {r.name for r in select_roots(inventory, cfg, [], True, on_missing=log.debug)}
    grace = _kernel_seconds("zfs_unlock_agent.grace", args.grace, zero=True)
    race = BootRace(
        unlocker,
        client,
        validate.dataset_name(args.dataset),
        any_prompt,
        grace=GRACE_SECONDS if grace is None else grace,
        deadline=_kernel_seconds("zfs_unlock_agent.deadline", args.deadline, zero=False),
        network_up=args.network_up,
        request_deadline=cfg.network.deadline,
    )
    return race.run(inventory, managed)


def _kernel_seconds(name: str, text: str | None, zero: bool) -> float | None:
    """A number of seconds from the kernel command line (0 allowed when ZERO), or None for
    the default. A typo there must cost neither the prompt nor the key server: it is said,
    and the default stands in."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    lowest_ok = value >= 0 if zero else value > 0
    if lowest_ok and value < 86400:
        return value
    log.warning("%s=%s is not a number of seconds we can use; taking the default", name, text)
    return None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError("must be more than 0 and less than 86400")
    return value


def cmd_enroll(args: argparse.Namespace) -> int:
    from zfs_unlock_agent.enroll import enroll  # noqa: PLC0415 - not on the unlock path

    cfg = _load(args)
    validate.dataset_name(args.dataset)
    zfs = Zfs(cfg.zfs)
    with _client_factory(cfg)() as client:
        _output(
            enroll(
                zfs,
                client,
                read_machine_id(cfg.machine_id_file),
                args.dataset,
                args.keyformat,
                args.create,
            )
        )
    return EX_OK


def cmd_rotate(args: argparse.Namespace) -> int:
    from zfs_unlock_agent.rotate import rotate  # noqa: PLC0415 - not on the unlock path

    cfg = _load(args)
    zfs = Zfs(cfg.zfs)
    inventory = zfs.inventory()
    roots = select_roots(inventory, cfg, args.dataset, args.all)
    if not roots:
        log.info("no managed encryption roots found; nothing to rotate")
        return EX_OK
    machine_id = read_machine_id(cfg.machine_id_file)
    results = []
    with _client_factory(cfg)() as client:
        for root in roots:
            try:
                _output(rotate(zfs, client, machine_id, inventory, root))
                results.append(RootResult(root.name, "rotated"))
            except AgentError as exc:
                log.error("%s", exc)
                results.append(RootResult(root.name, "failed", exc.exit_code, str(exc)))
    return exit_code(results)


def cmd_renew(args: argparse.Namespace) -> int:
    from zfs_unlock_agent import initramfs, renew  # noqa: PLC0415 - not on the unlock path

    cfg = _load(args)
    machine_id = read_machine_id(cfg.machine_id_file)
    with _client_factory(cfg)() as client:
        not_after = renew.renew(
            cfg,
            client,
            machine_id,
            lambda: initramfs.refresh(cfg.state_directory, cfg.daemon.initramfs_update),
        )
    day = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    _output(f"{cfg.client_certificate}: renewed, valid until {day}; the initramfs holds it")
    return EX_OK


def _no_server() -> KeyClient:
    raise UsageError("recover uses no key server")


def cmd_recover(args: argparse.Namespace) -> int:
    """Unlock from a recovery kit, with no key server: docs/recovery-kit.md."""
    from zfs_unlock_agent.recover import read_kit  # noqa: PLC0415 - break-glass only

    for name in args.dataset:
        validate.dataset_name(name)
    # The configuration is optional here (a rebuilt host may have none): only [zfs] is used.
    settings = _load(args, check_files=False).zfs if args.config.exists() else config.ZfsSettings()
    zfs = Zfs(settings)
    inventory = zfs.inventory()
    roots = [inventory.root_of(name) for name in args.dataset]
    kit = read_kit(args.kit, args.identity)
    try:
        if args.all:
            roots = [
                r
                for r in inventory.encryption_roots()
                if kit.find(inventory.pool_guids.get(r.pool, ""), r)
            ]
            if not roots:
                hosts = ", ".join(sorted({k.host for k in kit.keys})) or "none"
                raise BadKit(
                    f"{args.kit}: none of its {len(kit.keys)} key(s) (host(s) {hosts}) is for"
                    " an encryption root here: no pool and dataset GUID matches; nothing loaded"
                )
        unlocker = Unlocker(
            zfs, _no_server, "", settings.volume_link_timeout, settings.zvol_dir, False
        )
        roots = list({r.name: r for r in roots}.values())
        return exit_code(
            unlocker.unlock(inventory, roots, mount=not args.no_mount, source=kit.source)
        )
    finally:
        kit.wipe()


def _terminal_columns() -> int:
    """What shutil.get_terminal_size() says, without importing shutil (and with it the
    compression modules) on every run: argparse asks as soon as an argument is added."""
    with contextlib.suppress(KeyError, ValueError):
        return int(os.environ["COLUMNS"])
    with contextlib.suppress(OSError):
        return os.get_terminal_size(1).columns  # standard output, as shutil asks
    return 80


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad command line; the documented status is EX_USAGE (64)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"configuration file (default ${config.CONFIG_ENV} or {config.DEFAULT_PATH})",
    )
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    parser = _Parser(
        prog="zfs-unlock-agent",
        parents=[common],
        description="Unlock OpenZFS encrypted datasets with keys from a zfs-unlock key server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="DS",
        help="without a command: unlock DS's encryption root and mount it",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Command, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common], help=text, description=text
        )
        p.set_defaults(handler=handler)
        return p

    p = add("unlock", cmd_unlock, "fetch keys, load them and mount (default: every managed root)")
    p.add_argument("--all", action="store_true", help="every managed root, plus any --dataset")
    p.add_argument("--dataset", action="append", default=[], metavar="DS")
    p.add_argument("--no-mount", action="store_true", help="load keys only")
    p.add_argument(
        "--deadline",
        type=_seconds,
        metavar="SECONDS",
        help="give up reaching the servers after this long (default: [network] deadline)",
    )
    p = add(
        "verify", cmd_verify, "fetch keys and prove them with 'zfs load-key -n'; change nothing"
    )
    p.add_argument("--dataset", action="append", default=[], metavar="DS")
    p = add("status", cmd_status, "show managed encryption roots (no network)")
    p.add_argument("--json", action="store_true")
    p = add(
        "identity",
        cmd_identity,
        "create this host's key pair and CSR; print what the server admin needs",
    )
    p.add_argument("--name", help="host name to request (default: the short hostname)")
    add(
        "daemon",
        cmd_daemon,
        "unlock at boot, then retry failed roots, unlock pools that appear later, check in"
        " (the systemd service)",
    )
    p = add(
        "password-agent",
        cmd_password_agent,
        "answer systemd's password questions for managed ZFS roots with the server's keys"
        " (started by zfs-unlock-agent-password.path)",
    )
    p.add_argument(
        "--idle",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="exit after the ask directory has been empty this long (default 5)",
    )
    p = add(
        "boot-unlock",
        cmd_boot_unlock,
        "initramfs: the key server and a prompt on the console race for DS's encryption root;"
        " the first key that loads wins",
    )
    p.add_argument("--dataset", required=True, metavar="DS")
    p.add_argument(
        "--grace",
        metavar="SECONDS",
        help="show the prompt this long after the network is up, without a key from the server"
        " (default 2)",
    )
    p.add_argument(
        "--network-up",
        type=Path,
        metavar="FILE",
        help="a file that appears once the network is up: the server is asked and the grace"
        " period starts then (or after 15 s without it); without this option, at once",
    )
    p.add_argument(
        "--deadline",
        metavar="SECONDS",
        help="stop asking the servers after this long (default: for as long as the race lasts)",
    )
    p = add(
        "needs-prompt",
        cmd_needs_prompt,
        "exit 1 if the agent manages DS's encryption root, else 0 (for zfs-load-key@ units)",
    )
    p.add_argument("dataset", metavar="DS")
    add("configcheck", cmd_configcheck, "validate the configuration (no ZFS, no network)")
    add(
        "check",
        cmd_check,
        "ask every server whether this host could fetch its keys now, and say what is wrong",
    )
    p = add(
        "setup",
        cmd_setup,
        "first run: write the configuration, make the identity, print the enrollment command",
    )
    p.add_argument(
        "--server",
        action="append",
        default=[],
        required=True,
        metavar="URL",
        help="a key server, https://HOST[:PORT] (repeat for more, each with its --pin)",
    )
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        required=True,
        metavar="PIN",
        help="the server's pin, sha256//..., as 'zfs-unlock-server pin' prints it",
    )
    p.add_argument("--name", help="host name to request (default: the short hostname)")
    p.add_argument("--force", action="store_true", help="replace an existing configuration")
    p = add(
        "recover",
        cmd_recover,
        "no key server: load keys from a recovery kit (age-encrypted) and mount",
    )
    p.add_argument("--kit", type=Path, required=True, metavar="FILE", help="the recovery kit")
    p.add_argument(
        "--identity",
        type=Path,
        required=True,
        metavar="FILE",
        help="the age identity file that opens it",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--dataset", action="append", default=[], metavar="DS", help="DS's encryption root"
    )
    which.add_argument(
        "--all",
        action="store_true",
        help="every encryption root here whose pool and dataset GUID the kit holds",
    )
    p.add_argument("--no-mount", action="store_true", help="load keys only")
    p = add("enroll", cmd_enroll, "move a dataset to a key from the server")
    p.add_argument("--dataset", required=True, metavar="DS")
    p.add_argument("--keyformat", choices=("raw", "hex"), default="raw")
    p.add_argument(
        "--create", action="store_true", help="create DS (encrypted) when it does not exist"
    )
    p = add(
        "rotate",
        cmd_rotate,
        "give an unlocked dataset a new key from the server (zfs change-key), retire the old",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--dataset", action="append", default=[], metavar="DS", help="DS's encryption root"
    )
    which.add_argument("--all", action="store_true", help="every managed encryption root")
    add(
        "renew",
        cmd_renew,
        "get a new client certificate for this host's key from the server (over mutual TLS)",
    )
    return parser


def harden_process() -> bool:
    """Keys pass through this process's memory: no core dumps, no ptrace by other users.
    Returns False when the kernel refused to make the process non-dumpable."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    hardened = harden_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    if "config" not in args:
        args.config = config.default_path()
    log.setup(getattr(args, "verbose", False))
    if not hardened:
        log.warning("could not mark the process non-dumpable (prctl); core dumps are still off")
    handler: Command | None = getattr(args, "handler", None)
    if handler is None:
        if not args.dataset:
            parser.print_usage(sys.stderr)
            return EX_USAGE
        args.all, args.no_mount, args.deadline = False, False, None
        handler = cmd_unlock  # the manual mode: --dataset DS
    try:
        return handler(args)
    except AgentError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except validate.InvalidInput as exc:
        log.error("%s", exc)
        return EX_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - a bug: say so, without local variables that might hold a key
        log.error("internal error (run with -v for details)")
        log.debug("traceback", exc_info=True)
        return EX_SOFTWARE


def run() -> NoReturn:
    """The installed command (and `python -m zfs_unlock_agent`): main(), its output
    flushed, then an exit that skips the interpreter's teardown. Freeing every module and
    OpenSSL's clean-up cost each cold unlock about 8 ms and do nothing for a process that
    is done: main() has closed its files and reaped every zfs it started."""
    code = main()
    try:
        sys.stdout.flush()
    except OSError as exc:
        log.error("cannot write the output: %s", exc.strerror)
        code = EX_IOERR  # whatever the status said, the output it promised is lost
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


__all__ = ["main", "run"]
