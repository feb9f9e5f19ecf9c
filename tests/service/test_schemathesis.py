"""Schemathesis over the gateway's OpenAPI schema (bounded: a few dozen generated requests per
operation, in-process, no swarm behind it): no request, however malformed, gets a 500. Requests
valid enough to reach the swarm get 503 (no blockserver here), after every check of the input."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings


@pytest.fixture(scope="module")
def gateway_schema(tiny_dir):
    app = create_app(GatewaySettings(model=str(tiny_dir("llama")), model_name="tiny", num_threads=1,
                                     ping_interval_s=3600.0, api_key="k"))
    with TestClient(app):  # runs the lifespan: the model is loaded for the whole module
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_request_gets_a_server_error(gateway_schema):
    checked = []
    for result in gateway_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case):
            response = case.call(headers={"Authorization": "Bearer k"})
            checked.append(response.status_code)
            if case.path == "/health":  # 503 "degraded" there is its answer, not an error: no swarm here
                assert response.status_code in (200, 503)
                return
            if response.status_code >= 500:
                assert response.status_code == 503 and response.json()["error"]["code"] in (
                    "service_unavailable", "loading"), (case.method, case.path, case.body, response.text)
            if response.status_code >= 400 and "json" in str(response.headers.get("content-type")):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

        no_server_error()
    assert len(checked) > 100
