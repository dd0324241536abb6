"""Start a service's app under uvicorn (used by each `python -m services.<name>`)."""

import logging

import uvicorn
from fastapi import FastAPI

from services.common.settings import ServiceSettings


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    configure_logging(settings.log_level)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=10)
