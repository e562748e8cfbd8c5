"""The deployment files (docker-compose.yml, deploy/) against the code they drive; no Docker engine.

Each check (in deploylint/) is a function returning a list of problems (empty = fine), run here once
on the real files and once on a deliberately broken copy (the `*_caught` tests), so no check can pass
vacuously. `check_cli` (conftest.py) checks `pum` argument lists against the real parser; the scripts
are run for real in test_deploy_scripts.py.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
from deploylint import COMPOSE, CPU_OVERRIDE, DEPLOY, DOCKERFILES, REPO, SCRIPTS, TLS_OVERRIDE
from deploylint.checks import (build_problems, compose_cli_problems, container_path_problems, dependency_problems,
                               env_problems, gpu_problems, healthcheck_problems, job_problems, mount_problems,
                               token_problems)
from deploylint.compose import effective_argv, env_of, interpolate, load_compose, server_services, worker_services
from deploylint.dockerfile import (dockerfile_instructions, dockerfile_problems, dockerignore_excludes,
                                   dockerignore_patterns, image_argv, last, package_copy_problems, uid_of)
from deploylint.shell import client_env_names, pum_invocations, server_env_names, settings_env_names, shell_reads, shell_sets


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_tls() -> dict:
    return load_compose(COMPOSE, TLS_OVERRIDE)


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    """The CPU simulation as deploy/compose.cpu.yaml documents it: the override and the CPU job file."""
    return load_compose(COMPOSE, CPU_OVERRIDE, env={"PUM_JOB_FILE": "./deploy/job.cpu.yaml"})


# Every way the compose file is run: as it is, with TLS, with CPU workers.
VARIANTS = ["compose", "compose_tls", "compose_cpu"]


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> set[str]:
    from pum.server.app import create_app
    from pum.server.config import ServerSettings

    app = create_app(ServerSettings(dev_mode=True, state_dir=tmp_path_factory.mktemp("state")))
    # the documented GET routes (app.routes lists an included router as one entry, not its routes)
    return {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


# ---- the checks on the real files ----------------------------------------------------------


def test_compose_builds_from_files_that_exist(compose):
    assert build_problems(compose) == []


@pytest.mark.parametrize("files", VARIANTS)
def test_bind_mounts_exist_and_named_volumes_are_declared(files, request):
    assert mount_problems(request.getfixturevalue(files)) == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile, check_cli):
    assert dockerfile_problems(dockerfile, check_cli) == []
    assert package_copy_problems(dockerfile) == []


def test_dockerfiles_are_the_expected_images():
    server = dockerfile_instructions((DEPLOY / "server.Dockerfile").read_text())
    worker = dockerfile_instructions((DEPLOY / "worker.Dockerfile").read_text())
    # python:3.11-slim with the CPU torch (a stage CPU workers build on), then the server on it.
    assert [args for kw, args in server if kw == "FROM"] == ["python:3.11-slim AS torch-cpu", "torch-cpu"]
    assert "8000" in last(server, "EXPOSE").split()
    assert image_argv(server)[0] == ["pum"]
    assert image_argv(worker) == (["pum", "worker"], [])
    assert "download.pytorch.org/whl/cpu" in (DEPLOY / "server.Dockerfile").read_text()
    # The tokens setup writes with mode 600 must be readable by the workers' user.
    assert uid_of(DEPLOY / "server.Dockerfile") is not None
    assert uid_of(DEPLOY / "server.Dockerfile") == uid_of(DEPLOY / "worker.Dockerfile")


@pytest.mark.parametrize("files", VARIANTS)
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


@pytest.mark.parametrize("files", VARIANTS)
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


def test_cpu_workers_reserve_no_gpu_and_build_on_the_cpu_torch(compose, compose_cpu):
    assert worker_services(compose_cpu) == worker_services(compose)
    for name in worker_services(compose_cpu):
        worker = compose_cpu["services"][name]
        assert "deploy" not in worker  # !reset removed the GPU reservation
        assert worker["build"]["args"] == {"PUM_UID": "10001", "BASE_IMAGE": "pum-torch-cpu", "REQUIRE_CUDA": "0"}
        assert worker["build"]["dockerfile"] == "deploy/worker.Dockerfile"  # merged into, not replaced
        assert effective_argv(compose_cpu, name)[2:] == ["--threads", "1"]
    assert any(p.startswith("worker-0: reserves") for p in gpu_problems(compose_cpu))  # the GPU check sees it
    # The base it names is the server image's torch stage.
    assert "FROM python:3.11-slim AS torch-cpu" in (DEPLOY / "server.Dockerfile").read_text()


def test_compose_override_tags(tmp_path):
    base, override = tmp_path / "base.yml", tmp_path / "override.yml"
    base.write_text("services:\n  a:\n    build: {context: ., args: {X: '1'}}\n    ports: ['1:1']\n"
                    "    deploy: {resources: {}}\n    environment: {A: '1', B: '2'}\n")
    override.write_text("services:\n  a:\n    build: {args: {Y: '2'}}\n    ports: !override ['2:2']\n"
                        "    deploy: !reset null\n    environment: !override {C: '3'}\n")
    a = load_compose(base, override)["services"]["a"]
    assert a == {"build": {"context": ".", "args": {"X": "1", "Y": "2"}}, "ports": ["2:2"], "environment": {"C": "3"}}


@pytest.mark.parametrize("files", VARIANTS)
def test_setup_issues_a_token_per_worker(files, request):
    assert token_problems(request.getfixturevalue(files)) == []


@pytest.mark.parametrize("files", VARIANTS)
def test_healthcheck_targets_a_route_of_the_app(files, request, routes):
    assert "/healthz" in routes
    assert healthcheck_problems(request.getfixturevalue(files), routes) == []


def test_dependency_order(compose):
    assert dependency_problems(compose) == []


@pytest.mark.parametrize("files", VARIANTS)
def test_paths_the_processes_use_are_mounted(files, request):
    assert container_path_problems(request.getfixturevalue(files)) == []


def test_job_file_loads():
    from pum.client.job_file import load_job_file

    assert job_problems(DEPLOY / "job.demo.yaml") == []
    assert job_problems(DEPLOY / "job.cpu.yaml") == []
    cpu = load_job_file(DEPLOY / "job.cpu.yaml", environ={})
    assert (cpu["pum"]["copies_m"], cpu["pum"]["rounds_R"], cpu["pum"]["noise_kappa"]) == (4, 2, 0.01)
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
    (["server", "--version"], False, "no flag --version"),  # a top-level flag after the subcommand
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
        (good.replace("lr: 1.0e-5", "learn_rate: 1.0e-5"), "learn_rate"),  # learning_rate is an accepted alias
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
