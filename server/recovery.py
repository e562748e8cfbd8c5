"""Start-up after a crash: delete what no committed state points to, finish what was interrupted.

Both run before the server takes requests. Each step is idempotent, so a crash during recovery
is recovered from the same way.
"""

from __future__ import annotations

import logging

from pum.common.errors import InsufficientStorage
from pum.common.states import TAKES_UPLOADS, CopyState, RoundState

from .context import ServerContext
from .lifecycle import Lifecycle

log = logging.getLogger(__name__)


def remove_orphans(ctx: ServerContext) -> None:
    """Uploads of an open round whose copy was never accepted (and the spool folder of older versions)."""
    for job in ctx.store.jobs():
        files = ctx.files(job.id)
        files.delete_folder(files.SPOOL)
        rnd = ctx.store.round(job.id, job.round) if job.round else None
        if rnd is not None and rnd.state is RoundState.MERGED:  # stepped: its uploads were about to go
            files.delete_folder(files.round_dir(job.round))
        if rnd is None or rnd.state is not RoundState.OPEN:
            continue
        kept = {files.upload(job.round, c.lease_id) for c in ctx.store.copies(job.id, job.round)
                if c.state is CopyState.ACCEPTED}
        for name in files.list(files.round_dir(job.round)):
            blob = f"{files.round_dir(job.round)}/{name}"
            if name.startswith(files.UPLOAD_PREFIX) and blob not in kept:
                log.info("job %s round %d: removing %s, never accepted", job.id, job.round, name)
                files.delete(blob)


def recover(ctx: ServerContext, lifecycle: Lifecycle) -> None:
    """A complete round not yet stepped is stepped; a step whose next round was not yet opened
    (or whose model was not yet exported) is finished."""
    for job in ctx.store.jobs():
        if job.state not in TAKES_UPLOADS or not job.round:
            continue
        with ctx.lock(job.id):
            rnd = ctx.store.round(job.id, job.round)
            if rnd.state is RoundState.MERGED or job.spec.settings.auto_advance:
                try:
                    lifecycle.finish_round(job)
                except InsufficientStorage as err:  # the job is paused with the reason; the server serves on
                    log.warning("job %s: %s", job.id, err)
