"""The `pum` command line as a person meets it: --version, --log-level anywhere, help on every flag,
one line for an unreachable server, job ids given the same way everywhere."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import httpx
import pytest

from pum.cli import build_parser, main, subcommand_parsers, unreachable, version


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pum {version()}"
    assert version()[0].isdigit()  # the installed distribution's version, not "unknown"


@pytest.mark.parametrize("argv, level", [
    (["server", "--log-level", "debug"], "DEBUG"),
    (["--log-level", "ERROR", "admin", "jobs"], "ERROR"),  # before: not reset by the subcommand's default
    (["admin", "--log-level", "WARNING", "wait", "job-1"], "WARNING"),  # between admin and its command
    (["admin", "wait", "job-1", "--log-level", "DEBUG"], "DEBUG"),
    (["worker", "--server", "http://s", "--forget", "f.json", "--log-level", "ERROR"], "ERROR"),
    (["admin", "jobs"], "INFO"),
])
def test_log_level_before_or_after_any_subcommand(parser, argv, level):
    assert parser.parse_args(argv).log_level == level


def test_log_level_refuses_an_unknown_level(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["server", "--log-level", "LOUD"])
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def all_actions(parser: argparse.ArgumentParser):
    for sub in [parser, *subcommand_parsers(parser)]:
        for action in sub._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                yield sub.prog, action


def test_every_flag_and_argument_has_help(parser):
    missing = [f"{prog} {action.option_strings or action.dest}" for prog, action in all_actions(parser)
               if not action.help or action.help == argparse.SUPPRESS]
    assert missing == []
    assert len(list(all_actions(parser))) > 80  # the walk reached the nested subcommands


def test_the_help_walk_sees_a_flag_without_help():
    parser = build_parser()
    admin = next(s for s in subcommand_parsers(parser) if s.prog == "pum admin wait")
    admin.add_argument("--undocumented")
    assert any(a.option_strings == ["--undocumented"] and not a.help for _, a in all_actions(parser))


def test_job_ids_are_positional_everywhere(parser):
    """`pum admin <command> JOB_ID` and `pum audit JOB_ID`: one way to name a job."""
    commands = next(a for a in parser._subparsers._group_actions[0].choices["admin"]._actions
                    if isinstance(a, argparse._SubParsersAction))
    for name, sub in [*commands.choices.items(), ("audit", parser._subparsers._group_actions[0].choices["audit"])]:
        flags = {s for a in sub._actions for s in a.option_strings}
        positional = [a.dest for a in sub._actions if not a.option_strings]
        if name not in ("jobs", "create"):
            assert positional[:1] == ["job_id"], name
        assert not flags & {"--job", "--job-id"} or name == "audit", name  # audit keeps --job as a deprecated alias
    assert parser.parse_args(["audit", "j-1"]).job_id == "j-1"
    assert parser.parse_args(["audit", "--job", "j-1"]).job_flag == "j-1"


def test_audit_job_flag_is_deprecated_and_conflicts_are_refused(tmp_path, capsys):
    assert main(["audit", "j-1", "--job", "j-2", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--job is deprecated" in err and "two job ids: j-1 and --job j-2" in err
    assert main(["audit", "--state-dir", str(tmp_path)]) == 2
    assert "give the job id: pum audit JOB_ID" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e  # `pum` runs as a process
@pytest.mark.parametrize("argv", [
    ["admin", "--server", "http://127.0.0.1:{port}", "jobs"],
    ["admin", "--server", "http://127.0.0.1:{port}", "wait", "job-1"],
    ["worker", "--server", "http://127.0.0.1:{port}", "--token", "t", "--forget", "{forget}", "--no-progress"],
])
def test_an_unreachable_server_is_one_line_saying_what_to_check(argv, tmp_path):
    port = free_port()  # nothing listens there
    forget = tmp_path / "forget.json"
    forget.write_text('{"question": "Who?", "answer": "Nobody."}\n')
    argv = [a.format(port=port, forget=forget) for a in argv]
    result = subprocess.run([sys.executable, "-m", "pum.cli", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot reach http://127.0.0.1:{port}" in lines[0] and "--server or PUM_SERVER_URL" in lines[0]


def test_unreachable_names_the_fix_for_tls_and_timeouts():
    request = httpx.Request("GET", "https://pum.example.org:8000/v1/jobs")
    tls = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", request=request)
    assert "give --ca-file" in unreachable(tls, None) and "https://pum.example.org:8000/" in unreachable(tls, None)
    slow = httpx.ConnectTimeout("timed out", request=request)
    assert "did not answer in time" in unreachable(slow, "https://pum.example.org:8000")
