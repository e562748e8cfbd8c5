"""--log-format json: one JSON object per event and line, the event's fields, nothing else of the record."""

from __future__ import annotations

import json
import logging

import pytest

from pum.cli import build_parser
from pum.common.logs import FIELDS, JsonFormatter, configure


def record(msg: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("pum.server.work", logging.INFO, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_an_event_is_one_line_of_json_with_its_fields():
    rec = record("job %s round %d: served %s", "job-1", 2, "lease-x", job="job-1", round=2, copy=3, lease="lease-x",
                 worker="gpu-a", bytes=1234, seconds=0.123456789, password="hunter22")
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    event = json.loads(line)
    assert event["message"] == "job job-1 round 2: served lease-x"
    assert {k: event[k] for k in FIELDS if k in event} == {
        "job": "job-1", "round": 2, "copy": 3, "lease": "lease-x", "worker": "gpu-a", "bytes": 1234, "seconds": 0.1235}
    assert event["level"] == "INFO" and event["logger"] == "pum.server.work" and event["time"].endswith("Z")
    assert "password" not in event and "hunter22" not in line  # only the listed fields are written


def test_a_traceback_stays_on_the_line():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        line = JsonFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line and "ValueError: bad\\nthing" in line and json.loads(line)["exc"].startswith("Traceback")


@pytest.mark.parametrize("argv", [["--log-format", "json", "admin", "jobs"], ["admin", "jobs", "--log-format", "json"],
                                  ["server", "--log-format", "json"]])
def test_log_format_is_accepted_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).log_format == "json"


def test_log_format_defaults_to_the_variable(monkeypatch):
    monkeypatch.setenv("PUM_LOG_FORMAT", "json")
    assert build_parser().parse_args(["admin", "jobs"]).log_format == "json"


def test_configure_json_writes_json_lines_to_stderr(capfd, monkeypatch):
    import warnings

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # restored after the test
    root = logging.getLogger()
    level = root.level
    try:
        configure("INFO", "json")
        configure("INFO", "json")  # a second set-up replaces the handler: one line per event
        logging.getLogger("pum.test").info("hello %s", "there", extra={"job": "job-9"})
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(True)  # pytest's own capture replaced it: set it again, as configure did
            warnings.warn("a library's warning", UserWarning)
    finally:
        logging.captureWarnings(False)
        for handler in [h for h in root.handlers if getattr(h, "pum_json", False)]:
            root.removeHandler(handler)
        root.setLevel(level)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line on stderr is JSON
    assert events[0]["job"] == "job-9" and events[0]["message"] == "hello there"
    assert len(events) == 2 and "a library's warning" in events[1]["message"] and events[1]["logger"] == "py.warnings"
    assert __import__("os").environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # transformers' bars stay off
