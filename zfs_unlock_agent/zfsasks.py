"""Which ZFS dataset a systemd password question asks for: OpenZFS asks in two places.

- zfs-mount-generator's zfs-load-key@ROOT units, for keylocation=prompt roots, with the
  id "zfs:ROOT";
- dracut's zfs-load-key.sh, with the message "Encrypted ZFS password for DATASET" (the
  root file system, which may sit below its encryption root) and no id.

The password agent answers these questions; the daemon leaves a root alone while one is
asked for it (the answer would come from the password agent or a person).
"""

from __future__ import annotations

import re
from pathlib import Path

from zfs_unlock_agent import askpassword
from zfs_unlock_agent.askpassword import Question
from zfs_unlock_agent.errors import AgentError
from zfs_unlock_agent.zfs import Inventory
from zfs_unlock_common import validate

_DRACUT_MESSAGE = re.compile(r"Encrypted ZFS password for (\S+)")


def dataset_asked(question: Question) -> str | None:
    """The dataset an OpenZFS question is about, or None for anybody else's question."""
    if question.id.startswith("zfs:"):
        name = question.id.removeprefix("zfs:")
    elif (found := _DRACUT_MESSAGE.fullmatch(question.message.strip())) is not None:
        name = found.group(1)
    else:
        return None
    try:
        return validate.dataset_name(name)
    except validate.InvalidInput:
        return None


def roots_asked(inventory: Inventory, directory: Path = askpassword.ASK_DIRECTORY) -> set[str]:
    """The encryption roots that a live question in DIRECTORY asks the key of."""
    roots = set()
    for question in askpassword.questions(directory):
        name = dataset_asked(question)
        if name is None or not question.still_asked():
            continue
        try:
            roots.add(inventory.root_of(name).name)
        except AgentError:
            continue
    return roots
