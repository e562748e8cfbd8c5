"""`pum server`: run the FastAPI app under uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from pum.common.errors import InvalidInput


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("server", help="run the PUM server (model owner)")
    parser.add_argument("--state-dir", help="state folder (PUM_SERVER_STATE_DIR; default ./state)")
    parser.add_argument("--saves-dir", help="where merged models go (default ./saves/unlearn)")
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--dev", action="store_true", help="development mode: no admin token needed")
    parser.add_argument("--lease-ttl", type=float, help="lease TTL in seconds (default 120)")
    parser.add_argument("--tls-cert", help="certificate file: serve HTTPS")
    parser.add_argument("--tls-key", help="private key file for --tls-cert")
    parser.set_defaults(run=run)

    audit = subparsers.add_parser("audit", help="operator check: the strongest attacks on the current round's copies")
    audit.add_argument("job_id", nargs="?", help="the job's id (its current round is audited)")
    audit.add_argument("--job", dest="job_flag", help="deprecated: give the job id as JOB_ID instead")
    audit.add_argument("--state-dir", default="state", help="the server's state folder")
    audit.add_argument("--coords", type=int, default=2000, help="coordinates sampled per tensor")
    audit.set_defaults(run=run_audit)


def add_privacy_parser(subparsers) -> None:
    privacy = subparsers.add_parser("privacy", help="the privacy report a job file would get, over all its R rounds (JSON)")
    privacy.add_argument("job_file", help="job YAML: task, model_dir, pum settings")
    privacy.set_defaults(run=run_privacy)


def run_privacy(args: argparse.Namespace) -> int:
    """Create the job on a throw-away state folder, open its first round, print the report of all R rounds
    (strict JSON: an infinite ε is "inf", never Infinity)."""
    import json
    import tempfile
    from pathlib import Path

    import yaml

    from pum.common.settings import PumSettings
    from pum.common.states import JobAction

    from .config import ServerSettings
    from .service import JobService

    spec = yaml.safe_load(Path(args.job_file).read_text()) or {}
    settings = PumSettings.from_sources(args.job_file)
    with tempfile.TemporaryDirectory(prefix="pum-privacy-") as tmp:
        server = ServerSettings(state_dir=Path(tmp) / "state", saves_dir=Path(tmp) / "saves", dev_mode=True)
        service = JobService.open(server)
        job = service.jobs.create(spec.get("task", "privacy"), str(spec.get("model_dir", "")), settings.to_public_dict(), {})
        service.jobs.act(job.id, JobAction.START)
        report = service.privacy(job.id)
        service.close()
    print(json.dumps(report.model_dump(mode="json", exclude={"job", "state"}), indent=2, allow_nan=False))
    return 0


def run_audit(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .audit import audit_round

    if args.job_flag:
        print("pum audit: --job is deprecated; give the job id as JOB_ID (pum audit JOB_ID)", file=sys.stderr)
    if args.job_id and args.job_flag and args.job_id != args.job_flag:
        raise InvalidInput(f"two job ids: {args.job_id} and --job {args.job_flag}; give one")
    job_id = args.job_id or args.job_flag
    if not job_id:
        raise InvalidInput("give the job id: pum audit JOB_ID")
    report = audit_round(Path(args.state_dir), job_id, args.coords)
    print(json.dumps(report, indent=2, allow_nan=False))
    return 0


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .config import ServerSettings

    flags = {
        "state_dir": args.state_dir, "saves_dir": args.saves_dir, "host": args.host, "port": args.port,
        "lease_ttl_s": args.lease_ttl, "tls_certfile": args.tls_cert, "tls_keyfile": args.tls_key,
    }
    if args.dev:
        flags["dev_mode"] = True
    try:
        settings = ServerSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        raise InvalidInput(f"server settings: {err.errors()[0]['msg']}") from None
    import torch

    torch.set_num_threads(settings.torch_threads)
    logging.getLogger("pum").info("state in %s; dev mode %s", settings.state_dir.resolve(), settings.dev_mode)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="info",
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
    )
    return 0
