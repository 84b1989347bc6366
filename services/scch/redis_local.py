"""A local ``redis-server`` for tests, benchmarks and trying the Redis backend by hand: started on
a private unix socket (no TCP port), with no persistence, stopped by its own pid.  Readiness is the server's own "Ready to accept
connections" log line, read from its stdout under a bound (no sleeps)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

#: Bound of a start or a stop, seconds.
START_TIMEOUT = 20.0


class RedisServer:
    def __init__(self, directory: str) -> None:
        binary = os.environ.get("RECA_REDIS_SERVER") or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; ./dev installs it (Debian package redis-server)")
        self.binary = binary
        self.socket = os.path.join(directory, "redis.sock")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no", "--logfile", "", "--daemonize", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()
        lines: list[str] = []

        def watch() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                if "ready to accept connections" in line.lower():
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=watch, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("redis-server did not start:\n" + "".join(lines[-20:]))
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(START_TIMEOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
