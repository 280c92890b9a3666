"""The notification hook: tell people that a release waits for their approval.

`[approval] notify` in server.toml is a command as an argv list (no shell). For each new
request it runs once, with the request as one JSON object on stdin (approvalrows.
Approval.as_json) and a small environment, and is killed after `notify_timeout`
seconds. Its outcome is audited (`approval_notified`, or `approval_notify_failed` with
the reason), and nothing it does or fails to do releases a key: approval comes only
from `approval approve` or the approval page.

The command runs beside the request, not inside it: a slow mail server does not hold
the agent's answer back. A thread waits for it; the worker's main thread writes the
audit record (collect), between requests.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from zfs_unlock_server.approvalrows import Approval
from zfs_unlock_server.audit import AuditRecord, AuditSink

log = logging.getLogger("zfs_unlock_server")

# What the command sees of the server's environment: enough to find programs and speak
# UTF-8, nothing of the server's credentials.
_PASSED = ("PATH", "LANG", "HOME", "TZ")


class Notifier:
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self._outcomes: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._running: list[threading.Thread] = []

    def __call__(self, request: Approval) -> None:
        """Start the command for REQUEST (a new pending request); returns at once."""
        if not self.argv:
            return
        payload = json.dumps(request.as_json(int(time.time())), sort_keys=True).encode()
        worker = threading.Thread(target=self._run, args=(request, payload), daemon=True)
        self._running.append(worker)
        worker.start()

    def _run(self, request: Approval, payload: bytes) -> None:
        fields: AuditRecord = {"host": request.host, "approval": request.id}
        try:
            outcome = self._call(payload)
        except Exception as exc:  # noqa: BLE001 (whatever went wrong is the hook's failure)
            outcome = f"{type(exc).__name__}: {exc}"
        if outcome:
            log.warning("approval %s: the notification hook failed: %s", request.id, outcome)
            record: AuditRecord = {
                "event": "approval_notify_failed",
                "decision": "failed",
                "reason": outcome,
                **fields,
            }
        else:
            record = {"event": "approval_notified", "decision": "allow", **fields}
        with self._lock:
            self._outcomes.append(record)

    def _call(self, payload: bytes) -> str:
        """Run the command once; "" when it succeeded, else what went wrong."""
        env = {k: os.environ[k] for k in _PASSED if k in os.environ}
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        try:
            process = subprocess.Popen(  # noqa: S603 (the admin's argv, no shell)
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own group: a timeout kills what it started too
            )
        except OSError as exc:
            return f"cannot run {self.argv[0]}: {exc.strerror}"
        try:
            _, stderr = process.communicate(payload, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return f"still running after {self.timeout:g} s; killed"
        if process.returncode != 0:
            said = " ".join(stderr.decode("utf-8", "replace").split())[:200]
            return f"exit status {process.returncode}" + (f": {said}" if said else "")
        return ""

    def collect(self, audit: AuditSink) -> None:
        """Audit the outcomes of the commands that ended (from the worker's main thread)."""
        with self._lock:
            done, self._outcomes = self._outcomes, []
        self._running = [t for t in self._running if t.is_alive()]
        if not done:
            return
        try:
            audit.write(*done)
        except BaseException:
            with self._lock:  # written at the next chance instead
                self._outcomes[:0] = done
            raise

    def wait(self, audit: AuditSink) -> None:
        """Let the running commands end (or time out), then audit them all (tests and
        commands that end right after)."""
        for worker in list(self._running):
            worker.join()
        self.collect(audit)
