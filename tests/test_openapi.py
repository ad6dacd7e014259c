"""Issue 17, point 9: the three services' OpenAPI documents tell the truth, checked by schemathesis against the
real servers (127.0.0.1, a private Redis, a tiny published nightly, API keys on).

A bounded, deterministic run per service (schemathesis' examples, coverage and fuzzing phases, at most
MAX_EXAMPLES cases per operation) with these checks: no 5xx (`not_a_server_error`), every answer's status,
content type and body as documented (`status_code_conformance`, `content_type_conformance`,
`response_schema_conformance`), every request the schema allows accepted (`positive_data_acceptance`: the schema
is no looser than validation) and the documented API key enforced (`ignored_auth`). docs/reliability.md §9 has the
figures and how to run it by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import TINY_CONFIG, ServerProcess, free_port

from common.local_redis import LocalRedis
from common.settings import Settings

SERVICES = ("feature", "vector", "recall")
READ, WRITE = "openapi-read-key", "openapi-write-key"
MAX_EXAMPLES = 20
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "positive_data_acceptance", "ignored_auth")
ST = Path(sys.executable).with_name("st")  # schemathesis' CLI, installed with the dev extras


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("schemathesis", reason="schemathesis comes with the dev extras: pip install -e '.[dev]'")
    from trainer.nightly import run_nightly
    from trainer.synth import write_synthetic

    root = tmp_path_factory.mktemp("openapi")
    data = write_synthetic(root / "data", n_users=120, n_items=80, n_clicks=2500, seed=3, progress=False)
    config = root / "channels.yaml"
    config.write_text(TINY_CONFIG)
    server = LocalRedis(data_dir=root / "redis").start()
    settings = Settings(redis_url=server.url, artifacts_dir=root / "artifacts", channels_config=config,
                        run_dir=root / "run")
    procs: dict[str, ServerProcess] = {}
    try:
        assert run_nightly(settings, data_dir=data, config_path=config, progress=False)["status"] == "ok"
        ports = {name: free_port() for name in SERVICES}
        env = {**os.environ, "REDIS_URL": server.url, "ARTIFACTS_DIR": str(settings.artifacts_dir),
               "CHANNELS_CONFIG": str(config), "RUN_DIR": str(settings.run_dir), "OMP_NUM_THREADS": "1",
               "VECTOR_URL": f"http://127.0.0.1:{ports['vector']}",
               "FEATURE_URL": f"http://127.0.0.1:{ports['feature']}",
               "API_READ_KEY": READ, "API_WRITE_KEY": WRITE, "ALLOWED_HOSTS": "127.0.0.1,localhost"}
        for name in SERVICES:
            procs[name] = ServerProcess([f"services.{name}_server", "serve", "--port", str(ports[name])], env,
                                        ports[name], root / f"{name}.log").start()
        deadline = time.monotonic() + 90
        while True:  # every channel loaded: the run tests the services, not their start-up
            r = httpx.get(procs["recall"].url + "/recall", params={"user_id": "1"}, headers={"x-api-key": READ})
            if r.status_code == 200 and all(c["status"] == "ok" for c in r.json()["channels"].values()):
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        yield root, procs
    finally:
        for p in procs.values():
            p.stop()
        server.stop()


def schema_of(procs: dict[str, ServerProcess], name: str) -> dict:
    r = httpx.get(procs[name].url + "/openapi.json", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("service", SERVICES)
def test_schemathesis_finds_no_failure(stack, service):
    """Bounded and reproducible (deterministic generation, which also keeps no example database): 10-30 s a
    service on 2 shared cores."""
    root, procs = stack
    workdir = root / f"st-{service}"
    workdir.mkdir(exist_ok=True)
    (workdir / "schemathesis.toml").write_text(f'[auth.openapi.ApiKey]\napi_key = "{WRITE}"\n')
    cmd = [str(ST), "--config-file", "schemathesis.toml", "run", procs[service].url + "/openapi.json",
           "--checks", ",".join(CHECKS), "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
           "--phases", "examples,coverage,fuzzing",
           "--generation-with-security-parameters", "false",
           "--suppress-health-check", "all", "--workers", "1", "--request-timeout", "10", "--no-color"]
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=240)
    report = out.stdout + out.stderr
    assert out.returncode == 0, f"schemathesis found failures on the {service} server:\n{report[-20000:]}"
    assert "generated" in report and " passed" in report, report[-3000:]


def test_documents_what_the_servers_answer(stack):
    """What the run cannot see on its own: the error model, text/plain metrics, the key schemes, the id rule."""
    _, procs = stack
    for name in SERVICES:
        schema = schema_of(procs, name)
        assert set(schema["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
        assert schema["components"]["schemas"]["Error"]["required"] == ["detail"]
        for path, item in schema["paths"].items():
            for method, op in item.items():
                codes = set(op["responses"])
                assert {"200", "408", "431", "503"} <= codes, (name, method, path)
                assert op["responses"]["200"]["content"], (name, method, path)
                if method == "post":
                    assert {"413", "415", "422"} <= codes, (name, method, path)
                if path == "/healthz":
                    assert "security" not in op and "401" not in codes  # probes never need a key
                else:
                    assert op["security"] and {"401", "403"} <= codes, (name, method, path)
        metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert list(metrics) == ["text/plain"]
    recall = schema_of(procs, "recall")["paths"]["/recall"]
    user_id = next(p for p in recall["get"]["parameters"] if p["name"] == "user_id")["schema"]
    assert user_id["maxLength"] == 256 and user_id["minLength"] == 1 and "," in user_id["pattern"]
    body = recall["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["exclude"]["maxItems"] == 10_000 and body["additionalProperties"] is False


def test_no_key_no_security_scheme(redis_url):
    """Keys off (the default, `make demo`): the document claims no key either."""
    from services.feature_server.app import create_app

    schema = create_app(Settings(redis_url=redis_url)).openapi()
    assert "securitySchemes" not in schema["components"]
    ops = [op for item in schema["paths"].values() for op in item.values()]
    assert ops and not any("security" in op or "401" in op["responses"] for op in ops)
    assert all({"408", "431", "503"} <= set(op["responses"]) for op in ops)
