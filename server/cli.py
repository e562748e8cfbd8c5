"""`pum server`: run the FastAPI app under uvicorn (serving.py: the connection guard, SIGTERM)."""

from __future__ import annotations

import argparse
import logging
import sys

from pum.common.errors import InvalidInput


# Every ServerSettings field as a flag; PUM_SERVER_<FIELD> (PUM_ADMIN_TOKEN) is the other way, and a
# flag wins over the variable. tests/server/test_cli_settings.py walks the fields.
SETTING_FLAGS: dict[str, tuple[str, dict]] = {
    "state_dir": ("--state-dir", {"help": "state folder: jobs, rounds, secrets, state.db (PUM_SERVER_STATE_DIR; default ./state)"}),
    "saves_dir": ("--saves-dir", {"help": "where merged models go (PUM_SERVER_SAVES_DIR; default ./saves/unlearn)"}),
    "host": ("--host", {"help": "interface to bind (PUM_SERVER_HOST; default 127.0.0.1)"}),
    "port": ("--port", {"type": int, "help": "port (PUM_SERVER_PORT; default 8000; 0 picks a free one)"}),
    "admin_token": ("--admin-token-file", {"metavar": "FILE", "help": "read the admin token from FILE (a flag with the "
                    "token itself would show it to every user of the machine; or PUM_ADMIN_TOKEN)"}),
    "dev_mode": ("--dev", {"action": "store_const", "const": True,
                           "help": "development mode: no admin token needed, seeded jobs allowed (PUM_SERVER_DEV_MODE)"}),
    "lease_ttl_s": ("--lease-ttl", {"type": float, "help": "lease TTL in seconds: a lease without a heartbeat for that "
                    "long puts its copy back (PUM_SERVER_LEASE_TTL_S; default 120)"}),
    "upload_idle_timeout_s": ("--upload-idle-timeout", {"type": float, "help": "seconds an upload may send nothing "
                              "before it is cut off (PUM_SERVER_UPLOAD_IDLE_TIMEOUT_S; default 60)"}),
    "max_header_bytes": ("--max-header-bytes", {"type": int, "help": "largest safetensors header accepted from a "
                         "worker (PUM_SERVER_MAX_HEADER_BYTES; default 16 MiB)"}),
    "max_concurrent_copies": ("--max-concurrent-copies", {"type": int, "help": "copies generated at once; further "
                              "downloads wait (PUM_SERVER_MAX_CONCURRENT_COPIES; default 2)"}),
    "upload_threads": ("--upload-threads", {"type": int, "help": "threads that parse, check and merge uploads "
                       "(PUM_SERVER_UPLOAD_THREADS; default 2)"}),
    "torch_threads": ("--torch-threads", {"type": int, "help": "threads torch may use for noise and merging "
                      "(PUM_SERVER_TORCH_THREADS; default 1)"}),
    "tls_certfile": ("--tls-cert", {"help": "certificate file: serve HTTPS (PUM_SERVER_TLS_CERTFILE)"}),
    "tls_keyfile": ("--tls-key", {"help": "private key file for --tls-cert (PUM_SERVER_TLS_KEYFILE)"}),
    "device": ("--device", {"help": "where new jobs draw their copies' noise: cpu, cuda or cuda:N; fixed per job at "
               "its creation (PUM_SERVER_DEVICE; default cpu)"}),
    "send_timeout_s": ("--send-timeout", {"type": float, "help": "seconds a download may read nothing before it is "
                       "cut off and its copy slot freed (PUM_SERVER_SEND_TIMEOUT_S; default 30)"}),
    "header_timeout_s": ("--header-timeout", {"type": float, "help": "seconds a connection has to send a request's "
                         "headers (PUM_SERVER_HEADER_TIMEOUT_S; default 10)"}),
    "body_timeout_s": ("--body-timeout", {"type": float, "help": "seconds a JSON body has to arrive whole "
                       "(PUM_SERVER_BODY_TIMEOUT_S; default 30)"}),
    "max_json_body_bytes": ("--max-json-body-bytes", {"type": int, "help": "largest JSON body; larger ones get 413 "
                            "unread (PUM_SERVER_MAX_JSON_BODY_BYTES; default 1 MiB)"}),
    "max_connections": ("--max-connections", {"type": int, "help": "open connections; past it the idlest is dropped "
                        "(PUM_SERVER_MAX_CONNECTIONS; default 4096)"}),
    "lease_max_age_s": ("--lease-max-age", {"type": float, "help": "seconds after which a lease ends, heartbeats or "
                        "not (PUM_SERVER_LEASE_MAX_AGE_S; default 86400)"}),
    "shutdown_grace_s": ("--shutdown-grace", {"type": float, "help": "seconds SIGTERM lets open responses run "
                         "before it ends them and exits 0 (PUM_SERVER_SHUTDOWN_GRACE_S; default 10)"}),
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("server", help="run the PUM server (model owner)")
    for field, (flag, options) in SETTING_FLAGS.items():
        parser.add_argument(flag, dest=field, **options)
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
    from pydantic import ValidationError

    from .app import create_app
    from .serving import serve

    try:
        settings = settings_from_args(args)
    except ValidationError as err:
        raise InvalidInput(f"server settings: {err.errors()[0]['msg']}") from None
    import torch

    if settings.device != "cpu" and not torch.cuda.is_available():
        raise InvalidInput(f"--device {settings.device}: this machine has no CUDA device (use cpu)")
    torch.set_num_threads(settings.torch_threads)
    logging.getLogger("pum").info("state in %s; dev mode %s", settings.state_dir.resolve(), settings.dev_mode)
    # json: uvicorn's loggers (errors, the access log) go to the root handler, so every line is JSON
    json_logs = {"log_config": None} if getattr(args, "log_format", "text") == "json" else {}
    serve(create_app(settings), settings, **json_logs)
    return 0


def settings_from_args(args: argparse.Namespace):
    """ServerSettings from the flags given, the environment for the rest."""
    from pathlib import Path

    from .config import ServerSettings

    values = {field: getattr(args, field) for field in SETTING_FLAGS if getattr(args, field, None) is not None}
    if "admin_token" in values:
        values["admin_token"] = Path(values["admin_token"]).read_text().strip()
    return ServerSettings(**values)
