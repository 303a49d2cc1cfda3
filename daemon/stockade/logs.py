"""Structured logging, configured once at process start.

JSON lines when the output is not a terminal, a readable console format otherwise. Context
(session, server, identity) comes from contextvars so that every line of a request carries
it. Tracebacks never include local variables: locals are where secrets and message bodies
live. The stdlib loggers of grpc and docker are routed through the same chain.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

LogFormat = Literal["auto", "json", "console"]

# Keys whose values are never written, whatever a caller passes to a log call.
SENSITIVE_KEYS = frozenset(
    {"secret", "secret_value", "password", "token", "authorization", "private_key", "value"}
)
REDACTED = "[REDACTED]"

# Third-party stdlib loggers we route through structlog's chain.
ROUTED_STDLIB_LOGGERS = ("grpc", "docker", "urllib3", "asyncio")


def redact_sensitive_keys(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Replace the value of any key that names a secret-bearing field."""
    for key in SENSITIVE_KEYS.intersection(event):
        event[key] = REDACTED
    return event


class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that knows its name, so `add_logger_name` works as for stdlib loggers."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "stockade")


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_sensitive_keys,
    ]


def _renderers(fmt: Literal["json", "console"]) -> list[Processor]:
    if fmt == "json":
        return [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    # plain_traceback: the rich formatter would print locals by default.
    return [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "console"]:
    if fmt != "auto":
        return fmt
    return "console" if stream.isatty() else "json"


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger. Call once, from `main`."""
    out = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, out)
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared = _shared_processors()

    structlog.configure(
        processors=[*shared, *_renderers(chosen)],
        logger_factory=_NamedWriteLoggerFactory(out),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *_renderers(chosen),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    for name in ROUTED_STDLIB_LOGGERS:  # let them propagate to the root handler only
        routed = logging.getLogger(name)
        routed.handlers.clear()
        routed.propagate = True
    # urllib3 (under the docker SDK) is chatty at debug; keep it at warning unless asked.
    if numeric_level > logging.DEBUG:
        logging.getLogger("urllib3").setLevel(logging.WARNING)


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger whose lines carry `logger=name`, like the routed stdlib loggers' lines."""
    # The proxy stays lazy, so module-level loggers pick up `configure_logging` when it runs.
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Bind session/server/identity (or any key) for every log line inside the block."""
    tokens: Mapping[str, Token[Any]] = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
