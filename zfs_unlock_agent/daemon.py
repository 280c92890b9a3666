"""`zfs-unlock-agent daemon`: a boot pass, then retries, new pools, check-ins and reloads.

One thread. It sleeps in select() on a self-pipe that the signal handlers write to and
on the udev monitor, so SIGTERM, SIGHUP and a hot-plugged pool disk wake it at once.
The boot pass has its own, shorter network budget: a boot never waits longer than
that for an unreachable server; roots still locked are retried afterwards.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from zfs_unlock_agent import askpassword, config, initramfs, learnedpins, renew, textfile
from zfs_unlock_agent.errors import AgentError
from zfs_unlock_agent.keyclient import ApprovalTicket, KeyClient
from zfs_unlock_agent.log import log
from zfs_unlock_agent.notify import Notifier
from zfs_unlock_agent.rotate import rotate
from zfs_unlock_agent.udev import PoolDiskWatch
from zfs_unlock_agent.unlock import RootResult, Unlocker, read_machine_id, select_roots
from zfs_unlock_agent.zfs import TYPABLE_KEYFORMATS, Dataset, Inventory, Zfs
from zfs_unlock_agent.zfsasks import roots_asked
from zfs_unlock_common import protocol
from zfs_unlock_common.protocol import DatasetRef

# After a disk with a ZFS label appears, look for its pool this often, for this long:
# someone (an admin, an import rule) imports it a moment later.
WATCH_POLL = 2.0
WATCH_WINDOW = 120.0


class Stopping(Exception):
    """SIGTERM or SIGINT arrived while the daemon waited."""


class Signals:
    """SIGTERM, SIGINT and SIGHUP recorded by a handler and announced on a pipe."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: list[int] = []
        self._previous = {sig: signal.signal(sig, self._record) for sig in self.HANDLED}
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)

    def take(self) -> list[int]:
        """The signals that arrived since the last call, oldest first."""
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass
        taken, self._pending = self._pending, []
        return taken

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self.read_fd)
        os.close(self._write_fd)


@dataclass
class Retry:
    pause: float  # the pause that was chosen; the next one doubles it
    due: float  # monotonic time of the next try


def zfs_mount_pending() -> bool:
    """True while systemd has a start job queued for zfs-mount.service: it will mount
    everything, parents first, and mounting before it could hide a child under a parent
    it mounts later. The unit is ordered after zfs-mount.service, so at boot that job is
    done and, as when started any other way, nobody else will mount: we do.
    """
    if not os.environ.get("INVOCATION_ID"):
        return False
    try:
        jobs = subprocess.run(
            ["systemctl", "list-jobs", "--no-legend", "--plain", "zfs-mount.service"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return "zfs-mount.service" in jobs.stdout


class Daemon:
    def __init__(
        self,
        cfg: config.Config,
        notifier: Notifier,
        signals: Signals,
        watch: PoolDiskWatch,
        clock: Callable[[], float] = time.monotonic,
        mount_pending: Callable[[], bool] = zfs_mount_pending,
        wall_clock: Callable[[], float] = time.time,
        ask_directory: Path = askpassword.ASK_DIRECTORY,
    ) -> None:
        self.config = cfg
        self.ask_directory = ask_directory
        self.machine_id = read_machine_id(cfg.machine_id_file)
        self.notifier = notifier
        self.signals = signals
        self.watch = watch
        self.clock = clock
        self.mount_pending = mount_pending
        self.retries: dict[str, Retry] = {}  # by dataset GUID: survives renames
        # Passes that ask again for a release waiting for approval find the same request.
        self.ticket = ApprovalTicket()
        self.managed = 0
        self.missing_reported: set[str] = set()
        self.next_rescan = 0.0
        self.watch_until = 0.0
        self.next_checkin = 0.0
        self.reload_requested = False
        self.wall_clock = wall_clock
        self.last_success: float | None = None  # for the textfile (wall clock)
        self.last_error: tuple[float, str] | None = None

    # Waiting

    def _wait(self, timeout: float) -> None:
        """Sleep until TIMEOUT, a signal or a udev event; raises Stopping on SIGTERM."""
        fds = [self.signals.read_fd]
        watch_fd = self.watch.fileno()
        if watch_fd is not None:
            fds.append(watch_fd)
        timeout = max(0.0, min(timeout, self.notifier.next_ping() - self.clock()))
        select.select(fds, [], [], timeout)
        self._take_signals()
        self.notifier.ping()

    def _take_signals(self) -> None:
        for signum in self.signals.take():
            if signum == signal.SIGHUP:
                self.reload_requested = True
            else:
                raise Stopping

    def _sleep_between_tries(self, seconds: float) -> None:
        """KeyClient's pause between rounds: interruptible, and the watchdog keeps hearing."""
        end = self.clock() + seconds
        while (left := end - self.clock()) > 0:
            fds = [self.signals.read_fd]
            # A slow try may have let a ping fall due: never a negative timeout.
            timeout = max(0.0, min(left, self.notifier.next_ping() - self.clock(), 1.0))
            select.select(fds, [], [], timeout)
            self._take_signals()
            self.notifier.ping()

    # Work

    def _unlocker(self, deadline: float) -> Unlocker:
        cfg = self.config
        network = cfg.network._replace(deadline=deadline)
        return Unlocker(
            Zfs(cfg.zfs),
            lambda: KeyClient(
                cfg.trusted_servers(),
                cfg.client_certificate,
                cfg.client_key,
                network,
                sleep=self._sleep_between_tries,
            ),
            self.machine_id,
            cfg.zfs.volume_link_timeout,
            cfg.zfs.zvol_dir,
            ticket=self.ticket,
        )

    def _note_missing(self, problem: str) -> None:
        """Say it once, not on every rescan."""
        if problem not in self.missing_reported:
            self.missing_reported.add(problem)
            log.warning("%s (listed in the configuration); looking again later", problem)

    def unlock_pass(self, deadline: float) -> None:
        """Unlock every managed root that is locked and due; retry failures later."""
        unlocker = self._unlocker(deadline)
        try:
            inventory = unlocker.zfs.inventory()
            roots = select_roots(inventory, self.config, [], True, on_missing=self._note_missing)
        except AgentError as exc:
            log.error("cannot list pools and datasets: %s", exc)
            self._failed(f"cannot list pools and datasets: {exc}")
            self.write_textfile()
            return
        now = self.clock()
        guids = {root.guid for root in roots}
        for guid in set(self.retries) - guids:  # exported, destroyed or no longer managed
            del self.retries[guid]
        self.managed = len(roots)
        due = [
            root
            for root in roots
            if (root.keystatus != "available" or root.guid in self.retries)
            and (root.guid not in self.retries or self.retries[root.guid].due <= now)
        ]
        due = self._leave_to_prompts(inventory, due)
        if not due:
            self.write_textfile()
            return
        results = unlocker.unlock(inventory, due, mount=not self.mount_pending())
        for root, result in zip(due, results, strict=True):
            self._record(root.guid, result)
        self.write_textfile()

    def _leave_to_prompts(self, inventory: Inventory, due: list[Dataset]) -> list[Dataset]:
        """DUE without the roots that OpenZFS's prompt asks for right now, when
        [datasets] openzfs_prompt = "answer": the password agent and the person at the
        console answer those. Loading such a key here would leave the prompt asking for a
        key already loaded (OpenZFS's unit looks at the keystatus only before it asks),
        and its unit failing after three tries. They are looked at again shortly."""
        if self.config.datasets.openzfs_prompt != "answer" or not due:
            return due
        asked = roots_asked(inventory, self.ask_directory)
        left = {r.name for r in due if r.name in asked and r.keyformat in TYPABLE_KEYFORMATS}
        pause = self.config.daemon.retry_initial
        for root in due:
            if root.name in left:
                if root.guid not in self.retries:
                    log.info(
                        "%s: OpenZFS's prompt asks for it; left to the password agent", root.name
                    )
                self.retries[root.guid] = Retry(pause, self.clock() + pause)
        return [r for r in due if r.name not in left]

    def _record(self, guid: str, result: RootResult) -> None:
        if result.ok:
            self.retries.pop(guid, None)
            self._succeeded()
            return
        self._failed(f"{result.root}: {result.message or result.outcome}")
        settings = self.config.daemon
        previous = self.retries.get(guid)
        pause = settings.retry_initial if previous is None else previous.pause * 2
        pause = min(pause, settings.retry_max)
        self.retries[guid] = Retry(pause, self.clock() + pause)
        log.info("%s: trying again in %g s", result.root, pause)

    def checkin(self) -> None:
        """Tell the server this host lives, and do what its answer and the calendar ask:
        keep the pins it announces, renew the certificate at two thirds of its life,
        rebuild the initramfs when either changed what it holds (then say so at once:
        `tls activate` waits for it), rotate the keys it wants rotated."""
        interval = self.config.daemon.checkin_interval
        try:
            unlocker = self._unlocker(self.config.network.deadline)
            with unlocker.client() as client:
                held = self.held_pins()
                answer = client.checkin(self.machine_id, held)
                self.next_checkin = self.clock() + interval
                self._succeeded()
                if answer.pins is not None:
                    self.learn_pins(answer.pins)
                renewed = self.renew_certificate(client, asked=answer.renew)
                self.refresh_initramfs()
                if answer.rotate:
                    self.rotate(unlocker.zfs, client, answer.rotate)
            if renewed or self.held_pins() != held:
                # At once, and with the certificate now in place: the server's `tls status`
                # and `ca status` wait for this, and a renewed certificate's first use ends
                # the one it replaced.
                with self._unlocker(self.config.network.deadline).client() as client:
                    client.checkin(self.machine_id, self.held_pins())
        except AgentError as exc:
            retry = min(interval, self.config.daemon.retry_max)
            log.warning("check-in failed (trying again in %g s): %s", retry, exc)
            self.next_checkin = self.clock() + retry
            self._failed(f"check-in: {exc}")
        self.write_textfile()

    def held_pins(self) -> list[str]:
        """The server pins this host trusts at boot as well as now: agent.toml's, and the
        learned ones once the initramfs holds them. Learned ones first: the server needs
        those most, and takes at most MAX_REPORTED_PINS."""
        cfg = self.config
        learned: list[str] = []
        if cfg.learned and not initramfs.is_stale(cfg.state_directory):
            learned = sorted(cfg.learned.announced)
        configured = sorted(cfg.configured_pins() - set(learned))
        return (learned + configured)[: protocol.MAX_REPORTED_PINS]

    def learn_pins(self, announced: list[str]) -> None:
        """Keep the pins a server vouches for (learnedpins.py); a changed set marks the
        initramfs stale first."""
        cfg = self.config
        before = cfg.learned or learnedpins.LearnedPins(cfg.state_directory / learnedpins.FILE_NAME)
        # A copy: memory takes the new set only once the mark and the file are written,
        # or held_pins() would report pins the initramfs may never get.
        learned = before.copy()
        try:
            if learned.learn(announced, cfg.configured_pins(), int(self.wall_clock())):
                log.info("the key server announced pins: %s", " ".join(sorted(learned.announced)))
                initramfs.mark_stale(cfg.state_directory)
            if learned.dirty:
                learned.save()
        except OSError as exc:
            log.warning("cannot keep the pins the key server announced: %s", exc)
            self._failed(f"learned pins: {exc}")
            return
        self.config = cfg._replace(learned=learned)

    def renew_certificate(self, client: KeyClient, asked: bool) -> bool:
        """Renew the client certificate once two thirds of its life are gone, or when the
        server ASKED (a CA rollover); True when it was renewed."""
        cfg = self.config
        try:
            if not (asked or renew.due(cfg.client_certificate, self.wall_clock())):
                return False
            if initramfs.is_stale(cfg.state_directory):
                # A rebuild is failing: renewing now would only be undone again. The
                # rebuild is tried below; the renewal waits for it to succeed.
                log.info("the certificate renewal waits for the initramfs rebuild")
                return False
            not_after = renew.renew(cfg, client, self.machine_id, self._rebuild_initramfs)
        except AgentError as exc:
            log.warning(
                "renewing the client certificate failed (trying again at the next check-in): %s",
                exc,
            )
            self._failed(f"certificate renewal: {exc}")
            return False
        day = time.strftime("%Y-%m-%d", time.gmtime(not_after))
        log.info("client certificate renewed, valid until %s; the initramfs holds it", day)
        return True

    def refresh_initramfs(self) -> None:
        try:
            self._rebuild_initramfs()
        except (AgentError, OSError) as exc:
            log.warning("%s; trying again at the next check-in", exc)
            self._failed(f"initramfs: {exc}")

    def _rebuild_initramfs(self) -> None:
        cfg = self.config
        if initramfs.is_stale(cfg.state_directory):
            initramfs.refresh(cfg.state_directory, cfg.daemon.initramfs_update, self.notifier.ping)
            log.info("the initramfs holds the learned pins and the current certificate")

    def rotate(self, zfs: Zfs, client: KeyClient, due: list[DatasetRef]) -> None:
        """Rotate the keys the server asked for (key rotate, max_key_age_days) of the roots
        here whose key is loaded; the server asks again at the next check-in until done."""
        try:
            inventory = zfs.inventory()
        except AgentError as exc:
            log.warning("cannot list datasets to rotate their keys: %s", exc)
            return
        wanted = set(due)
        for root in inventory.encryption_roots():
            try:
                if DatasetRef(inventory.pool_guid(root), root.guid) not in wanted:
                    continue
                log.info("%s", rotate(zfs, client, self.machine_id, inventory, root))
            except AgentError as exc:
                log.warning("%s: rotation asked for by the server failed: %s", root.name, exc)

    def _succeeded(self) -> None:
        self.last_success = self.wall_clock()

    def _failed(self, message: str) -> None:
        self.last_error = (self.wall_clock(), message)

    def write_textfile(self) -> None:
        """The state for node_exporter, when [daemon] textfile names a file; a failure to
        write it is logged, never fatal."""
        path = self.config.daemon.textfile
        if path is None:
            return
        locked = len(self.retries)
        state = textfile.AgentState(
            unlocked=self.managed - locked,
            locked=locked,
            last_success=self.last_success,
            last_error=None if self.last_error is None else self.last_error[0],
            last_error_message="" if self.last_error is None else self.last_error[1],
        )
        try:
            textfile.write(path, state)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc.strerror or exc)

    def reload(self) -> None:
        self.reload_requested = False
        self.notifier.reloading()
        try:
            fresh = config.load(self.config.path)
            machine_id = read_machine_id(fresh.machine_id_file)
        except AgentError as exc:
            log.error("reload refused; the running configuration stays: %s", exc)
        else:
            self.config, self.machine_id = fresh, machine_id
            self.retries.clear()
            self.missing_reported.clear()
            self.next_rescan = self.next_checkin = self.clock()
            log.info("configuration reloaded from %s", fresh.path)
        self.notifier.ready(self.summary())

    def summary(self) -> str:
        locked = len(self.retries)
        if not self.managed:
            return "no managed encryption roots yet; watching for pools"
        text = f"{self.managed - locked} of {self.managed} managed encryption roots unlocked"
        if locked:
            soonest = min(r.due for r in self.retries.values()) - self.clock()
            text += f"; {locked} locked, next try in {max(soonest, 0):.0f} s"
        return text

    # The loop

    def _timeout(self) -> float:
        moments = [self.next_rescan]
        moments += [r.due for r in self.retries.values()]
        if self.config.daemon.checkin_interval:
            moments.append(self.next_checkin)
        return min(moments) - self.clock()

    def run(self) -> int:
        try:
            if initramfs.is_stale(self.config.state_directory):
                # Killed between a renewal's new certificate and the rebuild: the boot
                # pass's first use of that certificate ends the one the initramfs holds.
                self.notifier.status("rebuilding the initramfs first")
                self.refresh_initramfs()
            self.notifier.status("boot pass: unlocking managed encryption roots")
            self.unlock_pass(self.config.daemon.boot_deadline)
            self.notifier.ready(self.summary())
            log.info("boot pass done: %s", self.summary())
            self.next_rescan = self.clock() + self.config.daemon.rescan_interval
            # The boot pass's requests already told the server we are alive; a check-in
            # now would only delay the first retry while the server is away.
            self.next_checkin = self.clock() + self.config.daemon.checkin_interval
            while True:
                self._take_signals()
                if self.reload_requested:
                    self.reload()
                if self.watch.drain():
                    log.info("a disk with a ZFS label appeared; looking for its pool")
                    self.watch_until = self.clock() + WATCH_WINDOW
                    self.next_rescan = self.clock()
                now = self.clock()
                if now >= self.next_rescan or any(r.due <= now for r in self.retries.values()):
                    self.unlock_pass(self.config.network.deadline)
                    watching = self.clock() < self.watch_until
                    pause = WATCH_POLL if watching else self.config.daemon.rescan_interval
                    self.next_rescan = self.clock() + pause
                    self.notifier.status(self.summary())
                if self.config.daemon.checkin_interval and self.clock() >= self.next_checkin:
                    self.checkin()
                self.notifier.ping()
                self._wait(self._timeout())
        except Stopping:
            self.notifier.stopping()
            log.info("stopping")
            return 0
