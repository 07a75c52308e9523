#!/usr/bin/env python3
"""What clients that ask for big pages and never read them make a server hold.

Usage: bench/slow-readers.py [BINARY] [CLIENTS]   (default target/release/linkid, 300)

In a temporary directory: imports 1,000 links whose ids and usernames are as
long as allowed (255 four-byte characters: a page of all of them is ~3 MB),
starts `BINARY serve` on its built-in defaults, then opens CLIENTS
connections with a 4 KiB receive buffer that each ask for that page and read
nothing. It prints the server's RSS before, its peak (VmHWM) once every
request was answered, and its RSS after the clients closed; and, for a
linkid that has the budget of unsent answers, how many got the page and how
many a 503. Standard library only.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BINARY = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/linkid")
CLIENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 300
PAGE = "/api/admin/users/v4/linked-identities?limit=1000"


def kib(pid: int, field: str) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answered(base: str) -> float:
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    prefix = 'linkid_requests_total{operation="searchLinkedIdentities"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def main() -> None:
    work = tempfile.mkdtemp(prefix="linkid-slow-readers-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKID_")}
    long = "\U0001d518" * 240
    with open(f"{work}/long.jsonl", "w") as out:
        for i in range(1000):
            out.write(json.dumps({"user_id": f"u{i:05}{long}", "provider_id": "okta",
                                  "linked_user_id": f"r{i:05}{long}",
                                  "linked_username": f"n{i:05}{long}"}) + "\n")
    subprocess.run([BINARY, "import", "long.jsonl"], cwd=work, env=env, check=True, capture_output=True)
    token = subprocess.run([BINARY, "token", "mint", "--admin"], cwd=work, env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    port = free_port()
    server = subprocess.Popen([BINARY, "serve"], cwd=work, env={**env, "LINKID_SERVER__ADDR": f"127.0.0.1:{port}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(base + PAGE, headers={"Authorization": f"Bearer {token}"})
        page = len(urllib.request.urlopen(request, timeout=60).read())
        before = kib(server.pid, "VmRSS")
        request = f"GET {PAGE} HTTP/1.1\r\nHost: linkid\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        stalled = []
        for _ in range(CLIENTS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            stalled.append(sock)
        deadline = time.monotonic() + 600
        while answered(base) < CLIENTS + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        peak = kib(server.pid, "VmHWM")
        statuses = {}
        for sock in stalled:
            status = sock.recv(12, socket.MSG_WAITALL).decode(errors="replace")
            statuses[status] = statuses.get(status, 0) + 1
            sock.close()
        time.sleep(2)
        after = kib(server.pid, "VmRSS")
        print(f"{os.path.basename(BINARY)}: {CLIENTS} clients that never read a {page}-byte page")
        print(f"  RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, after they closed {after / 1024:.0f} MiB")
        print(f"  answers: {statuses}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
