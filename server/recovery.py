"""Start-up after a crash: delete what no committed state points to, finish what was interrupted.

Both run before the server takes requests. Each step is idempotent, so a crash during recovery
is recovered from the same way.
"""

from __future__ import annotations

import logging

from pum.common.states import TAKES_UPLOADS, RoundState

from .context import ServerContext
from .lifecycle import Lifecycle

log = logging.getLogger(__name__)


def remove_orphans(ctx: ServerContext) -> None:
    """Spooled uploads, and S1 blobs of an open round other than the committed one."""
    for job in ctx.store.jobs():
        files = ctx.files(job.id)
        files.delete_folder(files.SPOOL)
        rnd = ctx.store.round(job.id, job.round) if job.round else None
        if rnd is None or rnd.state is not RoundState.OPEN:
            continue
        for name in files.list(files.round_dir(job.round)):
            if name.startswith("s1_") and name != rnd.s1_file:
                log.info("job %s round %d: removing %s, never committed", job.id, job.round, name)
                files.delete(f"{files.round_dir(job.round)}/{name}")


def recover(ctx: ServerContext, lifecycle: Lifecycle) -> None:
    """A complete round not yet stepped is stepped; a step whose next round was not yet opened
    (or whose model was not yet exported) is finished."""
    for job in ctx.store.jobs():
        if job.state not in TAKES_UPLOADS or not job.round:
            continue
        settings = job.spec.settings
        with ctx.lock(job.id):
            rnd = ctx.store.round(job.id, job.round)
            if rnd.state is RoundState.MERGED:
                lifecycle.after_step(job)
            elif rnd.accepted == settings.copies_m and settings.auto_advance:
                lifecycle.step(job)
