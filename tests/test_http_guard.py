"""Issue 17's attacks and faults, each reproduced against the three services as real processes on 127.0.0.1:
bounded heads and receive time (431, 408, slowloris), bounded bodies (413) and id lists, JSON-only bodies (415),
API keys (401/403), the Host allow-list (400), one id rule, duplicate parameters (422), idempotent event retries,
POST /recall, non-finite scores, a client gone mid-body (no 500), and a hung Redis (circuit breaker, request
budget). One module-wide stack on a private Redis (it gets SIGSTOPped), with API keys and a Host allow-list on.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest
from conftest import ROOT, ServerProcess, free_port

from common.local_redis import LocalRedis
from common.settings import Settings
from services.http_guard import HttpGuard

sys.path.insert(0, str(ROOT))  # scripts/ is not an installed package; its raw-socket probes are reused here
from scripts.probe_hardening import held_open, send_then_read  # noqa: E402

CONFIG = """
default_k: 30
channels:
  popular: {kind: list, model: popular, weight: 0.3, quota: 30, timeout_ms: 2000}
  mf: {kind: u2i, model: mf, quota: 60, timeout_ms: 2000, params: {dim: 8, epochs: 3}}
"""
READ, WRITE = "read-key-for-tests", "write-key-for-tests"
R = {"x-api-key": READ}
W = {"x-api-key": WRITE}
JSON = {"content-type": "application/json"}
HUGE = b"a" * (64 << 20)


class Stack:
    def __init__(self, root: Path, redis_server: LocalRedis, procs: dict[str, ServerProcess], env: dict[str, str]):
        self.root, self.redis, self.procs, self.env = root, redis_server, procs, env
        self.client = {n: httpx.Client(base_url=p.url, timeout=30.0, headers=R) for n, p in procs.items()}

    def port(self, name: str) -> int:
        return self.procs[name].port


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from trainer.nightly import run_nightly
    from trainer.synth import write_synthetic

    root = tmp_path_factory.mktemp("guard")
    data = write_synthetic(root / "data", n_users=120, n_items=80, n_clicks=2500, seed=3, progress=False)
    config = root / "channels.yaml"
    config.write_text(CONFIG)
    server = LocalRedis(data_dir=root / "redis").start()
    settings = Settings(redis_url=server.url, artifacts_dir=root / "artifacts", channels_config=config,
                        run_dir=root / "run")
    assert run_nightly(settings, data_dir=data, config_path=config, progress=False)["status"] == "ok"
    ports = {name: free_port() for name in ("feature", "vector", "recall")}
    env = {**os.environ, "REDIS_URL": server.url, "ARTIFACTS_DIR": str(settings.artifacts_dir),
           "CHANNELS_CONFIG": str(config), "RUN_DIR": str(settings.run_dir), "OMP_NUM_THREADS": "1",
           "VECTOR_URL": f"http://127.0.0.1:{ports['vector']}", "FEATURE_URL": f"http://127.0.0.1:{ports['feature']}",
           "API_READ_KEY": READ, "API_WRITE_KEY": WRITE, "ALLOWED_HOSTS": "127.0.0.1,localhost",
           "HTTP_RECEIVE_TIMEOUT_S": "1"}
    procs: dict[str, ServerProcess] = {}
    try:
        for name in ("feature", "vector", "recall"):
            procs[name] = ServerProcess([f"services.{name}_server", "serve", "--port", str(ports[name])], env,
                                        ports[name], root / f"{name}.log").start()
        st = Stack(root, server, procs, env)
        deadline = time.monotonic() + 90
        while True:  # the recall server reaches the vector server with its own key: mf answers
            r = st.client["recall"].get("/recall", params={"user_id": "1"})
            if r.status_code == 200 and r.json()["channels"]["mf"]["status"] == "ok":
                st.items = [it["item_id"] for it in r.json()["items"]]
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        yield st
        for c in st.client.values():
            c.close()
    finally:
        for p in procs.values():
            p.stop()
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def detail(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    d = r.json()["detail"]
    return d if isinstance(d, str) else d[0]["msg"]


def peak_rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# -- 1. heads and receive time --------------------------------------------------------------------------

@pytest.mark.parametrize("service", ["recall", "feature", "vector"])
def test_a_64mb_header_gets_431_json_early_while_other_clients_are_served(stack, service):
    answer: dict = {}

    def attack() -> None:
        answer["r"] = send_then_read(stack.port(service), [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ",
                                                           HUGE, b"\r\n\r\n"])

    t = threading.Thread(target=attack)
    t.start()
    statuses = []
    while t.is_alive() or not statuses:  # requests on other connections while the attack runs
        statuses.append(stack.client[service].get("/healthz").status_code)
    t.join()
    status, body, sent = answer["r"]
    assert status == 431 and "HTTP_MAX_HEAD_BYTES" in orjson.loads(body)["detail"]
    assert sent < len(HUGE) // 2  # answered after the bound, not after reading (and parsing) 64 MB
    assert set(statuses) == {200}


def test_slow_or_silent_connections_are_closed_after_the_receive_timeout(stack):
    """HTTP_RECEIVE_TIMEOUT_S=1 here: a head sent a header a second gets 408 (JSON) and is closed; a connection
    that sends nothing is closed; on every service (before: held for as long as the client liked)."""
    out: dict = {}
    threads = []
    for name in ("recall", "feature", "vector"):
        for kind, first, trickle in (("trickle", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: 1\r\n"),
                                     ("silent", b"", None)):
            def run(name=name, kind=kind, first=first, trickle=trickle):
                out[(name, kind)] = held_open(stack.port(name), 30.0, trickle, first)
            threads.append(threading.Thread(target=run))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (name, kind), res in out.items():
        assert not res["capped"], (name, kind, res)
        assert res["status"] == (408 if kind == "trickle" else None), (name, kind, res)


def test_a_normal_request_with_a_body_is_not_cut_by_the_receive_timeout(stack):
    r = stack.client["recall"].post("/recall", json={"user_id": "1", "k": 5})
    assert r.status_code == 200 and len(r.json()["items"]) == 5


# -- 4. body sizes and list lengths ---------------------------------------------------------------------

def test_a_100mb_body_is_refused_on_its_declared_length_without_memory_growth(stack):
    pid = stack.procs["vector"].proc.pid
    before = peak_rss_mb(pid)
    body = b" " * (100 << 20)
    head = (f"POST /search/user HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-API-Key: {READ}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    status, answer, sent = send_then_read(stack.port("vector"), [head, body])
    assert status == 413 and "HTTP_MAX_BODY_BYTES" in orjson.loads(answer)["detail"]
    assert sent < len(body) // 2
    assert peak_rss_mb(pid) - before < 50  # before: 1.1 GB more at peak (the body, then its parse)
    assert stack.client["vector"].get("/healthz").status_code == 200


@pytest.mark.parametrize("service, path", [("vector", "/search/user"), ("recall", "/recall"), ("feature", "/events")])
def test_a_chunked_body_past_the_bound_gets_413(stack, service, path):
    """No Content-Length: the guard counts what the app reads (fast path and FastAPI route alike)."""
    piece = b"[" + b" " * 65534 + b"]"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(80)) + b"0\r\n\r\n"  # 5 MiB
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-API-Key: {WRITE}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    status, answer, _ = send_then_read(stack.port(service), [head, chunks])
    assert status == 413, answer
    assert "bytes" in orjson.loads(answer)["detail"]


def test_exclude_and_recent_lists_are_bounded_on_every_endpoint(stack):
    too_many = [f"i{j}" for j in range(10_001)]
    vec = stack.client["vector"]
    r = vec.post("/search/user", json={"user_id": "1", "channels": {"mf": 5}, "exclude": too_many})
    assert r.status_code == 422 and "'exclude'" in detail(r) and "at most 10000" in detail(r)
    r = vec.post("/search/user", json={"user_id": "1", "channels": {"mf": 5}, "recent": too_many[:1001]})
    assert r.status_code == 422 and "'recent'" in detail(r) and "at most 1000" in detail(r)
    r = vec.post("/search", json={"channel": "mf", "k": 5, "user_id": "1", "exclude": too_many})
    assert r.status_code == 422 and "'exclude'" in detail(r)
    r = stack.client["recall"].post("/recall", json={"user_id": "1", "exclude": too_many})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "exclude"]


# -- 2. JSON only, API keys, Host -------------------------------------------------------------------------

def test_bodies_must_be_json_415(stack):
    uid = f"ct-{uuid.uuid4().hex[:8]}"
    feature = stack.client["feature"]
    ev = orjson.dumps([{"user_id": uid, "item_id": stack.items[0]}])
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = feature.post("/events", content=ev, headers={**W, "content-type": ctype})
        assert r.status_code == 415 and "application/json" in detail(r)
    r = httpx.post(f"{feature.base_url}/events", content=ev, headers=W)  # no Content-Type at all
    assert r.status_code == 415
    assert feature.get(f"/users/{uid}").status_code == 404  # nothing was written
    r = feature.post("/events", content=ev, headers={**W, "content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200 and r.json() == {"accepted": 1}
    for service, path in (("feature", "/items"), ("recall", "/recall"), ("vector", "/search"),
                          ("vector", "/search/user")):
        r = stack.client[service].post(path, content=b"{}", headers={**W, "content-type": "text/plain"})
        assert r.status_code == 415, (service, path, r.text)


def test_api_keys(stack):
    recall, feature, vector = (stack.procs[n].url for n in ("recall", "feature", "vector"))
    ev = [{"user_id": "key-user", "item_id": stack.items[0]}]
    r = httpx.get(recall + "/recall", params={"user_id": "1"})
    assert r.status_code == 401 and "API_READ_KEY" in detail(r) and r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(recall + "/recall", params={"user_id": "1"}, headers={"x-api-key": "wrong"})
    assert r.status_code == 403
    assert httpx.get(recall + "/recall", params={"user_id": "1"}, headers={"authorization": f"Bearer {READ}"}
                     ).status_code == 200
    assert httpx.get(recall + "/recall", params={"user_id": "1"}, headers=W).status_code == 200  # write ⊇ read
    r = httpx.post(feature + "/events", json=ev, headers=R)  # a read key cannot write
    assert r.status_code == 403 and "API_WRITE_KEY" in detail(r)
    assert httpx.post(feature + "/events", json=ev).status_code == 401
    assert httpx.post(feature + "/items", json={"item_id": "new-item", "attrs": {"a": 1}}, headers=R).status_code == 403
    assert httpx.post(feature + "/events", json=ev, headers=W).status_code == 200
    assert httpx.get(f"{feature}/users/key-user").status_code == 401
    assert httpx.post(vector + "/search/user", json={"user_id": "1", "channels": {"mf": 3}}).status_code == 401
    for base in (recall, feature, vector):
        assert httpx.get(base + "/healthz").status_code == 200  # probes need no key
        assert httpx.get(base + "/metrics").status_code == 401  # API_KEY_METRICS defaults to true
        assert httpx.get(base + "/metrics", headers=R).status_code == 200
        assert httpx.get(base + "/openapi.json").status_code == 200  # API_KEY_DOCS defaults to false


def test_keys_are_off_by_default():
    """`make demo` and the tests run without keys: the guard then refuses nothing but malformed bodies."""
    guard = HttpGuard(None, Settings())
    scope = {"type": "http", "method": "GET", "path": "/recall", "headers": [(b"host", b"anything.example")]}
    assert guard.refusal(scope) is None
    post = {**scope, "method": "POST", "path": "/events", "headers": [(b"content-type", b"application/json")]}
    assert guard.refusal(post) is None


def test_host_allow_list(stack):
    r = stack.client["recall"].get("/recall", params={"user_id": "1"}, headers={"host": "evil.example"})
    assert r.status_code == 400 and "ALLOWED_HOSTS" in detail(r)
    r = stack.client["feature"].get("/healthz", headers={"host": "rebind.evil.example:8001"})
    assert r.status_code == 400
    r = stack.client["recall"].get("/recall", params={"user_id": "1"}, headers={"host": f"localhost:{stack.port('recall')}"})
    assert r.status_code == 200


# -- 8. ids, parameters, retries, POST /recall, scores, disconnects -----------------------------------------

@pytest.mark.parametrize("bad", ["u\x00x", "u\x07x", "a,b", "\x7f", "x" * 257])
def test_one_id_rule_on_every_service(stack, bad):
    feature, recall, vector = (stack.client[n] for n in ("feature", "recall", "vector"))
    item = stack.items[0]
    assert feature.post("/events", json=[{"user_id": bad, "item_id": item}], headers=W).status_code == 422
    assert feature.post("/events", json=[{"user_id": "ok-user", "item_id": bad}], headers=W).status_code == 422
    assert feature.post("/items", json={"item_id": bad, "attrs": {"a": 1}}, headers=W).status_code == 422
    assert recall.get("/recall", params={"user_id": bad}).status_code == 422
    assert recall.post("/recall", json={"user_id": bad}).status_code == 422
    assert recall.post("/recall", json={"user_id": "1", "exclude": [bad]}).status_code == 422
    assert vector.post("/search/user", json={"user_id": bad, "channels": {"mf": 3}}).status_code == 422
    assert vector.post("/search/user", json={"user_id": "1", "channels": {"mf": 3}, "exclude": [bad]}
                       ).status_code == 422
    assert feature.get("/users/" + quote(bad, safe="")).status_code == 422
    assert feature.get("/items/" + quote(bad, safe="")).status_code == 422


def test_duplicate_query_parameters_are_422(stack):
    r = stack.client["recall"].get("/recall?user_id=1&user_id=2&k=5")
    assert r.status_code == 422
    d = r.json()["detail"][0]
    assert d["loc"] == ["query", "user_id"] and "2 times" in d["msg"]
    assert stack.client["recall"].get("/recall?user_id=1&k=5&k=7").json()["detail"][0]["loc"] == ["query", "k"]


def test_an_event_retried_with_its_event_id_counts_once(stack):
    feature = stack.client["feature"]
    user, item, eid = f"retry-{uuid.uuid4().hex[:8]}", stack.items[-1], str(uuid.uuid4())
    clicks0 = feature.get(f"/items/{item}").json()["realtime_clicks"]
    ev = {"user_id": user, "item_id": item, "event_id": eid}
    assert feature.post("/events", json=[ev], headers=W).json() == {"accepted": 1}
    assert feature.post("/events", json=[ev], headers=W).json() == {"accepted": 0, "duplicates": 1}
    twice = [{**ev, "event_id": "batch-dup"}, {**ev, "event_id": "batch-dup"}]  # the same id twice in one batch
    assert feature.post("/events", json=twice, headers=W).json() == {"accepted": 1, "duplicates": 1}
    assert feature.get(f"/users/{user}").json()["clicks"] == 2
    assert feature.get(f"/items/{item}").json()["realtime_clicks"] == clicks0 + 2
    r = feature.post("/events", json=[{**ev, "event_id": "bad,id"}], headers=W)
    assert r.status_code == 422 and "event_id" in detail(r)


def test_post_recall_answers_like_get_and_takes_10000_exclusions(stack):
    recall = stack.client["recall"]
    got = recall.get("/recall", params={"user_id": "3", "k": 10, "explain": "true"}).json()
    posted = recall.post("/recall", json={"user_id": "3", "k": 10, "explain": True}).json()
    assert [i["item_id"] for i in posted["items"]] == [i["item_id"] for i in got["items"]]
    top = [i["item_id"] for i in got["items"][:5]]
    excl = [str(uuid.uuid4()) for _ in range(9_995)] + top  # far past what a URL can carry (~1,700 UUIDs)
    r = recall.post("/recall", json={"user_id": "3", "k": 10, "exclude": excl})
    assert r.status_code == 200, r.text
    assert not set(top) & {i["item_id"] for i in r.json()["items"]}
    r = recall.post("/recall", json={"user_id": "3", "colour": 1})
    assert r.status_code == 422 and "colour" in r.json()["detail"][0]["msg"]


def test_huge_query_vector_components_are_422_not_null_scores(stack):
    dim = 8
    r = stack.client["vector"].post("/search", json={"channel": "mf", "k": 5, "vector": [3e38] * dim})
    assert r.status_code == 422 and "'vector'" in detail(r)
    r = stack.client["vector"].post("/search", json={"channel": "mf", "k": 5, "vector": [0.5] * dim})
    assert r.status_code == 200 and None not in r.json()["scores"]


def test_a_client_gone_mid_body_is_not_a_500(stack):
    feature = stack.client["feature"]

    def events_500() -> float:
        lines = [x for x in feature.get("/metrics").text.splitlines()
                 if x.startswith("feature_server_request_seconds_count") and '"/events"' in x and 'status="500"' in x]
        return sum(float(x.split()[-1]) for x in lines)

    before = events_500()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", stack.port("feature"))) as s:
            s.sendall(f"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-API-Key: "
                      f"{WRITE}\r\nContent-Length: 1000\r\n\r\n[{{\"user_id\":".encode())
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while 'status="499"' not in feature.get("/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert events_500() == before
    assert "Exception in ASGI application" not in (stack.root / "feature.log").read_text()


# -- 7. a hung Redis: circuit breaker and request budget (last: it stops the stack's Redis) ---------------

def test_hung_redis_fails_fast_then_recovers_and_requests_keep_a_budget(stack):
    budget = ServerProcess(["services.feature_server", "serve", "--port", str(port := free_port())],
                           {**stack.env, "REDIS_BREAKER_FAILURES": "0", "REDIS_TIMEOUT_S": "5",
                            "REQUEST_BUDGET_S": "0.5"}, port, stack.root / "budget.log").start()
    pid = stack.redis.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for name, path in (("recall", "/recall?user_id=1"), ("feature", "/users/1")):
            seen = []
            for _ in range(12):  # the first few wait REDIS_TIMEOUT_S each; then the breaker is open
                r = stack.client[name].get(path)
                assert r.status_code == 503, r.text
                seen.append(detail(r))
                if "failing fast" in seen[-1]:
                    break
            assert "failing fast" in seen[-1], seen
            assert "Redis" in seen[-1]
        r = httpx.get(budget.url + "/users/1", headers=R, timeout=30)  # no breaker: the budget ends the wait
        assert r.status_code == 503 and "REQUEST_BUDGET_S" in detail(r)
    finally:
        os.kill(pid, signal.SIGCONT)
        budget.stop()
    deadline = time.monotonic() + 30
    while True:  # back without a restart
        r = stack.client["recall"].get("/recall", params={"user_id": "1"})
        f = stack.client["feature"].get("/users/1")
        if r.status_code == 200 and f.status_code == 200:
            break
        assert time.monotonic() < deadline, (r.text, f.text)
        time.sleep(0.1)
