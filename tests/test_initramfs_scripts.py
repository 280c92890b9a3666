"""The initramfs integration's shell scripts: lint, install.sh, and each script run for real.

The scripts hard-code paths of the system they run on (/proc/cmdline,
/usr/sbin/zfs-unlock-agent, /usr/share/initramfs-tools/hook-functions,
/lib/dracut-zfs-lib.sh). Nothing here touches those paths on this machine:

- the initramfs-tools provider and the dracut pre-mount hook run in a chroot that
  looks like an initramfs (busybox, or dash with coreutils), with stubs for the
  agent, zfs, zpool and systemctl, and a plain file as /proc/cmdline;
- the initramfs-tools hook runs in a private mount namespace where a tmpfs over
  /usr/share/initramfs-tools holds a stub hook-functions;
- dracut's module-setup.sh is sourced by bash with stub dracut functions.

The stubs record what they were asked; OpenZFS's side is mimicked from its
documented contract (contrib/initramfs/README.md, decrypt_fs in scripts/zfs, and
decode_root_args in the dracut module's zfs-lib.sh).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from bench.common import machine_id_for
from tests.chroot import Image

ROOT = Path(__file__).parents[1]
INITRAMFS = ROOT / "initramfs"
INSTALL = INITRAMFS / "install.sh"
HOOK = INITRAMFS / "initramfs-tools" / "hooks" / "zfs-unlock-agent"
PROVIDER = INITRAMFS / "initramfs-tools" / "load-key.d" / "zfs-unlock-agent"
CONF = INITRAMFS / "initramfs-tools" / "conf.d" / "zfs-unlock-agent"
DRACUT = INITRAMFS / "dracut" / "90zfs-unlock-agent"
MODULE_SETUP = DRACUT / "module-setup.sh"
DRACUT_HOOK = DRACUT / "zfs-unlock-agent-load-key.sh"
AGENT = Path(sys.executable).with_name("zfs-unlock-agent")
EX_USAGE, EX_NOINPUT, EX_TEMPFAIL, EX_CONFIG = 64, 66, 75, 78

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mount namespaces need root")


# Lint


def shellcheck() -> str:
    binary = shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck is not installed (scripts/bootstrap.sh installs it on Debian)")
    return binary


@pytest.mark.parametrize(
    ("script", "shell", "excluded"),
    [
        pytest.param(INSTALL, "sh", "", id="install.sh"),
        pytest.param(HOOK, "sh", "", id="initramfs-tools-hook"),
        pytest.param(PROVIDER, "sh", "", id="initramfs-tools-provider"),
        # A configuration file that mkinitramfs sources: its variable is used there.
        pytest.param(CONF, "sh", "SC2034", id="initramfs-tools-conf.d"),
        pytest.param(MODULE_SETUP, "bash", "", id="dracut-module-setup"),
        pytest.param(DRACUT_HOOK, "sh", "", id="dracut-pre-mount-hook"),
    ],
)
def test_shellcheck_is_clean(script: Path, shell: str, excluded: str) -> None:
    args = [shellcheck(), "--shell", shell, "--severity", "style"]
    if excluded:
        args += ["--exclude", excluded]
    result = subprocess.run(
        [*args, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("script", "shell"),
    [
        (INSTALL, "dash"),
        (HOOK, "dash"),
        (PROVIDER, "dash"),
        (DRACUT_HOOK, "dash"),
        (MODULE_SETUP, "bash"),
        (PROVIDER, "busybox"),
        (DRACUT_HOOK, "busybox"),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else value,
)
def test_the_shells_that_run_them_parse_them(script: Path, shell: str) -> None:
    binary = shutil.which(shell)
    if binary is None:
        pytest.skip(f"{shell} is not installed")
    argv = [binary, "sh", "-n", str(script)] if shell == "busybox" else [binary, "-n", str(script)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


# install.sh


def run_install(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def tree(root: Path) -> dict[str, int]:
    """Every file below ROOT, relative, with its permission bits."""
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        (
            "initramfs-tools",
            {
                "etc/initramfs-tools/hooks/zfs-unlock-agent": (HOOK, 0o755),
                "etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent": (PROVIDER, 0o644),
                "etc/initramfs-tools/conf.d/zfs-unlock-agent": (CONF, 0o644),
            },
        ),
        (
            "dracut",
            {
                "usr/lib/dracut/modules.d/90zfs-unlock-agent/module-setup.sh": (
                    MODULE_SETUP,
                    0o755,
                ),
                "usr/lib/dracut/modules.d/90zfs-unlock-agent/zfs-unlock-agent-load-key.sh": (
                    DRACUT_HOOK,
                    0o755,
                ),
            },
        ),
    ],
)
def test_install_puts_the_files_in_the_documented_places(
    tmp_path: Path, tool: str, expected: dict[str, tuple[Path, int]]
) -> None:
    target = tmp_path / "root"
    target.mkdir()

    result = run_install("--root", str(target), tool, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert tree(target) == {name: mode for name, (_, mode) in expected.items()}
    for name, (source, _) in expected.items():
        assert (target / name).read_bytes() == source.read_bytes(), name
    assert tool in result.stdout and str(target) in result.stdout


def test_the_documented_places_are_the_ones_the_man_page_names() -> None:
    page = (ROOT / "docs" / "man" / "zfs-unlock-agent.8").read_text()
    for path in (
        "/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent",
        "/etc/initramfs-tools/hooks/zfs-unlock-agent",
        "/usr/lib/dracut/modules.d/90zfs-unlock-agent/",
    ):
        assert path in page


def test_conf_d_sets_a_private_umask() -> None:
    result = subprocess.run(
        ["sh", "-c", '. "$1"; printf %s "$UMASK"', "sh", str(CONF)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == "0077"


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="nothing"),
        pytest.param(["mkinitcpio"], id="unknown-tool"),
        pytest.param(["initramfs-tools", "dracut"], id="two-tools"),
        pytest.param(["dracut", "dracut"], id="the-same-tool-twice"),
        pytest.param(["--root"], id="root-without-a-value"),
        pytest.param(["--root", "/tmp"], id="root-without-a-tool"),
        pytest.param(["--force", "dracut"], id="unknown-option"),
        pytest.param(["-h"], id="help-is-not-an-option"),
    ],
)
def test_bad_usage_exits_64_and_installs_nothing(tmp_path: Path, args: list[str]) -> None:
    result = run_install(*[str(tmp_path) if a == "/tmp" else a for a in args])

    assert result.returncode == EX_USAGE, result.stderr
    assert "usage:" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_root_that_is_not_a_directory_exits_66(tmp_path: Path) -> None:
    result = run_install("--root", str(tmp_path / "missing"), "dracut")
    assert result.returncode == EX_NOINPUT
    assert not (tmp_path / "missing").exists()


# An initramfs to run the boot-time scripts in


def busybox_image(root: Path) -> Image:
    """/bin/sh and the usual tools as busybox applets, as initramfs-tools builds it."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    image = Image(root)
    image.add_exec(Path(busybox), at=Path("/bin/busybox"))
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    for applet in applets:
        link = image.inside(Path("/bin") / applet)
        if not link.exists():
            link.symlink_to("busybox")
    return image


def dash_image(root: Path) -> Image:
    """/bin/sh is dash, the tools are coreutils, sed and grep (Debian's klibc-less setup)."""
    image = Image(root)
    image.add_exec(Path(shutil.which("dash") or "/bin/dash"), at=Path("/bin/sh"))
    for tool in ("cat", "sed", "tr", "grep", "sleep", "env", "mkdir"):
        found = shutil.which(tool)
        assert found is not None, tool
        image.add_exec(Path(found), at=Path("/bin") / tool)
    return image


IMAGES = {"busybox": busybox_image, "dash": dash_image}


@pytest.fixture(params=sorted(IMAGES))
def initramfs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Image]:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    image: Image = IMAGES[request.param](tmp_path / "initramfs")
    for directory in ("log", "state", "run", "proc", "etc", "sbin", "usr/sbin", "dev"):
        image.inside(Path("/") / directory).mkdir(parents=True, exist_ok=True)
    os.mknod(image.inside(Path("/dev/null")), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    image.inside(Path("/dev/null")).chmod(0o666)
    yield image


def state(image: Image, name: str, value: str) -> None:
    image.add_text(f"/state/{name}", value)


def log(image: Image, name: str) -> list[str]:
    path = image.inside(Path("/log") / name)
    return path.read_text().splitlines() if path.exists() else []


# Stubs, shared by both boot-time scripts

STUB_AGENT = """#!/bin/sh
# Stands in for /usr/sbin/zfs-unlock-agent: records its arguments, one per line, then
# exits with /state/agent-exit; with 0 and /state/agent-loads it "loads the key".
for arg in "$@"; do printf '%s\\n' "$arg"; done >/log/agent-argv
code="$(cat /state/agent-exit)"
if [ "$code" = 0 ] && [ -e /state/agent-loads ]; then echo available >/state/keystatus; fi
exit "$code"
"""

STUB_ZFS = """#!/bin/sh
# zfs get -H[o value] PROPERTY DATASET, from /state/PROPERTY (a missing file: no dataset)
echo "zfs $*" >>/log/calls
[ "$1" = get ] || exit 2
eval "prop=\\${$(($# - 1))}"
[ -e "/state/$prop" ] || { echo "cannot open dataset" >&2; exit 1; }
cat "/state/$prop"
"""

STUB_ZPOOL = """#!/bin/sh
# zpool get -Ho value bootfs: one line per imported pool, from /state/bootfs
echo "zpool $*" >>/log/calls
cat /state/bootfs
"""


def add_stubs(image: Image, agent: bool = True) -> None:
    if agent:
        image.add_text("/usr/sbin/zfs-unlock-agent", STUB_AGENT, 0o755)
    image.add_text("/sbin/zfs", STUB_ZFS, 0o755)
    image.add_text("/sbin/zpool", STUB_ZPOOL, 0o755)


# The initramfs-tools provider, run the way OpenZFS's decrypt_fs runs providers

OPENZFS_DECRYPT_FS = """#!/bin/sh
# OpenZFS's decrypt_fs (contrib/initramfs/scripts/zfs, 2.2 and later), reduced to what
# concerns providers: with the root's encryption root locked, source each provider in
# a subshell; a provider that returns 0 and leaves the key loaded ends the search;
# otherwise the passphrase prompt follows. initramfs-tools functions are defined.
configure_networking() { echo configure_networking >>/log/calls; }
get_fs_value() { zfs get -H -ovalue "$2" "$1" 2>/dev/null; }
ZFS=zfs
ZPOOL=zpool
ENCRYPTIONROOT="$1"
KEYLOCATION=prompt
KEYSTATUS="$(get_fs_value "$ENCRYPTIONROOT" keystatus)"
[ "$KEYSTATUS" = unavailable ] || exit 0
for f in /etc/zfs/initramfs-tools-load-key /etc/zfs/initramfs-tools-load-key.d/*; do
    [ -r "$f" ] || continue
    (. "$f")
    rc=$?
    echo "$f returned $rc" >>/log/calls
    if [ "$rc" = 0 ]; then
        KEYSTATUS="$(get_fs_value "$ENCRYPTIONROOT" keystatus)"
        [ "$KEYSTATUS" = unavailable ] || { echo "key loaded"; exit 0; }
    fi
done
echo "asking for the passphrase"
exit 3
"""

CMDLINE = "BOOT_IMAGE=/vmlinuz-6.1.0 root=ZFS=rpool/ROOT/debian ro quiet ip=dhcp"


def provider_boot(
    image: Image,
    cmdline: str = CMDLINE,
    agent_exit: int = 0,
    loads: bool = True,
    agent: bool = True,
) -> subprocess.CompletedProcess[str]:
    add_stubs(image, agent)
    image.add_text("/proc/cmdline", cmdline + "\n")
    image.add_text("/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent", PROVIDER.read_text())
    image.add_text("/decrypt_fs", OPENZFS_DECRYPT_FS, 0o755)
    state(image, "keystatus", "unavailable\n")
    state(image, "agent-exit", f"{agent_exit}\n")
    if loads:
        state(image, "agent-loads", "")
    return image.run("/bin/sh", "/decrypt_fs", "rpool/ROOT")


def unlock_argv(deadline: str = "30") -> list[str]:
    """The dracut hook's call."""
    return ["unlock", "--no-mount", "--deadline", deadline, "--dataset", "rpool/ROOT"]


def race_argv(grace: str = "2", deadline: str = "") -> list[str]:
    argv = ["boot-unlock", "--dataset", "rpool/ROOT", "--grace", grace]
    argv += ["--network-up", "/run/zfs-unlock-agent.network-up"]
    return [*argv, "--deadline", deadline] if deadline else argv


def test_provider_unlocks_the_encryption_root(initramfs: Image) -> None:
    result = provider_boot(initramfs)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "key loaded"
    assert log(initramfs, "agent-argv") == race_argv()
    assert log(initramfs, "calls").count("configure_networking") == 1
    # zfsunlock kills what this names once it has loaded a key over SSH: the race.
    named = initramfs.inside(Path("/run/zfs_console_askpwd_cmd")).read_text()
    assert named == "zfs_unlock_agent boot-unlock\n"
    # The network task says when it is done: the race's grace period starts then.
    assert initramfs.inside(Path("/run/zfs-unlock-agent.network-up")).exists()


def test_a_network_that_hangs_does_not_hold_the_race_back(initramfs: Image) -> None:
    # configure_networking waiting for a DHCP answer that never comes: the race starts
    # all the same, and the provider returns with the race (the network task goes on).
    script = OPENZFS_DECRYPT_FS.replace(
        "configure_networking() { echo configure_networking >>/log/calls; }",
        "configure_networking() { echo configure_networking >>/log/calls; sleep 20; }",
    )
    add_stubs(initramfs)
    initramfs.add_text("/proc/cmdline", CMDLINE + "\n")
    initramfs.add_text("/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent", PROVIDER.read_text())
    initramfs.add_text("/decrypt_fs", script, 0o755)
    state(initramfs, "keystatus", "unavailable\n")
    state(initramfs, "agent-exit", "0\n")
    state(initramfs, "agent-loads", "")
    started = time.monotonic()
    # Its output to a file: the network task, still running, holds it open.
    result = initramfs.run("/bin/sh", "-c", "/bin/sh /decrypt_fs rpool/ROOT >/log/out 2>&1")
    assert time.monotonic() - started < 15, "the provider waited for the network"
    assert result.returncode == 0, log(initramfs, "out")
    assert log(initramfs, "out") == ["key loaded"]
    assert log(initramfs, "agent-argv") == race_argv()
    assert not initramfs.inside(Path("/run/zfs-unlock-agent.network-up")).exists()


@pytest.mark.parametrize(
    ("extra", "grace", "deadline"),
    [
        pytest.param("zfs_unlock_agent.grace=7", "7", "", id="grace"),
        pytest.param("zfs_unlock_agent.grace=0", "0", "", id="prompt-at-once"),
        pytest.param("zfs_unlock_agent.deadline=90", "2", "90", id="deadline"),
        pytest.param("zfs_unlock_agent.grace=5 zfs_unlock_agent.grace=9", "9", "", id="last"),
        pytest.param("zfs_unlock_agent.grace=2.5", "2.5", "", id="fraction"),
        pytest.param("xzfs_unlock_agent.grace=4", "2", "", id="not-ours"),
        # Anything but a number falls back to the default (a typo must cost neither the
        # prompt nor the automatic unlock), and is never split into words or run.
        pytest.param("zfs_unlock_agent.grace=5;reboot", "2", "", id="odd"),
        pytest.param("zfs_unlock_agent.grace=$(reboot)", "2", "", id="substitution"),
        pytest.param("zfs_unlock_agent.deadline=1.2.3", "2", "", id="two-dots"),
        pytest.param("zfs_unlock_agent.deadline=0", "2", "", id="zero-deadline"),
        pytest.param("zfs_unlock_agent.grace=", "2", "", id="empty"),
    ],
)
def test_provider_takes_its_settings_from_the_kernel_command_line(
    initramfs: Image, extra: str, grace: str, deadline: str
) -> None:
    initramfs.add_text("/sbin/reboot", "#!/bin/sh\necho rebooted >>/log/calls\n", 0o755)

    result = provider_boot(initramfs, f"{CMDLINE} {extra}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert log(initramfs, "agent-argv") == race_argv(grace, deadline)
    assert "rebooted" not in log(initramfs, "calls")


@pytest.mark.parametrize(
    ("agent_exit", "loads"),
    [
        pytest.param(EX_TEMPFAIL, False, id="server-unreachable"),
        pytest.param(EX_USAGE, False, id="agent-refuses-its-arguments"),
        pytest.param(0, False, id="success-but-the-key-is-not-loaded"),
    ],
)
def test_provider_failure_falls_back_to_the_prompt(
    initramfs: Image, agent_exit: int, loads: bool
) -> None:
    result = provider_boot(initramfs, agent_exit=agent_exit, loads=loads)

    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.strip() == "asking for the passphrase"
    provider = "/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent"
    assert f"{provider} returned {agent_exit}" in log(initramfs, "calls")


def test_provider_without_the_agent_returns_at_once(initramfs: Image) -> None:
    result = provider_boot(initramfs, agent=False)

    assert result.returncode == 3, result.stdout + result.stderr
    calls = log(initramfs, "calls")
    assert "/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent returned 1" in calls
    assert "configure_networking" not in calls  # no network brought up for nothing


def test_provider_writes_resolv_conf_from_the_dhcp_answers(initramfs: Image) -> None:
    initramfs.add_text(
        "/run/net-eth0.conf", "DEVICE='eth0'\nIPV4DNS0='192.0.2.53'\nIPV4DNS1='0.0.0.0'\n"
    )
    initramfs.add_text(
        "/run/net-eth1.conf", 'DEVICE="eth1"\nIPV4DNS0="198.51.100.7"\nIPV4DNS1=""\n'
    )

    result = provider_boot(initramfs)

    assert result.returncode == 0, result.stdout + result.stderr
    resolv = initramfs.inside(Path("/etc/resolv.conf")).read_text()
    assert resolv == "nameserver 192.0.2.53\nnameserver 198.51.100.7\n"


def test_provider_keeps_an_existing_resolv_conf(initramfs: Image) -> None:
    initramfs.add_text("/etc/resolv.conf", "nameserver 203.0.113.1\n")
    initramfs.add_text("/run/net-eth0.conf", "IPV4DNS0='192.0.2.53'\n")

    result = provider_boot(initramfs)

    assert result.returncode == 0, result.stdout + result.stderr
    assert initramfs.inside(Path("/etc/resolv.conf")).read_text() == "nameserver 203.0.113.1\n"


# The dracut pre-mount hook, with OpenZFS's zfs-lib.sh and systemctl stubbed

DRACUT_ZFS_LIB = """# What the hook uses of dracut-lib.sh and OpenZFS's dracut zfs-lib.sh.
getarg() {
    for _arg in $(cat /proc/cmdline); do
        case "$_arg" in "$1"*) echo "${_arg#"$1"}"; return 0 ;; esac
    done
    return 1
}
warn() { echo "warn: $*" >>/log/calls; }
decode_root_args() {
    xroot=$(getarg root=)
    case "$xroot" in
    "" | zfs | zfs: | zfs:AUTO) root=zfs:AUTO; return 0 ;;
    ZFS=* | zfs:*) root="${xroot#zfs:}"; root="${root#ZFS=}"; return 0 ;;
    esac
    return 1
}
"""

STUB_SYSTEMCTL = """#!/bin/sh
# is-active: true from the Nth question on (/state/active-after, default 1);
# is-failed: /state/import-failed decides; anything else is recorded.
echo "systemctl $*" >>/log/calls
case "$1" in
is-active)
    n=$(($(cat /state/asked 2>/dev/null || echo 0) + 1)); echo "$n" >/state/asked
    [ "$n" -ge "$(cat /state/active-after 2>/dev/null || echo 1)" ] ;;
is-failed) [ -e /state/import-failed ] ;;
*) exit 0 ;;
esac
"""

DRACUT_HOOK_RUNNER = """#!/bin/sh
# dracut sources pre-mount hooks; a hook that returns lets the next one (OpenZFS's) run.
(. /lib/dracut/hooks/pre-mount/85-zfs-unlock-agent-load-key.sh)
echo "hook returned $?"
"""


def dracut_boot(
    image: Image,
    cmdline: str = "root=zfs:rpool/ROOT/debian rd.neednet=1 ip=dhcp",
    encryptionroot: str | None = "rpool/ROOT",
    keystatus: str = "unavailable",
    agent_exit: int = 0,
    states: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """STATES: more files in /state for the stubs (bootfs, active-after, import-failed)."""
    add_stubs(image)
    image.add_text("/bin/systemctl", STUB_SYSTEMCTL, 0o755)
    image.add_text("/lib/dracut-zfs-lib.sh", DRACUT_ZFS_LIB)
    image.add_text(
        "/lib/dracut/hooks/pre-mount/85-zfs-unlock-agent-load-key.sh", DRACUT_HOOK.read_text()
    )
    image.add_text("/run-hook", DRACUT_HOOK_RUNNER, 0o755)
    image.add_text("/proc/cmdline", cmdline + "\n")
    if encryptionroot is not None:
        state(image, "encryptionroot", encryptionroot + "\n")
    state(image, "keystatus", keystatus + "\n")
    state(image, "agent-exit", f"{agent_exit}\n")
    state(image, "agent-loads", "")
    for name, value in (states or {}).items():
        state(image, name, value)
    return image.run("/bin/sh", "/run-hook", timeout=30)


def test_dracut_hook_unlocks_the_root_datasets_encryption_root(initramfs: Image) -> None:
    result = dracut_boot(
        initramfs, cmdline="root=zfs:rpool/ROOT/debian zfs_unlock_agent.deadline=12"
    )

    assert result.stdout.strip() == "hook returned 0", result.stderr
    assert log(initramfs, "agent-argv") == unlock_argv("12")
    calls = log(initramfs, "calls")
    assert "zfs get -Ho value encryptionroot rpool/ROOT/debian" in calls
    assert "systemctl start network-online.target" in calls
    assert not [c for c in calls if c.startswith("warn:")]


@pytest.mark.parametrize("root", ["zfs:AUTO", ""], ids=["auto", "no-root"])
def test_dracut_hook_finds_the_root_through_bootfs(initramfs: Image, root: str) -> None:
    cmdline = f"root={root}" if root else "quiet"
    result = dracut_boot(initramfs, cmdline=cmdline, states={"bootfs": "-\nrpool/ROOT/debian\n"})

    assert result.stdout.strip() == "hook returned 0", result.stderr
    assert "zfs get -Ho value encryptionroot rpool/ROOT/debian" in log(initramfs, "calls")
    assert log(initramfs, "agent-argv") == unlock_argv()


def test_dracut_hook_waits_for_the_pool_import(initramfs: Image) -> None:
    result = dracut_boot(initramfs, states={"active-after": "3"})

    assert result.stdout.strip() == "hook returned 0", result.stderr
    calls = log(initramfs, "calls")
    assert calls.count("systemctl is-active --quiet zfs-import.target") == 3
    first_zfs = next(i for i, c in enumerate(calls) if c.startswith("zfs "))
    assert first_zfs > max(i for i, c in enumerate(calls) if "is-active" in c)
    assert log(initramfs, "agent-argv") == unlock_argv()


@pytest.mark.parametrize(
    ("cmdline", "encryptionroot", "keystatus", "states"),
    [
        pytest.param(
            None,
            "rpool/ROOT",
            "unavailable",
            {"active-after": "1000", "import-failed": ""},
            id="pool-import-failed",
        ),
        pytest.param(None, "-", "unavailable", {}, id="not-encrypted"),
        pytest.param(None, None, "unavailable", {}, id="no-such-dataset"),
        pytest.param(None, "rpool/ROOT", "available", {}, id="key-already-loaded"),
        pytest.param("root=/dev/sda1", "rpool/ROOT", "unavailable", {}, id="root-not-on-zfs"),
        # A key that can be typed: OpenZFS's hook asks, and the password agent answers.
        pytest.param(
            None,
            "rpool/ROOT",
            "unavailable",
            {"keyformat,keylocation": "hex\nprompt\n"},
            id="hex-left-to-the-password-agent",
        ),
        pytest.param(
            None,
            "rpool/ROOT",
            "unavailable",
            {"keyformat,keylocation": "passphrase\nprompt\n"},
            id="passphrase-left-to-the-password-agent",
        ),
    ],
)
def test_dracut_hook_leaves_alone_what_is_not_its_business(
    initramfs: Image,
    cmdline: str | None,
    encryptionroot: str | None,
    keystatus: str,
    states: dict[str, str],
) -> None:
    result = dracut_boot(
        initramfs,
        cmdline or "root=zfs:rpool/ROOT/debian",
        encryptionroot,
        keystatus,
        states=states,
    )

    assert result.stdout.strip() == "hook returned 0", result.stderr
    assert log(initramfs, "agent-argv") == []
    assert "systemctl start network-online.target" not in log(initramfs, "calls")


@pytest.mark.parametrize(
    "properties", ["raw\nprompt\n", "hex\nfile:///etc/zfs/root.key\n"], ids=["raw", "hex-file"]
)
def test_dracut_hook_fetches_a_key_nobody_is_asked_for(initramfs: Image, properties: str) -> None:
    result = dracut_boot(initramfs, states={"keyformat,keylocation": properties})

    assert result.stdout.strip() == "hook returned 0", result.stderr
    assert log(initramfs, "agent-argv") == unlock_argv()


def test_dracut_hook_warns_and_returns_0_when_the_agent_fails(initramfs: Image) -> None:
    result = dracut_boot(initramfs, agent_exit=EX_TEMPFAIL)

    assert result.stdout.strip() == "hook returned 0", result.stderr
    warnings = [c for c in log(initramfs, "calls") if c.startswith("warn:")]
    assert len(warnings) == 1 and "rpool/ROOT" in warnings[0]


# The initramfs-tools hook, in a mount namespace with a stub hook-functions

HOOK_FUNCTIONS = """# Stands in for /usr/share/initramfs-tools/hook-functions: copies into $DESTDIR,
# following symbolic links, and records every call in $HOOK_LOG.
copy_exec() { echo "copy_exec $*" >>"$HOOK_LOG"; _zua_copy "$1"; }
copy_file() {
    echo "copy_file $*" >>"$HOOK_LOG"
    [ -e "$DESTDIR${3:-$2}" ] && return 1
    _zua_copy "$2" "${3:-$2}"
}
_zua_copy() { mkdir -p "$DESTDIR$(dirname "${2:-$1}")" && cp -L "$1" "$DESTDIR${2:-$1}"; }
manual_add_modules() { echo "manual_add_modules $*" >>"$HOOK_LOG"; }
auto_add_modules() { echo "auto_add_modules $*" >>"$HOOK_LOG"; }
"""


# Stands in for OpenZFS's scripts/zfs, already in the image when hooks run: 2.1's decrypt_fs
# prompts as soon as the root's key is unavailable; 2.2's first runs the key providers.
OPENZFS_21_SCRIPT = """# scripts/zfs of OpenZFS 2.1 (stand-in): no key providers
get_fs_value() { $ZFS get -H -ovalue "$2" "$1" 2>/dev/null; }

decrypt_fs()
{
	fs="$1"
	ENCRYPTIONROOT="$(get_fs_value "${fs}" encryptionroot)"
	if ! [ "${ENCRYPTIONROOT}" = "-" ]; then
		KEYSTATUS="$(get_fs_value "${ENCRYPTIONROOT}" keystatus)"
		# Continue only if the key needs to be loaded
		[ "$KEYSTATUS" = "unavailable" ] || return 0

		echo "asking for the passphrase"
		return 3
	fi
	return 0
}
"""
OPENZFS_22_SCRIPT = OPENZFS_21_SCRIPT.replace(
    '\t\techo "asking',
    '\t\tfor f in "/etc/zfs/initramfs-tools-load-key" "/etc/zfs/initramfs-tools-load-key.d/"*; do'
    '\n\t\t\t:\n\t\tdone\n\t\techo "asking',
)
PROVIDER_IN_IMAGE = "/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent"


def host_config(tmp_path: Path, key_mode: int = 0o400) -> Path:
    """A configuration that bootfiles accepts (its files exist; nothing is contacted)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "client.crt").write_text("certificate\n")
    (etc / "client.key").write_text("key\n")
    (etc / "client.key").chmod(key_mode)
    (etc / "machine-id").write_text(machine_id_for("initramfs") + "\n")
    config = etc / "agent.toml"
    config.write_text(
        'machine_id_file = "machine-id"\n'
        '[[server]]\nurl = "https://keys.example:8443"\n'
        'pins = ["sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]\n'
        '[client]\ncertificate = "client.crt"\nkey = "client.key"\n'
    )
    return config


def run_hook(
    tmp_path: Path,
    umask: str = "0077",
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("a mount namespace needs root")
    stub = tmp_path / "hook-functions"
    stub.write_text(HOOK_FUNCTIONS)
    destdir = tmp_path / "destdir"
    if not destdir.exists():  # as mkinitramfs has it when hooks run: OpenZFS's script in
        (destdir / "scripts").mkdir(parents=True)
        (destdir / "scripts" / "zfs").write_text(OPENZFS_22_SCRIPT)
    script = (
        "mount -t tmpfs zua-hook-test /usr/share/initramfs-tools && "
        'cp "$STUB" /usr/share/initramfs-tools/hook-functions && '
        'umask "$UMASK_FOR_HOOK" && exec sh "$HOOK" "$@"'
    )
    environment = {
        "PATH": f"{AGENT.parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "DESTDIR": str(destdir),
        "HOOK_LOG": str(tmp_path / "hook.log"),
        "STUB": str(stub),
        "HOOK": str(HOOK),
        "ZFS_UNLOCK_AGENT_PROVIDER": str(PROVIDER),
        "UMASK_FOR_HOOK": umask,
        **(env or {}),
    }
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "hook", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environment,
    )


def hook_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "hook.log"
    return path.read_text().splitlines() if path.exists() else []


def agent_interpreter() -> str:
    """The interpreter the hooks take from the agent's first line."""
    return AGENT.read_text().splitlines()[0].removeprefix("#!")


def bootfiles(config: Path) -> list[tuple[str, str]]:
    result = subprocess.run(
        [agent_interpreter(), "-I", "-m", "zfs_unlock_agent.bootfiles", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pairs = [line.split(" ", 1) for line in result.stdout.splitlines()]
    return [(kind, path) for kind, path in pairs]


def test_hook_prereqs() -> None:
    result = subprocess.run(
        ["sh", str(HOOK), "prereqs"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout) == (0, "zfs\n")


@needs_root
@pytest.mark.parametrize("umask", ["0022", "0027", "0002"])
def test_hook_refuses_an_image_others_could_read(tmp_path: Path, umask: str) -> None:
    config = host_config(tmp_path)

    result = run_hook(tmp_path, umask, {"ZFS_UNLOCK_AGENT_CONFIG": str(config)})

    assert result.returncode == 1, result.stderr
    assert f"umask is {umask}" in result.stderr
    assert "UMASK=0077" in result.stderr
    assert hook_log(tmp_path) == []
    assert [p.name for p in (tmp_path / "destdir").iterdir()] == ["scripts"]


@needs_root
def test_hook_copies_what_bootfiles_lists_and_a_fixed_entry_point(tmp_path: Path) -> None:
    config = host_config(tmp_path, key_mode=0o600)  # 0400 in the image all the same

    result = run_hook(tmp_path, env={"ZFS_UNLOCK_AGENT_CONFIG": str(config)})

    assert result.returncode == 0, result.stderr
    destdir = tmp_path / "destdir"
    expected = []
    for kind, path in bootfiles(config):
        expected.append(f"copy_exec {path}" if kind == "exec" else f"copy_file agent {path}")
    calls = hook_log(tmp_path)
    assert calls[0] == f"copy_file config {PROVIDER} {PROVIDER_IN_IMAGE}"
    assert calls[1 : len(expected) + 1] == expected
    assert calls[len(expected) + 1 :] == ["manual_add_modules af_packet", "auto_add_modules net"]
    assert (destdir / PROVIDER_IN_IMAGE.lstrip("/")).read_text() == PROVIDER.read_text()
    assert (destdir / "scripts" / "zfs").read_text() == OPENZFS_22_SCRIPT  # runs providers
    key = destdir / str(tmp_path / "etc" / "client.key").lstrip("/")
    assert stat.S_IMODE(key.stat().st_mode) == 0o400
    wrapper = destdir / "usr" / "sbin" / "zfs-unlock-agent"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert wrapper.read_text() == (
        f'#!/bin/sh\nexec {agent_interpreter()} -I -m zfs_unlock_agent "$@"\n'
    )


@needs_root
def test_hook_without_config_builds_a_prompting_image(tmp_path: Path) -> None:
    host_config(tmp_path)
    env = {"ZFS_UNLOCK_AGENT_CONFIG": str(tmp_path / "absent.toml")}

    result = run_hook(tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert "this initramfs will prompt for keys" in result.stderr
    assert hook_log(tmp_path) == []


@needs_root
def test_hook_with_config_but_no_agent_fails_loudly(tmp_path: Path) -> None:
    """A configured host whose agent is gone must not silently get a prompting image."""
    config = host_config(tmp_path)
    env = {"ZFS_UNLOCK_AGENT_CONFIG": str(config), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    result = run_hook(tmp_path, env=env)

    assert result.returncode == 1, result.stderr
    assert "not installed" in result.stderr
    assert hook_log(tmp_path) == []


@needs_root
def test_hook_fails_on_a_configuration_bootfiles_refuses(tmp_path: Path) -> None:
    config = host_config(tmp_path, key_mode=0o440)

    result = run_hook(tmp_path, env={"ZFS_UNLOCK_AGENT_CONFIG": str(config)})

    assert result.returncode == EX_CONFIG, result.stderr
    assert "client.key" in result.stderr
    assert hook_log(tmp_path) == []
    assert not (tmp_path / "destdir" / "usr" / "sbin" / "zfs-unlock-agent").exists()


def fake_agent(tmp_path: Path, bootfiles_output: str) -> Path:
    """A zfs-unlock-agent whose interpreter prints BOOTFILES_OUTPUT for bootfiles."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    (bin_dir / "output").write_text(bootfiles_output)
    python.write_text(f'#!/bin/sh\ncat "{bin_dir / "output"}"\n')
    python.chmod(0o755)
    agent = bin_dir / "zfs-unlock-agent"
    agent.write_text(f"#!{python}\n# a console script\n")
    agent.chmod(0o755)
    return bin_dir


@needs_root
def test_hook_copies_paths_with_spaces_whole(tmp_path: Path) -> None:
    odd = tmp_path / "dir with spaces" / "module file.py"
    odd.parent.mkdir()
    odd.write_text("# a module\n")
    bin_dir = fake_agent(tmp_path, f"file {odd}\n")
    config = host_config(tmp_path)

    result = run_hook(
        tmp_path,
        env={"ZFS_UNLOCK_AGENT_CONFIG": str(config), "PATH": f"{bin_dir}:/usr/bin:/bin"},
    )

    assert result.returncode == 0, result.stderr
    assert hook_log(tmp_path)[1] == f"copy_file agent {odd}"
    assert (tmp_path / "destdir" / str(odd).lstrip("/")).read_text() == "# a module\n"


@needs_root
def test_hook_refuses_a_line_it_does_not_understand(tmp_path: Path) -> None:
    bin_dir = fake_agent(tmp_path, "file /etc/hostname\nsymlink /etc/passwd\n")
    config = host_config(tmp_path)

    result = run_hook(
        tmp_path,
        env={"ZFS_UNLOCK_AGENT_CONFIG": str(config), "PATH": f"{bin_dir}:/usr/bin:/bin"},
    )

    assert result.returncode == 1
    assert "unexpected line from bootfiles: symlink" in result.stderr
    assert not (tmp_path / "destdir" / "usr" / "sbin" / "zfs-unlock-agent").exists()


# dracut's module-setup.sh, sourced by bash with stub dracut functions

DRACUT_FUNCTIONS = """# The dracut functions module-setup.sh uses; each records its call in $DRACUT_LOG.
require_binaries() { echo "require_binaries $*" >>"$DRACUT_LOG"; command -v "$@" >/dev/null; }
inst_binary() { echo "inst_binary $*" >>"$DRACUT_LOG"; _copy "$1"; }
inst_simple() { echo "inst_simple $*" >>"$DRACUT_LOG"; _copy "$1"; }
inst_hook() { echo "inst_hook $*" >>"$DRACUT_LOG"; }
derror() { echo "derror $*" >>"$DRACUT_LOG"; }
_copy() { mkdir -p "$initdir$(dirname "$1")" && cp -L "$1" "$initdir$1"; }
"""


def dracut(tmp_path: Path, call: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    functions = tmp_path / "dracut-functions.sh"
    functions.write_text(DRACUT_FUNCTIONS)
    initdir = tmp_path / "initdir"
    initdir.mkdir(exist_ok=True)
    script = f'. "$1"; . "$2"; {call}; echo "returned $?"'
    return subprocess.run(
        ["bash", "-c", script, "bash", str(functions), str(MODULE_SETUP)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": f"{AGENT.parent}:/usr/bin:/bin",
            "initdir": str(initdir),
            "moddir": str(DRACUT),
            "DRACUT_LOG": str(tmp_path / "dracut.log"),
            **env,
        },
    )


def dracut_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "dracut.log"
    return path.read_text().splitlines() if path.exists() else []


def test_dracut_module_depends_on_zfs_and_the_network(tmp_path: Path) -> None:
    result = dracut(tmp_path, "depends", {})
    assert result.stdout.split("\n")[0].split() == ["zfs", "network", "systemd"]


@pytest.mark.parametrize(
    ("agent", "config", "included"),
    [(True, True, True), (True, False, False), (False, True, False)],
    ids=["agent-and-config", "no-config", "no-agent"],
)
def test_dracut_module_check(tmp_path: Path, agent: bool, config: bool, included: bool) -> None:
    path = host_config(tmp_path) if config else tmp_path / "absent.toml"
    env = {"ZFS_UNLOCK_AGENT_CONFIG": str(path)}
    if not agent:
        env["PATH"] = "/usr/bin:/bin"
    result = dracut(tmp_path, "check", env)
    assert result.stdout.strip() == f"returned {0 if included else 1}"


def test_dracut_module_installs_the_listed_files_and_the_hook(tmp_path: Path) -> None:
    config = host_config(tmp_path, key_mode=0o600)  # 0400 in the image all the same

    result = dracut(tmp_path, "install", {"ZFS_UNLOCK_AGENT_CONFIG": str(config)})

    assert result.stdout.strip() == "returned 0", result.stderr
    expected = []
    for kind, path in bootfiles(config):
        expected.append(f"inst_binary {path}" if kind == "exec" else f"inst_simple {path}")
    calls = dracut_log(tmp_path)
    assert calls[: len(expected)] == expected
    assert calls[len(expected) :] == [
        f"inst_hook pre-mount 85 {DRACUT}/zfs-unlock-agent-load-key.sh"
    ]
    initdir = tmp_path / "initdir"
    key = initdir / str(tmp_path / "etc" / "client.key").lstrip("/")
    assert stat.S_IMODE(key.stat().st_mode) == 0o400
    wrapper = initdir / "usr" / "sbin" / "zfs-unlock-agent"
    assert wrapper.read_text() == (
        f'#!/bin/sh\nexec {agent_interpreter()} -I -m zfs_unlock_agent "$@"\n'
    )
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    # The password agent, started in the initrd whenever a question is asked.
    units = initdir / "usr" / "lib" / "systemd" / "system"
    watch = (units / "zfs-unlock-agent-password.path").read_text()
    assert "DirectoryNotEmpty=/run/systemd/ask-password" in watch
    service = (units / "zfs-unlock-agent-password.service").read_text()
    assert "ExecStart=/usr/sbin/zfs-unlock-agent password-agent" in service
    assert "Conflicts=shutdown.target initrd-switch-root.target" in service
    wanted = units / "sysinit.target.wants" / "zfs-unlock-agent-password.path"
    assert os.readlink(wanted) == "../zfs-unlock-agent-password.path"


def test_dracut_module_refuses_a_configuration_bootfiles_refuses(tmp_path: Path) -> None:
    config = host_config(tmp_path, key_mode=0o640)

    result = dracut(tmp_path, "install", {"ZFS_UNLOCK_AGENT_CONFIG": str(config)})

    assert result.stdout.strip() == "returned 1", result.stderr
    calls = dracut_log(tmp_path)
    assert calls == [f"derror zfs-unlock-agent: the configuration {config} is not usable"]
    assert not (tmp_path / "initdir" / "usr").exists()


def hook_on_openzfs_21(tmp_path: Path) -> Path:
    """The hook run on an image whose scripts/zfs is OpenZFS 2.1's; that script, after."""
    destdir = tmp_path / "destdir"
    (destdir / "scripts").mkdir(parents=True)
    (destdir / "scripts" / "zfs").write_text(OPENZFS_21_SCRIPT)
    config = host_config(tmp_path)

    result = run_hook(tmp_path, env={"ZFS_UNLOCK_AGENT_CONFIG": str(config)})

    assert result.returncode == 0, result.stderr
    assert f"copy_file config {PROVIDER} {PROVIDER_IN_IMAGE}" in hook_log(tmp_path)
    return destdir / "scripts" / "zfs"


def decrypt_root(image: Image, script: Path, agent_exit: int, loads: bool) -> str:
    """Source SCRIPT in the stand-in initramfs and call decrypt_fs for the root, with our
    provider installed and the root's key unavailable, as OpenZFS's script does at boot."""
    add_stubs(image)
    image.add_text("/proc/cmdline", CMDLINE + "\n")
    image.add_text(PROVIDER_IN_IMAGE, PROVIDER.read_text())
    image.add_text("/scripts/zfs", script.read_text())
    state(image, "encryptionroot", "rpool/ROOT\n")
    state(image, "keystatus", "unavailable\n")
    state(image, "agent-exit", f"{agent_exit}\n")
    if loads:
        state(image, "agent-loads", "")
    run = (
        "ZFS=zfs; configure_networking() { echo configure_networking >>/log/calls; }; "
        '. /scripts/zfs; decrypt_fs rpool/ROOT/debian; echo "decrypt_fs returned $?"'
    )
    result = image.run("/bin/sh", "-c", run)
    return result.stdout + result.stderr


@needs_root
def test_hook_makes_openzfs_21s_script_run_the_provider(tmp_path: Path, initramfs: Image) -> None:
    """OpenZFS 2.1 neither copies nor runs key providers: the hook copies ours and makes the
    image's decrypt_fs run it before the prompt, which then never comes."""
    script = hook_on_openzfs_21(tmp_path)

    output = decrypt_root(initramfs, script, agent_exit=0, loads=True)

    assert output.strip() == "decrypt_fs returned 0"
    assert log(initramfs, "agent-argv") == race_argv()
    assert log(initramfs, "calls").count("configure_networking") == 1


@needs_root
def test_openzfs_21_still_prompts_when_the_agent_fails(tmp_path: Path, initramfs: Image) -> None:
    script = hook_on_openzfs_21(tmp_path)

    output = decrypt_root(initramfs, script, agent_exit=EX_TEMPFAIL, loads=False)

    assert output.splitlines() == ["asking for the passphrase", "decrypt_fs returned 3"]
    assert log(initramfs, "agent-argv") == race_argv()


@needs_root
def test_hook_leaves_a_script_that_runs_providers_as_it_is(tmp_path: Path) -> None:
    """Run twice, or on OpenZFS 2.2 and later, the hook changes nothing of OpenZFS's."""
    script = hook_on_openzfs_21(tmp_path)
    once = script.read_text()
    (tmp_path / "hook.log").unlink()

    result = run_hook(
        tmp_path, env={"ZFS_UNLOCK_AGENT_CONFIG": str(tmp_path / "etc" / "agent.toml")}
    )

    assert result.returncode == 0, result.stderr
    assert script.read_text() == once
    assert once.count("initramfs-tools-load-key.d") == 1


@needs_root
@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="no-script"),
        pytest.param("decrypt_fs() { echo prompt; }\n", id="unknown-script"),
    ],
)
def test_hook_refuses_an_image_whose_script_cannot_run_the_provider(
    tmp_path: Path, content: str | None
) -> None:
    destdir = tmp_path / "destdir"
    (destdir / "scripts").mkdir(parents=True)
    if content is not None:
        (destdir / "scripts" / "zfs").write_text(content)
    config = host_config(tmp_path)

    result = run_hook(tmp_path, env={"ZFS_UNLOCK_AGENT_CONFIG": str(config)})

    assert result.returncode == 1, result.stderr
    assert "scripts/zfs" in result.stderr
    if content is not None:
        assert (destdir / "scripts" / "zfs").read_text() == content
        assert sorted(p.name for p in (destdir / "scripts").iterdir()) == ["zfs"]
    assert not (destdir / "usr" / "sbin" / "zfs-unlock-agent").exists()


@needs_root
def test_hook_refuses_without_the_provider(tmp_path: Path) -> None:
    config = host_config(tmp_path)
    env = {"ZFS_UNLOCK_AGENT_CONFIG": str(config), "ZFS_UNLOCK_AGENT_PROVIDER": "/nonexistent"}

    result = run_hook(tmp_path, env=env)

    assert result.returncode == 1, result.stderr
    assert "/nonexistent is missing" in result.stderr
    assert hook_log(tmp_path) == []
    assert not (tmp_path / "destdir" / "usr" / "sbin" / "zfs-unlock-agent").exists()
