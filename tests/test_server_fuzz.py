"""Property-based fuzzing of the real server from its own OpenAPI document (schemathesis).

Every operation, with bodies that fit the schema (positive) and bodies that break it (negative),
against a server process on 127.0.0.1 with an API key. The server runs a tiny random Llama (the
bundled model would spend the time budget generating): what is under test is the HTTP side, the
validation and the engine's bookkeeping, not the weights. No case may get a 5xx or hang; after them
/health answers and every KV block is back in the pool.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after the importorskip)
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tinyserve_lab.launcher import ServerProcess  # noqa: E402

from conftest import wait_server_idle  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # per operation and mode: 8 operations x 2 modes x 25 = ~400 requests, ~1 min here


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    args = ["--model", str(tiny_llama_dir), "--dtype", "float32", "--enforce-eager", "--num-threads", "1",
            "--max-model-len", "64", "--kv-cache-memory-gb", "0.01", "--api-key", KEY, "--request-timeout", "20"]
    with ServerProcess(args) as srv:
        yield srv


def test_fuzz_every_operation_from_openapi(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    statuses: Counter[tuple[str, str, int]] = Counter()

    def fuzz(op, mode) -> None:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            response = case.call(base_url=server.url, headers=AUTH, timeout=30)
            statuses[op.label, mode.value, response.status_code] += 1
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])

        run()

    for op in operations:
        fuzz(op, schemathesis.GenerationMode.POSITIVE)
        try:
            fuzz(op, schemathesis.GenerationMode.NEGATIVE)
        except Unsatisfiable:  # nothing to break: a GET with no parameters, or only a string path one
            assert op.method.upper() == "GET", op.label
    total = sum(statuses.values())
    print(f"fuzz cases: {total}", dict(sorted(statuses.items())))
    assert total >= len(operations) * EXAMPLES  # the generator really ran
    assert any(status == 200 for (_, _, status) in statuses)  # and some cases were valid requests
    assert sum(n for (label, mode, _), n in statuses.items() if mode == "negative" and "completions" in label) \
        >= 2 * EXAMPLES
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    wait_server_idle(server.url)
