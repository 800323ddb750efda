"""Platform routes for deployments: the finalize hook that starts `DeployTemplateWorkflow`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from vmflow.api.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    retry_once_on_conflict,
)
from vmflow.api.orchestration import Orchestrator
from vmflow.api.schemas import DeploymentFinalizeRequest, DeploymentResponse, error_responses
from vmflow.compute.images import InvalidImageReferenceError, strip_image_digest
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    Deployment,
    DeploymentStatus,
    Organization,
    Project,
    WorkerInstanceGroup,
    utc_now,
)
from workflows.contract import deploy_workflow_id

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])

_ERRORS = error_responses(401, 404, 409, 413, 422)


def deployment_response(deployment: Deployment, project_slug: str) -> DeploymentResponse:
    return DeploymentResponse(
        id=deployment.id,
        project=project_slug,
        version=deployment.version,
        image=deployment.image,
        tasks=list(deployment.tasks or []),
        status=deployment.status,
        template_mode=deployment.template_mode,
        template_id=deployment.template_id,
        error_name=deployment.error_name,
        error_message=deployment.error_message,
        created_at=deployment.created_at,
        deployed_at=deployment.deployed_at,
        workflow_id=deploy_workflow_id(deployment.id),
    )


def _get_or_create_project(session: Session, body: DeploymentFinalizeRequest) -> Project:
    project = session.scalars(select(Project).where(Project.slug == body.project)).one_or_none()
    if project is not None:
        return project

    organization = session.scalars(
        select(Organization).where(Organization.slug == body.organization)
    ).one_or_none()
    if organization is None:
        organization = Organization(slug=body.organization, feature_flags={})
        session.add(organization)
    group = WorkerInstanceGroup(name=f"{body.project}-default", workload_type=body.workload_type)
    project = Project(slug=body.project, organization=organization, default_worker_group=group)
    session.add_all([group, project])
    session.flush()
    logger.info(
        "created project %s (%s) in organization %s with a %s worker group",
        project.slug,
        project.id,
        organization.slug,
        group.workload_type.value,
    )
    return project


@dataclass
class _Upserted:
    response: DeploymentResponse
    created: bool


def _upsert_deployment(session: Session, body: DeploymentFinalizeRequest, image: str) -> _Upserted:
    project = _get_or_create_project(session, body)
    existing = session.scalars(
        select(Deployment).where(
            Deployment.project_id == project.id, Deployment.version == body.version
        )
    ).one_or_none()
    if existing is not None:
        differences = []
        if existing.image != image:
            differences.append(f"image {existing.image!r}, not {image!r}")
        if sorted(existing.tasks or []) != sorted(body.tasks):
            differences.append(f"tasks {', '.join(sorted(existing.tasks or [])) or 'none'}")
        if differences:
            raise ConflictError(
                "deployment_version_exists",
                f"version {body.version!r} of project {body.project!r} is already deployed "
                f"as {existing.id} with {' and '.join(differences)}; deploy the new image "
                "under a new version",
            )
        # Deploying it again makes it the project's newest DEPLOYED deployment,
        # the one a trigger by project runs on.
        if existing.status == DeploymentStatus.DEPLOYED:
            existing.deployed_at = utc_now()
        return _Upserted(deployment_response(existing, project.slug), created=False)

    deployment = Deployment(
        project_id=project.id,
        version=body.version,
        image=image,
        tasks=list(body.tasks),
        created_at=utc_now(),
    )
    session.add(deployment)
    session.flush()
    return _Upserted(deployment_response(deployment, project.slug), created=True)


@router.post(
    "/finalize",
    response_model=DeploymentResponse,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": DeploymentResponse}, **_ERRORS},
    summary="Finalize a deployment and start its template rollout",
)
async def finalize_deployment(
    body: DeploymentFinalizeRequest, request: Request, response: Response
) -> DeploymentResponse:
    """Record the deployment and start `DeployTemplateWorkflow` for it.

    Retrying the hook with the same project, version and image returns the
    same deployment with 200 and starts no second workflow.
    """
    try:
        image = strip_image_digest(body.image)
    except InvalidImageReferenceError as error:
        raise InvalidRequestError("invalid_image", str(error)) from error

    def upsert() -> _Upserted:
        with session_scope(request.app.state.session_factory) as session:
            return _upsert_deployment(session, body, image)

    upserted = await run_in_threadpool(retry_once_on_conflict, upsert)
    deployment = upserted.response

    orchestrator: Orchestrator = request.app.state.orchestrator
    started = await orchestrator.start_deploy(
        deployment.id, summary=f"deploy {deployment.project} {deployment.version} ({image})"
    )
    logger.info(
        "deployment %s of project %s version %s: record %s, workflow %s %s",
        deployment.id,
        deployment.project,
        deployment.version,
        "created" if upserted.created else "reused",
        started.workflow_id,
        "started" if started.started else "already started",
    )
    if not upserted.created:
        response.status_code = status.HTTP_200_OK
    return deployment


@router.get(
    "/{deployment_id}",
    response_model=DeploymentResponse,
    responses=_ERRORS,
    summary="Get a deployment",
)
async def get_deployment(deployment_id: str, request: Request) -> DeploymentResponse:
    def load() -> DeploymentResponse:
        with session_scope(request.app.state.session_factory) as session:
            deployment = session.get(Deployment, deployment_id)
            if deployment is None:
                raise NotFoundError(
                    "deployment_not_found", f"deployment {deployment_id!r} does not exist"
                )
            return deployment_response(deployment, deployment.project.slug)

    return await run_in_threadpool(load)
