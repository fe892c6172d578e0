"""Model routes: the caller's catalog (their models and the public base models)."""


from typing import Annotated, Any

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path

from functions.api import context
from shared.jobs import not_found

router = Router()


@router.get("/models", summary="List models", description="Public base models and the caller's own models.",
            responses=context.responses({200: "The models"}))
def list_models() -> dict[str, Any]:
    return {"models": context.catalog().list(context.tenant(router))}


@router.get("/models/<model_id>", summary="Show a model",
            description="Size, depth, perplexity, parent, producing job, artifact and cost of one model.",
            responses=context.responses({200: "The model"}))
def get_model(model_id: Annotated[str, Path(max_length=128)]) -> dict[str, Any]:
    model = context.catalog().get(model_id, context.tenant(router))
    if model is None:
        raise not_found("model", "model_id", model_id)
    return model
