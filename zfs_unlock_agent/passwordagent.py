"""`zfs-unlock-agent password-agent`: answer systemd's password questions for ZFS roots
with keys from the key server.

OpenZFS asks through systemd-ask-password in two places: the zfs-load-key@ROOT units that
zfs-mount-generator makes for keylocation=prompt (Id=zfs:ROOT) and dracut's zfs-load-key.sh
("Encrypted ZFS password for DATASET"). Whoever answers first wins: systemd's console and
plymouth agents ask the same question, so a person at the console races the network.

A question gets an answer only when every check passes: it names a dataset whose
encryption root this host manages and whose key is not loaded, the key can pass through a
password prompt (hex or passphrase; a raw key cannot), the server releases it, `zfs
load-key -n` proves it (a wrong answer would use up one of OpenZFS's tries), and the
question is still asked when the answer is ready. Anything else gets no answer at all,
which leaves the question to the other agents.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from zfs_unlock_agent import askpassword
from zfs_unlock_agent.askpassword import Question
from zfs_unlock_agent.config import Config
from zfs_unlock_agent.errors import EX_TEMPFAIL, AgentError, ZfsError, ZfsUnavailable
from zfs_unlock_agent.keyclient import ApprovalTicket, KeyClient, ReleasedKey
from zfs_unlock_agent.log import log
from zfs_unlock_agent.unlock import key_problem, select_roots
from zfs_unlock_agent.zfs import TYPABLE_KEYFORMATS, Dataset, Inventory, Zfs
from zfs_unlock_agent.zfsasks import dataset_asked
from zfs_unlock_common.protocol import DatasetRef

POLL_SECONDS = 0.25  # how often the ask directory is looked at
IDLE_SECONDS = 5.0  # the directory empty this long: exit (the .path unit starts us again)


class PasswordAgent:
    def __init__(
        self,
        config: Config,
        zfs: Zfs,
        client: Callable[[float], KeyClient],
        machine_id: str,
        directory: Path = askpassword.ASK_DIRECTORY,
        idle: float = IDLE_SECONDS,
    ) -> None:
        """CLIENT(DEADLINE) makes a key client whose tries end after DEADLINE seconds."""
        self.config = config
        self.zfs = zfs
        self.client = client
        self.machine_id = machine_id
        self.directory = directory
        self.idle = idle
        self.settled: set[tuple[Path, tuple[int, int]]] = set()  # answered, or never will be
        self.ticket = ApprovalTicket()  # a release waiting for approval is asked for again

    def run(self) -> int:
        """Answer questions until the directory has been empty for IDLE seconds. Empty, not
        merely without a question for us: the .path unit starts us again whenever it is
        not, so leaving while a stale file lies there would only restart us over and over."""
        quiet_since = time.monotonic()
        while True:
            names = askpassword.entries(self.directory)
            if names:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.idle:
                return 0
            asked = askpassword.questions(self.directory, names)
            self.settled &= {(q.path, q.identity) for q in asked}  # forget the answered
            waiting = [q for q in asked if (q.path, q.identity) not in self.settled]
            if waiting:
                self.answer_round(waiting)
            time.sleep(POLL_SECONDS)

    def answer_round(self, asked: Sequence[Question]) -> None:
        """One try at every question in ASKED: those that are not ours are settled, ours
        get one request to the key server for all of them."""
        try:
            inventory = self.zfs.inventory()
            managed = {r.name for r in select_roots(inventory, self.config, [], True, log.debug)}
        except AgentError as exc:
            log.warning("cannot list the datasets (%s); trying again", exc)
            return
        ours: dict[str, list[Question]] = {}
        for question in asked:
            root = self._root_to_answer(question, inventory, managed)
            if root is None:
                self._settle(question)
            else:
                ours.setdefault(root.name, []).append(question)
        if ours:
            self._fetch_and_answer(inventory, ours)

    def _root_to_answer(
        self, question: Question, inventory: Inventory, managed: set[str]
    ) -> Dataset | None:
        name = dataset_asked(question)
        if name is None:
            log.debug("%s: not a ZFS question; left to other agents", question.path.name)
            return None
        if not question.still_asked():
            log.debug("%s: no longer asked (answered, expired or its asker gone)", name)
            return None
        try:
            root = inventory.root_of(name)
        except AgentError:
            log.info("%s: no such encrypted dataset here; left to other agents", name)
            return None
        if root.name not in managed:
            log.info("%s: not managed by zfs-unlock-agent; left to other agents", root.name)
            return None
        if root.keystatus == "available":
            log.info("%s: its key is loaded already; nothing to answer", root.name)
            return None
        if root.keyformat not in TYPABLE_KEYFORMATS:
            log.warning(
                "%s: its key is %s and cannot pass through a password prompt; the daemon"
                " (zfs-unlock-agent.service) loads it instead",
                root.name,
                root.keyformat,
            )
            return None
        return root

    def _settle(self, question: Question) -> None:
        self.settled.add((question.path, question.identity))

    def _fetch_and_answer(self, inventory: Inventory, ours: dict[str, list[Question]]) -> None:
        roots = {name: inventory.get(name) for name in ours}
        refs = {}
        for name, root in roots.items():
            try:
                refs[name] = DatasetRef(inventory.pool_guid(root), root.guid)
            except ZfsUnavailable as exc:
                log.warning("%s; left to other agents", exc)
                for question in ours.pop(name):
                    self._settle(question)
        if not refs:
            return
        deadline = self._deadline([q for questions in ours.values() for q in questions])
        try:
            with self.client(deadline) as client:
                batch = client.release(self.machine_id, list(refs.values()), self.ticket)
        except AgentError as exc:
            if exc.exit_code == EX_TEMPFAIL:
                log.progress("no key from the key server yet (%s); still trying", exc)
                return  # the next round tries again, while the questions are asked
            log.error("no key from the key server (%s); the questions are left to others", exc)
            for questions in ours.values():
                for question in questions:
                    self._settle(question)
            return
        released = batch.released
        try:
            for name, questions in ours.items():
                key = released.get(refs[name])
                if refs[name] in batch.waiting:
                    log.progress("%s: approval %s is still pending", name, batch.approval)
                    continue  # the next round asks again, while the question is asked
                if key is None:
                    log.error("%s: the key server refused to release its key", name)
                elif (proven := self._proven(roots[name], key)) is not None:
                    self._answer(name, questions, proven)
                for question in questions:
                    self._settle(question)
        finally:
            for key in released.values():
                key.wipe()

    def _deadline(self, asked: Sequence[Question]) -> float:
        """The configured deadline, cut to the first of ASKED's own time limits."""
        deadline = self.config.network.deadline
        limits = [q.not_after for q in asked if q.not_after]
        if limits:
            left = (min(limits) - askpassword.monotonic_us()) / 1e6
            deadline = max(0.1, min(deadline, left))
        return deadline

    def _proven(self, root: Dataset, key: ReleasedKey) -> ReleasedKey | None:
        """KEY, or during a rotation its next key, whichever `zfs load-key -n` accepts."""
        for candidate in (key, key.next):
            if candidate is None:
                continue
            problem = key_problem(root, candidate)
            if problem:
                log.error("%s: %s", root.name, problem)
                continue
            try:
                self.zfs.load_key(root.name, candidate.secret, dry_run=True)
            except ZfsError as exc:
                log.debug("%s: key %s does not prove: %s", root.name, candidate.key_id, exc)
                continue
            return candidate
        log.error("%s: no key from the key server opens it; no answer", root.name)
        return None

    def _answer(self, root: str, questions: Sequence[Question], key: ReleasedKey) -> None:
        for question in questions:
            if not question.still_asked():
                log.info("%s: the question was answered or withdrawn meanwhile", root)
                continue
            try:
                askpassword.answer(question, key.secret)
            except OSError as exc:
                log.info("%s: the asker is gone (%s)", root, exc.strerror)
                continue
            log.info("%s: answered the password question with the key server's key", root)
