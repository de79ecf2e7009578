"""Where mergeflow keeps its caches and built artifacts.

Everything mergeflow writes on its own (content-hash memo, intermediate cache, downloaded registry models) lives under
one folder, ``MERGEFLOW_HOME`` (default ``~/.cache/mergeflow``), so it can be moved, shared or wiped in one place.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from mergeflow.errors import storage_error

ENV_HOME = "MERGEFLOW_HOME"
DEFAULT_HOME = Path("~/.cache/mergeflow")


def mergeflow_home() -> Path:
    """The mergeflow home folder, created on demand.

    Read from the environment at every call (not at import) so tests and workers can point it elsewhere at run time.
    """
    raw = os.environ.get(ENV_HOME, "").strip()
    home = Path(raw).expanduser() if raw else DEFAULT_HOME.expanduser()
    home = home.resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, f"create {ENV_HOME}", home) from exc
    return home


# ------------------------------------------------------------------------------------ leftovers of killed runs

def _host_identity() -> str:
    """The host name and the pid namespace: pids mean the same thing only where both are equal (two containers may
    share a host name, or a folder, but not their process tables)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}\0{namespace}"


# Temporary folders name the host and the process that made them: another machine's or container's folders (a
# MERGEFLOW_HOME or an output folder shared over the network or mounted in several) are never judged by this process
# table.
HOST_TAG = hashlib.sha256(_host_identity().encode()).hexdigest()[:8]

_boot_time: float | None = None


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from ``/proc``; None where that cannot be read."""
    global _boot_time
    try:
        if _boot_time is None:
            with open("/proc/stat", encoding="ascii") as f:
                _boot_time = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        # the fields after the command name, which may itself hold spaces and parentheses; starttime is field 22
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        return _boot_time + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def left_by_a_gone_process(path: Path, pid: int, host: str | None = None) -> bool:
    """Whether ``path``, made by process ``pid`` (of the host tagged ``host``; None: this one), is a leftover: that
    process is not running, or the running ``pid`` started after ``path`` last changed (the number was reused, as
    it is at every restart of a container). Another host's paths are never leftovers here."""
    if (host is not None and host != HOST_TAG) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        pass  # another user's process (or not a pid): judged by its start time alone
    start = process_start_time(pid)
    if start is None:
        return False
    try:
        changed = os.lstat(path).st_ctime  # a rename or a new entry changes it; made after its maker started
    except OSError:
        return False
    return changed < start - 2.0  # the slack covers the coarse clock of the boot time
