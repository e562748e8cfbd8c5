"""Settings of the server process (environment variables PUM_SERVER_*, validated at start-up)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    # Every number has a lower and an upper bound (README "Bounds of the settings"). Each field reads
    # PUM_SERVER_<FIELD> and nothing else, except admin_token: PUM_ADMIN_TOKEN, the one variable the
    # server and `pum admin` share. Keywords use the field names.
    model_config = SettingsConfigDict(env_prefix="PUM_SERVER_", extra="forbid", frozen=True)

    # Where jobs, rounds, secrets and the SQLite database live; a restart on the same folder continues.
    state_dir: Path = Path("state")
    # Merged models are saved under saves_dir/<task>/ in Hugging Face format.
    saves_dir: Path = Path("saves/unlearn")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Bearer token of the admin role; required unless dev_mode. Its alias replaces the prefixed name
    # (an alias choice "admin_token" would let a bare ADMIN_TOKEN variable in).
    admin_token: SecretStr | None = Field(None, validation_alias="PUM_ADMIN_TOKEN")
    # Development mode: no admin token needed (never on a reachable interface).
    dev_mode: bool = False
    # A lease not renewed by a heartbeat within this many seconds puts its copy back in the pool.
    lease_ttl_s: float = Field(120.0, gt=0, le=86400)
    # An upload that sends nothing for this long is cut off (408) and leaves no trace.
    upload_idle_timeout_s: float = Field(60.0, gt=0, le=3600)
    # Largest safetensors header accepted from a worker.
    max_header_bytes: int = Field(16 * 2**20, ge=1024, le=2**30)
    # Copies streamed at once, each on a copy thread of its own (never the threads that answer leases,
    # heartbeats and admin calls): each costs a few times the largest tensor of memory, so this caps
    # the server's memory whatever m and the number of workers are; further downloads wait their turn.
    max_concurrent_copies: int = Field(2, ge=1, le=64)
    # A copy download whose client reads nothing for this long (the send buffer stays full) is cut
    # off and its copy slot freed: a stalled reader holds a slot at most this long.
    send_timeout_s: float = Field(30.0, gt=0, le=3600)
    # A connection must deliver a request's complete headers within this many seconds of opening
    # (or of its previous response); a half-sent request is then cut off.
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    # A request body bounded by max_json_body_bytes must arrive whole within this many seconds (408
    # otherwise); upload bodies are bounded by upload_idle_timeout_s instead.
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Largest body of a JSON route (job creation, tokens, give-backs): larger ones get 413 unread.
    max_json_body_bytes: int = Field(2**20, ge=1024, le=2**26)
    # Open connections per process: past it, the connection idle longest (waiting for its request's
    # headers) is dropped to let the new one in. The process raises its file limit to fit.
    max_connections: int = Field(4096, ge=16, le=65536)
    # A lease ends at this age even if heartbeats keep coming, and its copy is offered again: one
    # token cannot hoard copies.
    lease_max_age_s: float = Field(24 * 3600.0, gt=0, le=30 * 86400)
    # SIGTERM: stop accepting, let open responses (copy streams) finish for this long, then end them and exit.
    shutdown_grace_s: float = Field(10.0, ge=0, le=3600)
    # Threads that parse, check and merge uploads, at a lower CPU priority than lease and heartbeat
    # answers (merges of one job run one at a time whatever this is).
    upload_threads: int = Field(2, ge=1, le=64)
    # Threads torch may use for noise generation and merging.
    torch_threads: int = Field(1, ge=1, le=1024)
    # Where new jobs draw their copies' noise: "cpu", or "cuda" / "cuda:N" (the server's GPU). Fixed per
    # job at its creation: a job's copies are the same bytes only on the device type they were drawn on.
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    # TLS: serve HTTPS when both are given.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _admin_token_keyword(cls, values):
        """`admin_token=` as a keyword (pydantic's populate_by_name would also read PUM_SERVER_ADMIN_TOKEN)."""
        if isinstance(values, dict) and "admin_token" in values:
            values = {**values, "PUM_ADMIN_TOKEN": values["admin_token"]}
            del values["admin_token"]
        return values

    @model_validator(mode="after")
    def _admin_token_or_dev_mode(self):
        if self.admin_token is None and not self.dev_mode:
            raise ValueError("set PUM_ADMIN_TOKEN (admin_token), or start in development mode (dev_mode) explicitly")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("TLS needs both tls_certfile and tls_keyfile")
        return self
