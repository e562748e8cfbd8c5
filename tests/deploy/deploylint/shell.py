"""Shell text of the deploy scripts: the `pum` commands it runs, the variables it reads and sets,
and the variables the code reads from the environment (to check the scripts and compose against)."""

from __future__ import annotations

import re
import shlex

from . import REPO


def _command_segments(text: str) -> list[str]:
    """Simple commands of shell text: split at ; | & newlines and parentheses, `$(...)` bodies apart.

    Quote-aware: a `pum` inside a string ("run pum admin ...") is text, not a command; one inside
    `"$(...)"` is a command. Comments are dropped, backslash-newlines joined.
    """
    text = re.sub(r"\\\n", " ", text)
    segments: list[str] = []
    stack: list[str] = ["cmd"]  # contexts: cmd, ", ', {
    buffers: list[list[str]] = [[]]  # one per open cmd context
    i = 0
    while i < len(text):
        c, two, ctx = text[i], text[i:i + 2], stack[-1]
        if ctx == "'":
            buffers[-1].append(c)
            if c == "'":
                stack.pop()
        elif two == "$(" and ctx in ("cmd", '"', "{"):
            buffers[-1].append("$SUB")
            stack.append("cmd")
            buffers.append([])
            i += 2
            continue
        elif two == "${" and ctx in ("cmd", '"', "{"):
            buffers[-1].append(two)
            stack.append("{")
            i += 2
            continue
        elif ctx == "{":
            buffers[-1].append(c)
            if c == "}":
                stack.pop()
        elif ctx == '"':
            buffers[-1].append(c)
            if c == "\\":
                buffers[-1].append(text[i + 1:i + 2])
                i += 1
            elif c == '"':
                stack.pop()
        elif c == "#" and (i == 0 or text[i - 1].isspace()):  # a comment, to the end of the line
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif c in "\"'":  # ctx == "cmd"
            buffers[-1].append(c)
            stack.append(c)
        elif c in ";|&\n()":
            segments.append("".join(buffers[-1]))
            buffers[-1] = []
            if c == ")" and len(stack) > 1:  # end of a $( ... )
                stack.pop()
                buffers.pop()
        else:
            buffers[-1].append(c)
        i += 1
    segments += ["".join(b) for b in buffers]
    return [s.strip() for s in segments if s.strip()]


def pum_invocations(text: str) -> list[list[str]]:
    """The argument lists of every `pum` command in shell text (tokens after the word `pum`).

    `${VAR:+words}` is expanded to its words (optional flags are checked as if given), `"$@"` is
    dropped, and a trailing redirection (`> file`, `2>/dev/null`) is cut off.
    """
    text = re.sub(r"\$\{\w+:\+([^}]*)\}", r"\1", text)
    found = []
    for segment in _command_segments(text):
        if not re.search(r"(^|\s)pum(\s|$)", segment):
            continue
        try:
            tokens = shlex.split(segment)
        except ValueError:
            continue
        if "pum" not in tokens:
            continue
        args = tokens[tokens.index("pum") + 1:]
        cut = next((k for k, t in enumerate(args) if re.match(r"\d*[<>]", t)), len(args))
        found.append([t for t in args[:cut] if t != "$@"])
    return found


def shell_reads(text: str) -> set[str]:
    """Upper-case variables that shell text reads ($NAME or ${NAME...})."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", code))


def shell_sets(text: str) -> set[str]:
    """Upper-case variables that shell text assigns or exports."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        names |= set(re.findall(r"^(?:export\s+)?([A-Z][A-Z0-9_]*)=", line))
        if line.startswith("export "):
            names |= {w.split("=")[0] for w in line.split()[1:] if re.match(r"[A-Z][A-Z0-9_]*(=|$)", w)}
    return names


# ---- what the code reads from the environment ----------------------------------------------


def server_env_names() -> set[str]:
    """The variables ServerSettings reads: PUM_SERVER_<FIELD>, or a field's alias names when it has them."""
    from pydantic import AliasChoices

    from pum.server.config import ServerSettings

    prefix, names = ServerSettings.model_config["env_prefix"], set()
    for name, field in ServerSettings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(prefix + name)
    return {n.upper() for n in names}


def client_env_names() -> set[str]:
    """The variables client/cli.py reads (os.environ.get / os.environ[...] / os.getenv)."""
    source = (REPO / "client" / "cli.py").read_text()
    return set(re.findall(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""", source))


def settings_env_names() -> set[str]:
    """The seed's variables that PumSettings reads (`pum admin create` applies them over the job file)."""
    from pum.common.settings import ENV_NAMES

    return set(ENV_NAMES.values())
