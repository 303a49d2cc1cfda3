"""An MCP-ish stdio server that reads JSON the way Go's encoding/json does, inside a sandbox.

It is passed to `python3 -c` in the stockade/python image, so it is self-contained. What it
emulates, because servers written in Go really read JSON this way:
- object keys match struct fields case-insensitively (Unicode simple folding: the Kelvin sign
  folds to k, the long s to s), and when several keys match one field, the LAST one wins;
- go-sdk 1.3.1-1.4.0 also folds "name\\u0000" into "name" (trailing NULs dropped);
- a message with a method (in any case) is a request, even if it also carries an error.
It runs the tools `get_me` and `create_or_update_file`, and reports each execution on stderr
as `EXECUTED <tool> <id>`, so a test can compare what ran with what the audit allowed.
"""

import json
import sys

FOLDS = {"\u212a": "k", "\u017f": "s"}


def fold(key):
    return "".join(FOLDS.get(c, c) for c in key.rstrip("\x00")).lower()


def pairs(items):
    return ("go-object", items)


def field(value, name):
    """Go's view of value.Name: the last key that folds to `name`, else None."""
    if not (isinstance(value, tuple) and value[0] == "go-object"):
        return None
    found = None
    for key, item in value[1]:
        if fold(key) == name:
            found = item
    return found


def answer(request_id, result):
    body = {"jsonrpc": "2.0", "id": request_id, "result": result}
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    try:
        message = json.loads(line, object_pairs_hook=pairs)
    except ValueError:
        continue
    method, request_id = field(message, "method"), field(message, "id")
    params = field(message, "params")
    if method is None or request_id is None:
        continue
    if method == "initialize":
        answer(
            request_id,
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "go-style", "version": "1"},
            },
        )
    elif method == "tools/list":
        tools = [
            {"name": name, "inputSchema": {"type": "object"}}
            for name in ("get_me", "create_or_update_file")
        ]
        answer(request_id, {"tools": tools})
    elif method == "tools/call":
        tool = field(params, "name")
        print(f"EXECUTED {tool} {request_id}", file=sys.stderr, flush=True)
        answer(request_id, {"content": [{"type": "text", "text": f"ran {tool}"}]})
