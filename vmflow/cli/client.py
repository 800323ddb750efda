"""Synchronous client of the supervisor API's platform routes, used by the CLI commands."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx

from vmflow.cli.local import resolve_api_key, resolve_api_url


class ApiClientError(RuntimeError):
    """The API could not be reached or returned an error; the message has the API's detail."""

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error


class ApiClient:
    """The platform routes as methods; each returns the response's JSON body."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout_s,
        )

    @classmethod
    def from_environment(cls, api_url: str | None = None) -> ApiClient:
        return cls(api_url or resolve_api_url(), resolve_api_key())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ApiClientError(
                f"cannot reach the vmflow API at {self.base_url} ({error!r}); start it with "
                "`vmflow dev` or set VMFLOW_API_URL"
            ) from error
        if response.is_success:
            return response.json()
        try:
            body = response.json()
            detail, name = body.get("detail"), body.get("error")
        except ValueError:
            detail, name = response.text[:500], None
        raise ApiClientError(
            f"{method} {path} failed with {response.status_code}: {detail}",
            status=response.status_code,
            error=name,
        )

    def finalize_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/api/v1/deployments/finalize", json=body)
        return result

    def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/api/v1/deployments/{deployment_id}")
        return result

    def trigger(self, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/api/v1/tasks/{task_id}/trigger", json=body)
        return result

    def get_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/api/v1/runs/{run_id}")
        return result

    def list_runs(self, **params: Any) -> dict[str, Any]:
        query = {key: value for key, value in params.items() if value is not None}
        result: dict[str, Any] = self.request("GET", "/api/v1/runs", params=query)
        return result

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/api/v1/runs/{run_id}/cancel")
        return result

    def run_logs(self, run_id: str, *, after: int = 0) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", f"/api/v1/runs/{run_id}/logs", params={"after": after}
        )
        return result

    def complete_token(self, token_id: str, output: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/api/v1/waitpoints/tokens/{token_id}/complete", json={"output": output}
        )
        return result
