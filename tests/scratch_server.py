"""A tiny stdio JSON-RPC server that runs *inside* a sandbox for the supervisor tests.

It is passed to `python3 -c` in the stockade/python image, so it must be self-contained.
Methods: scratch/echo returns its params; scratch/write {text} writes /tmp/scratch;
scratch/read returns it; scratch/hang never answers; scratch/stderr {text} logs a line;
scratch/eat-memory allocates until killed; scratch/flood {count, size} writes that many
notifications of `size` bytes to stdout as fast as it can; scratch/garbage {count} writes
that many lines that are not JSON-RPC; scratch/stderr-lines {count} that many stderr lines;
scratch/big {size} answers with a string of `size` characters; scratch/fork-bomb forks
until the pids limit stops it and reports how many forks succeeded.
"""

import json
import os
import sys
import time


def answer(request_id, result):
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}) + "\n")
    sys.stdout.flush()


def fork_bomb():
    children = 0
    while children < 10000:
        try:
            pid = os.fork()
        except OSError:
            return children
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
    return children


for line in sys.stdin:
    message = json.loads(line)
    method, request_id = message.get("method"), message.get("id")
    params = message.get("params") or {}
    if method == "notifications/cancelled":
        print(f"cancelled {params.get('requestId')}", file=sys.stderr, flush=True)
    if request_id is None:
        continue
    print(f"got {method}", file=sys.stderr, flush=True)
    if method == "initialize":
        answer(
            request_id,
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "serverInfo": {"name": "scratch", "version": "1"},
            },
        )
    elif method == "scratch/write":
        with open("/tmp/scratch", "w") as handle:
            handle.write(params["text"])
        answer(request_id, {})
    elif method == "scratch/read":
        text = None
        if os.path.exists("/tmp/scratch"):
            with open("/tmp/scratch") as handle:
                text = handle.read()
        answer(request_id, {"text": text})
    elif method == "scratch/echo":
        answer(request_id, {"echo": params, "pid": os.getpid()})
    elif method == "scratch/stderr":
        print(params["text"], file=sys.stderr, flush=True)
        answer(request_id, {})
    elif method == "scratch/eat-memory":
        hoard = []
        while True:
            hoard.append(bytearray(8 * 1024 * 1024))
    elif method == "scratch/fork-bomb":
        answer(request_id, {"forks": fork_bomb()})
    elif method == "scratch/flood":
        note = (
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": "info", "data": "f" * params.get("size", 1000)},
                }
            )
            + "\n"
        )
        for _ in range(params.get("count", 100000)):
            sys.stdout.write(note)
        sys.stdout.flush()
        answer(request_id, {"flooded": True})
    elif method == "scratch/garbage":
        for n in range(params.get("count", 100000)):
            sys.stdout.write(f"garbage line {n} is not JSON-RPC\n")
        sys.stdout.flush()
        answer(request_id, {"garbage": True})
    elif method == "scratch/stderr-lines":
        for n in range(params.get("count", 100000)):
            sys.stderr.write(f"stderr line {n} of a chatty server\n")
        sys.stderr.flush()
        answer(request_id, {"stderr": True})
    elif method == "scratch/big":
        answer(request_id, {"text": "b" * params.get("size", 1000)})
    elif method == "scratch/hang":
        pass
