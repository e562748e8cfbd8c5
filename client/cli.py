"""`pum worker` and `pum admin …`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from functools import partial
from pathlib import Path

from pum.common.states import ACTIONS, JobAction, JobState

JOB_ID_HELP = "the job's id (`pum admin jobs` lists them)"
JOB_DID_NOT_FINISH = 4  # `pum admin wait`'s exit status for a job that ended failed or aborted


def http_client(server: str, token: str | None, ca_file: str | None = None, timeout: float = 600.0):
    """An httpx.Client for the server; verifies TLS against `ca_file` when given."""
    import ssl

    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    verify = ssl.create_default_context(cafile=ca_file) if ca_file else True
    return httpx.Client(base_url=server, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), verify=verify)


def add_parsers(subparsers) -> None:
    from pum.common.prompts import PROMPT_FORMATS

    worker = subparsers.add_parser("worker", help="run a worker (data owner): lease, unlearn, upload")
    worker.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    worker.add_argument("--token", default=os.environ.get("PUM_WORKER_TOKEN"), help="worker token (or PUM_WORKER_TOKEN)")
    worker.add_argument("--forget", required=True, help="forget set: JSON lines with question/answer")
    worker.add_argument("--retain", help="retain set (needed by GradDiff, NPO)")
    worker.add_argument("--saves-dir", default="saves/unlearn", help="per-copy logs go to SAVES/<task>/")
    worker.add_argument("--carry-dir", help="reference model and optimiser state kept across rounds "
                        "(default SAVES/carry); workers of one data owner may share it")
    worker.add_argument("--device", help="cuda, cuda:1, cpu (default: the GPU if any)")
    worker.add_argument("--threads", type=int, help="torch CPU threads")
    worker.add_argument("--max-copies", type=int, help="stop after this many copies")
    worker.add_argument("--idk", help="'I don't know' answers for DPO, one per line (default: TOFU's list)")
    worker.add_argument("--ca-file", help="CA bundle to verify the server's TLS certificate")
    worker.add_argument("--no-progress", action="store_true", help="no progress bars")
    worker.add_argument("--bf16-delta", action="store_true", help="upload the update in bfloat16: half the bytes, "
                        "~0.2%% relative error of the update (default: float32, exact)")
    worker.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="train each copy with N processes of this machine, one per GPU (FSDP2 under torchrun); "
                        "process 0 talks to the server")
    worker.set_defaults(run=run_worker)

    unlearn = subparsers.add_parser("unlearn", help="run an inner method directly on a model (the baseline, no PUM)")
    unlearn.add_argument("model_dir", help="Hugging Face model folder (with tokenizer), or a model id in the local cache")
    unlearn.add_argument("--forget", required=True, help="forget split: JSON lines, or a datasets save_to_disk folder")
    unlearn.add_argument("--retain", help="retain set (needed by GradDiff, NPO)")
    unlearn.add_argument("--out", required=True, help="where the unlearned model is saved")
    unlearn.add_argument("--method", default=os.environ.get("PUM_INNER_HANDLER", "GradDiff"),
                         help="inner method: GradAscent, GradDiff, NPO, SimNPO, DPO, RMU, ... (or PUM_INNER_HANDLER; default GradDiff)")
    unlearn.add_argument("--epochs", type=float, default=None,
                         help="epochs over the forget set (default: num_train_epochs in --hyperparams, "
                              "else PUM_LOCAL_EPOCHS, else 5)")
    unlearn.add_argument("--hyperparams", default="{}",
                         help='JSON, PUM\'s or open-unlearning\'s names: {"lr": 1e-5, "batch_size": 32, "beta": 0.1} '
                              'or {"learning_rate": 1e-5, "per_device_train_batch_size": 8, '
                              '"gradient_accumulation_steps": 4, "num_train_epochs": 10, "warmup_epochs": 1}')
    unlearn.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS,
                         help="chat: the tokenizer's chat template; plain: 'Question: …\\nAnswer:'; "
                              "auto (default): chat when the tokenizer has a template")
    unlearn.add_argument("--device", help="cuda, cpu (default: the GPU if any)")
    unlearn.add_argument("--threads", type=int, help="torch CPU threads")
    add_step_options(unlearn)
    unlearn.set_defaults(run=run_unlearn)

    admin = subparsers.add_parser("admin", help="admin commands against a running server")
    admin.add_argument("--server", default=os.environ.get("PUM_SERVER_URL", "http://127.0.0.1:8000"),
                       help="server URL (or PUM_SERVER_URL; default http://127.0.0.1:8000)")
    admin.add_argument("--token", default=os.environ.get("PUM_ADMIN_TOKEN"), help="admin token (or PUM_ADMIN_TOKEN)")
    admin.add_argument("--ca-file", help="CA bundle to verify the server's TLS certificate")
    commands = admin.add_subparsers(dest="command", required=True)
    commands.add_parser("jobs", help="list jobs")
    create = commands.add_parser("create", help="create a job from a job YAML (task, model_dir, pum, hyperparams)")
    create.add_argument("job_file", help="job YAML, e.g. presets/tofu/NPO.yaml; PUM_* variables of the seed "
                                         "override its pum: section")
    create.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override the file (and the variables): task=…, model_dir=…, pum.NAME=…, "
                             "hyperparams.NAME=… (repeatable)")
    status = commands.add_parser("status", help="show a job: a short table (state, round, copies with their workers, "
                                               "durations, failures, ETA, ε)")
    status.add_argument("job_id", help=JOB_ID_HELP)
    status.add_argument("--json", action="store_true", help="print the whole status document as JSON instead")
    watch = commands.add_parser("watch", help="show a job's status table every few seconds until the job ends")
    watch.add_argument("job_id", help=JOB_ID_HELP)
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    watch.add_argument("--count", type=int, help="stop after this many tables (default: when the job ends)")
    for action in JobAction:
        commands.add_parser(str(action), help=ACTIONS[action].doc).add_argument("job_id", help=JOB_ID_HELP)
    token = commands.add_parser("token", help="issue a worker token for a job")
    token.add_argument("job_id", help=JOB_ID_HELP)
    token.add_argument("--label", default="worker", help="a name for the worker that gets the token (default worker)")
    revoke_lease = commands.add_parser("revoke-lease", help="end a live lease now; its copy is offered again")
    revoke_lease.add_argument("job_id", help=JOB_ID_HELP)
    revoke_lease.add_argument("lease_id", help="the lease (`pum admin status JOB_ID` shows each copy's lease_id)")
    revoke_token = commands.add_parser("revoke-token", help="revoke a job's worker tokens by label, ending their leases")
    revoke_token.add_argument("job_id", help=JOB_ID_HELP)
    revoke_token.add_argument("label", help="the label the token was issued with")
    wait = commands.add_parser("wait", help="wait until a job is finalized, aborted or failed, showing its progress "
                                            "(exit status 4, with the reason, when it failed or was aborted)")
    wait.add_argument("job_id", help=JOB_ID_HELP)
    wait.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait as long as the job runs)")
    wait.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    delete = commands.add_parser("delete", help="remove an ended job, its state and its exported model "
                                                "(its task can then be used again)")
    delete.add_argument("job_id", help=JOB_ID_HELP)
    download = commands.add_parser("download", help="download a finalized job's model")
    download.add_argument("job_id", help=JOB_ID_HELP)
    download.add_argument("dest", help="folder the model's files are written to (created if missing)")
    download.add_argument("--no-progress", action="store_true", help="no progress bars")
    admin.set_defaults(run=run_admin)


def add_step_options(parser: argparse.ArgumentParser) -> None:
    """How a step is computed (trainer keys of --hyperparams, README "Big models"); they override the JSON."""
    parser.add_argument("--gradient-accumulation-steps", type=int, metavar="N",
                        help="passes per step: each runs batch_size/N pairs (same result, less memory)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None,
                        help="recompute activations in the backward pass (same result, less memory, ~1/3 slower)")
    parser.add_argument("--bf16-autocast", action="store_true", default=None,
                        help="bfloat16 matmuls on a GPU that has them; weights and optimiser state stay float32")


def step_hyperparams(args: argparse.Namespace) -> dict:
    """The step options given on the command line, as trainer keys."""
    keys = ("gradient_accumulation_steps", "gradient_checkpointing", "bf16_autocast")
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


def run_worker(args: argparse.Namespace) -> int:
    import torch

    from pum.common.qa import load_qa

    from .api import WorkerAPI
    from .methods import load_idk_answers
    from .parallel import under_torchrun
    from .worker import Worker, WorkerOptions

    if not args.token:
        raise SystemExit("pum worker: give --token or set PUM_WORKER_TOKEN")
    if args.nproc_per_node < 1:
        raise SystemExit(f"pum worker: --nproc-per-node must be ≥ 1 (got {args.nproc_per_node})")
    if args.nproc_per_node > 1 and not under_torchrun():
        from .fsdp_worker import relaunch_under_torchrun  # torch.distributed only where it is used

        relaunch_under_torchrun(args.nproc_per_node, sys.argv[1:])  # does not return
    if args.threads:
        torch.set_num_threads(args.threads)
    forget = load_qa(args.forget)
    retain = load_qa(args.retain) if args.retain else None
    options = WorkerOptions(
        saves_dir=Path(args.saves_dir), carry_dir=Path(args.carry_dir) if args.carry_dir else None,
        device=args.device, progress=not args.no_progress, max_copies=args.max_copies,
        idk_answers=load_idk_answers(args.idk) if args.idk else None, bf16_delta=args.bf16_delta,
    )

    @contextlib.contextmanager
    def open_api():
        with http_client(args.server, args.token, args.ca_file) as http:
            yield WorkerAPI(http)

    if under_torchrun():
        from .fsdp_worker import run_group_worker

        done = run_group_worker(open_api, forget, retain, options)
        if done is None:  # a follower: process 0 reports
            return 0
    else:
        with open_api() as api:
            done = Worker(api, forget, retain, options).run()
    print(json.dumps({"copies_uploaded": done}))
    return 0


def run_unlearn(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pum.common.aliases import canonical_job
    from pum.common.hub import resolve_local
    from pum.common.prompts import QAEncoder
    from pum.common.qa import load_qa
    from pum.common.schemas import TaskSpec

    from .trainer import TrainConfig, run_unlearning
    from .worker import default_device

    if args.threads:
        torch.set_num_threads(args.threads)
    pum = {} if args.epochs is None else {"local_epochs": args.epochs}
    pum, hyperparams = canonical_job(pum, json.loads(args.hyperparams))
    hyperparams.update(step_hyperparams(args))
    epochs = pum.get("local_epochs", float(os.environ.get("PUM_LOCAL_EPOCHS", 5)))
    task = TaskSpec(method=args.method, epochs=epochs, rounds=1, hyperparams=hyperparams,
                    prompt_format=args.prompt_format)
    config = TrainConfig.from_task(task)
    device = args.device or default_device()
    model_dir = resolve_local(args.model_dir, "model_dir")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # float32 weights whatever the checkpoint's dtype: bf16 weights would round away lr-sized updates.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    retain = load_qa(args.retain) if args.retain else None
    encoder = QAEncoder(tokenizer, task.prompt_format)
    metrics = run_unlearning(model, encoder, load_qa(args.forget), retain, config, progress=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"saved": args.out, **metrics}, default=str))
    return 0


def run_admin(args: argparse.Namespace) -> int:
    from .admin import AdminAPI
    from .job_file import load_job_file
    from .progress import WaitProgress, byte_bar

    with http_client(args.server, args.token, args.ca_file) as http:
        api = AdminAPI(http)
        if args.command == "jobs":
            result = [job.model_dump(mode="json") for job in api.jobs()]
        elif args.command == "create":
            spec = load_job_file(Path(args.job_file), overrides=args.overrides)
            result = api.create_job(spec["task"], spec["model_dir"], spec["pum"], spec["hyperparams"])
        elif args.command == "status" and args.json:
            result = api.status(args.job_id)
        elif args.command in ("status", "watch"):
            return show_status(api, args)
        elif args.command in set(JobAction):
            result = api.action(args.job_id, args.command)
        elif args.command == "token":
            result = {"token": api.issue_token(args.job_id, args.label)}
        elif args.command == "delete":
            result = api.delete_job(args.job_id)
        elif args.command == "revoke-lease":
            result = api.revoke_lease(args.job_id, args.lease_id)
        elif args.command == "revoke-token":
            result = api.revoke_token(args.job_id, args.label)
        elif args.command == "wait":
            result = api.wait(args.job_id, args.timeout, on_status=None if args.no_progress else WaitProgress(sys.stderr))
        else:
            bars = partial(byte_bar, enabled=not args.no_progress)
            result = {"saved": str(api.download_model(args.job_id, Path(args.dest), bars=bars))}
    json.dump(result.model_dump(mode="json") if hasattr(result, "model_dump") else result, sys.stdout, indent=2)
    print()
    if args.command == "wait" and result.state is not JobState.FINALIZED:
        print(f"pum admin: job {result.id} {result.state}" + (f": {result.error}" if result.error else ""),
              file=sys.stderr)
        return JOB_DID_NOT_FINISH
    return 0


def show_status(api, args: argparse.Namespace) -> int:
    """The status table once (`status`), or refreshed until the job ends (`watch`)."""
    from pum.common.errors import PumError

    from .status_view import status_table, watch

    def read():
        status = api.status(args.job_id)
        try:
            report = api.privacy(args.job_id)
        except PumError:  # the table still shows the job
            report = None
        return status, report

    if args.command == "status":
        print(status_table(*read()))
    else:
        watch(read, sys.stdout, args.interval, args.count, clear=sys.stdout.isatty())
    return 0
