"""A peer for the security system tests, run as its own process (in another network namespace by
tests/test_security_netns.py): ``python -m tests.netns_peer MODE ...``; prints one JSON line.

    handshake ENDPOINT dealer|sub [CERT SERVER_CERT]   -> {"event": HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED_* }
    register  ENDPOINT SERVICE CERT SERVER_CERT        -> {"event": ..., "reply": [frames as hex]}
    call      ENDPOINT SERVICE CERT SERVER_CERT        -> {"result": payload} or {"error": code}

Every wait is bounded (:data:`WAIT_S`); the handshake result is read from the socket's monitor
(ZeroMQ's own handshake events), not inferred from silence.
"""

from __future__ import annotations

import json
import sys

import zmq
from zmq.utils.monitor import recv_monitor_message

from kernel import auth, codec
from kernel import protocol as P

WAIT_S = 15.0
_OUTCOMES = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


def handshake(sock: zmq.Socket, endpoint: str) -> str:
    """Connect ``sock`` and return the name of the first handshake outcome its monitor reports.
    A NULL-mechanism peer refused by a CURVE server sees its connection closed at the greeting:
    reported as DISCONNECTED after a CONNECTED with no handshake success."""
    mon = sock.get_monitor_socket()
    sock.connect(endpoint)
    try:
        while mon.poll(int(WAIT_S * 1000)):
            ev = recv_monitor_message(mon)
            if ev["event"] in _OUTCOMES or ev["event"] == zmq.EVENT_DISCONNECTED:
                return zmq.Event(ev["event"]).name
        return "timeout"
    finally:
        sock.disable_monitor()
        mon.close(0)


def main(argv: list[str]) -> dict:
    mode, endpoint = argv[0], argv[1]
    ctx = zmq.Context()
    try:
        if mode == "handshake":
            kind = {"dealer": zmq.DEALER, "sub": zmq.SUB}[argv[2]]
            creds = auth.peer_credentials(*argv[3:5]) if len(argv) > 3 else None
            sock = auth.secure_socket(ctx, kind, endpoint, creds)
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            out = {"event": handshake(sock, endpoint)}
            sock.close(0)
            return out
        service, cert, server = argv[2], argv[3], argv[4]
        creds = auth.peer_credentials(cert, server)
        if mode == "register":
            sock = auth.secure_socket(ctx, zmq.DEALER, endpoint, creds)
            event = handshake(sock, endpoint)
            sock.send_multipart([P.MDPW, P.WorkerCmd.READY.value, service.encode(), codec.pack({"capacity": 64})])
            reply = sock.recv_multipart() if sock.poll(int(WAIT_S * 1000)) else []
            sock.close(0)
            return {"event": event, "reply": [f.hex() for f in reply]}
        if mode == "call":
            from clients import Client
            from kernel import errors

            with Client(endpoint, timeout=WAIT_S, retries=0, context=ctx, cert=cert, server_cert=server) as c:
                try:
                    return {"result": c.call(service, {"x": 1})}
                except errors.RecaError as exc:
                    return {"error": exc.code, "message": exc.message}
        raise SystemExit(f"unknown mode {mode!r}")
    finally:
        ctx.destroy(0)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
