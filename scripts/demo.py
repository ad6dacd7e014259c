"""`make demo`: start the stack on built-in synthetic data and show real /recall answers.

1. `make up` (local Redis, nightly job if nothing is published, the three services);
2. a warm user's history (feature server) and their candidates with the channels that produced them;
3. the same user after a few clicks posted to the feature server: what changed;
4. a brand-new user's cold-start answer;
5. where to look next, ending with the inspector's address (/ui/ on the recall server). The stack keeps
   running; `make down` stops it.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from scripts import stack
from services.http_guard import client_headers

console = Console()
TOP = 15


def get(client: httpx.Client, url: str, **params) -> dict:
    r = client.get(url, params=params)
    r.raise_for_status()
    return r.json()


def pick_warm_user(client: httpx.Client, feature: str, settings) -> tuple[str, dict]:
    """A user with a rich history: the busiest of the first users of the published id map."""
    from common.ids import load_id_map
    from common.keyspace import Keyspace
    from common.redis_conn import RedisStores

    url = settings.redis_url or stack.local_redis_url(settings)
    stores = RedisStores(url, Keyspace.from_settings(settings))
    try:
        ids = load_id_map(stores, "user").ids[:60]
    finally:
        stores.close()
    best: tuple[str, dict] | None = None
    for uid in ids:
        r = client.get(f"{feature}/users/{uid}")
        if r.status_code == 200:
            rec = r.json()
            if best is None or rec.get("clicks", 0) > best[1].get("clicks", 0):
                best = (uid, rec)
    if best is None:
        raise SystemExit("no user with features found: did the nightly job publish? (see `make nightly`)")
    return best


def when(ts) -> str:
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%d %H:%M") if ts else "-"


def history_table(client: httpx.Client, feature: str, uid: str, rec: dict, n: int = 10) -> Table:
    t = Table(title=f"user {uid}: {rec.get('clicks', 0)} clicks, top categories "
                    f"{', '.join(str(c[0]) for c in rec.get('top_categories', [])[:3]) or '-'}, "
                    f"region {rec.get('region') or '-'}", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("item")
    t.add_column("clicked (UTC)")
    t.add_column("category")
    for i, (item, ts) in enumerate(rec.get("recent", [])[:n], start=1):
        r = client.get(f"{feature}/items/{item}")
        cat = r.json().get("category") if r.status_code == 200 else None
        t.add_row(str(i), str(item), when(ts), str(cat if cat is not None else "-"))
    return t


def candidates_table(body: dict, title: str, n: int = TOP, marks: dict[str, str] | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("rank", justify="right")
    t.add_column("item")
    t.add_column("score", justify="right")
    t.add_column("channels (rank in each)")
    if marks:
        t.add_column("")
    for i, it in enumerate(body["items"][:n], start=1):
        chans = ", ".join(f"{c} #{r}" for c, r in sorted(it.get("channels", {}).items(), key=lambda x: x[1]))
        row = [str(i), it["item_id"], f"{it['score']:.4f}", chans]
        if marks:
            row.append(marks.get(it["item_id"], ""))
        t.add_row(*row)
    return t


def status_table(body: dict) -> Table:
    t = Table(title="channels of this answer", title_justify="left")
    for col in ("channel", "status", "candidates", "latency ms", "version", "detail"):
        t.add_column(col)
    colour = {"ok": "green", "empty": "yellow", "skipped": "yellow", "timeout": "red", "error": "red"}
    for name, st in body["channels"].items():
        t.add_row(name, f"[{colour.get(st['status'], 'white')}]{st['status']}[/]", str(st["count"]),
                  f"{st['latency_ms']:.2f}", str(body["versions"].get(name) or "-"), st.get("detail", ""))
    return t


def main() -> int:
    t_start = time.monotonic()
    console.rule("[bold]multirecall demo")
    console.print("Starting the stack (`make up`): local Redis, nightly job if nothing is published yet, "
                  "feature / vector / recall servers.\n")
    settings = stack._settings()
    urls = stack.up(settings=settings)
    recall, feature = urls["recall"], urls["feature"]
    client = httpx.Client(timeout=30.0, headers=client_headers(settings, write=True))  # API keys, when set

    console.rule("[bold]1. A warm user")
    uid, rec = pick_warm_user(client, feature, settings)
    console.print(f"History from the feature server: GET {feature}/users/{uid}")
    console.print(history_table(client, feature, uid, rec))
    before = get(client, f"{recall}/recall", user_id=uid, k=300, explain="true")
    console.print(f"\nCandidates: GET {recall}/recall?user_id={uid}&k=300&explain=true "
                  f"→ {len(before['items'])} items (top {TOP} shown)")
    console.print(candidates_table(before, f"top {TOP} candidates of user {uid}"))
    console.print(status_table(before))

    console.rule("[bold]2. The same user, a moment after three clicks")
    # click three candidates that only one i2i channel ranks mid-list: their neighbours move up next time
    pool = [it for it in before["items"][20:120] if any(c.endswith("i2i") or c == "itemcf" for c in it["channels"])]
    clicked = [it["item_id"] for it in (pool or before["items"][20:])[:3]]
    events = [{"user_id": uid, "item_id": i} for i in clicked]
    r = client.post(f"{feature}/events", json=events)
    r.raise_for_status()
    console.print(f"POST {feature}/events {events}  → {r.json()}")
    after = get(client, f"{recall}/recall", user_id=uid, k=300, explain="true")
    top_before = [it["item_id"] for it in before["items"][:TOP]]
    top_after = [it["item_id"] for it in after["items"][:TOP]]
    marks = {i: "[green]new in top[/]" for i in top_after if i not in top_before}
    console.print(candidates_table(after, f"top {TOP} candidates after the clicks", marks=marks))
    all_after = {it["item_id"] for it in after["items"]}
    console.print(f"clicked items now filtered out of the answer: "
                  f"{', '.join(i for i in clicked if i not in all_after) or '-'}")
    console.print(f"left the top {TOP}: {', '.join(i for i in top_before if i not in top_after) or '-'}; "
                  f"entered it: {', '.join(marks) or '-'}")

    console.rule("[bold]3. A brand-new user (cold start)")
    new_user = f"demo-new-user-{int(time.time())}"
    cold = get(client, f"{recall}/recall", user_id=new_user, k=50, explain="true")
    console.print(f"GET {recall}/recall?user_id={new_user}&k=50&explain=true → cold_start={cold['cold_start']}")
    console.print(candidates_table(cold, "cold-start candidates (popular lists)", n=10))
    console.print(status_table(cold))

    console.rule("[bold]4. Where to look next")
    console.print(Panel.fit(
        f"API docs         {recall}/docs   {feature}/docs   {urls['vector']}/docs\n"
        f"Prometheus       {recall}/metrics\n"
        f"health           {recall}/healthz\n\n"
        f"curl '{recall}/recall?user_id={uid}&k=20&explain=true'\n"
        f"curl '{recall}/recall?user_id={uid}&k=50&channels=itemcf,mf&exclude={top_after[0]}'\n"
        f"curl -X POST {feature}/events -H 'content-type: application/json' "
        f"-d '[{{\"user_id\": \"{uid}\", \"item_id\": \"{top_after[0]}\"}}]'\n"
        f"curl {feature}/users/{uid}\n\n"
        f"docs/recall_server.md (API), docs/running.md (make targets, compose, settings)\n"
        f"The stack keeps running; [bold]make down[/] stops it.", title="next"))
    console.print(f"demo finished in {time.monotonic() - t_start:.0f}s")
    # last line on purpose: the inspector (docs/inspector.md) is where to look next
    console.print(f"[bold]Inspector:[/] {recall}/ui/   (user {uid}: {recall}/ui/users/{quote(str(uid), safe='')})",
                  soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
