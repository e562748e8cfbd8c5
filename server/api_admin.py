"""Admin routes: jobs, their actions, worker tokens, the privacy report, the merged model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from pum.common.schemas import (
    JobCreate, JobStatus, JobSummary, ModelFiles, PrivacyReport, Revoked, TokenCreate, TokenIssued,
)
from pum.common.states import ACTIONS, JobAction

from .auth import AdminOnly, Service
from .binary import binary_reply, binary_response
from .views import job_summary

router = APIRouter(prefix="/v1/jobs", dependencies=[AdminOnly], tags=["admin"])


@router.post("", status_code=201, response_model=JobStatus)
def create_job(body: JobCreate, service: Service) -> JobStatus:
    """Create a job from a model folder, PUM settings and the inner method's hyperparameters."""
    job = service.jobs.create(body.task, body.model_dir, body.pum, body.hyperparams)
    return service.status(job.id)


@router.get("", response_model=list[JobSummary])
def list_jobs(service: Service) -> list[JobSummary]:
    """All jobs, oldest first."""
    return [job_summary(job) for job in service.store.jobs()]


@router.get("/{job_id}", response_model=JobStatus)
def job_status(job_id: str, service: Service) -> JobStatus:
    """State, round, and each copy's state and timings."""
    return service.status(job_id)


@router.delete("/{job_id}", response_model=JobSummary)
def delete_job(job_id: str, service: Service) -> JobSummary:
    """Remove an ended job (finalized, aborted, failed), its state and its exported model, so its
    task can be used again; a job that has not ended is 409 (abort it first). Answers what it was."""
    return job_summary(service.jobs.delete(job_id))


def _action_route(action: JobAction) -> None:
    def handler(job_id: str, service: Service) -> JobStatus:
        service.jobs.act(job_id, action)
        return service.status(job_id)

    handler.__doc__ = ACTIONS[action].doc
    router.add_api_route(f"/{{job_id}}/{action}", handler, methods=["POST"], response_model=JobStatus, name=str(action))


for _action in JobAction:
    _action_route(_action)


@router.post("/{job_id}/tokens", status_code=201, response_model=TokenIssued)
def issue_token(job_id: str, body: TokenCreate, service: Service) -> TokenIssued:
    """A new worker token for the job; it is shown only in this response."""
    token = service.issue_token(job_id, body.label, body.party)
    return TokenIssued(token=token, label=body.label, party=body.party, job_id=job_id)


@router.delete("/{job_id}/tokens/{label:path}", response_model=Revoked)
def revoke_token(job_id: str, label: str, service: Service) -> Revoked:
    """Revoke the job's worker tokens with this label: refused from now on, their live leases ended."""
    return service.revoke_tokens(job_id, label)


@router.post("/{job_id}/leases/{lease_id}/revoke", response_model=Revoked)
def revoke_lease(job_id: str, lease_id: str, service: Service) -> Revoked:
    """End a live lease now (a hoarding worker): its copy is offered to another worker."""
    return service.work.revoke(job_id, lease_id)


@router.get("/{job_id}/privacy", response_model=PrivacyReport)
def privacy(job_id: str, service: Service) -> PrivacyReport:
    """The privacy report over all R rounds: headline true ε against the largest party, the seed formula's ε, σ_ℓ, τ_ℓ, reasons, warnings."""
    return service.privacy(job_id)


@router.get("/{job_id}/model", response_model=ModelFiles)
def model_files(job_id: str, service: Service) -> ModelFiles:
    """Files of the finalized model."""
    return service.model_files(job_id)


@router.get("/{job_id}/model/{name}", response_class=StreamingResponse, responses=binary_reply("the file's bytes"))
def model_file(job_id: str, name: str, service: Service) -> StreamingResponse:
    """One file of the finalized model."""
    return binary_response(*service.model_file(job_id, name))
