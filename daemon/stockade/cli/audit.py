"""`stockade audit verify|tail|export|key`: the security team's view of the audit trail.

These read the files directly (no daemon needed): a verifier needs only the files and the
public key, which `stockade audit key` prints for export. Records hold strings hosts and
servers chose (tool names, reasons): the human and CEF forms show their control characters
escaped (`cli/terminal.py`); the JSON forms escape them by being JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from stockade import exitcodes
from stockade.audit.chain import (
    AUDIT_KEY_FILE,
    HEAD_FILE,
    fingerprint,
    load_public_key,
    public_path,
)
from stockade.audit.heads import HeadError, check_extends, check_witnesses, load_state, save_state
from stockade.audit.verify import VerifyResult, audit_files, default_head, verify
from stockade.cli.audit_key import VERIFY_CONFIG_HELP, add_key_options, pinned_key
from stockade.cli.channel import CliError
from stockade.cli.terminal import printable
from stockade.config import load_settings


def _audit_dir(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir else load_settings().state_dir / "audit"


def _key_path(args: argparse.Namespace) -> Path:
    if args.key:
        return Path(args.key)
    return public_path(load_settings().state_dir / "pki" / AUDIT_KEY_FILE)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    files = audit_files(list(args.files) or [_audit_dir(args)])
    if not files:
        raise CliError("no audit files found (give FILES or --dir)", exitcodes.USAGE)
    pinned = pinned_key(args, files)
    if isinstance(pinned, str):  # the key found is not the pinned one
        return _verdict(args, VerifyResult().fail("audit key", pinned))
    head = Path(args.head) if args.head else default_head(files)
    result = verify(files, pinned, head, require_head=not args.no_head)
    state = Path(args.state) if args.state else None
    try:
        if args.witness and result.ok:
            check_witnesses(result, [Path(w) for w in args.witness], pinned)
        accepted = load_state(state, pinned) if state else None
        if accepted is not None:
            check_extends(result, accepted, "head this verifier accepted before")
    except HeadError as exc:
        result.fail("heads", str(exc))
    if result.ok and state is not None:
        save_state(state, result, pinned)
    return _verdict(args, result)


def _verdict(args: argparse.Namespace, result: VerifyResult) -> int:
    if args.json:
        hidden = ("signatures", "heads", "last_checkpoint")
        print(json.dumps({k: v for k, v in vars(result).items() if k not in hidden}))
    else:
        if result.ok:
            print(
                f"OK: {result.records} records, {result.checkpoints} signed checkpoints, "
                f"seq {result.first_seq}..{result.last_seq}"
            )
        else:
            print(f"FAILED: {printable(result.problem)}")
        for note in result.notes:
            print(f"  note: {printable(note)}")
    return exitcodes.OK if result.ok else exitcodes.REFUSED


def cmd_audit_key(args: argparse.Namespace) -> int:
    try:
        pem = _key_path(args).read_text()
        if args.fingerprint:
            pem = fingerprint(load_public_key(_key_path(args))) + "\n"
        sys.stdout.write(pem)
    except ValueError as exc:
        raise CliError(f"not an audit public key: {exc}", exitcodes.FAILED) from None
    except OSError as exc:
        raise CliError(
            f"cannot read the audit public key: {exc.strerror}", exitcodes.FAILED
        ) from None
    return exitcodes.OK


def _since(value: str | None) -> str | None:
    """`10m`, `2h`, `1d` ago, or an ISO time; returned in the records' `ts` format."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[:-1].isdigit() and value[-1] in units:
        moment = datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    else:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise CliError(
                f"--since {value!r}: give 10m, 2h, 1d or an ISO time", exitcodes.USAGE
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _matches(record: dict[str, Any], args: argparse.Namespace, since: str | None) -> bool:
    if args.server and record.get("server") != args.server:
        return False
    if args.identity and args.identity not in str(record.get("identity", "")):
        return False
    if args.decision and record.get("outcome") != args.decision:
        return False
    return not (since and str(record.get("ts", "")) < since)


def _records(directory: Path, follow: bool) -> Iterator[dict[str, Any]]:
    """Every record in order; with `follow`, then new ones as they are written."""
    position: dict[Path, int] = {}
    while True:
        for path in audit_files([directory]):
            with path.open("rb") as handle:
                handle.seek(position.get(path, 0))
                for line in handle:
                    if not line.endswith(b"\n"):
                        break  # being written: read it whole next time
                    position[path] = position.get(path, 0) + len(line)
                    yield json.loads(line)
        if not follow:
            return
        time.sleep(0.5)


def _human(record: dict[str, Any]) -> str:
    """One line for people; what a host or server put in the record shows escaped."""
    parts = [record.get("ts", ""), record.get("type", ""), record.get("outcome", "")]
    for key in ("identity", "server", "action", "target", "rule", "reason", "latency_ms"):
        if record.get(key) is not None:
            parts.append(f"{key}={record[key]}")
    return printable("  ".join(str(p) for p in parts))


def cmd_audit_tail(args: argparse.Namespace) -> int:
    since = _since(args.since)
    records = [r for r in _records(_audit_dir(args), follow=False) if _matches(r, args, since)]
    for record in records[-args.lines :] if args.lines else records:
        print(json.dumps(record) if args.json else _human(record), flush=True)
    if args.follow:
        seen = records[-1]["seq"] if records else 0
        for record in _records(_audit_dir(args), follow=True):
            if record["seq"] > seen and _matches(record, args, since):
                print(json.dumps(record) if args.json else _human(record), flush=True)
    return exitcodes.OK


CEF_SEVERITY = {"deny": 7, "error": 5, "failure": 5}


def _cef_escape(value: object, header: bool = False) -> str:
    text = str(value).replace("\\", "\\\\")
    text = text.replace("|", "\\|") if header else text.replace("=", "\\=")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def to_cef(record: dict[str, Any]) -> str:
    """ArcSight CEF: header fields, then key=value extensions (SIEM-friendly names)."""
    event = str(record.get("type", ""))
    name = f"{event} {record.get('outcome', '')}".strip()
    severity = CEF_SEVERITY.get(str(record.get("outcome")), 3)
    extensions = {
        "rt": record.get("ts"),
        "suser": record.get("identity"),
        "dhost": record.get("server"),
        "act": record.get("action"),
        "outcome": record.get("outcome"),
        "reason": record.get("reason"),
        "cs1Label": "rule",
        "cs1": record.get("rule"),
        "cs2Label": "target",
        "cs2": record.get("target"),
        "externalId": record.get("seq"),
        "src": record.get("peer"),
    }
    header = ["CEF:0", "Stockade", "stockaded", "1", event, name, str(severity)]
    body = " ".join(f"{k}={_cef_escape(v)}" for k, v in extensions.items() if v is not None)
    return "|".join(_cef_escape(h, header=True) for h in header) + "|" + body


def cmd_audit_export(args: argparse.Namespace) -> int:
    since = _since(args.since)
    for record in _records(_audit_dir(args), follow=False):
        if _matches(record, args, since):
            print(
                json.dumps(record, sort_keys=True)
                if args.format == "jsonl"
                else printable(to_cef(record))
            )
    return exitcodes.OK


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="only this server")
    parser.add_argument("--identity", help="only identities containing this text")
    parser.add_argument("--decision", choices=["allow", "deny", "ok", "error"], help="outcome")
    parser.add_argument("--since", help="10m, 2h, 1d, or an ISO time")


def add_audit_parsers(sub: Any) -> None:
    audit = sub.add_parser("audit", help="verify and read the audit trail (offline)")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", help="the audit folder (default: STATE_DIR/audit)")

    verify_parser = actions.add_parser(
        "verify",
        parents=[where],
        help="check the hash chain and signatures; name the first bad line",
        epilog="example: stockade audit verify --key audit-key.pub /backup/audit-*.jsonl\n"
        + VERIFY_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify_parser.add_argument("files", nargs="*", type=Path, metavar="FILE")
    add_key_options(verify_parser)
    verify_parser.add_argument("--head", help=f"the signed head (default: {HEAD_FILE} beside)")
    verify_parser.add_argument(
        "--no-head", action="store_true", help="accept a missing signed head (said in the verdict)"
    )
    verify_parser.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="FILE|DIR",
        help="witnessed heads (syslog collector file, witness file): the log must extend each",
    )
    verify_parser.add_argument(
        "--state",
        metavar="FILE",
        help="the last head this verifier accepted: fail unless the log extends it, then update",
    )
    verify_parser.add_argument("--json", action="store_true", help="machine-readable output")
    verify_parser.set_defaults(handler=cmd_audit_verify)

    tail = actions.add_parser(
        "tail",
        parents=[where],
        help="the latest records, filtered; -f to follow",
        epilog="example: stockade audit tail -f --decision deny --since 1h",
    )
    tail.add_argument("-f", "--follow", action="store_true")
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many (0: all)")
    tail.add_argument("--json", action="store_true", help="one JSON record per line")
    _filters(tail)
    tail.set_defaults(handler=cmd_audit_tail)

    export = actions.add_parser(
        "export",
        parents=[where],
        help="every matching record as JSONL or CEF (for a SIEM)",
        epilog="example: stockade audit export --format cef --since 1d > stockade.cef",
    )
    export.add_argument("--format", choices=["jsonl", "cef"], default="jsonl")
    _filters(export)
    export.set_defaults(handler=cmd_audit_export)

    key = actions.add_parser(
        "key",
        help="print the audit public key (PEM) for verifiers",
        epilog="example: stockade audit key > stockade-audit.pub",
    )
    key.add_argument("--key", help=argparse.SUPPRESS)
    key.add_argument(
        "--fingerprint", action="store_true", help="print its SHA-256 fingerprint instead"
    )
    key.set_defaults(handler=cmd_audit_key)
