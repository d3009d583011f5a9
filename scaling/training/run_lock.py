"""One live run per run directory: rank 0 holds an exclusive lock on `<train.output_dir>/.run.lock` while it runs.

    message = lock_run_directory(run_dir)    # None when this process now holds the directory

The kernel releases the lock when its holder exits, however it exits (SIGKILL included), so a crashed run never blocks
the next one, while a live one (e.g. workers orphaned by a killed launcher, still writing checkpoints) does. The file
names the holder's pid, host and start time for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from scaling.logging import get_logger

log = get_logger(__name__)

LOCK_FILE = ".run.lock"
_held: dict[Path, IO] = {}  # the open lock files of this process: the lock lives as long as the file stays open


class RunDirectoryBusy(RuntimeError):
    """Another live run holds train.output_dir."""


def lock_run_directory(run_dir: str | os.PathLike) -> str | None:
    """Take the run directory's lock; return None, or the message naming the live run that holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        return (f"{run_dir} is in use by another live run ({describe_holder(holder)}); two runs would write the "
                "same checkpoints and step log. Wait for it to end or stop it, or choose another train.output_dir")
    except OSError as error:  # a file system without locks (e.g. Lustre mounted without -o flock)
        handle.close()
        log.warning("cannot lock %s (%s): a second run on this directory will not be refused", run_dir,
                    error.strerror or error)
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    handle.flush()
    _held[run_dir] = handle
    return None


def describe_holder(text: str) -> str:
    """'pid 123 on host node7, started 2026-01-02 10:00:00' from the lock file's contents."""
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on host {holder['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
