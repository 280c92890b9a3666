"""STRATEGY:
1. Enroll tank2/outage (on the second pool), write a file, and lock every managed
   encryption root.
2. Switch the key server down: `zfs-unlock-agent unlock` exits 75 (EX_TEMPFAIL)
   and every managed root stays locked.
3. Switch it up: `unlock` exits 0, every managed root is available and mounted,
   and the file is intact.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.guest.harness import (
    EX_TEMPFAIL,
    Context,
    check,
    expect_props,
    lock,
    managed_roots,
    switch_server,
)


def run(ctx: Context) -> str:
    ctx.agent("enroll", "--dataset", "tank2/outage", "--create")
    data = os.urandom(64).hex()
    Path("/tank2/outage/file").write_text(data)
    roots = managed_roots(ctx)
    check("tank2/outage" in roots, f"managed roots: {roots}")
    for root in roots:
        lock(ctx, root)
    switch_server("down")
    try:
        ctx.agent("unlock", expect=EX_TEMPFAIL)
        for root in roots:
            expect_props(ctx, root, keystatus="unavailable", mounted="no")
    finally:
        switch_server("up")
    ctx.agent("unlock")
    for root in roots:
        expect_props(ctx, root, keystatus="available", mounted="yes")
    check(Path("/tank2/outage/file").read_text() == data, "the file changed")
    return f"down: exit 75, nothing loaded; up: {len(roots)} root(s) unlocked"
