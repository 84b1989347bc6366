"""``python -m clients logs NAME [-f]``: a service's own log file, as the supervisor writes it.

The kernel's supervisor sends each child's stdout and stderr to ``<runtime>/logs/<child>.log``
(rotated to ``.log.1`` ... past a size; kernel/supervisor.py).  ``NAME`` is a process name
(``echo#0``) or a service name (``echo``: every replica, each line prefixed with its process).
The files are read on this machine: the runtime directory is the one beside an ``ipc://``
endpoint, else ``$RECA_RUNTIME_DIR`` (or the default runtime directory).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from kernel.config import runtime_dir

#: Seconds between two looks at a followed file.
FOLLOW_POLL_S = 0.2


class NoLogs(LookupError):
    """No log file for the name asked."""


def logs_dir(endpoint: str | None) -> str:
    if endpoint and endpoint.startswith("ipc://"):
        return os.path.join(os.path.dirname(endpoint[len("ipc://") :]), "logs")
    return os.path.join(runtime_dir(), "logs")


def log_files(directory: str, name: str) -> dict[str, str]:
    """process name -> its current log file, for a process name or every replica of a service."""
    exact = os.path.join(directory, f"{name}.log")
    if os.path.isfile(exact):
        return {name: exact}
    found = {
        os.path.basename(p)[: -len(".log")]: p
        for p in sorted(glob.glob(os.path.join(glob.escape(directory), glob.escape(name) + "#*.log")))
    }
    if not found:
        have = sorted(
            os.path.basename(p)[: -len(".log")] for p in glob.glob(os.path.join(glob.escape(directory), "*.log"))
        )
        raise NoLogs(
            f"no log file for {name!r} in {directory}"
            + (
                f"; there are logs of: {', '.join(have)}"
                if have
                else " (is the kernel running here, with this runtime directory?)"
            )
        )
    return found


def tail(path: str, n: int) -> list[str]:
    """The last ``n`` lines of ``path`` (reads the end of the file only)."""
    if n <= 0:
        return []
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        block = 8192
        data = b""
        while size > 0 and data.count(b"\n") <= n:
            step = min(block, size)
            size -= step
            fh.seek(size)
            data = fh.read(step) + data
    return [line.decode(errors="replace") for line in data.splitlines()[-n:]]


class Follower:
    """Reads what is appended to a log file, across the supervisor's rotations (a new inode)."""

    def __init__(self, path: str, *, from_start: bool = False) -> None:
        self.path = path
        self.fh = open(path, "rb")
        if not from_start:
            self.fh.seek(0, os.SEEK_END)
        self.inode = os.fstat(self.fh.fileno()).st_ino
        self.rest = b""

    def read(self) -> list[str]:
        out = self._drain()
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return out
        if inode != self.inode:  # rotated: finish the old file, continue with the new one
            self.fh.close()
            self.fh = open(self.path, "rb")
            self.inode = inode
            out += self._drain()
        return out

    def _drain(self) -> list[str]:
        data = self.rest + self.fh.read()
        *lines, self.rest = data.split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def close(self) -> None:
        self.fh.close()


def main(args: argparse.Namespace, out=print) -> int:
    directory = args.dir or logs_dir(args.endpoint)
    try:
        files = log_files(directory, args.name)
    except NoLogs as exc:
        print(f"python -m clients logs: {exc}", file=sys.stderr)
        return 1
    prefix = len(files) > 1
    for proc, path in files.items():
        for line in tail(path, args.lines):
            out(f"{proc}| {line}" if prefix else line)
    if not args.follow:
        return 0
    followers = {proc: Follower(path) for proc, path in files.items()}
    try:
        while True:
            for proc, f in followers.items():
                for line in f.read():
                    out(f"{proc}| {line}" if prefix else line)
            sys.stdout.flush()
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return 0
    finally:
        for f in followers.values():
            f.close()
