"""``python -m kernel keys`` — the principals' certificates, in zmq.auth's format.

    python -m kernel keys new NAME --role ROLE [--dir DIR]
    python -m kernel keys list [--dir DIR]

``new`` writes ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (secret, mode 0600), the
role in the certificates' metadata, and creates the kernel's own pair ``DIR/kernel.key*`` the
first time.  Give a peer its ``.key_secret`` (``RECA_CERT``) and ``DIR/kernel.key``
(``RECA_SERVER_CERT``); point the kernel's ``[auth] keys`` at DIR.  Removing ``NAME.key`` from
DIR revokes the principal (the kernel re-reads DIR while it runs).  ROLE is ``operator``,
``client`` or ``service:NAME[,NAME...]``.  DIR defaults to ``$RECA_KEYS`` or
``~/.config/reca/keys``.
"""

from __future__ import annotations

import argparse
import os
import sys

from kernel import auth

#: Environment variable naming the default key directory.
ENV_KEYS = "RECA_KEYS"


def default_dir() -> str:
    return os.environ.get(ENV_KEYS) or os.path.join(os.path.expanduser("~"), ".config", "reca", "keys")


def new(directory: str, name: str, role: str) -> tuple[str, str]:
    """Create NAME's pair in ``directory`` (and the kernel's pair the first time)."""
    if name == auth.KERNEL_KEY:
        raise auth.AuthError(f"{name!r} is reserved for the kernel's own key pair")
    auth.ensure_private_dir(directory)
    if not os.path.exists(os.path.join(directory, auth.KERNEL_KEY + ".key_secret")):
        auth.write_certificate(directory, auth.KERNEL_KEY, auth.KERNEL_ROLE)
    try:
        return auth.write_certificate(directory, name, role)
    except FileExistsError:
        raise auth.AuthError(f"{name} already has a certificate in {directory}; remove it first") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernel keys", description="principals' CURVE certificates")
    sub = p.add_subparsers(dest="cmd", required=True)
    pn = sub.add_parser("new", help="create a principal's certificate pair")
    pn.add_argument("name")
    pn.add_argument("--role", required=True, help="operator, client or service:NAME[,NAME...]")
    pn.add_argument("--dir", default=None)
    pl = sub.add_parser("list", help="list the principals of a key directory")
    pl.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    directory = args.dir or default_dir()
    try:
        if args.cmd == "new":
            public, secret = new(directory, args.name, args.role)
            print(f"{args.name}: public {public}")
            print(f"{args.name}: secret {secret} (mode 0600; RECA_CERT={secret})")
            print(f"kernel public certificate: {os.path.join(directory, auth.KERNEL_KEY + '.key')} "
                  f"(RECA_SERVER_CERT)")
        else:
            for cert in auth.list_certificates(directory):
                print(f"{cert.name}\t{cert.role}\t{cert.public.decode()}")
    except (auth.AuthError, ValueError, OSError) as exc:
        print(f"python -m kernel keys: {exc}", file=sys.stderr)
        return 2
    return 0
