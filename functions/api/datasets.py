"""Dataset routes: register an upload, list and show the caller's datasets."""
from aws_lambda_powertools.event_handler.api_gateway import Router

router = Router()
