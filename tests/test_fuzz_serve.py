"""Fuzzing the server: schemathesis reads `serve`'s own OpenAPI schema from the running server (the real
command line, on 127.0.0.1) and sends requests that fit it and requests that do not. None may get a 5xx,
and the server must stay up: after every request `/health` answers, and at the end a good request gets
its answer. The seed is pytest's header's (`FUZZ_SEED`), the budget `FUZZ_SERVE_EXAMPLES` per mode."""

import os
import subprocess
import sys

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings

from conftest import FUZZ_SEED, ROOT
from runs import smoke_run
from test_serve import free_port, wait_until_serving

EXAMPLES = int(os.environ.get("FUZZ_SERVE_EXAMPLES", "150"))


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_the_server_stays_up(tmp_path):
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    run = smoke_run()
    port, log = free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "tinyllama_ft", "serve", "--adapter", str(run), "--port",
                                str(port), "--max_new_tokens", "8"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=log.open("w", encoding="utf-8"))
    try:
        wait_until_serving(process, f"{base}/v1", log)
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        errors, sent = [], {}
        client = httpx.Client(timeout=120)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(FUZZ_SEED)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=schema.as_strategy(generation_mode=mode))
            def send(case):
                response = case.call(base_url=base, timeout=120)
                key = f"{mode.value} {case.method} {case.path}"
                sent[key] = sent.get(key, 0) + 1
                if response.status_code >= 500:
                    errors.append(f"{key} {response.status_code}: {case.body!r:.200} -> {response.text[:200]}")
                assert process.poll() is None, f"the server died after {case.body!r:.300}"
                assert client.get(f"{base}/health").status_code == 200

            send()
        print(f"schemathesis (seed {FUZZ_SEED}): {sum(sent.values())} requests {sent}; {len(errors)} 5xx")
        assert not errors, "\n".join(errors[:20])
        good = client.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi."}],
                                                                "max_tokens": 4})
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
