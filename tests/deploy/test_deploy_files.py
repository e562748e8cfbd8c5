"""The deployment files (docker-compose.yml, deploy/) against the code they drive; no Docker engine.

Each check is a function returning a list of problems (empty = fine), run once on the real files
and once on a deliberately broken copy (the `*_caught` tests), so no check can pass vacuously.
`check_cli` (conftest.py) checks `pum` argument lists against the real parser; the scripts are
run for real in test_deploy_scripts.py.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
TLS_OVERRIDE = DEPLOY / "compose.tls.yaml"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
# Host folders the user provides (deploy/README.md): a bind mount of them, or of a path under
# them, need not exist in the repository. Every other bind-mounted host path must.
USER_DIRS = ("models", "data", "saves", "tls")


# ---- shell text: the `pum` commands it runs, the variables it reads and sets ----------------


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


# ---- Dockerfiles ---------------------------------------------------------------------------


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


# ---- docker-compose.yml --------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?+])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's ${VAR}, ${VAR:-default} and $$ in strings (recursively); unset variables take their defaults."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, word = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        have = env.get(name)
        if op in (":-", "-"):
            return have if have or (op == "-" and name in env) else word
        if op in (":+", "+"):
            return word if have else ""
        return have or ""

    return _VAR.sub(one, value)


def load_compose(*files: Path) -> dict:
    """The compose files merged (later ones override: mappings by key, volumes by target), interpolated."""
    merged: dict = {}
    for f in files:
        merged = merge_compose(merged, interpolate(yaml.safe_load(f.read_text())))
    return merged


def merge_compose(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key != "services":
            out[key] = copy.deepcopy(value) if key not in out or not isinstance(value, dict) else {**out[key], **value}
            continue
        for name, svc in value.items():
            target = out.setdefault("services", {}).setdefault(name, {})
            for field, v in svc.items():
                if field == "volumes":
                    by_target = {mount(m)[1]: m for m in target.get("volumes", [])}
                    by_target.update({mount(m)[1]: m for m in v})
                    target["volumes"] = list(by_target.values())
                elif isinstance(v, dict) and isinstance(target.get(field), dict):
                    target[field] = {**target[field], **v}
                else:
                    target[field] = copy.deepcopy(v)
    return out


def mount(spec) -> tuple[str, str, bool]:
    """(source, target, read_only) of a short ("src:dst:ro") or long-syntax volume entry."""
    if isinstance(spec, dict):
        return spec.get("source", ""), spec["target"], bool(spec.get("read_only"))
    parts = spec.split(":")
    return parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")


def is_host_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def dockerfile_of(compose: dict, name: str) -> Path | None:
    """The Dockerfile that builds a service's image (its own build, or the service that builds its image)."""
    services = compose["services"]
    svc = services[name]
    builder = svc if "build" in svc else next(
        (s for s in services.values() if "build" in s and s.get("image") == svc.get("image")), None)
    if builder is None:
        return None
    build = builder["build"] if isinstance(builder["build"], dict) else {"context": builder["build"]}
    return REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def effective_argv(compose: dict, name: str) -> list[str]:
    """What the container runs: compose entrypoint/command over the image's (a new entrypoint drops the image CMD)."""
    svc, dockerfile = compose["services"][name], dockerfile_of(compose, name)
    entry, cmd = [], []
    if dockerfile and dockerfile.is_file():
        entry, cmd = image_argv(dockerfile_instructions(dockerfile.read_text()))
    if "entrypoint" in svc:
        entry, cmd = _words(svc["entrypoint"]), []
    if "command" in svc:
        cmd = _words(svc["command"])
    return entry + cmd


def _words(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def host_path(compose: dict, name: str, container_path: str) -> Path | None:
    """The host file behind a container path, through the service's bind mounts (longest target wins)."""
    best = None
    for source, target, _ in map(mount, compose["services"][name].get("volumes", [])):
        if is_host_path(source) and (container_path == target or container_path.startswith(target.rstrip("/") + "/")):
            if best is None or len(target) > len(best[1]):
                best = (source, target)
    if best is None:
        return None
    return (REPO / best[0]).resolve() / container_path[len(best[1]):].lstrip("/")


def mounted(compose: dict, name: str, container_path: str) -> bool:
    targets = [mount(m)[1].rstrip("/") for m in compose["services"][name].get("volumes", [])]
    return any(container_path == t or container_path.startswith(t + "/") for t in targets)


def script_of(compose: dict, name: str) -> Path | None:
    """The host script a service runs as `sh SCRIPT ...`, if it runs one."""
    argv = effective_argv(compose, name)
    if len(argv) >= 2 and Path(argv[0]).name in ("sh", "bash", "dash"):
        return host_path(compose, name, argv[1])
    return None


def server_services(compose: dict) -> list[str]:
    return [n for n in compose["services"] if effective_argv(compose, n)[1:2] == ["server"]]


def worker_services(compose: dict) -> list[str]:
    return [n for n in compose["services"] if (dockerfile_of(compose, n) or Path()).name == "worker.Dockerfile"]


def flag_value(argv: list[str], flag: str) -> str | None:
    for k, token in enumerate(argv):
        if token == flag and k + 1 < len(argv):
            return argv[k + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# ---- compose checks ------------------------------------------------------------------------


def build_problems(compose: dict) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = REPO / build.get("context", ".")
            if not context.is_dir():
                problems.append(f"{name}: build context {context} does not exist")
            elif not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: dockerfile {build.get('dockerfile', 'Dockerfile')} does not exist")
        elif dockerfile_of(compose, name) is None:
            problems.append(f"{name}: image {svc.get('image')!r} is built by no service (it would be pulled)")
    return problems


def mount_problems(compose: dict) -> list[str]:
    problems, declared = [], set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for source, target, _ in map(mount, svc.get("volumes", [])):
            if not is_host_path(source):
                if source not in declared:
                    problems.append(f"{name}: named volume {source!r} is not declared under volumes:")
                continue
            path = (REPO / source).resolve()
            user_dir = any(path == REPO / d or REPO / d in path.parents for d in USER_DIRS)
            if not user_dir and not path.exists():
                problems.append(f"{name}: bind mount {source} -> {target}: {path} does not exist")
    return problems


def compose_cli_problems(compose: dict, check_cli) -> list[str]:
    """A service running `pum ...` gives a complete, valid command line; one running a script has it mounted."""
    problems = []
    for name in compose["services"]:
        argv = effective_argv(compose, name)
        if argv and Path(argv[0]).name == "pum":
            problems += [f"{name}: {p}" for p in check_cli(argv[1:])]
        elif len(argv) >= 2 and Path(argv[0]).name in ("sh", "bash", "dash"):
            script = script_of(compose, name)
            if script is None or not script.is_file():
                problems.append(f"{name}: runs {argv[1]}, which no bind mount provides")
        else:
            problems.append(f"{name}: runs {argv}, neither pum nor a mounted script")
    return problems


def env_problems(compose: dict) -> list[str]:
    """Each variable a service sets is read by what it runs: ServerSettings, the client CLI, or its script."""
    server, client, seed = server_env_names(), client_env_names(), settings_env_names()
    problems = []
    for name, svc in compose["services"].items():
        argv = effective_argv(compose, name)
        if argv[1:2] == ["server"]:
            allowed, who = server, "ServerSettings"
        else:
            script = script_of(compose, name)
            allowed = client | seed | (shell_reads(script.read_text()) if script and script.is_file() else set())
            who = f"the client CLI, the seed's settings or {script.name if script else 'its script'}"
        for var in sorted(set(env_of(svc)) - allowed):
            problems.append(f"{name}: {var} is read by nothing it runs ({who})")
    return problems


def gpu_problems(compose: dict) -> list[str]:
    """Each worker reserves exactly one NVIDIA GPU, and no two workers the same one."""
    problems, owner = [], {}
    workers = worker_services(compose)
    if not workers:
        problems.append("no worker service (none built from deploy/worker.Dockerfile)")
    for name in workers:
        reservations = ((compose["services"][name].get("deploy") or {}).get("resources") or {}).get("reservations")
        devices = (reservations or {}).get("devices") or []
        ids = [str(i) for d in devices for i in d.get("device_ids") or []]
        if len(devices) != 1 or len(ids) != 1 or devices[0].get("count") is not None:
            problems.append(f"{name}: reserves {ids or devices}, not exactly one GPU by device_ids")
            continue
        if devices[0].get("driver") != "nvidia" or "gpu" not in (devices[0].get("capabilities") or []):
            problems.append(f"{name}: the reservation needs driver nvidia and capabilities [gpu]")
        if ids[0] in owner:
            problems.append(f"{name}: GPU {ids[0]} is already reserved by {owner[ids[0]]}")
        owner[ids[0]] = name
    return problems


def token_problems(compose: dict) -> list[str]:
    """setup issues a token for exactly the names the workers read (PUM_WORKER_NAME), on a shared volume."""
    problems = []
    setup_args = effective_argv(compose, "setup")[2:]
    issued = set(setup_args[1:])
    wanted = {env_of(compose["services"][w]).get("PUM_WORKER_NAME") for w in worker_services(compose)}
    if issued != wanted:
        problems.append(f"setup issues tokens for {sorted(issued)} but the workers read {sorted(map(str, wanted))}")
    setup_vols = {mount(m)[0]: mount(m)[1] for m in compose["services"]["setup"].get("volumes", [])}
    for w in worker_services(compose):
        svc = compose["services"][w]
        tokens_dir = env_of(svc).get("PUM_TOKENS_DIR", "/tokens")
        shared = [s for s, t, _ in map(mount, svc.get("volumes", [])) if t == tokens_dir and s in setup_vols]
        if not shared or setup_vols[shared[0]] != env_of(compose["services"]["setup"]).get("PUM_TOKENS_DIR", "/tokens"):
            problems.append(f"{w}: its tokens folder {tokens_dir} is not the volume setup writes to")
    return problems


def healthcheck_urls(test: list[str] | str) -> list[str]:
    words = shlex.split(test) if isinstance(test, str) else test
    return [w for w in words if "://" in w]


def healthcheck_problems(compose: dict, routes: set[str]) -> list[str]:
    """The server's health check (compose and image) hits a GET route of the app, on the port it serves."""
    problems = [] if server_services(compose) else ["no service runs `pum server`"]
    for name in server_services(compose):
        svc, dockerfile = compose["services"][name], dockerfile_of(compose, name)
        port = flag_value(effective_argv(compose, name), "--port") or "8000"
        ins = dockerfile_instructions(dockerfile.read_text())
        tests = {"compose": (svc.get("healthcheck") or {}).get("test") or []}
        image_check = last(ins, "HEALTHCHECK") or ""
        tests["image"] = exec_form(image_check.split(" CMD ", 1)[1].strip()) if " CMD " in f" {image_check}" else []
        copied = {dest for _, dest in copies(ins)}
        for where, test in tests.items():
            urls = healthcheck_urls(test)
            if not urls:
                problems.append(f"{name}: {where} health check {test} probes no URL")
            for url in urls:
                u = urlparse(url)
                if u.path not in routes:
                    problems.append(f"{name}: {where} health check {url}: the app has no GET {u.path}")
                if str(u.port) != port:
                    problems.append(f"{name}: {where} health check {url}: the server listens on {port}")
            scripts = [w for w in (test if isinstance(test, list) else []) if w.endswith(".py")]
            problems += [f"{name}: {where} health check runs {s}, which the image does not COPY"
                         for s in scripts if s not in copied]
    return problems


def dependency_problems(compose: dict) -> list[str]:
    """service_healthy targets have a health check; setup waits for a healthy server, workers for setup."""
    problems, services = [], compose["services"]
    for name, svc in services.items():
        for target, cond in (svc.get("depends_on") or {}).items():
            condition = (cond or {}).get("condition")
            if condition == "service_healthy":
                image_check = last(dockerfile_instructions(dockerfile_of(compose, target).read_text()), "HEALTHCHECK")
                if not services[target].get("healthcheck") and not image_check:
                    problems.append(f"{name} waits for {target} to be healthy, but {target} has no health check")
    for server in server_services(compose):
        if ((services["setup"].get("depends_on") or {}).get(server) or {}).get("condition") != "service_healthy":
            problems.append(f"setup does not wait for {server} to be healthy")
    for w in worker_services(compose):
        condition = ((services[w].get("depends_on") or {}).get("setup") or {}).get("condition")
        if condition != "service_completed_successfully":
            problems.append(f"{w} does not wait for setup to complete successfully")
    return problems


def container_path_problems(compose: dict) -> list[str]:
    """Paths the processes use live on mounts: server state and saves, the job's model, the workers' data."""
    from pum.client.admin import load_job_file

    problems = []
    for name in server_services(compose):
        argv = effective_argv(compose, name)
        for flag in ("--state-dir", "--saves-dir", "--tls-cert", "--tls-key"):
            path = flag_value(argv, flag)
            if path and not mounted(compose, name, path):
                problems.append(f"{name}: {flag} {path} is on no volume (lost with the container, or absent)")
        job_file = host_path(compose, "setup", effective_argv(compose, "setup")[2])
        if job_file is None or not job_file.is_file():
            problems.append(f"setup: job file {effective_argv(compose, 'setup')[2]} is not a mounted file")
        else:
            model_dir = load_job_file(job_file, environ={})["model_dir"]
            if not mounted(compose, name, model_dir):
                problems.append(f"{name}: the job's model_dir {model_dir} is on no mount of the server")
    for w in worker_services(compose):
        script = script_of(compose, w)
        for argv in pum_invocations(script.read_text()) if script else []:
            for flag in ("--forget", "--retain", "--saves-dir", "--ca-file"):
                path = flag_value(argv, flag)
                if path and path.startswith("/") and not mounted(compose, w, path.split("$")[0].rstrip("/") or "/x"):
                    problems.append(f"{w}: {flag} {path} is on no mount")
    return problems


def job_problems(job_file: Path) -> list[str]:
    """The job loads like `pum admin create` loads it, and its hyperparams configure the workers' trainer."""
    from pum.client.admin import load_job_file
    from pum.client.trainer import TrainConfig
    from pum.common.errors import PumError
    from pum.common.schemas import TaskSpec

    try:
        job = load_job_file(job_file, environ={})
        pum = job["pum"]
        TrainConfig.from_task(TaskSpec(method=pum["inner_handler"], epochs=pum["local_epochs"],
                                       max_steps=pum["local_max_steps"], rounds=pum["rounds_R"],
                                       hyperparams=job["hyperparams"]))
    except (ValueError, PumError) as err:
        return [f"{job_file.name}: {err}"]
    return []


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_tls() -> dict:
    return load_compose(COMPOSE, TLS_OVERRIDE)


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> set[str]:
    from pum.server.app import create_app
    from pum.server.config import ServerSettings

    app = create_app(ServerSettings(dev_mode=True, state_dir=tmp_path_factory.mktemp("state")))
    return {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}


# ---- the checks on the real files ----------------------------------------------------------


def test_compose_builds_from_files_that_exist(compose):
    assert build_problems(compose) == []


def test_bind_mounts_exist_and_named_volumes_are_declared(compose, compose_tls):
    assert mount_problems(compose) == []
    assert mount_problems(compose_tls) == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile, check_cli):
    assert dockerfile_problems(dockerfile, check_cli) == []
    assert package_copy_problems(dockerfile) == []


def test_dockerfiles_are_the_expected_images():
    server = dockerfile_instructions((DEPLOY / "server.Dockerfile").read_text())
    worker = dockerfile_instructions((DEPLOY / "worker.Dockerfile").read_text())
    assert last(server, "FROM") == "python:3.11-slim"
    assert "8000" in last(server, "EXPOSE").split()
    assert image_argv(server)[0] == ["pum"]
    assert image_argv(worker) == (["pum", "worker"], [])
    assert "download.pytorch.org/whl/cpu" in (DEPLOY / "server.Dockerfile").read_text()
    # The tokens setup writes with mode 600 must be readable by the workers' user.
    assert uid_of(DEPLOY / "server.Dockerfile") is not None
    assert uid_of(DEPLOY / "server.Dockerfile") == uid_of(DEPLOY / "worker.Dockerfile")


@pytest.mark.parametrize("files", ["compose", "compose_tls"])
def test_compose_commands_match_the_cli(files, check_cli, request):
    assert compose_cli_problems(request.getfixturevalue(files), check_cli) == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_pum_commands_match_the_cli(script, check_cli):
    invocations = pum_invocations(script.read_text())
    assert invocations, f"{script.name}: found no pum command (the extractor is broken?)"
    for argv in invocations:
        assert check_cli(argv) == []


def test_scripts_run_the_expected_commands(parser):
    def command(argv: list[str]) -> tuple[str, str | None]:
        ns = parser.parse_known_args(argv)[0]
        return ns.role, getattr(ns, "command", None)

    setup = {command(a) for a in pum_invocations((DEPLOY / "setup.sh").read_text())}
    assert {("admin", "create"), ("admin", "token"), ("admin", "start")} <= setup
    assert [command(a) for a in pum_invocations((DEPLOY / "worker-entry.sh").read_text())] == [("worker", None)]


def test_readme_pum_commands_match_the_cli(check_cli):
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (DEPLOY / "README.md").read_text(), re.S)
    text = "\n".join(re.sub(r"^\$ ", "", line) for block in blocks for line in block.splitlines())
    invocations = pum_invocations(text)
    assert len(invocations) >= 3
    for argv in invocations:
        assert check_cli(argv, complete=False) == []


@pytest.mark.parametrize("files", ["compose", "compose_tls"])
def test_every_environment_variable_is_read(files, request):
    assert env_problems(request.getfixturevalue(files)) == []


def test_scripts_set_only_variables_the_code_reads():
    known = server_env_names() | client_env_names() | settings_env_names()
    for script in SCRIPTS:
        assert shell_sets(script.read_text()) <= known, script.name


def test_the_code_reads_what_the_env_checks_assume():
    assert {"PUM_WORKER_TOKEN", "PUM_SERVER_URL", "PUM_ADMIN_TOKEN"} <= client_env_names()
    assert {"PUM_ADMIN_TOKEN", "PUM_SERVER_TORCH_THREADS"} <= server_env_names()
    assert "PUM_SERVER_ADMIN_TOKEN" not in server_env_names()  # an alias replaces the prefixed name


def test_server_settings_accept_the_compose_environment(compose, monkeypatch):
    from pum.server.config import ServerSettings

    for var in [v for v in os.environ if v.startswith("PUM_")]:
        monkeypatch.delenv(var)
    for name in server_services(compose):
        for var, value in env_of(compose["services"][name]).items():
            monkeypatch.setenv(var, value)
        settings = ServerSettings()  # validates every value; needs the admin token (not dev mode)
        assert settings.admin_token is not None and not settings.dev_mode
        assert settings.admin_token.get_secret_value() == env_of(compose["services"]["setup"])["PUM_ADMIN_TOKEN"]


def test_each_worker_reserves_one_distinct_gpu(compose):
    assert gpu_problems(compose) == []
    assert len(worker_services(compose)) >= 2


@pytest.mark.parametrize("files", ["compose", "compose_tls"])
def test_setup_issues_a_token_per_worker(files, request):
    assert token_problems(request.getfixturevalue(files)) == []


@pytest.mark.parametrize("files", ["compose", "compose_tls"])
def test_healthcheck_targets_a_route_of_the_app(files, request, routes):
    assert "/healthz" in routes
    assert healthcheck_problems(request.getfixturevalue(files), routes) == []


def test_dependency_order(compose):
    assert dependency_problems(compose) == []


@pytest.mark.parametrize("files", ["compose", "compose_tls"])
def test_paths_the_processes_use_are_mounted(files, request):
    assert container_path_problems(request.getfixturevalue(files)) == []


def test_job_file_loads():
    from pum.client.admin import load_job_file

    assert job_problems(DEPLOY / "job.demo.yaml") == []
    job = load_job_file(DEPLOY / "job.demo.yaml", environ={})
    assert (job["pum"]["copies_m"], job["pum"]["rounds_R"], job["pum"]["noise_kappa"]) == (4, 2, 0.01)
    assert job["pum"]["inner_handler"] == "GradDiff" and job["model_dir"].startswith("/models/")


def test_dockerignore_keeps_the_context_small():
    for dockerfile in DOCKERFILES:
        patterns = dockerignore_patterns(dockerfile, REPO)
        for heavy in (".venv/lib/x.py", "models/m/model.safetensors", "state/state.db", "saves/x", "tls/server.key"):
            assert dockerignore_excludes(patterns, heavy), (dockerfile.name, heavy)


# ---- each check catches a broken input -----------------------------------------------------


@pytest.mark.parametrize("argv, complete, expected", [
    (["server", "--hots", "0.0.0.0"], False, "no flag --hots"),
    (["server", "--state", "/state"], False, "no flag --state"),  # an abbreviation argparse would take
    (["wroker"], False, "no subcommand 'wroker'"),
    (["admin", "crate", "job.yaml"], False, "no subcommand 'crate'"),
    (["worker", "--tls-cert", "c.pem"], False, "no flag --tls-cert"),  # a server flag on the worker
    (["server", "--log-level", "DEBUG"], False, "no flag --log-level"),  # a top-level flag after the subcommand
    (["admin", "jobs", "extra"], False, "takes no argument 'extra'"),
    (["worker", "--server", "http://server:8000"], True, "required"),
    (["server", "--port", "eighty"], True, "invalid int"),
])
def test_cli_problems_caught(check_cli, argv, complete, expected):
    assert any(expected in p for p in check_cli(argv, complete=complete))


def test_cli_problems_accepts_good_lines(check_cli):
    assert check_cli(["--log-level", "DEBUG", "server", "--port=8000", "--dev"]) == []
    assert check_cli(["admin", "--ca-file", "ca.crt", "token", "job-1", "--label", "w"]) == []
    assert check_cli(["worker"], complete=False) == []


@pytest.mark.parametrize("text, expected", [
    ('exec pum worker --sever "$URL" --forget f "$@"\n', [["worker", "--sever", "$URL", "--forget", "f"]]),
    ('id=$(pum admin tokn "$job" | json_field id)\n', [["admin", "tokn", "$job"]]),
    ('x="$(pum admin ${CA:+--ca "$CA"} start "$j")"\n', [["admin", "--ca", "$CA", "start", "$j"]]),
    ('pum admin start "$j" > /dev/null 2>&1\n', [["admin", "start", "$j"]]),
    ('echo "then run: pum admin status $id"\n# pum admin nope\n', []),
    ('pum admin jobs   # lists {"id": ...}\n', [["admin", "jobs"]]),
])
def test_pum_invocations_extracts_commands(text, expected):
    assert pum_invocations(text) == expected


def test_a_bad_flag_in_a_script_is_caught(check_cli):
    problems = [p for argv in pum_invocations('exec pum worker --sever x --forget f "$@"\n') for p in check_cli(argv)]
    assert any("--sever" in p for p in problems)


def _gpu(services: dict, name: str) -> dict:
    return services[name]["deploy"]["resources"]["reservations"]["devices"][0]


def _probe(url: str) -> list[str]:
    return ["CMD", "python", "/opt/pum/healthcheck.py", url]


# (check, an edit of the services that breaks the file, text the check must then report)
BROKEN_COMPOSE = [
    pytest.param("build", lambda sv: sv["server"]["build"].update(dockerfile="deploy/x.Dockerfile"), "does not exist",
                 id="missing-dockerfile"),
    pytest.param("build", lambda sv: sv["setup"].update(image="pum-srv"), "built by no service", id="pulled-image"),
    pytest.param("mounts", lambda sv: sv["setup"]["volumes"].append("./deploy/nope.sh:/x.sh:ro"), "does not exist",
                 id="missing-bind-file"),
    pytest.param("mounts", lambda sv: sv["setup"]["volumes"].append("cache:/cache"), "not declared",
                 id="undeclared-volume"),
    pytest.param("cli", lambda sv: sv["server"].update(command=["server", "--hots", "x"]), "--hots", id="bad-flag"),
    pytest.param("cli", lambda sv: sv["setup"].update(entrypoint=["sh", "/opt/x.sh"]), "no bind mount",
                 id="unmounted-script"),
    pytest.param("env", lambda sv: sv["server"]["environment"].update(PUM_SERVER_STATEDIR="/s"),
                 "PUM_SERVER_STATEDIR", id="server-env-typo"),
    pytest.param("env", lambda sv: sv["server"]["environment"].update(PUM_SERVER_ADMIN_TOKEN="t"),
                 "PUM_SERVER_ADMIN_TOKEN", id="prefixed-alias"),
    pytest.param("env", lambda sv: sv["worker-0"]["environment"].update(PUM_WORKER_TOKN="t"), "PUM_WORKER_TOKN",
                 id="worker-env-typo"),
    pytest.param("gpu", lambda sv: _gpu(sv, "worker-1").update(device_ids=["0"]), "already reserved",
                 id="same-gpu"),
    pytest.param("gpu", lambda sv: _gpu(sv, "worker-1").update(device_ids=["1", "2"]), "not exactly one",
                 id="two-gpus"),
    pytest.param("gpu", lambda sv: sv["worker-1"].pop("deploy"), "not exactly one", id="no-gpu"),
    pytest.param("tokens", lambda sv: sv["setup"].update(command=["/opt/pum/job.yaml", "worker-0"]),
                 "setup issues tokens", id="missing-token"),
    pytest.param("tokens", lambda sv: sv["worker-0"]["volumes"].remove("tokens:/tokens:ro"), "not the volume",
                 id="unshared-tokens"),
    pytest.param("health", lambda sv: sv["server"]["healthcheck"].update(test=_probe("http://127.0.0.1:8000/health")),
                 "no GET /health", id="wrong-route"),
    pytest.param("health", lambda sv: sv["server"]["healthcheck"].update(test=_probe("http://127.0.0.1:80/healthz")),
                 "listens on 8000", id="wrong-port"),
    pytest.param("health", lambda sv: sv["server"]["healthcheck"].update(
        test=["CMD", "python", "/hc.py", "http://127.0.0.1:8000/healthz"]), "does not COPY", id="missing-probe"),
    pytest.param("depends", lambda sv: sv["worker-0"].pop("depends_on"), "does not wait for setup",
                 id="worker-starts-early"),
    pytest.param("depends", lambda sv: sv["setup"]["depends_on"]["server"].update(condition="service_started"),
                 "healthy", id="setup-starts-early"),
    pytest.param("paths", lambda sv: sv["server"]["volumes"].remove("state:/state"), "--state-dir /state",
                 id="state-not-on-volume"),
    pytest.param("paths", lambda sv: sv["server"]["volumes"].remove("./models:/models:ro"), "model_dir",
                 id="models-not-mounted"),
    pytest.param("paths", lambda sv: sv["worker-0"]["volumes"].remove("./data:/data:ro"), "--forget",
                 id="data-not-mounted"),
]


@pytest.mark.parametrize("check, edit, expected", BROKEN_COMPOSE)
def test_compose_check_catches(check, edit, expected, compose, check_cli, routes):
    run = {
        "build": build_problems, "mounts": mount_problems, "cli": lambda c: compose_cli_problems(c, check_cli),
        "env": env_problems, "gpu": gpu_problems, "tokens": token_problems,
        "health": lambda c: healthcheck_problems(c, routes), "depends": dependency_problems,
        "paths": container_path_problems,
    }[check]
    assert run(compose) == []
    broken = copy.deepcopy(compose)
    edit(broken["services"])
    problems = run(broken)
    assert any(expected in p for p in problems), problems


def test_dockerfile_checks_catch_broken_files(tmp_path, check_cli):
    good = (DEPLOY / "server.Dockerfile").read_text()
    cases = [
        (good.replace("COPY cli /tmp/pum-src/cli", "COPY cli2 /tmp/pum-src/cli"), "COPY cli2"),
        (good.replace("USER pum", "USER root"), "runs as root"),
        (good.replace('"--saves-dir", "/saves/unlearn"', '"--save-dir", "/saves/unlearn"'), "no flag --save-dir"),
        (good.replace('ENTRYPOINT ["pum"]', 'ENTRYPOINT ["python"]'), "not the pum console script"),
    ]
    for text, expected in cases:
        broken = tmp_path / "server.Dockerfile"
        broken.write_text(text)
        assert any(expected in p for p in dockerfile_problems(broken, check_cli)), expected
    # A source the .dockerignore leaves out: COPY would fail with "not found" in a real build.
    broken = tmp_path / "x.Dockerfile"
    broken.write_text(good)
    (tmp_path / "x.Dockerfile.dockerignore").write_text("*\n!pyproject.toml\n!cli\n")
    assert any("excluded by the .dockerignore" in p for p in dockerfile_problems(broken, check_cli, context=REPO))
    broken.write_text(good.replace("COPY demo /tmp/pum-src/demo\n", "").replace(" README.md /tmp", " /tmp"))
    problems = package_copy_problems(broken)
    assert any("does not COPY demo" in p for p in problems) and any("README.md" in p for p in problems)


def test_job_check_catches_broken_files(tmp_path):
    good = (DEPLOY / "job.demo.yaml").read_text()
    for text, expected in [
        (good.replace("copies_m: 4", "copies_m: 1"), "copies_m"),
        (good.replace("lr: 1.0e-5", "learning_rate: 1.0e-5"), "learning_rate"),
        (good.replace("GradDiff", "GradDif"), "GradDif"),
        (good.replace("task:", "tsk:"), "tsk"),
    ]:
        job = tmp_path / "job.yaml"
        job.write_text(text)
        assert any(expected in p for p in job_problems(job)), expected


def test_env_and_interpolation_helpers():
    assert interpolate("${A:-x}/${B}/$$C", {"B": "b"}) == "x/b/$C"
    assert shell_sets("export FOO BAR\nBAZ=1\nlower=2\n") == {"FOO", "BAR", "BAZ"}
    assert shell_reads('echo "${PUM_X:-1} $PUM_Y"\n# $PUM_Z\n') == {"PUM_X", "PUM_Y"}
    assert not dockerignore_excludes(["*", "!cli"], "cli/__init__.py")
    assert dockerignore_excludes(["*", "!cli", "**/__pycache__"], "cli/__pycache__/x.pyc")
