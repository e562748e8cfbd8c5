"""The checks on a compose deployment: each returns a list of problems (empty = fine)."""

from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import urlparse

from . import REPO, USER_DIRS
from .compose import (dockerfile_of, effective_argv, env_of, flag_value, host_path, is_host_path, mount, mounted,
                      script_of, server_services, worker_services)
from .dockerfile import copies, dockerfile_instructions, exec_form, last
from .shell import client_env_names, pum_invocations, server_env_names, settings_env_names, shell_reads


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
    from pum.client.job_file import load_job_file

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
    from pum.client.job_file import load_job_file
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
