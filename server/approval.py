"""Approval policies: when a release waits for a person to approve it.

A policy belongs to a host, or to one dataset of a host (which then wins over the
host's). It says `none` (released as before), `required` (every release waits), or
`conditional`: a release waits only when one of its conditions holds now:

- the request comes from outside the policy's networks (`unless_from`);
- the host was silent for longer than `silent` seconds: a dead-man switch that asks
  a person instead of disabling the host. Once tripped it stays tripped (a check-in
  does not reset it) until an approved release reaches the host;
- the clock is outside the policy's `hours` (the server's local time).

A waiting release gives up after `timeout` seconds: no answer is a denial.
Policies are stored as canonical JSON text; nothing here touches the database.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("none", "required", "conditional")
DEFAULT_TIMEOUT = 600  # seconds a request waits for its approval before it is denied
MAX_TIMEOUT = 7 * 86400
# A host seen this recently is not silent: requests look at the condition only after it.
MIN_SILENCE = 60
_HOURS = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")

# Why a release waits, as the audit log, `approval list` and the notification say it.
REQUIRED = "required"
OUTSIDE_NETWORKS = "source_outside_networks"
SILENT = "host_was_silent"
OUTSIDE_HOURS = "outside_hours"


class PolicyError(ValueError):
    """A policy that cannot be: the message says which part, in the CLI's words."""


@dataclass(frozen=True)
class Policy:
    mode: str = "none"
    unless_from: tuple[str, ...] = ()
    silent: int = 0  # seconds; 0: not a condition
    hours: str = ""  # "HH:MM-HH:MM"; empty: not a condition
    timeout: int = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PolicyError(f"--approval must be one of {', '.join(MODES)}")
        conditions = bool(self.unless_from or self.silent or self.hours)
        if self.mode == "conditional" and not conditions:
            raise PolicyError(
                "--approval conditional needs a condition: --approval-unless-from,"
                " --approval-silent or --approval-hours"
            )
        if self.mode != "conditional" and conditions:
            raise PolicyError("conditions go with --approval conditional only")
        for net in self.unless_from:
            try:
                ipaddress.ip_network(net, strict=True)
            except ValueError:
                raise PolicyError(
                    f"--approval-unless-from {net!r} is not a network in CIDR form"
                ) from None
        if (self.silent and self.silent < MIN_SILENCE) or self.silent < 0:
            raise PolicyError(f"--approval-silent must be at least {MIN_SILENCE} seconds")
        if self.hours and not _HOURS.fullmatch(self.hours):
            raise PolicyError("--approval-hours must be HH:MM-HH:MM (24-hour clock)")
        if self.hours and self.hours[:5] == self.hours[6:]:
            raise PolicyError("--approval-hours must be a window, not one moment")
        if not 1 <= self.timeout <= MAX_TIMEOUT:
            raise PolicyError(f"--approval-timeout must be 1 to {MAX_TIMEOUT} seconds")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def to_text(self) -> str:
        if self.mode == "none":
            return json.dumps({"mode": "none"})
        fields: dict[str, object] = {"mode": self.mode, "timeout": self.timeout}
        if self.unless_from:
            fields["unless_from"] = list(self.unless_from)
        if self.silent:
            fields["silent"] = self.silent
        if self.hours:
            fields["hours"] = self.hours
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """One line for `host show` and `key list`."""
        if self.mode != "conditional":
            text = self.mode
        else:
            parts = []
            if self.unless_from:
                parts.append("from outside " + ",".join(self.unless_from))
            if self.silent:
                parts.append(f"after {self.silent} s of silence")
            if self.hours:
                parts.append(f"outside {self.hours}")
            text = "when " + " or ".join(parts)
        return text if self.mode == "none" else f"{text} (timeout {self.timeout} s)"

    def reasons(self, source_ip: str, silent_for: int, now: datetime.datetime) -> list[str]:
        """Why a release under this policy waits now (empty: it does not). SILENT_FOR is
        the longest the host was unseen: before this request, or before the request that
        tripped its silence condition, which no approved release has reset since."""
        if self.mode == "none":
            return []
        if self.mode == "required":
            return [REQUIRED]
        found = []
        if self.unless_from and not in_networks(source_ip, self.unless_from):
            found.append(OUTSIDE_NETWORKS)
        if self.silent and silent_for > self.silent:
            found.append(SILENT)
        if self.hours and not within_hours(self.hours, now):
            found.append(OUTSIDE_HOURS)
        return found


NONE = Policy()


def from_text(text: str) -> Policy:
    """A stored policy. One that does not parse was written by no version of this server:
    it is refused loudly (PolicyError), never read as `none`."""
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise PolicyError("a stored approval policy is not a JSON object")
        return Policy(
            mode=fields["mode"],
            unless_from=tuple(fields.get("unless_from", ())),
            silent=int(fields.get("silent", 0)),
            hours=str(fields.get("hours", "")),
            timeout=int(fields.get("timeout", DEFAULT_TIMEOUT)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyError(f"a stored approval policy is damaged ({exc})") from None


def in_networks(source_ip: str, networks: Sequence[str]) -> bool:
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(net) for net in networks)


def within_hours(hours: str, now: datetime.datetime) -> bool:
    """Whether NOW's time of day lies in HOURS ("HH:MM-HH:MM", start included, end not);
    a window whose end is before its start runs over midnight."""
    start, end = hours.split("-")
    minute = now.hour * 60 + now.minute
    first = int(start[:2]) * 60 + int(start[3:])
    last = int(end[:2]) * 60 + int(end[3:])
    if first < last:
        return first <= minute < last
    return minute >= first or minute < last
