"""A malicious model owner's server, run as a real process: `python hostile_server.py ROOT PORT`.

It speaks the worker protocol but serves what ROOT/scenario.json scripts: leases (hostile file
and task names, a code-loading config), any file asked for (the content of ROOT/files/<last path
segment>, else a payload), and ROOT/copy.safetensors as every copy. Every request is appended to
ROOT/requests.jsonl, so a test can see what the worker asked for and what it gave back.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response


def create_app(root: Path) -> FastAPI:
    scenario = json.loads((root / "scenario.json").read_text())
    leases = list(scenario["leases"])
    log_lock = threading.Lock()
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next):
        body = (await request.body()).decode(errors="replace")[:2000]
        with log_lock, (root / "requests.jsonl").open("a") as log:
            log.write(json.dumps({"method": request.method, "path": request.url.path, "body": body}) + "\n")
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/work/lease")
    def lease() -> dict:
        return leases.pop(0) if leases else {"status": "done", "job_state": "finalized"}

    @app.get("/v1/work/files/{name:path}")
    def public_file(name: str) -> Response:
        served = root / "files" / Path(name).name
        content = served.read_bytes() if served.is_file() else b"payload written by the server"
        return Response(content, media_type="application/octet-stream")

    @app.get("/v1/work/leases/{lease_id}/copy")
    def copy(lease_id: str) -> Response:
        return Response((root / "copy.safetensors").read_bytes(), media_type="application/octet-stream")

    @app.post("/v1/work/leases/{lease_id}/heartbeat")
    def heartbeat(lease_id: str) -> dict:
        return {"lease_id": lease_id, "ttl_s": 60.0}

    @app.post("/v1/work/leases/{lease_id}/release")
    def release(lease_id: str) -> dict:
        return {"released": True}

    @app.put("/v1/work/leases/{lease_id}/delta")
    def delta(lease_id: str) -> dict:
        return {"accepted": True, "job_state": "running", "round": 1}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
