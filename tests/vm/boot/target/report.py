"""The booted target's report (run by zua-boot-report.service in tests/vm/test_boot.py's boots).

Runs on the target system (Debian's python3, standard library only) once boot is over:
waits for `systemctl is-system-running --wait`, collects what the tests assert on (the
system state, failed units, ZFS key and mount state, the root mount, the journals of the
agent and zfs-mount, unit timestamps; with zua.server=1 systemd-analyze verify and security
too), writes it as
JSON to the host's 9p share and prints a summary to the console, then powers off.

Kernel command line: zua.boot=NAME names the boot (its results go to /mnt/host/NAME/);
zua.stack=STACK says which network stack the boot runs (zua-network-stack masks the
others; the report records each stack's units and how it saw the network);
zua.hotplug=1 also waits for the host to attach the disk of the pool `usb`, imports it
as an admin would, and times how long the agent's daemon takes to unlock and mount
usb/secure; zua.server=1 also starts zfs-unlock-server.service on a throw-away data dir.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

SHARE = Path("/mnt/host")
USB_DISK = Path("/dev/disk/by-id/virtio-zua-usb-part1")
OUR_UNITS = ("zfs-unlock-agent.service", "zfs-unlock-agent.target", "zfs-unlock-server.service")
SHOWN = (
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "ExecMainStatus",
    "NRestarts",
    "FragmentPath",
    "DropInPaths",
    "InactiveExitTimestampMonotonic",
    "ActiveEnterTimestampMonotonic",
)


def say(message: str) -> None:
    print(f"ZUABOOT: {message}", flush=True)


def run(*argv: str, timeout: float = 120, stdin: str | None = None) -> dict[str, Any]:
    """ARGV's exit status and output (stderr folded in); never raises."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            errors="replace",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"argv": list(argv), "rc": None, "out": f"{type(exc).__name__}: {exc}"}
    return {"argv": list(argv), "rc": done.returncode, "out": done.stdout + done.stderr}


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def cmdline() -> dict[str, str]:
    words = Path("/proc/cmdline").read_text().split()
    return dict(word.split("=", 1) for word in words if word.startswith("zua.") and "=" in word)


def mount_share() -> bool:
    SHARE.mkdir(parents=True, exist_ok=True)
    done = run("mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,msize=262144",
               "hostshare", str(SHARE))  # fmt: skip
    mounted: bool = done["rc"] == 0
    if not mounted:
        say(f"cannot mount the host's share: {done['out'].strip()}")
    return mounted


def zfs_state() -> dict[str, dict[str, str]]:
    done = run("zfs", "get", "-H", "-o", "name,property,value",
               "keystatus,mounted,keylocation,keyformat,encryptionroot,mountpoint,"
               "zfs-unlock-agent:managed", "-t", "filesystem")  # fmt: skip
    state: dict[str, dict[str, str]] = {}
    for line in done["out"].splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            state.setdefault(parts[0], {})[parts[1]] = parts[2]
    return state


def unit_properties(*units: str) -> dict[str, dict[str, str]]:
    shown: dict[str, dict[str, str]] = {}
    for unit in units:
        done = run("systemctl", "show", *(f"--property={p}" for p in SHOWN), unit)
        shown[unit] = dict(line.split("=", 1) for line in done["out"].splitlines() if "=" in line)
    return shown


def network() -> dict[str, Any]:
    """The addresses, and each network stack's own view of the interfaces (a masked stack's
    tool says it is not running)."""
    return {
        "addresses": run("ip", "-4", "-o", "address", "show", "scope", "global")["out"],
        "routes": run("ip", "-4", "route")["out"],
        "networkd": run("networkctl", "--no-pager", "--no-legend", "list")["out"],
        "ifupdown": run("ifquery", "--state")["out"],
        "networkmanager": run("nmcli", "-t", "-f", "DEVICE,STATE,CONNECTION", "device")["out"],
    }


def unit_files() -> list[str]:
    """Our unit files as the packages installed them. (verify takes no drop-in file; the
    zfs-load-key@ drop-in has no unit to attach to without zfs-mount-generator's cache.)"""
    found: list[str] = []
    for unit in OUR_UNITS:
        props = unit_properties(unit)[unit]
        if props.get("FragmentPath"):
            found.append(props["FragmentPath"])
    return found


def hotplug() -> dict[str, Any]:
    """Wait for the host to attach the usb disk, import its pool, time the daemon's unlock."""
    result: dict[str, Any] = {}
    start = time.monotonic()
    say("HOTPLUG-READY")
    while not USB_DISK.exists():
        if time.monotonic() - start > 300:
            result["error"] = f"{USB_DISK} never appeared"
            return result
        time.sleep(0.2)
    appeared = time.monotonic()
    result["disk_appeared_after"] = round(appeared - start, 2)
    say(f"usb disk appeared: {USB_DISK}")
    # cachefile=none: a removable pool stays out of zpool.cache, or the next boot's
    # zfs-import-cache.service would fail on it and zfs-import-scan would not run.
    result["import"] = run("zpool", "import", "-d", "/dev/disk/by-id", "-o", "cachefile=none",
                           "usb", timeout=120)  # fmt: skip
    imported = time.monotonic()
    result["import_seconds"] = round(imported - appeared, 2)
    say(f"zpool import usb: exit {result['import']['rc']}")
    deadline = imported + 180
    while time.monotonic() < deadline:
        props = zfs_state().get("usb/secure", {})
        if props.get("keystatus") == "available" and props.get("mounted") == "yes":
            result["unlocked_and_mounted_after_import"] = round(time.monotonic() - imported, 2)
            break
        time.sleep(0.5)
    result["usb_secure"] = zfs_state().get("usb/secure", {})
    marker = Path(result["usb_secure"].get("mountpoint", "/usb/secure")) / "marker"
    result["marker"] = marker.read_text().strip() if marker.is_file() else None
    result["journal"] = run("journalctl", "-b", "-u", "zfs-unlock-agent", "-o",
                            "short-monotonic", "--no-pager", "--since", "-5min")["out"]  # fmt: skip
    say(
        f"usb/secure: {result['usb_secure']} after {result.get('unlocked_and_mounted_after_import')} s"
    )
    return result


def server_unit() -> dict[str, Any]:
    """zfs-unlock-server.service on a throw-away data directory: active, and answers TLS."""
    result: dict[str, Any] = {}
    if not unit_properties("zfs-unlock-server.service")["zfs-unlock-server.service"].get(
        "FragmentPath"
    ):
        result["skipped"] = "zfs-unlock-server.service is not installed"
        return result
    setup = Path("/usr/local/lib/zua-boot-report/server-setup.sh")
    result["setup"] = run("sh", str(setup), timeout=300)
    result["start"] = run("systemctl", "enable", "--now", "zfs-unlock-server.service", timeout=300)
    result["unit"] = unit_properties("zfs-unlock-server.service")
    result["journal"] = run("journalctl", "-b", "-u", "zfs-unlock-server", "-o",
                            "short-monotonic", "--no-pager")["out"]  # fmt: skip
    # A TLS handshake that the server completes; it then asks for a client certificate.
    result["tls"] = run(
        "python3", "-c",
        "import socket, ssl; c = ssl.create_default_context();"
        " c.check_hostname = False; c.verify_mode = ssl.CERT_NONE;"
        " s = c.wrap_socket(socket.create_connection(('127.0.0.1', 8443), timeout=30));"
        " print(s.version(), s.cipher()[0])",
        timeout=60,
    )  # fmt: skip
    result["security"] = run("systemd-analyze", "security", "--no-pager",
                             "zfs-unlock-server.service")["out"]  # fmt: skip
    say(f"server: start exit {result['start']['rc']}, tls: {result['tls']['out'].strip()}")
    return result


def exposure(text: str) -> str | None:
    found = re.search(r"Overall exposure level for \S+: (\S+ \S+)", text)
    return found.group(1) if found else None


def main() -> int:
    options = cmdline()
    name = options.get("zua.boot", "boot")
    say(f"report of boot {name} starting at {uptime():.1f} s")
    report: dict[str, Any] = {"name": name, "report_started": uptime()}
    report["state"] = run("systemctl", "is-system-running", "--wait", timeout=900)["out"].strip()
    report["state_at"] = uptime()
    say(f"system state: {report['state']} at {report['state_at']:.1f} s")
    report["failed"] = run("systemctl", "list-units", "--failed", "--plain", "--no-legend")["out"]
    report["jobs"] = run("systemctl", "list-jobs", "--no-legend")["out"]
    # The initramfs's race and password agent end with the initramfs: none may be left.
    # Both run through the initramfs's wrapper (python3 -I -m zfs_unlock_agent), the
    # system's own password agent through /usr/bin/zfs-unlock-agent.
    report["initramfs_agents"] = [
        line.strip()
        for line in run("ps", "-eo", "pid,args", "--no-headers")["out"].splitlines()
        if "-m zfs_unlock_agent" in line
    ]
    report["zfs"] = zfs_state()
    report["findmnt"] = run("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "/")["out"].strip()
    report["load_key_units"] = run("systemctl", "list-units", "--all", "--plain", "--no-legend",
                                   "zfs-load-key*")["out"]  # fmt: skip
    report["units"] = unit_properties(
        "zfs-unlock-agent.service", "zfs-mount.service", "zfs-import-scan.service",
        "zfs-import-cache.service", "network-online.target", "systemd-networkd-wait-online.service",
        "zfs-unlock-agent.target", "zua-needs-data.service", "local-fs.target",
        "systemd-networkd.service", "networking.service", "ifupdown-wait-online.service",
        "NetworkManager.service", "NetworkManager-wait-online.service",
        "zfs-load-key@tank-typed.service", "zfs-unlock-agent-password.service",
    )  # fmt: skip
    report["network"] = network()
    report["zfs_list_cache"] = sorted(p.name for p in Path("/etc/zfs/zfs-list.cache").glob("*"))
    report["mount_units"] = run("systemctl", "show", "--property=Id,ActiveState,Result,SourcePath",
                                "--all", "tank.mount", "tank-secure.mount")["out"]  # fmt: skip
    report["zfs_version"] = run("zfs", "version")["out"]
    needs_data = Path("/run/zua-needs-data")
    report["needs_data"] = needs_data.read_text().strip() if needs_data.exists() else None
    report["journal_ours"] = run("journalctl", "-b", "-u", "zfs-unlock-agent", "-u", "zfs-mount",
                                 "-o", "short-monotonic", "--no-pager")["out"]  # fmt: skip
    report["analyze_time"] = run("systemd-analyze", "time")["out"].strip()
    if options.get("zua.server") == "1":  # the units are the same in every boot: once
        files = unit_files()
        report["verify"] = run("systemd-analyze", "verify", "--man=no", *files) if files else None
        security = run("systemd-analyze", "security", "--no-pager", "zfs-unlock-agent.service")
        report["security"] = security["out"]
        report["security_exposure"] = exposure(security["out"])
        say(f"systemd-analyze security zfs-unlock-agent.service: {report['security_exposure']}")
    report["cmdline"] = Path("/proc/cmdline").read_text().strip()
    say(f"keystatus: { {ds: p.get('keystatus') for ds, p in report['zfs'].items()} }")
    say(f"findmnt /: {report['findmnt']}")
    say(f"failed units: {report['failed'].strip() or 'none'}")
    print(report["journal_ours"], flush=True)
    if options.get("zua.hotplug") == "1":
        report["hotplug"] = hotplug()
    if options.get("zua.server") == "1":
        report["server"] = server_unit()
    report["journal"] = run("journalctl", "-b", "-o", "short-monotonic", "--no-pager")["out"]
    report["report_finished"] = uptime()
    if mount_share():
        out = SHARE / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        os.sync()
    say(f"REPORT-DONE {name} at {uptime():.1f} s")
    run("systemctl", "poweroff", "--no-block")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
