"""libzmq's own C proxy as a peer of ``bench routing``: the floor for one ZeroMQ hop.

``python -m bench._proxy proxy-broker EP`` runs ``zmq.proxy`` between a ROUTER bound at ``EP``
(clients) and a DEALER bound at ``EP-w`` (the worker): every message is moved by libzmq's C loop,
no Python per message.  ``python -m bench._proxy proxy-worker EP`` is the echo worker: a DEALER
connected to ``EP-w`` that sends back what it gets (the client's routing envelope included), so a
client's DEALER sees its body come back.  No flow control: the proxy pushes every request to the
worker's socket.
"""

from __future__ import annotations

import sys

import zmq


def _sock(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    return s


def proxy_broker(endpoint: str) -> None:
    ctx = zmq.Context()
    front, back = _sock(ctx, zmq.ROUTER), _sock(ctx, zmq.DEALER)
    front.bind(endpoint)
    back.bind(endpoint + "-w")
    zmq.proxy(front, back)


def proxy_worker(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = _sock(ctx, zmq.DEALER)
    sock.connect(endpoint + "-w")
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


if __name__ == "__main__":
    role, endpoint = sys.argv[1], sys.argv[2]
    {"proxy-broker": proxy_broker, "proxy-worker": proxy_worker}[role](endpoint)
