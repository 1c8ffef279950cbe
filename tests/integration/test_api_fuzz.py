"""The OpenAPI document fed to a property-based fuzzer (schemathesis) against a real boxvold:
a bounded, seeded run of valid and invalid requests to every operation fails on any 5xx and
on any answer the document does not describe (status, content type, body schema).

Left out: schemathesis's "schema-valid request rejected" check. Some rules span fields (a fuse
export takes no ``via``; ``in_use`` and ``dangling`` must not contradict) or depend on state
(a name shaped like an id); the document states them in words, and their 422 is documented.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import schemathesis
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.helpers import Daemon

OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"
#: Examples per operation and mode: bounded, so the whole run takes under a minute here.
EXAMPLES = 100


def _send(http: httpx.Client, case: Any) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url="http://boxvold")
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body["content"] = data.encode() if isinstance(data, str) else data
    return http.request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        **body,
    )


def test_fuzzing_the_openapi_document_finds_no_5xx_and_no_undocumented_answer(
    daemon: Daemon,
) -> None:
    schema = schemathesis.openapi.from_dict(json.loads(OPENAPI.read_text()))
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://boxvold", timeout=60) as http:
        for result in schema.get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis.settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    suppress_health_check=list(hypothesis.HealthCheck),
                    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                )
                @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
                def check(case: Any) -> None:
                    response = _send(http, case)
                    assert response.status_code < 500, (case.method, case.path, response.text)
                    case.validate_response(response, excluded_checks=[positive_data_acceptance])

                try:
                    check()
                except hypothesis.errors.Unsatisfiable:
                    # An operation that takes nothing (health, version) has no invalid form.
                    assert mode is GenerationMode.NEGATIVE, operation.label
    assert daemon.client().health()["status"] == "ok"
