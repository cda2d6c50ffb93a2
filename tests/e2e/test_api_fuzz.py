"""schemathesis: requests generated from the app's own OpenAPI schema never get a 5xx or hang.

`make test` runs SHARDSERVE_FUZZ_EXAMPLES (default 100) cases per operation, a few hundred in all;
`make fuzz` runs thousands (RELIABILITY.md has the latest)."""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.api_server import live_app, started_stack, tiny_settings
from tests.support.models import tiny_llama

EXAMPLES = int(os.environ.get("SHARDSERVE_FUZZ_EXAMPLES", "100"))
pytestmark = pytest.mark.timeout(max(600, EXAMPLES * 20))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    model_settings = tiny_settings(tiny_llama(tmp_path_factory))
    with started_stack(model_settings) as stack, live_app(model_settings, stack) as srv:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json")


def test_no_server_errors(api_schema) -> None:
    # schemathesis' own pytest plugin does not support pytest 9 yet: drive its strategies directly
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 5
    statuses: collections.Counter[int] = collections.Counter()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def no_5xx(case) -> None:
            response = case.call(timeout=60)  # a hang fails the case
            statuses[response.status_code] += 1
            assert response.status_code < 500, (
                f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"
            )

        no_5xx()
    print(f"fuzz: {sum(statuses.values())} cases over {len(operations)} operations, no 5xx: {dict(statuses)}")
