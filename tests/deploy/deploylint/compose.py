"""docker-compose.yml read as compose reads it: interpolation, merging of override files (with
compose's `!reset` and `!override` tags), mounts, and what each service's container runs."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import yaml

from . import REPO
from .dockerfile import dockerfile_instructions, image_argv


_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?+])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's ${VAR}, ${VAR:-default} and $$ in strings (recursively); unset variables take their defaults."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
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


class Override:
    """`!override VALUE` in an override file: VALUE replaces the base's value instead of merging into it."""

    def __init__(self, value):
        self.value = value


RESET = object()  # `!reset` in an override file: the base's value is removed


class _ComposeLoader(yaml.SafeLoader):
    """yaml.SafeLoader plus compose's `!reset` and `!override` tags (Compose 2.24+, podman-compose 1.1+)."""


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
_ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(*files: Path, env: dict[str, str] | None = None) -> dict:
    """The compose files merged as compose merges them, interpolated.

    Later files override: mappings merge key by key (recursively), `volumes` lists merge by target,
    other values are replaced; `!reset` removes a value and `!override` replaces it whole. `env` is
    the host environment the files are interpolated with (unset variables take their defaults).
    """
    merged: dict = {}
    for f in files:
        merged = _merge(merged, interpolate(yaml.load(f.read_text(), Loader=_ComposeLoader), env))
    return merged


def _merge(base, override, key: str | None = None):
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {mount(m)[1]: m for m in base}
        by_target.update({mount(m)[1]: m for m in override})
        return list(by_target.values())
    if isinstance(override, dict) and (base is None or isinstance(base, dict)):
        out = copy.deepcopy(base or {})
        for k, v in override.items():
            if v is RESET:
                out.pop(k, None)
            else:
                out[k] = _merge(out.get(k), v, k)
        return out
    return copy.deepcopy(override)


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
