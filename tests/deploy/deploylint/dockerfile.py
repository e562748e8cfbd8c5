"""Dockerfiles read as instructions: COPY sources, user, entrypoint and CMD, the .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path, PurePosixPath

from . import REPO


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


def last(instructions, keyword: str) -> str | None:
    values = [args for kw, args in instructions if kw == keyword]
    return values[-1] if values else None


def copies(instructions) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context (not --from a stage)."""
    out = []
    for kw, args in instructions:
        if kw not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else args.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def image_argv(instructions) -> tuple[list[str], list[str]]:
    entry, cmd = last(instructions, "ENTRYPOINT"), last(instructions, "CMD")
    return (exec_form(entry) if entry else []), (exec_form(cmd) if cmd else [])


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether a .dockerignore excludes `path` (last matching pattern wins; a match on a parent folder counts)."""
    parts, excluded = path.strip("/").split("/"), False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        alternatives = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase("/".join(parts[:k]), p) for p in alternatives for k in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def dockerignore_patterns(dockerfile: Path, context: Path) -> list[str]:
    """<Dockerfile>.dockerignore next to the Dockerfile, else <context>/.dockerignore (Docker's order)."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
        if candidate.is_file():
            lines = (line.strip() for line in candidate.read_text().splitlines())
            return [line for line in lines if line and not line.startswith("#")]
    return []


def dockerfile_problems(dockerfile: Path, check_cli, context: Path = REPO) -> list[str]:
    """COPY sources exist and are in the context; non-root user; `pum` entrypoint and CMD match the CLI."""
    ins, problems = dockerfile_instructions(dockerfile.read_text()), []
    name = dockerfile.name
    if not any(kw == "FROM" for kw, _ in ins):
        problems.append(f"{name}: no FROM")
    ignore = dockerignore_patterns(dockerfile, context)
    for sources, _ in copies(ins):
        for source in sources:
            if not list(context.glob(source)) and not (context / source).exists():
                problems.append(f"{name}: COPY {source}: not in the build context {context}")
            elif dockerignore_excludes(ignore, source):
                problems.append(f"{name}: COPY {source}: excluded by the .dockerignore")
    user = last(ins, "USER")
    if user is None or user.split(":")[0] in ("root", "0"):
        problems.append(f"{name}: runs as root (USER {user}); add an unprivileged USER")
    entry, cmd = image_argv(ins)
    if not entry or Path(entry[0]).name != "pum":
        problems.append(f"{name}: ENTRYPOINT {entry} is not the pum console script")
    else:
        problems += [f"{name}: {p}" for p in check_cli(entry[1:] + cmd, complete=bool(cmd))]
    return problems


def package_copy_problems(dockerfile: Path) -> list[str]:
    """`pip install .` needs pyproject.toml, the readme it names, and every package folder it maps."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    readme = pyproject["project"].get("readme")
    readme = readme.get("file") if isinstance(readme, dict) else readme
    needed = {"pyproject.toml", *([readme] if readme else []), *pyproject["tool"]["setuptools"]["package-dir"].values()}
    instructions = dockerfile_instructions(dockerfile.read_text())
    copied = [PurePosixPath(s) for sources, _ in copies(instructions) for s in sources]
    return [f"{dockerfile.name}: does not COPY {need} (pip install . needs it)" for need in sorted(needed)
            if not any(PurePosixPath(need) == c or c in PurePosixPath(need).parents for c in copied)]


def uid_of(dockerfile: Path) -> str | None:
    text = dockerfile.read_text()
    arg = re.search(r"^ARG PUM_UID=(\d+)", text, re.M)
    return arg.group(1) if arg and re.search(r"useradd[^\n]*--uid \"?\$\{PUM_UID\}", text) else None
