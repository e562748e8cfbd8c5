"""README.md says what the code does: its settings list, API table, commands and make targets."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def pum_commands(text: str) -> list[list[str]]:
    """Each `pum …` command of the bash blocks, as argv (continuation lines joined; a line is
    split at `&&`, `;`, `|`, `(`, `)` outside quotes)."""
    commands = []
    for block in shell_blocks(text):
        for line in _lines(block):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token and set(token) <= set(";&|()"):
                    if words[:1] == ["pum"]:
                        commands.append(words[1:])
                    words = []
                else:
                    words.append(token)
    return commands


def _lines(block: str) -> list[str]:
    """Shell lines: continuations joined, and a line whose quote is still open joined with the next."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        lines.append(pending)
        pending = ""
    return lines + ([pending] if pending else [])


def table_endpoints(text: str) -> set[str]:
    """`METHOD /path` of the API table, expanded: `a\\|b` alternatives, `[/{x}]` optional parts, `{x}` → `{}`."""
    found = set()
    for row in (line for line in text.splitlines() if line.startswith("| ")):
        for method, path in re.findall(r"`([A-Z]+) (/[^`]*)`", row):
            path = re.sub(r"\{\w+\}", "{}", path.split(" ")[0])
            forms = [path]
            if "[" in path:
                forms = [re.sub(r"\[.*?\]", "", path), path.replace("[", "").replace("]", "")]
            for form in forms:
                head, _, last = form.rpartition("/")
                found |= {f"{method} {head}/{choice}".replace("//", "/") for choice in last.split("\\|")}
    return found


def test_every_server_setting_is_listed_under_the_name_it_is_read_by():
    from pum.server.config import ServerSettings

    for name, field in ServerSettings.model_fields.items():
        variable = field.validation_alias or f"PUM_SERVER_{name.upper()}"
        short = variable.removeprefix("PUM_SERVER_")
        assert f"`{short}`" in README or f"`{variable}`" in README, variable


def test_every_route_is_in_the_api_table(tmp_path):
    from pum.server.app import create_app
    from pum.server.config import ServerSettings

    app = create_app(ServerSettings(state_dir=tmp_path / "s", saves_dir=tmp_path / "v", dev_mode=True))
    routes = {method.upper() + " " + re.sub(r"\{\w+\}", "{}", path)
              for path, methods in app.openapi()["paths"].items() for method in methods}
    routes |= {"GET /docs", "GET /openapi.json", "GET /metrics", "GET /ui"}  # not JSON: outside the OpenAPI document
    assert table_endpoints(README) == routes


def test_every_pum_command_parses_with_the_real_cli():
    from pum.cli import build_parser

    commands = pum_commands(README)
    assert len(commands) >= 10 and ["admin", "--ca-file", "ca.pem", "create", "job.yaml"] in commands
    for argv in commands:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) if "--help" in argv else contextlib.nullcontext():
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"`pum {shlex.join(argv)}` is refused: {err.getvalue().strip().splitlines()[-1]}")


def test_the_tls_walkthrough_talks_https_to_the_tls_port():
    walkthrough = next(b for b in shell_blocks(README) if "--tls-cert" in b)
    admin = [argv for argv in pum_commands(f"```bash\n{walkthrough}```") if argv[:1] == ["admin"]]
    assert admin and all("--ca-file" in argv for argv in admin)
    assert "export PUM_SERVER_URL=https://" in walkthrough


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"(?:^|`)make ([a-z-]+)", "\n".join(shell_blocks(README)) + README, re.M))
    assert {"demo", "test", "test-fast"} <= targets
    for target in targets:
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_the_readers_find_what_they_should():
    text = "```bash\npum a --x 1 \\\n  --y 2 && pum b c  # note\necho pum; T=$(pum d 'e; f')\npum g '{\n}'\n```"
    assert pum_commands(text) == [["a", "--x", "1", "--y", "2"], ["b", "c"], ["d", "e; f"], ["g", "{\n}"]]
    row = "| admin | `POST /v1/jobs/{id}/start\\|pause`, `GET /v1/jobs/{id}/model[/{file}]` | x |"
    assert table_endpoints(row) == {"POST /v1/jobs/{}/start", "POST /v1/jobs/{}/pause", "GET /v1/jobs/{}/model",
                                    "GET /v1/jobs/{}/model/{}"}
