"""Gateway callbacks: snapshot and template results, verified and turned into workflow signals.

The gateway posts each callback with the `metadata` the workflow put in the
request's callback target, signed with VMFLOW_CALLBACK_SECRET. A snapshot
callback names its run (`run_id`) and becomes `snapshot_finished` on
`run-<run id>`; a template callback names its deployment (`deployment_id`)
and becomes `template_finished` on `template-<deployment id>`.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ValidationError

from vmflow.api.errors import InvalidRequestError, describe_validation_errors
from vmflow.api.orchestration import Orchestrator
from vmflow.api.schemas import CallbackAccepted, error_responses
from vmflow.api.security import verified_callback_body
from vmflow.compute.models import SnapshotCallback, TemplateCallback
from workflows import contract
from workflows.contract import run_workflow_id

logger = logging.getLogger(__name__)

router = APIRouter(tags=["gateway callbacks"])

ModelT = TypeVar("ModelT", bound=BaseModel)

_ERRORS = error_responses(401, 404, 413, 422)

VerifiedBody = Annotated[bytes, Depends(verified_callback_body)]


def _parse(body: bytes, model: type[ModelT]) -> ModelT:
    # The body is parsed here, after the signature check, because the
    # signature covers the exact bytes the gateway sent.
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise InvalidRequestError(
            "invalid_callback",
            f"callback body is not a valid {model.__name__}: "
            + describe_validation_errors(error.errors()),
        ) from error


def _metadata_value(metadata: dict[str, str] | None, key: str, callback: str) -> str:
    value = (metadata or {}).get(key)
    if not value:
        raise InvalidRequestError(
            "invalid_callback",
            f"{callback} callback metadata has no {key!r}; the gateway must echo the "
            "metadata of the request's callback target",
        )
    return value


@router.post(
    contract.SNAPSHOT_CALLBACK_PATH,
    response_model=CallbackAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    summary="Receive a snapshot result from the gateway",
)
async def snapshot_callback(body: VerifiedBody, request: Request) -> CallbackAccepted:
    received_at_ns = time.time_ns()
    callback = _parse(body, SnapshotCallback)
    run_id = _metadata_value(callback.metadata, contract.METADATA_RUN_ID, "snapshot")

    orchestrator: Orchestrator = request.app.state.orchestrator
    await orchestrator.signal_run(
        run_id,
        contract.SIGNAL_SNAPSHOT_FINISHED,
        contract.SnapshotFinished(
            status=contract.SnapshotStatus(callback.status.value),
            snapshot_id=callback.snapshot_id,
            instance_id=callback.instance_id,
            error=callback.error,
            metadata=dict(callback.metadata),
            duration_ms=callback.duration_ms,
            received_at_ns=received_at_ns,
        ),
    )
    logger.info(
        "snapshot callback for run %s: instance %s snapshot %s %s",
        run_id,
        callback.instance_id,
        callback.snapshot_id,
        callback.status.value,
    )
    return CallbackAccepted(workflow_id=run_workflow_id(run_id))


@router.post(
    contract.TEMPLATE_CALLBACK_PATH,
    response_model=CallbackAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    summary="Receive a template build result from the gateway",
)
async def template_callback(body: VerifiedBody, request: Request) -> CallbackAccepted:
    callback = _parse(body, TemplateCallback)
    deployment_id = _metadata_value(callback.metadata, contract.METADATA_DEPLOYMENT_ID, "template")

    orchestrator: Orchestrator = request.app.state.orchestrator
    workflow_id = await orchestrator.signal_template_build(
        deployment_id,
        contract.TemplateFinished(
            status=contract.SnapshotStatus(callback.status.value),
            image=callback.image,
            template_id=callback.template_id,
            error=callback.error,
            metadata=dict(callback.metadata or {}),
            duration_ms=callback.duration_ms,
        ),
    )
    logger.info(
        "template callback for deployment %s: template %s of %s %s",
        deployment_id,
        callback.template_id,
        callback.image,
        callback.status.value,
    )
    return CallbackAccepted(workflow_id=workflow_id)
