"""Property-based fuzzing of every operation of the OpenAPI schema, in-process (ASGI).

Each operation gets schema-valid (positive) and schema-invalid (negative) requests, with random
path ids and with the ids of a real running job and lease, under the token its role needs (admin
for /v1/jobs…, a worker token for /v1/work…) and then under the other role's token. A bounded
number of examples per run, derandomized so CI sees the same requests every time; set
PUM_FUZZ_RANDOM=1 to explore new ones. No request may end in a 5xx, and every documented
response must match its schema.

The same against a running server (`pum server --dev`: admin calls need no token) from the
command line, admin operations, then worker operations with a worker token of a started job:

    CHECKS=not_a_server_error,response_schema_conformance,content_type_conformance,response_headers_conformance
    schemathesis run http://127.0.0.1:8000/openapi.json -n 25 --checks $CHECKS --exclude-path-regex '^/v1/work'
    schemathesis run http://127.0.0.1:8000/openapi.json -n 25 --checks $CHECKS --include-path-regex '^/v1/work' \
        -H "Authorization: Bearer $WORKER_TOKEN"
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install 'schemathesis>=4.32,<5'")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_headers_conformance, response_schema_conformance,
)

MAX_EXAMPLES = 20
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, response_headers_conformance]
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("PUM_FUZZ_RANDOM"),
    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate], print_blob=False,
)


@pytest.mark.slow  # 15–20 s of fuzzing: the full suite runs it, make test-fast does not
def test_every_operation_survives_fuzzing(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    worker_token = server.token(job)
    lease_id = server.worker(worker_token).post("/v1/work/lease").json()["lease_id"]
    admin_token = server.settings.admin_token.get_secret_value()
    server.token(job, "spare")  # revoked by the token revocation's runs, leaving worker_token to the others
    real_ids = {"job_id": job, "lease_id": lease_id, "name": "config.json", "label": "spare"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", server.admin.app)

    failures: dict[str, str] = {}
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19, [op.label for op in operations]
    runs = []
    for operation in operations:
        is_worker = operation.path.startswith("/v1/work")
        own, other = (worker_token, admin_token) if is_worker else (admin_token, worker_token)
        params = {p.name for p in operation.iter_parameters() if p.location == "path"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            runs.append((operation, mode, None, own, "own token"))
            if params:
                runs.append((operation, mode, {n: real_ids[n] for n in params}, own, "own token, real ids"))
        runs.append((operation, GenerationMode.POSITIVE, None, other, "other role's token"))

    for operation, mode, path_parameters, token, what in runs:
        label = f"{operation.label} [{mode.value}, {what}]"

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def run(case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            case.validate_response(response, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:  # nothing to generate: a negative request to an operation without inputs
            assert mode is GenerationMode.NEGATIVE and not list(operation.iter_parameters()), label
        except (Exception, FailureGroup) as err:  # collected: one report lists every failing run
            failures[label] = f"{type(err).__name__}: {str(err)[:1500]}"
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    assert calls > len(runs) * 5, calls  # the runs generated requests, not only rejections
