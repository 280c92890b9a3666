"""The real-OpenZFS scenarios, run inside the test guest by run.sh.

STRATEGY:
1. The agent runs exactly as an operator runs it: `python3 -m zfs_unlock_agent -c
   /etc/zfs-unlock-agent/agent.toml ...`, with the real key server behind
   https://10.0.2.100:8443 (a forwarder on the host) and real `zfs`/`zpool`.
2. Each scenario is a module of cases/ (listed in order in cases/__init__.py), with its
   own STRATEGY. It sets up what it needs on the pools run.sh created (tank on /dev/vda1,
   tank2 on /dev/vdb1; /dev/vdc1 is left for a scenario's own pool), with datasets of its
   own, checks with `zfs` itself, and fails with a reason naming the step. It leaves no
   managed encryption root behind that its server key cannot open, so `unlock` of every
   managed root stays meaningful.
3. Output: "SCENARIO <name> PASS|FAIL <reason>" per scenario, a JSON results file
   (every command, its status and stderr, for the host's report), and exit status 1
   if any scenario failed.

Usage: python3 -m tests.vm.guest.runner --results FILE [NAME...]
       (default: every scenario, in order)
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.vm.guest import cases
from tests.vm.guest.cases import SCENARIOS
from tests.vm.guest.harness import Context, Failure


def load(name: str) -> Callable[[Context], str]:
    """The `run` of the case NAME, imported only now: a module that fails to import fails
    its own scenario, not the others."""
    module = importlib.import_module(f"{cases.__name__}.{name}")
    run: Callable[[Context], str] = module.run
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(SCENARIOS))
    args = parser.parse_args()
    unknown = set(args.names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    results: list[dict[str, Any]] = []
    for name in args.names or list(SCENARIOS):
        ctx = Context()
        started = time.monotonic()
        print(f"== SCENARIO {name}", flush=True)
        try:
            status, reason = "PASS", load(name)(ctx)
        except Failure as exc:
            status, reason = "FAIL", str(exc)
        except Exception:  # noqa: BLE001 - a bug in a scenario: report it, run the others
            status, reason = "FAIL", traceback.format_exc(limit=5)
        seconds = round(time.monotonic() - started, 1)
        print(f"SCENARIO {name} {status} {reason.splitlines()[-1] if reason else ''}", flush=True)
        results.append(
            {
                "name": name,
                "status": status,
                "reason": reason,
                "seconds": seconds,
                "steps": ctx.steps,
                **({"data": ctx.data} if ctx.data else {}),
            }
        )
    zfs_version = subprocess.run(["zfs", "version"], capture_output=True, text=True, check=False)
    document = {
        "kernel": platform.release(),
        "zfs_version": zfs_version.stdout.split(),
        "scenarios": results,
    }
    args.results.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(r["status"] != "PASS" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
