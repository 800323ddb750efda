"""The CLI tests reuse the API tests' server: a real uvicorn API with stand-in workflows."""

from tests.api.conftest import api_server, api_task_queue, stand_in_worker

__all__ = ["api_server", "api_task_queue", "stand_in_worker"]
