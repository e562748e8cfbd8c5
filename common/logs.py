"""Logging set-up of every `pum` command: text for people, or JSON lines for a log pipeline.

`--log-format json` writes one JSON object per event and line: time, level, logger, message, and
the event's fields where they apply, given as `extra=` by the code that logs (one fact per key):

    job, round, copy (the index k: the operator's server logs only), lease, worker (a token's
    label), bytes, seconds, reason, state

A field outside that list is not written, so nothing reaches the log by accident; what is written
is what the text format says in words. Secrets are never passed to a log call (tests/security).
"""

from __future__ import annotations

import json
import logging
import os
import time

FIELDS = ("job", "round", "copy", "lease", "worker", "bytes", "seconds", "reason", "state")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the standard keys and the record's FIELDS."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                event[name] = round(value, 4) if isinstance(value, float) else value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Text: logging's basic set-up on stderr (left alone when the root logger has handlers already, as
    under pytest). JSON: one handler of ours on stderr (replacing an earlier one of ours), and every
    line on stderr is an event. httpx's per-request lines only from WARNING."""
    if fmt == "json":
        # Nothing else on stderr: Python's warnings become events, and transformers' and the hub's
        # progress bars stay off (read when they are first imported, which is after this).
        logging.captureWarnings(True)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        root = logging.getLogger()
        for old in [h for h in root.handlers if getattr(h, "pum_json", False)]:
            root.removeHandler(old)
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        handler.pum_json = True
        root.addHandler(handler)
        root.setLevel(level)
    else:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
