"""A real `pum worker` process against a malicious server process on 127.0.0.1.

The server hands out three leases: one whose public files climb out of the worker's folder (a
relative traversal, an absolute path, a dotfile), one whose task name is an absolute path, and one
whose config and tokenizer config name the server's own Python modules (`auto_map`), which write a
marker file when imported. The worker's stdin answers "y" to any question, as a user at a terminal
might. The worker must write nothing outside its folders (its temporary folder and its saves
folder), run none of the served code, ask for none of the unsafe files, and give every lease back
with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pum.demo.cluster import free_port, wait_healthy

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent


def tree(root: Path) -> set[str]:
    """Every path under `root`, relative to it (links not followed)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def scenario(root: Path, model_dir: Path, outside: Path) -> None:
    """The malicious server's script: files it serves, the copy, and three hostile leases."""
    files = root / "files"
    files.mkdir(parents=True)
    evil = f"open({str(outside / 'served_code_ran')!r}, 'w').write('the server ran code on the worker')\n"
    for module in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (files / module).write_text(evil + "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilTokenizer: pass\n")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evil", auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel",
    })
    (files / "config.json").write_text(json.dumps(config))
    (files / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
    }))
    shutil.copyfile(model_dir / "model.safetensors", root / "copy.safetensors")

    def lease(n: int, **changes) -> dict:
        return {
            "status": "leased", "lease_id": f"lease-{n}", "job_id": "job-x", "task_name": "innocent", "round": 1,
            "rounds_R": 1, "ttl_s": 60.0, "public_files": ["config.json", "tokenizer_config.json"],
            "task": {"method": "GradAscent", "epochs": 1.0, "max_steps": 1, "rounds": 1, "hyperparams": {}},
            **changes,
        }

    leases = [
        lease(1, public_files=["config.json", "../../climbed_out", str(outside / "absolute_name"), ".bashrc"]),
        lease(2, task_name=str(outside / "absolute_task")),
        lease(3, public_files=["config.json", "tokenizer_config.json", "configuration_evil.py",
                               "modeling_evil.py", "tokenization_evil.py"]),
    ]
    (root / "scenario.json").write_text(json.dumps({"leases": leases}))


def test_a_malicious_server_can_neither_write_outside_the_workers_folders_nor_run_code(tmp_path, tiny_model_dir):
    server_root, outside = tmp_path / "server", tmp_path / "outside"
    box = tmp_path / "worker"  # the worker's whole world: its temporary folder, saves, home, working folder
    worker_tmp, saves, home = box / "tmp", box / "saves", box / "home"
    for folder in (outside, worker_tmp, saves, home):
        folder.mkdir(parents=True)
    scenario(server_root, tiny_model_dir, outside)
    forget = box / "forget.jsonl"
    forget.write_text(json.dumps({"question": "Where was Ilsa Varn born?", "answer": "In Lisbon."}) + "\n")
    (box / "answers.txt").write_text("y\n" * 50)  # a user who says yes to every prompt
    before = tree(tmp_path)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen([sys.executable, str(HERE / "hostile_server.py"), str(server_root), str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        env = {**os.environ, "TMPDIR": str(worker_tmp), "HOME": str(home), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1"}
        env.pop("HF_HOME", None)
        with (box / "answers.txt").open("rb") as answers, (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.run(
                [sys.executable, "-m", "pum.cli", "worker", "--server", url, "--token", "pumw_any",
                 "--forget", str(forget), "--saves-dir", str(saves), "--threads", "1", "--no-progress"],
                cwd=box, env=env, stdin=answers, stdout=log, stderr=subprocess.STDOUT, timeout=300,
            )
    finally:
        server.terminate()
        server.wait(timeout=15)
    worker_log = (tmp_path / "worker.log").read_text()

    assert not (outside / "served_code_ran").exists(), worker_log[-3000:]
    new = tree(tmp_path) - before
    allowed = ("worker/tmp", "worker/saves", "server/requests.jsonl", "server.log", "worker.log")
    written_elsewhere = sorted(p for p in new if not p.startswith(allowed))
    assert written_elsewhere == [], worker_log[-3000:]
    assert not list(home.rglob("*")), "the worker wrote into its home (a cache of served code?)"
    assert not list(saves.rglob("*")) and not list(worker_tmp.rglob("*"))  # refused leases leave nothing behind

    requests = [json.loads(line) for line in (server_root / "requests.jsonl").read_text().splitlines()]
    asked = [r["path"].removeprefix("/v1/work/files/") for r in requests if r["path"].startswith("/v1/work/files/")]
    assert set(asked) <= {"config.json", "tokenizer_config.json"}, asked  # no unsafe name, no .py file
    released = {r["path"].split("/")[-2]: json.loads(r["body"])["reason"] for r in requests if r["path"].endswith("/release")}
    assert sorted(released) == ["lease-1", "lease-2", "lease-3"], requests
    assert "not plain file names" in released["lease-1"]
    assert "task_name" in released["lease-2"]
    assert "auto_map" in released["lease-3"]
    assert worker.returncode != 0 and "3 copies failed in a row" in worker_log  # it stops: the server is broken
