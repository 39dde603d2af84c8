"""Network workloads for the tests and bench/net_bench.py (loopback TCP, stdlib only).

    netload.py serve PORT                     accept and close, forever (prints "listening")
    netload.py churn PORT RATE SECONDS        connect+close at about RATE/s (0: flat out);
                                              prints "done N"
    netload.py hold PORT                      listen on PORT too, connect to it until no local
                                              port is left; prints "holding N"; then sleeps
    netload.py stream PORT SECONDS FLOWS      listen on PORT, FLOWS connections to it sending
                                              1 KiB every 2 ms; prints "sent BYTES"
Each renames itself (comm) to lx-net<mode> so the tests can match it.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import sys
import threading
import time

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def listener(port: int) -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4096)
    return srv


def serve(port: int) -> None:
    srv = listener(port)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.close()


def _drain(conn: socket.socket) -> None:
    while conn.recv(1 << 16):
        pass


def churn(port: int, rate: float, seconds: float) -> None:
    """About `rate` connections/s for `seconds`; rate 0: as many as it can."""
    done = 0
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        target = int((now - start) * rate) if rate > 0 else done + 100
        while done < target:
            s = socket.create_connection(("127.0.0.1", port))
            s.close()
            done += 1
        if rate > 0:
            time.sleep(0.001)
    print(f"done {done}", flush=True)


def hold(port: int) -> None:
    srv = listener(port)
    threading.Thread(target=serve_on, args=(srv,), daemon=True).start()
    held = []
    while True:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
        except OSError as exc:
            s.close()
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            break
        held.append(s)
    print(f"holding {len(held)}", flush=True)
    time.sleep(3600)


def serve_on(srv: socket.socket, drain: bool = False) -> None:
    held = []
    while True:
        conn, _ = srv.accept()
        if drain:
            threading.Thread(target=_drain, args=(conn,), daemon=True).start()
        held.append(conn)


def stream(port: int, seconds: float, flows: int) -> None:
    """`flows` connections to our own listener, each sending 1 KiB every 2 ms (TCP_NODELAY)."""
    srv = listener(port)
    threading.Thread(target=serve_on, args=(srv, True), daemon=True).start()
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(flows)]
    for s in conns:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
    chunk = b"x" * 1024
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for s in conns:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                pass  # this flow is waiting for a retransmit to be acknowledged
        time.sleep(0.002)
    print(f"sent {sent}", flush=True)


def main(argv: list[str]) -> None:
    mode = argv[0]
    set_comm(f"lx-net{mode}")
    port = int(argv[1])
    if mode == "serve":
        serve(port)
    elif mode == "churn":
        churn(port, float(argv[2]), float(argv[3]))
    elif mode == "hold":
        hold(port)
    elif mode == "stream":
        stream(port, float(argv[2]), int(argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
