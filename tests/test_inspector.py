"""The inspector (/ui/ on the recall server) end to end, in a real browser: Playwright driving Debian's chromium
against a real stack on 127.0.0.1 (private Redis, the nightly job on a tiny synthetic dataset with one item
registered through POST /items, an offline evaluation report, the three services as processes).

Screenshots of every page land in INSPECTOR_SCREENSHOTS (default var/test-artifacts/inspector/). Without chromium
(`apt-get install chromium`, or CHROMIUM=/path/to/chromium) or the `playwright` package, the browser tests skip
and say why; the JSON checks still run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from conftest import ROOT, ServerProcess, free_port

from common.ids import load_id_map
from common.keyspace import Keyspace, unpack_neighbors
from common.local_redis import LocalRedis
from common.publish import current_version, read_manifest
from common.redis_conn import RedisStores
from common.settings import Settings

CONFIG = """
merge: {normalize: rank, rank_offset: 20}
default_k: 50
channels:
  popular: {kind: list, model: popular, weight: 0.3, quota: 30, timeout_ms: 2000, params: {top_k: 100}}
  itemcf: {kind: i2i, model: itemcf, weight: 1.0, quota: 60, timeout_ms: 2000, params: {top_k: 50}}
  usercf: {kind: u2u, model: usercf, weight: 0.5, quota: 40, timeout_ms: 2000, params: {top_k: 20}}
  mf: {kind: u2i, model: mf, weight: 1.0, quota: 60, timeout_ms: 2000, params: {dim: 16, epochs: 5}}
  mf_i2i: {kind: i2i, from: mf, weight: 0.3, quota: 30, timeout_ms: 2000}
  eges: {kind: i2i, model: eges, weight: 0.5, quota: 30, timeout_ms: 2000,
         params: {dim: 16, epochs: 2, walks_per_node: 5, top_k: 30}}
"""
CHANNELS = ["popular", "itemcf", "usercf", "mf", "mf_i2i", "eges"]
I2I = ["itemcf", "mf_i2i", "eges"]
NEW_ITEM = "new-item-1"  # registered before the nightly: no clicks, a cold-start EGES vector
SHOTS = Path(os.environ.get("INSPECTOR_SCREENSHOTS") or ROOT / "var" / "test-artifacts" / "inspector")


def find_chromium() -> str | None:
    """$CHROMIUM if set (and executable), else Debian's chromium on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from common.channel_config import load_config
    from trainer.data.io import load_dataset
    from trainer.evaluate import evaluate, write_report
    from trainer.nightly import run_nightly
    from trainer.synth import write_synthetic

    root = tmp_path_factory.mktemp("inspector")
    data_dir = write_synthetic(root / "data", n_users=300, n_items=200, n_clicks=6000, seed=7, progress=False)
    config_path = root / "channels.yaml"
    config_path.write_text(CONFIG)
    server = LocalRedis(data_dir=root / "redis", port=free_port()).start()
    settings = Settings(redis_url=server.url, artifacts_dir=root / "artifacts", channels_config=config_path,
                        run_dir=root / "run", eval_dir=root / "eval")
    ports = {"feature": free_port(), "vector": free_port(), "recall": free_port()}
    env = {**os.environ, "REDIS_URL": server.url, "ARTIFACTS_DIR": str(settings.artifacts_dir),
           "CHANNELS_CONFIG": str(config_path), "RUN_DIR": str(settings.run_dir), "EVAL_DIR": str(settings.eval_dir),
           "OMP_NUM_THREADS": "1", "VECTOR_URL": f"http://127.0.0.1:{ports['vector']}",
           "FEATURE_URL": f"http://127.0.0.1:{ports['feature']}"}
    procs: dict[str, ServerProcess] = {}
    try:
        procs["feature"] = ServerProcess(["services.feature_server", "serve", "--port", str(ports["feature"])], env,
                                         ports["feature"], root / "feature.log").start()
        ds = load_dataset(data_dir)
        template = ds.items.iloc[0]
        attrs = {c: str(template[c]) for c in ("category_id", "brand", "market")}
        r = httpx.post(f"{procs['feature'].url}/items", json={"item_id": NEW_ITEM, "attrs": attrs}, timeout=10)
        assert r.status_code == 200, r.text
        summary = run_nightly(settings, data_dir=data_dir, config_path=config_path, progress=False)
        assert summary["status"] == "ok", summary["failed"]
        cfg = load_config(config_path)
        report, curves = evaluate(ds, cfg, channels=["popular", "itemcf"], progress=False, calib=False)
        write_report(report, curves, settings.eval_dir / "tiny")
        for name in ("vector", "recall"):
            procs[name] = ServerProcess([f"services.{name}_server", "serve", "--port", str(ports[name])], env,
                                        ports[name], root / f"{name}.log").start()
        counts = ds.interactions["user_id"].astype(str).value_counts()
        ctx = {"redis": server, "settings": settings, "summary": summary, "report": report, "procs": procs,
               "recall": httpx.Client(base_url=procs["recall"].url, timeout=10.0),
               "feature": httpx.Client(base_url=procs["feature"].url, timeout=10.0),
               "users": counts.index[:10].tolist(), "new_item_attrs": attrs}
        ctx["versions"] = wait_until_served(ctx["recall"], ctx["users"][0])
        yield ctx
        ctx["recall"].close()
        ctx["feature"].close()
    finally:
        for p in procs.values():
            p.stop()
        server.stop()


def wait_until_served(client: httpx.Client, user: str, timeout: float = 60.0) -> dict:
    """Poll /recall until every channel answers ok (vector server loaded, snapshot swapped); the versions served."""
    deadline, body = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        r = client.get("/recall", params={"user_id": user})
        if r.status_code == 200:
            body = r.json()
            if all(body["channels"][c]["status"] == "ok" for c in CHANNELS):
                return body["versions"]
        time.sleep(0.2)
    raise AssertionError(f"stack never served every channel: last answer {body}")


def explain(stack, user: str, k: int = 50) -> dict:
    r = stack["recall"].get("/recall", params={"user_id": user, "k": k, "explain": "true"})
    assert r.status_code == 200, r.text
    return r.json()


# ---- the browser ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need the `playwright` package (pip install -e '.[dev]')")
    chromium = find_chromium()
    if not chromium:
        where = f"CHROMIUM={os.environ['CHROMIUM']} is not an executable" if os.environ.get("CHROMIUM") else \
            "no chromium on PATH"
        pytest.skip(f"the browser tests need chromium ({where}): apt-get install chromium, or set CHROMIUM to its "
                    "path; Playwright's own browser download is not used")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium refuses to sandbox as root
        b = pw.chromium.launch(executable_path=chromium, args=args)
        yield b
        b.close()


@pytest.fixture
def page(browser, stack):
    ctx = browser.new_context(base_url=stack["procs"]["recall"].url, viewport={"width": 1500, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.set_default_timeout(15_000)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> Path:
    """Save a full-page screenshot as a test artifact."""
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000
    return path


def open_user(page, user: str):
    page.goto(f"/ui/users/{quote(user, safe='')}")
    page.wait_for_selector("#merged, #merged-empty, [data-testid=error]")


def dom_answer(page) -> tuple[list[str], list[dict]]:
    rows = page.locator("#merged tbody tr")
    ids = rows.evaluate_all("rs => rs.map(r => r.dataset.itemId)")
    chans = rows.evaluate_all("rs => rs.map(r => JSON.parse(r.dataset.channels))")
    return ids, chans


def dom_columns(page) -> dict[str, dict]:
    return page.locator("#channel-columns section.channel").evaluate_all(
        """secs => Object.fromEntries(secs.map(s => [s.dataset.channel, {status: s.dataset.status,
             items: [...s.querySelectorAll('li')].map(li => li.dataset.itemId)}]))""")


def test_overview_page_shows_channels_nightly_serving_and_evaluation(stack, page):
    page.goto("/ui/")
    page.wait_for_selector("#channels tbody tr")
    shot(page, "overview")
    rows = page.locator("#channels tbody tr")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.channel)") == CHANNELS
    for name in CHANNELS:
        row = page.locator(f'#channels tr[data-channel="{name}"]')
        assert row.get_attribute("data-status") == "ok"
        assert stack["versions"][name] in row.inner_text()  # the version actually served
        assert int(row.locator('[data-metric="requests"]').inner_text().replace(",", "")) >= 1  # wait_until_served
    mf_row = page.locator('#channels tr[data-channel="mf"]').inner_text()
    assert "item_vectors" in mf_row and "fit ok" in mf_row and "publish ok" in mf_row
    run = stack["summary"]
    assert run["run_id"] in page.locator("#nightly").inner_text()
    assert page.locator('#nightly-stages tr[data-stage="fit:eges"]').count() == 1
    hr = stack["report"]["merged"]["hr@50"]
    assert f"{hr:.3f}" in page.locator('#evaluation-table tr[data-row="merged"]').inner_text()
    assert page.locator('#evaluation-table tr[data-row="itemcf"]').count() == 1
    assert page.locator("#eval-plot").evaluate("img => img.complete && img.naturalWidth") > 100
    assert page.locator('[data-dep="vector_server"] .badge').get_attribute("data-status") == "ok"


def test_search_a_user_and_the_columns_match_recall_explain(stack, page):
    user = stack["users"][1]
    page.goto("/ui/")
    page.fill("#user-search-input", user)
    page.click("#user-search button")
    page.wait_for_url(f"**/ui/users/{user}")
    page.wait_for_selector("#merged")
    shot(page, "user")
    body = explain(stack, user)
    ids, chans = dom_answer(page)
    assert ids == [it["item_id"] for it in body["items"]] and len(ids) == 50
    assert chans == [it["channels"] for it in body["items"]]
    cols = dom_columns(page)
    assert list(cols) == CHANNELS
    for name, st in body["channels"].items():
        assert cols[name]["status"] == st["status"] == "ok"
        assert len(cols[name]["items"]) == st["count"] > 0
    for it in body["items"]:  # every (channel, rank) the answer names is that channel's column at that rank
        for name, rank in it["channels"].items():
            assert cols[name]["items"][rank - 1] == it["item_id"], (name, rank, it)
    # recent clicks as the feature server has them, newest first, with item attributes
    feat = stack["feature"].get(f"/users/{user}").json()
    assert not {str(i) for i, _ in feat["recent"]} & set(cols["itemcf"]["items"])  # own lists exclude clicked items
    recent = page.locator("#recent-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.itemId)")
    assert recent == [str(i) for i, _ in feat["recent"]]
    assert page.locator("#recent-table tbody tr").first.locator(".chips span").count() >= 3
    # overlap: the diagonal is each column's length
    diag = page.locator("#overlap-table tbody tr").evaluate_all(
        "rs => rs.map((r, i) => Number(r.querySelectorAll('td')[i].textContent))")
    assert diag == [len(cols[c]["items"]) for c in CHANNELS]


def test_post_a_click_through_the_page_changes_the_answer(stack, page):
    user = stack["users"][2]
    open_user(page, user)
    before = explain(stack, user)
    clicked = page.input_value("#click-item")
    assert clicked == before["items"][0]["item_id"]  # pre-filled with the top candidate
    page.click("#click-button")
    page.wait_for_selector("[data-testid=click-result-message]")
    shot(page, "user-after-click")
    first = page.locator("#recent-table tbody tr").first
    assert first.get_attribute("data-item-id") == clicked and first.get_attribute("data-realtime") == "true"
    ids, chans = dom_answer(page)
    assert clicked not in ids  # now seen: filtered out of every channel and the merge
    after = explain(stack, user)
    assert ids == [it["item_id"] for it in after["items"]] != [it["item_id"] for it in before["items"]]
    assert chans == [it["channels"] for it in after["items"]]
    assert "The answer changed" in page.locator("[data-testid=answer-diff]").inner_text()
    feat = stack["feature"].get(f"/users/{user}").json()
    assert str(feat["recent"][0][0]) == clicked and feat["realtime_clicks"] == 1


def test_unknown_user_gets_a_readable_message_and_the_cold_start_answer(stack, page):
    open_user(page, "nobody-at-all")
    shot(page, "user-unknown")
    msg = page.locator("[data-testid=user-message]").inner_text()
    assert "unknown user 'nobody-at-all'" in msg
    body = explain(stack, "nobody-at-all")
    assert body["cold_start"] and dom_answer(page)[0] == [it["item_id"] for it in body["items"]]
    cols = dom_columns(page)
    assert cols["popular"]["status"] == "ok" and cols["itemcf"]["status"] == "skipped"


def test_bad_and_unknown_ids_get_readable_messages(stack, page):
    for path, want in [(f"/ui/users/{'u' * 300}", "user_id must be at most 256 characters"),
                       ("/ui/users/%01x", "user_id must not contain a control character"),
                       ("/ui/items/no-such-item", "unknown item 'no-such-item'"),
                       ("/ui/items/a%2Cb", "item_id must not contain a comma"),
                       ("/ui/users/%E0%A4%A", "Not a valid address"),
                       ("/ui/users/", "Enter a user id")]:
        page.goto(path)
        text = page.locator("[data-testid=error]").inner_text()
        assert want in text, (path, text)
        assert "Traceback" not in page.content() and "internal error" not in text
    shot(page, "bad-id")


def test_item_page_shows_attributes_popularity_and_neighbours(stack, page):
    item = explain(stack, stack["users"][0])["items"][0]["item_id"]
    page.goto(f"/ui/items/{item}")
    page.wait_for_selector("#neighbours")
    shot(page, "item")
    feat = stack["feature"].get(f"/items/{item}").json()
    table = page.locator("#item-table").inner_text()
    assert str(feat["attrs"]["brand"]) in table and str(feat["category"]) in table
    assert str(feat["clicks"]) in page.locator("#popularity-table").inner_text()
    cols = page.locator("#neighbours section.channel").evaluate_all(
        "secs => Object.fromEntries(secs.map(s => [s.dataset.channel, [...s.querySelectorAll('li')].map(li => li.dataset.itemId)]))")
    assert list(cols) == I2I
    stores = RedisStores(stack["settings"].redis_url, Keyspace.from_settings(stack["settings"]))
    try:
        served = stack["recall"].get("/healthz").json()["versions"]
        ks, idmap = stores.keyspace, load_id_map(stores, "item")
        for name, publisher in (("itemcf", "itemcf"), ("mf_i2i", "mf"), ("eges", "eges")):
            manifest = read_manifest(stores, publisher)
            store, ver = manifest["stores"]["i2i"], current_version(stores, publisher)
            assert served[publisher] == ver
            ids, _ = unpack_neighbors(stores(store).get(ks.i2i(store, publisher, ver, idmap.get(item))))
            want = [idmap.ids[i] for i in np.asarray(ids) if i >= 0]
            assert cols[name] == want and want, name
    finally:
        stores.close()
    assert "learned from behaviour" in page.locator('#neighbours [data-channel="itemcf"] .vector-source').inner_text()


def test_cold_start_item_says_where_its_vector_came_from(stack, page):
    page.goto(f"/ui/items/{NEW_ITEM}")
    page.wait_for_selector("#neighbours")
    shot(page, "item-cold-start")
    assert page.locator("#cold-badge").is_visible()
    assert "registered through the feature server's POST /items" in page.locator("main").inner_text()
    eges = page.locator('#neighbours [data-channel="eges"]')
    assert eges.get_attribute("data-status") == "ok" and eges.locator("li").count() > 0
    source = eges.locator(".vector-source").inner_text()
    assert "cold start" in source and "side-information" in source
    assert f"brand={stack['new_item_attrs']['brand']}" in source
    itemcf = page.locator('#neighbours [data-channel="itemcf"]')
    assert itemcf.get_attribute("data-status") == "empty"
    assert "learns from behaviour only" in itemcf.locator(".vector-source").inner_text()


# ---- JSON endpoints (no browser needed) -------------------------------------------------------------------

def test_api_errors_are_clear_4xx(stack):
    c = stack["recall"]
    r = c.get("/ui/api/users/1", params={"k": "0"})
    assert r.status_code == 422 and "k must be an integer" in r.json()["detail"]
    r = c.get("/ui/api/items/nope")
    assert r.status_code == 404 and "unknown item 'nope'" in r.json()["detail"]
    r = c.post("/ui/api/clicks", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = c.post("/ui/api/clicks", json={"user_id": "1"})
    assert r.status_code == 422 and "item_id is required" in r.json()["detail"]
    r = c.post("/ui/api/clicks", json={"user_id": "1", "item_id": "x\u0001"})
    assert r.status_code == 422 and "item_id" in r.json()["detail"]
    assert c.get("/ui/api/evaluation/recall_at_k.png").content[:4] == b"\x89PNG"
    r = c.get("/ui", follow_redirects=False)
    assert r.status_code in (301, 302, 307) and r.headers["location"] == "/ui/"


def test_the_page_loads_nothing_from_outside(stack):
    c = stack["recall"]
    for path in ("/ui/", "/ui/static/inspector.js", "/ui/static/inspector.css"):
        r = c.get(path)
        assert r.status_code == 200
        assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", r.text), path


def test_a_stopped_vector_server_shows_as_degraded(stack, page):
    """Last: stops the vector server for good."""
    stack["procs"]["vector"].stop()
    user = stack["users"][3]
    open_user(page, user)
    shot(page, "user-vector-down")
    cols = dom_columns(page)
    assert cols["mf"]["status"] in ("error", "timeout") and cols["mf"]["items"] == []
    assert all(cols[c]["status"] == "ok" for c in ("popular", "itemcf", "usercf", "mf_i2i", "eges"))
    degraded = page.locator("[data-testid=degraded]").inner_text()
    assert "mf (" in degraded and "vector server" in degraded
    assert dom_answer(page)[0] == [it["item_id"] for it in explain(stack, user)["items"]]
    page.goto("/ui/")
    page.wait_for_selector("#channels tbody tr")
    shot(page, "overview-vector-down")
    assert page.locator('#channels tr[data-channel="mf"]').get_attribute("data-status") == "degraded"
    assert page.locator('#channels tr[data-channel="itemcf"]').get_attribute("data-status") == "ok"
    assert "unreachable" in page.locator('[data-dep="vector_server"]').inner_text()
    assert "mf (degraded: vector server unreachable" in page.locator("[data-testid=degraded]").inner_text()
