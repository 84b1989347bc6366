"""Peer processes for ``bench routing``: ``python -m bench._peers ROLE ENDPOINT``.

bare-broker / bare-worker: a pyzmq ROUTER-to-ROUTER broker with no protocol (the floor) that
pushes every request to the worker at once (no flow control);
bare1-broker, bare64-broker (with bare1-worker, bare64-worker): the same broker with credit-based
flow control, at most 1 / 64 requests outstanding at the worker (equal capacity to a reca worker
declaring 1 / 64 slots), the rest queued in the broker;
mt-broker / mt-worker: the PyPI ``majortomo`` MDP broker and worker (one request at a time).

``bench auth`` runs the bare pair with CURVE too (libzmq's own CURVE cost, no ZAP handler):
``bare-broker ENDPOINT SECRET_CERT`` and ``bare-worker ENDPOINT SECRET_CERT SERVER_CERT``.
"""

from __future__ import annotations

import collections
import sys

import zmq
import zmq.auth


def bare_broker(endpoint: str, credit: int | None = None, secret_cert: str | None = None) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    if secret_cert:
        public, secret = zmq.auth.load_certificate(secret_cert)
        sock.curve_server, sock.curve_publickey, sock.curve_secretkey = True, public, secret
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    worker = None
    outstanding = 0
    waiting: collections.deque = collections.deque()
    while True:
        frames = sock.recv_multipart()
        if frames[1] == b"READY":
            worker = frames[0]
        elif frames[1] == b"REPLY":  # from the worker: [wid, REPLY, cid, payload]
            sock.send_multipart([frames[2], frames[3]])
            outstanding -= 1
            if waiting:
                sock.send_multipart([worker, *waiting.popleft()])
                outstanding += 1
        elif worker is not None:  # from a client: [cid, payload]
            if credit is None or outstanding < credit:
                sock.send_multipart([worker, frames[0], frames[1]])
                outstanding += 1
            else:
                waiting.append((frames[0], frames[1]))


def bare_worker(endpoint: str, cert: str | None = None, server_cert: str | None = None) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if cert:
        public, secret = zmq.auth.load_certificate(cert)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = zmq.auth.load_certificate(server_cert)[0]
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    sock.send(b"READY")
    while True:
        cid, payload = sock.recv_multipart()
        sock.send_multipart([b"REPLY", cid, payload])


def mt_broker(endpoint: str) -> None:
    from majortomo.broker import Broker

    Broker(bind=endpoint, heartbeat_interval=1.0, heartbeat_timeout=10.0).run()


def mt_worker(endpoint: str) -> None:
    from majortomo import Worker

    w = Worker(endpoint, b"echo", heartbeat_interval=1.0, heartbeat_timeout=10.0)
    w.connect()
    while True:
        req = w.wait_for_request()
        if req is None:
            continue
        addr, frames = req
        w.send_reply_final(addr, frames)


if __name__ == "__main__":
    role, endpoint = sys.argv[1], sys.argv[2]
    roles = {"bare-broker": lambda ep, *cert: bare_broker(ep, None, *cert), "bare-worker": bare_worker,
             "mt-broker": mt_broker, "mt-worker": mt_worker,
             "bare1-broker": lambda ep: bare_broker(ep, 1), "bare1-worker": bare_worker,
             "bare64-broker": lambda ep: bare_broker(ep, 64), "bare64-worker": bare_worker}
    roles[role](endpoint, *sys.argv[3:])
