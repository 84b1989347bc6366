"""Principals: who a peer is, as the kernel has verified it, and what its role lets it do.

* On ``tcp://`` every connection to the ROUTER and to the control PUB is a ZeroMQ CURVE handshake
  checked by the kernel's ZAP handler (pyzmq's ``zmq.auth``, running in a thread of the kernel).
  A client key is accepted only if it is in the kernel's key directory (or is the certificate the
  supervisor made for one of its children); the ZAP *user id* of the connection is then the
  principal's name, and ZeroMQ stamps it on every message (frame property ``User-Id``), so the
  router knows the principal of each message, not of each routing id.  The control PUB accepts
  only operators and services (ZAP domain :data:`ZAP_DOMAIN_CONTROL`).
* On ``ipc://`` the kernel's runtime directory is private to the kernel's user (checked by
  :func:`ensure_private_dir`), so every peer there *is* the local user: :data:`LOCAL_OPERATOR`.
* ``tcp://`` without CURVE is refused unless the config says ``insecure = true``; then every peer
  is the local operator too, and the kernel says so loudly at start.

Roles (docs/security.md): ``operator`` (everything), ``service:NAME[,NAME...]`` (register as a
worker for those services, write audit records under those sources, and act as a client),
``client`` (its own jobs and requests only).

Key files use zmq.auth's certificate format (``NAME.key`` public, ``NAME.key_secret`` secret,
mode 0600), with the role in the certificate's ``metadata`` section; kernel.keys writes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
import threading
from typing import Iterable

import zmq
import zmq.auth

from kernel import protocol as P
# Re-exported: the principal lives in kernel.principal (pure; this module speaks CURVE/ZAP).
from kernel.principal import (
    CHILD_PREFIX as CHILD_PREFIX,
    CLIENT as CLIENT,
    KERNEL_ROLE as KERNEL_ROLE,
    LOCAL_OPERATOR as LOCAL_OPERATOR,
    OPERATOR as OPERATOR,
    REVOKED as REVOKED,
    SERVICE_PREFIX as SERVICE_PREFIX,
    Principal as Principal,
)

log = logging.getLogger("reca.auth")

__all__ = [
    "CHILD_PREFIX", "CLIENT", "ENV_CERT", "ENV_SERVER_CERT", "KERNEL_KEY", "KERNEL_ROLE", "LOCAL_OPERATOR", "NAME_RE",
    "OPERATOR", "REVOKED", "SERVICE_PREFIX", "USER_ID", "ZAP_DOMAIN_CONTROL", "ZAP_DOMAIN_ROUTER", "AuthError",
    "Certificate", "PeerCredentials", "Principal", "Principals", "ServerKeys", "UnsafeRuntimeDir", "check_ipc_endpoint",
    "check_key_dir", "certificate_name", "child_principals", "curve_server", "ensure_private_dir", "list_certificates",
    "load_public", "load_secret", "open_append", "open_append_fd", "parse_role", "peer_credentials", "read_certificate", "secure_socket",
    "write_certificate", "write_private", "write_public_certificate",
]

#: Environment variables read by clients, services and the CLI (defined in the protocol module).
ENV_CERT = P.ENV_CERT  # the peer's own secret certificate file
ENV_SERVER_CERT = P.ENV_SERVER_CERT  # the kernel's public certificate file
#: ZAP domains of the kernel's two sockets.
ZAP_DOMAIN_ROUTER = "reca"
ZAP_DOMAIN_CONTROL = "reca.control"
#: The frame property ZeroMQ sets to the ZAP user id of the connection a message came on.
USER_ID = "User-Id"

#: File name (without suffix) of the kernel's key pair in a key directory.
KERNEL_KEY = "kernel"
#: Principal names: what ``keys new`` accepts (supervised children get ``child:NAME``).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SERVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class AuthError(RuntimeError):
    """A certificate, key directory or role is missing or malformed; the message says which."""


class UnsafeRuntimeDir(PermissionError):
    """The runtime directory is not private to this user (or is a symlink)."""


def parse_role(text: str, *, allow_kernel: bool = False) -> str:
    """Normalise a role (``operator``, ``client``, ``service:A[,B...]``); ValueError if unknown.
    ``kernel`` (the kernel's own pair) only with ``allow_kernel``."""
    if not isinstance(text, str):
        raise ValueError(f"role must be a string, got {text!r}")
    text = text.strip()
    if text in (OPERATOR, CLIENT) or allow_kernel and text == KERNEL_ROLE:
        return text
    if text.startswith(SERVICE_PREFIX):
        names = [n.strip() for n in text[len(SERVICE_PREFIX):].split(",")]
        if names and all(_SERVICE_RE.fullmatch(n) and not n.startswith(P.MMI_PREFIX) for n in names):
            return SERVICE_PREFIX + ",".join(names)
    raise ValueError(f"unknown role {text!r}; expected operator, client or service:NAME[,NAME...]")




# -- certificates -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Certificate:
    """One certificate file: its principal name, role and z85 public key."""

    name: str
    role: str
    public: bytes
    path: str


def _metadata(path: str) -> dict[str, str]:
    """The ``metadata`` section of a zmq.auth certificate file (ZPL: indented ``key = value``)."""
    out: dict[str, str] = {}
    section = None
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line[0].isspace():
                section = line.strip()
                continue
            if section == "metadata" and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip().strip("'\"")
    return out


def read_certificate(path: str) -> Certificate:
    """Load a public (or secret) certificate file; AuthError if it is not one or has a bad role."""
    try:
        public, _ = zmq.auth.load_certificate(path)
        role = parse_role(_metadata(path).get("role", ""), allow_kernel=True)
    except (OSError, ValueError) as exc:
        raise AuthError(f"bad certificate {path}: {exc}") from exc
    return Certificate(certificate_name(path), role, public, path)


def certificate_name(path: str) -> str:
    """The principal name of a certificate file: its file name less the ``.key`` or
    ``.key_secret`` suffix (only at the end: ``alice.keyring.key`` is ``alice.keyring``, never
    ``alice``)."""
    base = os.path.basename(path)
    for suffix in (".key_secret", ".key"):
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def load_secret(path: str) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys of a secret certificate file; AuthError if it has no secret."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read certificate {path}: {exc}") from exc
    if secret is None:
        raise AuthError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public(path: str) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read certificate {path}: {exc}") from exc


_BANNER = ("#   ****  Generated by reca (python -m kernel keys), zmq.auth format  ****\n"
           "#   ZeroMQ CURVE {what} Certificate\n#   {note}\n\n")


def _cert_text(what: str, note: str, role: str, keys: list[tuple[str, bytes]]) -> bytes:
    text = _BANNER.format(what=what, note=note) + f"metadata\n    role = \"{role}\"\ncurve\n"
    return (text + "".join(f"    {k} = \"{v.decode()}\"\n" for k, v in keys)).encode()


def write_public_certificate(path: str, role: str, public: bytes) -> None:
    """Write a public certificate file (mode 0644, O_EXCL, no symlink followed)."""
    write_private(path, _cert_text("Public", "Give this file to the kernel's key directory / to peers.",
                                   parse_role(role, allow_kernel=True), [("public-key", public)]), 0o644)


def write_certificate(directory: str, name: str, role: str, keypair: tuple[bytes, bytes] | None = None
                      ) -> tuple[str, str]:
    """Create ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) in zmq.auth's format,
    the role in both files' metadata.  Refuses to overwrite (O_EXCL) or follow symlinks."""
    if not NAME_RE.fullmatch(name) and not name.startswith("child:"):
        raise AuthError(f"bad principal name {name!r}: letters, digits, '_', '.', '-' (max 64)")
    role = parse_role(role, allow_kernel=name == KERNEL_KEY)
    public, secret = keypair or zmq.curve_keypair()
    base = os.path.join(directory, name)
    write_public_certificate(base + ".key", role, public)
    write_private(base + ".key_secret", _cert_text(
        "Secret", "Keep this file private: it is this principal's identity.", role,
        [("public-key", public), ("secret-key", secret)]), 0o600)
    return base + ".key", base + ".key_secret"


def list_certificates(directory: str) -> list[Certificate]:
    """Every public certificate (``*.key``) of a key directory, sorted by name."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".key"))
    except OSError as exc:
        raise AuthError(f"cannot list key directory {directory}: {exc}") from exc
    return [read_certificate(os.path.join(directory, n)) for n in names]


# -- the kernel's table of principals ------------------------------------------------------------

def check_key_dir(path: str) -> None:
    """A key directory grants roles, so only its owner may write it: it must be owned by this
    user (or root) and not writable by group or others.  AuthError otherwise."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise AuthError(f"cannot read key directory {path}: {exc}") from exc
    if st.st_uid not in (os.geteuid(), 0):
        raise AuthError(f"key directory {path} is owned by uid {st.st_uid}, not by this user; refusing it")
    if st.st_mode & 0o022:
        raise AuthError(f"key directory {path} is writable by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):o}): anyone could add an operator key; chmod 700 it")


class Principals:
    """The kernel's verified principals: z85 public key -> Principal, from its key directory
    (re-read when the directory changes: a removed key is revoked) plus the certificates the
    supervisor made for its children.  The ZAP thread reads it; the kernel's loop swaps in new
    maps whole (one reference assignment), so readers never see a half-built table."""

    def __init__(self, key_dir: str | None = None) -> None:
        self.key_dir = key_dir
        self._children: dict[bytes, Principal] = {}
        self._by_key: dict[bytes, Principal] = {}
        self._by_name: dict[str, Principal] = {}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        self.reload()

    def _dir_stamp(self) -> tuple | None:
        if not self.key_dir:
            return None
        try:
            st = os.stat(self.key_dir)
            files = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(self.key_dir) if e.name.endswith(".key"))
        except OSError:
            return ("missing",)
        return (st.st_mtime_ns, tuple(files))

    def reload(self) -> bool:
        """Re-read the key directory if it changed; True if the table changed.  A certificate
        that cannot be read is skipped and logged (it grants nothing).  A directory another user
        could write to grants nothing either (anyone could add an operator key): AuthError at
        start, every key of it revoked if it becomes so later."""
        stamp = self._dir_stamp()
        if self.key_dir and stamp != ("missing",):
            try:
                check_key_dir(self.key_dir)
            except AuthError as exc:
                if self._stamp is None:
                    raise  # at start: the kernel refuses to start
                if self._stamp != ("missing",):
                    log.error("%s; revoking every key of it", exc)
                stamp = ("missing",)
        if stamp == self._stamp and self._by_key:
            return False
        with self._lock:
            by_key = dict(self._children)
            if self.key_dir and stamp != ("missing",):
                for entry in sorted(os.listdir(self.key_dir)):
                    if not entry.endswith(".key"):
                        continue
                    try:
                        cert = read_certificate(os.path.join(self.key_dir, entry))
                    except AuthError as exc:
                        log.error("key directory: %s (ignored)", exc)
                        continue
                    if cert.role == KERNEL_ROLE:
                        continue
                    by_key[cert.public] = Principal(cert.name, cert.role)
            elif self.key_dir:
                log.error("key directory %s is missing: only supervised children are known", self.key_dir)
            changed = by_key != self._by_key
            self._by_key = by_key
            self._by_name = {p.name: p for p in by_key.values()}
            self._stamp = stamp
        if changed:
            log.info("principals: %s", ", ".join(sorted(f"{p.name}={p.role}" for p in by_key.values())) or "none")
        return changed

    def add_child(self, name: str, role: str, public: bytes) -> Principal:
        """A supervised child's principal (its certificate made by the kernel at start)."""
        p = Principal(name, parse_role(role))
        with self._lock:
            self._children[public] = p
            self._by_key = {**self._by_key, public: p}
            self._by_name = {**self._by_name, name: p}
        return p

    def remove_child(self, public: bytes) -> None:
        """Revoke a child's key (a Ray-placed replica that was replaced or stopped)."""
        with self._lock:
            p = self._children.pop(public, None)
            if p is None:
                return
            self._by_key = {k: v for k, v in self._by_key.items() if k != public}
            self._by_name = {v.name: v for v in self._by_key.values()}

    def by_key(self, public_z85: bytes) -> Principal | None:
        return self._by_key.get(public_z85)

    def by_name(self, name: str) -> Principal | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self._by_key)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerKeys:
    """The kernel's own CURVE key pair (z85)."""

    public: bytes
    secret: bytes


def curve_server(sock: zmq.Socket, keys: ServerKeys, domain: str) -> None:
    """Make ``sock`` a CURVE server under ZAP ``domain`` (before bind)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())


@dataclasses.dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What a client, service or CLI needs for CURVE: its own key pair and the kernel's public
    key.  :func:`peer_credentials` reads them from arguments or ``RECA_CERT`` /
    ``RECA_SERVER_CERT``."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the kernel (before connect)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def peer_credentials(cert: str | None = None, server_cert: str | None = None) -> PeerCredentials | None:
    """The CURVE credentials from ``cert`` / ``server_cert`` (file paths), else from the
    environment; None when neither names a certificate (plain connection).  One without the
    other is an AuthError: a half-configured peer would silently connect in the clear."""
    cert = cert or os.environ.get(ENV_CERT) or None
    server_cert = server_cert or os.environ.get(ENV_SERVER_CERT) or None
    if cert is None and server_cert is None:
        return None
    if cert is None or server_cert is None:
        raise AuthError(f"CURVE needs both {ENV_CERT} (your secret certificate) and {ENV_SERVER_CERT} "
                        "(the kernel's public certificate)")
    public, secret = load_secret(cert)
    return PeerCredentials(public, secret, load_public(server_cert))


def secure_socket(ctx: zmq.Context, kind: int, endpoint: str, creds: PeerCredentials | None) -> zmq.Socket:
    """A socket of ``kind`` (LINGER 0) with CURVE applied for ``tcp://`` when ``creds`` is set;
    ``ipc://`` endpoints are checked (:func:`check_ipc_endpoint`).  Not yet connected."""
    if endpoint.startswith("ipc://"):
        check_ipc_endpoint(endpoint)
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if creds is not None and not endpoint.startswith(("ipc://", "inproc://")):
        creds.apply(sock)
    return sock


# -- the runtime directory ------------------------------------------------------------------------

def _check_private(path: str, st: os.stat_result, uid: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRuntimeDir(f"runtime directory {path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRuntimeDir(f"runtime directory {path} is not a directory")
    if st.st_uid != uid:
        raise UnsafeRuntimeDir(f"runtime directory {path} is owned by uid {st.st_uid}, not by this user "
                               f"(uid {uid}); refusing to use it")
    if st.st_mode & 0o077:
        raise UnsafeRuntimeDir(f"runtime directory {path} is accessible to group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it or remove it")


def ensure_private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) or verify an existing one: a real directory, owned by this
    process's user, not accessible to group or others.  UnsafeRuntimeDir otherwise."""
    uid = os.geteuid()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    _check_private(path, os.lstat(path), uid)
    return path


def check_ipc_endpoint(endpoint: str) -> None:
    """Before connecting to ``ipc://DIR/x.sock``: DIR must be owned by this user (or root) and
    closed to group and others, so the socket there is the kernel's, not a stranger's listener."""
    directory = os.path.dirname(os.path.abspath(endpoint[len("ipc://"):]))
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return  # nothing listens there yet; the connection waits (ZeroMQ reconnects)
    uid = os.geteuid()
    _check_private(directory, st, st.st_uid if st.st_uid in (uid, 0) else uid)


def write_private(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` with ``mode`` and write ``data``; never follows a symlink and never
    overwrites (O_NOFOLLOW | O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def open_append_fd(path: str, *, exclusive: bool = False) -> int:
    """An append-only descriptor on ``path`` (mode 0600), never through a planted symlink nor onto
    a file of another user (UnsafeRuntimeDir); ``exclusive``: the file must not exist yet."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeRuntimeDir(f"{path} is a symlink; refusing to write through it") from exc
        raise
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeRuntimeDir(f"{path} is not a regular file of this user; refusing to append to it")
    return fd


def open_append(path: str):
    """Open a log file for appending without following a symlink (text, line-buffered by caller).
    A planted symlink or a file of another user raises UnsafeRuntimeDir."""
    return os.fdopen(open_append_fd(path), "a", encoding="utf-8", buffering=1 << 16)


def child_principals(names: Iterable[str]) -> dict[str, str]:
    """The role each supervised child gets: ``service:BASE`` for a child ``BASE`` or ``BASE#r``."""
    return {n: SERVICE_PREFIX + n.split("#", 1)[0] for n in names}
