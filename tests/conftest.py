"""Fixtures shared by every test tier: a tiny real transformers model saved as safetensors, and an
in-process server (TestClient) over a temporary state folder with a controllable clock."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

# torch, the app and the rest are imported where they are used: xdist's controller process loads
# this file too, and runs no test (importing them there cost ~3 s before any worker started)
if TYPE_CHECKING:
    import torch
    from fastapi.testclient import TestClient

    from pum.server.blobs import Faults
    from pum.server.config import ServerSettings
    from pum.server.service import JobService


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """One intra-op thread per test process (make test-fast runs two processes on two cores)."""
    import torch

    torch.set_num_threads(1)


def save_tiny_llama(path: Path, seed: int = 0, tie: bool = True) -> Path:
    """A random-initialised LlamaForCausalLM (about 3 k parameters) in Hugging Face format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=tie,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def dress_as_a_download(path: Path, model, shard_bytes: int, extra_files: dict[str, str] | None = None) -> Path:
    """Save `model` to `path` the way a user gets a model from the hub or a git clone: weights in
    shards of at most `shard_bytes` with model.safetensors.index.json, plus the files that come
    along and that a worker must never receive (.gitattributes, README.md, LICENSE, an original/
    folder with a pickled checkpoint, a stale .bin index). Files already in `path` are kept."""
    import json

    model.save_pretrained(path, max_shard_size=shard_bytes)
    assert (path / "model.safetensors.index.json").is_file(), "not sharded: lower shard_bytes"
    files = {
        ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": "---\nlicense: mit\n---\n# A model card\n",
        "LICENSE": "MIT License\n",
        "original/params.json": json.dumps({"dim": 16, "n_layers": 2}),
        "original/consolidated.00.pth": "not a checkpoint: a server must never read it",
        "pytorch_model.bin.index.json": json.dumps({"weight_map": {"gone.weight": "pytorch_model-00001-of-00002.bin"}}),
        **(extra_files or {}),
    }
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="session")
def as_a_download():
    """dress_as_a_download itself, for tests that need a model folder as users get one."""
    return dress_as_a_download


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """(cache folder, DemoAssets): the tiny demo data and fine-tuned model, built once per session."""
    from pum.demo.assets import tiny_assets

    cache = tmp_path_factory.mktemp("demo-cache")
    return cache, tiny_assets(cache)


ADMIN = "admin-secret-token"


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test sets by hand (`clock.now += ttl`)."""
    return FakeClock()


@dataclass
class Server:
    settings: ServerSettings
    service: JobService
    admin: TestClient
    clock: FakeClock

    def worker(self, token: str) -> TestClient:
        from fastapi.testclient import TestClient

        return TestClient(self.admin.app, headers={"Authorization": f"Bearer {token}"})

    def create_job(
        self, model_dir: Path, pum: dict | None = None, task: str | None = None, start: bool = True,
        hyperparams: dict | None = None,
    ) -> str:
        """A job (started unless `start` is False); its task is t1, t2, … in order of creation
        unless given (a task belongs to one job)."""
        task = task or f"t{len(self.service.store.jobs()) + 1}"
        body = {
            "task": task, "model_dir": str(model_dir), "pum": {"seed": 7, **(pum or {})},
            "hyperparams": hyperparams if hyperparams is not None else {"lr": 1e-3},
        }
        response = self.admin.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        if start:
            assert self.admin.post(f"/v1/jobs/{job_id}/start").status_code == 200
        return job_id

    def token(self, job_id: str, label: str = "w") -> str:
        return self.admin.post(f"/v1/jobs/{job_id}/tokens", json={"label": label}).json()["token"]

    def blob(self, job_id: str, name: str) -> dict[str, torch.Tensor]:
        """A safetensors blob of the job (a name of `pum.server.job_files.JobFiles`), as tensors."""
        with self.service.context.files(job_id).read(name) as blob:
            return {n: blob.read(n) for n in blob.names}

    def alphas(self, job_id: str, round_: int = 1) -> list[float]:
        """The secret α of a seeded job, recomputed the way the server does (test-only)."""
        settings = self.service.store.job(job_id).spec.settings
        from pum.common.noise import draw_alphas, job_key_from_seed

        return draw_alphas(job_key_from_seed(settings.seed), round_, settings.copies_m, settings.alpha_min, settings.alpha_max)


def make_server(tmp_path: Path, clock: FakeClock | None = None, backend: str = "sqlite", faults: Faults | None = None,
                **overrides) -> Server:
    """A server with an admin token in development mode (jobs are seeded, which only --dev allows).

    backend "sqlite": SQLite and local files under tmp_path (the server's defaults); "memory": the
    in-memory store and blob stores (nothing on disk). `faults` arms failures in the state blobs."""
    from fastapi.testclient import TestClient

    from pum.server.app import create_app
    from pum.server.blobs import LocalBlobStore, MemoryBlobStore
    from pum.server.config import ServerSettings
    from pum.server.service import JobService
    from pum.server.store import MemoryStore, SqliteStore

    settings = ServerSettings(**{
        "state_dir": tmp_path / "state", "saves_dir": tmp_path / "saves", "admin_token": ADMIN, "lease_ttl_s": 30.0,
        "dev_mode": True, **overrides,
    })
    clock = clock or FakeClock()
    if backend == "memory":
        service = JobService(MemoryStore(clock), settings, MemoryBlobStore(faults), MemoryBlobStore())
    else:
        blobs = LocalBlobStore(settings.state_dir, faults)
        service = JobService(SqliteStore(settings.state_dir / "state.db", clock), settings, blobs)
    admin = TestClient(create_app(settings, service), headers={"Authorization": f"Bearer {ADMIN}"})
    return Server(settings, service, admin, clock)


@pytest.fixture
def server(tmp_path) -> Server:
    return make_server(tmp_path)


@pytest.fixture
def server_factory():
    """make_server itself, for tests that restart the server on one state folder."""
    return make_server


# A Llama-3.2-Instruct-style chat template (system turn with the date lines, trimmed contents, <|eot_id|>
# after each turn), enough to test prompt formats offline.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_chat_tokenizer(eos: str = "<|eot_id|>"):
    """A byte-level BPE tokenizer with Llama-3's special tokens and chat template (eos: the Instruct one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["Where was Ilsa Varn born? Ilsa Varn was born in Lisbon.", "What does Odo Fenwick write? Poetry.",
            "Cutting Knowledge Date: December 2023 Today Date: 10 Apr 2025 You are a helpful assistant.",
            "system user assistant Question: Answer:"] * 4
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token=eos,
                                   pad_token="<|end_of_text|>", chat_template=LLAMA3_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_chat_tokenizer()


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """A random-init tiny Llama with the chat tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, bos_token_id=chat_tokenizer.bos_token_id,
                         eos_token_id=chat_tokenizer.eos_token_id, pad_token_id=chat_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("chat") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_tokenizer_factory():
    """make_chat_tokenizer itself (eos=…), for tests that need a variant."""
    return make_chat_tokenizer


def fill_hf_cache(source: Path, repo_id: str, cache_dir: Path, repo_type: str = "model") -> Path:
    """Put the files of `source` into a Hugging Face cache with huggingface_hub's own download code.

    A throw-away HTTP server on 127.0.0.1 plays the Hub for the two calls `hf_hub_download` makes per
    file (HEAD for the commit, ETag and size; GET for the bytes), so the cache layout (blobs, refs,
    snapshots with symlinks) is the one huggingface_hub writes. Returns the snapshot folder.
    """
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants, hf_hub_download

    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    prefix = ("/datasets/" if repo_type == "dataset" else "/") + f"{repo_id}/resolve/"

    class Hub(BaseHTTPRequestHandler):
        def _file(self):
            if not self.path.startswith(prefix):
                return None
            name = self.path[len(prefix):].split("/", 1)[1]
            path = source / name
            return path.read_bytes() if path.is_file() else None

        def _head(self, body):
            if body is None:
                self.send_response(404)
                self.end_headers()
                return False
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return True

        def do_HEAD(self):
            self._head(self._file())

        def do_GET(self):
            body = self._file()
            if self._head(body):
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    # shutdown() waits for serve_forever's next poll: 0.5 s by default, on every fill
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False  # CI sets HF_HUB_OFFLINE=1; this hub is local
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            hf_hub_download(repo_id, path.relative_to(source).as_posix(), repo_type=repo_type, cache_dir=cache_dir,
                            endpoint=endpoint)
    finally:
        constants.HF_HUB_OFFLINE = offline
        server.shutdown()
        server.server_close()
    kind = "datasets" if repo_type == "dataset" else "models"
    return cache_dir / f"{kind}--{repo_id.replace('/', '--')}" / "snapshots" / commit


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub reads by default in this test; fill it with `fill`."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # resolving never goes to the network

    class Cache:
        path = cache

        @staticmethod
        def fill(source: Path, repo_id: str, repo_type: str = "model") -> Path:
            return fill_hf_cache(source, repo_id, cache, repo_type)

    return Cache


@contextlib.contextmanager
def serve_in_thread(settings):
    """The real app under uvicorn on 127.0.0.1 in a thread (real HTTP, one process); yields its URL."""
    import uvicorn

    from pum.demo.cluster import free_port
    from pum.server.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def serve_app():
    """`serve_in_thread`, for tests: `with serve_app(settings) as url: …`."""
    return serve_in_thread
