"""Checks of the deployment files (docker-compose.yml, deploy/) against the code they drive, with no
container engine: each check returns a list of problems (empty = fine). tests/deploy runs them on
the real files and on deliberately broken copies."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
TLS_OVERRIDE = DEPLOY / "compose.tls.yaml"
CPU_OVERRIDE = DEPLOY / "compose.cpu.yaml"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
# Host folders the user provides (deploy/README.md): a bind mount of them, or of a path under
# them, need not exist in the repository. Every other bind-mounted host path must.
USER_DIRS = ("models", "data", "saves", "tls")
