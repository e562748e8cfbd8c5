"""Worker tokens: issued by the admin, stored only as hashes, resolved to their job on each call, revoked by label."""

from __future__ import annotations

import hashlib
import logging
import secrets

from pum.common.errors import NotFound, Unauthorized
from pum.common.schemas import Revoked

from .context import ServerContext

log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(ctx: ServerContext, job_id: str, label: str, party: str = "") -> str:
    """A new worker token of the job; only its hash is kept, so it is shown once. `party` names the
    data owner it belongs to ("" = the job's one data owner): the privacy report takes every token
    of one party as one adversary."""
    ctx.job(job_id)
    token = "pumw_" + secrets.token_urlsafe(32)
    ctx.store.insert_token(hash_token(token), job_id, label, party)
    return token


def revoke_tokens(ctx: ServerContext, job_id: str, label: str) -> Revoked:
    """Revoke the job's tokens labelled `label`: they are refused from now on (401) and their live
    leases end, their copies offered again."""
    ctx.job(job_id)
    count, ended = ctx.store.revoke_tokens(job_id, label)
    if not count:
        raise NotFound(f"job {job_id} has no live token labelled {label[:100]!r}")
    log.warning("job %s: %d token(s) labelled %r revoked, %d live lease(s) ended", job_id, count, label[:100], len(ended))
    return Revoked(job_id=job_id, tokens=count, leases=[lease.id for lease in ended])


def worker_job(ctx: ServerContext, token: str) -> tuple[str, str]:
    """(job id, token hash) of a worker token; Unauthorized for an unknown one."""
    token_hash = hash_token(token)
    job_id = ctx.store.token_job(token_hash)
    if job_id is None:
        raise Unauthorized("unknown worker token: ask the admin for a token of this job")
    return job_id, token_hash
