// multirecall inspector: renders /ui/, /ui/users/{id} and /ui/items/{id} from the JSON under /ui/api/.
// Plain JavaScript, no build step, no library; every value reaches the page through textContent.
"use strict";

const app = document.getElementById("app");

// -- small helpers -----------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const enc = encodeURIComponent;
const userHref = (id) => `/ui/users/${enc(id)}`;
const itemHref = (id) => `/ui/items/${enc(id)}`;
const itemLink = (id) => h("a", {href: itemHref(id), class: "item-link"}, id);

function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? x.toLocaleString("en") : x.toFixed(digits);
}
function fmtTs(sec) {
  if (sec === null || sec === undefined || sec === "") return "–";
  const d = new Date(Number(sec) * 1000);
  return Number.isNaN(d.getTime()) ? String(sec) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}
function statusClass(status) {
  const s = String(status || "");
  if (s === "ok") return "ok";
  if (s === "empty" || s === "skipped") return s;
  if (s.startsWith("unavailable")) return "unavailable";
  return "degraded";
}
const badge = (status, extra) => h("span", {class: `badge ${statusClass(status)}`, "data-status": status}, extra || status);

function message(kind, text, testid) {
  return h("div", {class: `message ${kind}`, role: kind === "error" ? "alert" : "status", "data-testid": testid || "message"}, text);
}
function section(title, id, ...children) {
  return h("section", {class: "block", id}, h("h2", {}, title), ...children);
}
function table(headers, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {class: x.num ? "num" : null}, x.label || x)))),
    h("tbody", {}, rows));
}
function kvTable(obj, id) {
  const rows = Object.entries(obj || {}).map(([k, v]) => h("tr", {"data-key": k}, h("th", {}, k), h("td", {}, fmtValue(v))));
  return h("table", {class: "kv", id}, h("tbody", {}, rows));
}
function attrChips(attrs) {
  return h("span", {class: "chips"}, Object.entries(attrs || {}).map(([k, v]) => h("span", {}, `${k}=${fmtValue(v)}`)));
}

async function getJSON(url, options) {
  let r;
  try {
    r = await fetch(url, options);
  } catch (err) {
    return {ok: false, status: 0, body: {detail: `the recall server did not answer: ${err}`}};
  }
  let body;
  try { body = await r.json(); } catch (err) { body = {detail: `HTTP ${r.status} (not JSON)`}; }
  return {ok: r.ok, status: r.status, body};
}
function detailText(res) {
  const d = res.body && res.body.detail;
  if (Array.isArray(d)) return d.map((x) => x.msg || JSON.stringify(x)).join("; ");
  return d ? String(d) : `HTTP ${res.status}`;
}
function render(...nodes) {
  app.replaceChildren(...nodes);
}

// -- overview ----------------------------------------------------------------------------------------------
async function showOverview() {
  document.title = "Overview · multirecall inspector";
  const res = await getJSON("/ui/api/overview");
  if (!res.ok) { render(h("h1", {}, "Overview"), message("error", `Overview unavailable: ${detailText(res)}`, "error")); return; }
  const o = res.body;
  const vec = o.vector_server, feat = o.feature_server;
  const deps = table(["dependency", "status", "details"], [
    h("tr", {"data-dep": "redis"}, h("td", {}, "Redis"), h("td", {}, badge(o.redis === "ok" ? "ok" : "degraded", o.redis)), h("td", {})),
    h("tr", {"data-dep": "feature_server"}, h("td", {}, "feature server"), h("td", {}, badge(feat.status === "ok" ? "ok" : "degraded", feat.status)),
      h("td", {}, `${feat.url} · features version ${feat.features_version || "–"}`)),
    h("tr", {"data-dep": "vector_server"}, h("td", {}, `vector server (${vec.mode})`),
      h("td", {}, badge(vec.status === "ok" ? "ok" : (vec.status.startsWith("not used") ? "skipped" : "degraded"), vec.status)),
      h("td", {}, [vec.url || "in-process", " · loaded: ", Object.entries(vec.channels || {}).map(([n, b]) => `${n} ${b.version} (${b.n_indexed} vectors)`).join(", ") || "–",
        Object.keys(vec.not_loaded || {}).length ? ` · not loaded: ${JSON.stringify(vec.not_loaded)}` : ""])),
  ], {id: "dependencies"});

  const rows = o.channels.map((c) => {
    const s = c.serving || {};
    const fit = c.nightly.fit, pub = c.nightly.publish;
    const counts = Object.entries(c.counts || {}).map(([k, v]) => `${k} ${fmtNum(v)}`).join(", ");
    const cls = statusClass(c.status);
    return h("tr", {"data-channel": c.name, "data-status": cls, class: cls === "degraded" ? "changed" : null},
      h("td", {}, h("strong", {}, c.name), h("div", {class: "muted small"}, `${c.kind} · ${c.model}${c.publisher !== c.name ? ` (from ${c.publisher})` : ""}`)),
      h("td", {}, badge(c.status)),
      h("td", {class: "small"}, c.version || "–", h("div", {class: "muted"}, fmtTs(c.published_at))),
      h("td", {class: "small"}, counts || "–", h("div", {class: "muted"}, c.artifacts ? `${fmtBytes(c.artifacts.bytes)} in ${c.artifacts.files} files` : "artifact dir not on this machine")),
      h("td", {class: "small"}, fit ? `fit ${fit.status} ${fmtNum(fit.seconds)} s` : "–", h("br"), pub ? `publish ${pub.status} ${fmtNum(pub.seconds)} s` : "",
        fit && fit.error ? h("div", {class: "muted"}, fit.error) : null, pub && pub.error ? h("div", {class: "muted"}, pub.error) : null),
      h("td", {class: "num", "data-metric": "requests"}, fmtNum(s.requests)),
      h("td", {class: "num", "data-metric": "errors"}, fmtNum(s.errors)),
      h("td", {class: "num", "data-metric": "timeouts"}, fmtNum(s.timeouts)),
      h("td", {class: "num", "data-metric": "empty"}, fmtNum(s.empty)),
      h("td", {class: "num", "data-metric": "p50"}, fmtNum(s.p50_ms)),
      h("td", {class: "num", "data-metric": "p99"}, fmtNum(s.p99_ms)),
      h("td", {class: "num"}, fmtNum(s.mean_candidates, 1)));
  });
  const channels = table(["channel", "serving status", "version · published", "artifacts", "last nightly",
    {label: "requests", num: true}, {label: "errors", num: true}, {label: "timeouts", num: true}, {label: "empty", num: true},
    {label: "p50 ms", num: true}, {label: "p99 ms", num: true}, {label: "mean cand.", num: true}], rows, {id: "channels"});

  const degraded = o.channels.filter((c) => statusClass(c.status) !== "ok");
  const parts = [h("h1", {}, "Overview")];
  if (degraded.length) parts.push(message("warn", `Degraded channels: ${degraded.map((c) => `${c.name} (${c.status})`).join("; ")}`, "degraded"));
  parts.push(section("Services", "services-block", deps,
    h("p", {class: "muted small"}, `id maps: ${fmtNum(o.items_in_id_map)} items, ${fmtNum(o.users_in_id_map)} users · features version ${o.features.version || "–"} published ${fmtTs(o.features.published_at)}`)));
  parts.push(section("Channels", "channels-block", channels,
    h("p", {class: "muted small"}, "Serving columns: this recall server process (all its workers) since it started; p50/p99 from the Prometheus histogram buckets.")));
  parts.push(nightlySection(o.nightly));
  parts.push(evaluationSection(o.evaluation, o.evaluation_plot));
  render(...parts);
}

function nightlySection(n) {
  if (!n) return section("Last nightly run", "nightly", message("info", "No nightly run summary found under ARTIFACTS_DIR/runs/ on this machine.", "no-nightly"));
  const stages = table(["stage", "status", {label: "seconds", num: true}, {label: "peak RSS MB", num: true}, "error"],
    (n.stages || []).map((s) => h("tr", {"data-stage": s.stage}, h("td", {}, s.stage), h("td", {}, badge(s.status === "ok" ? "ok" : "degraded", s.status)),
      h("td", {class: "num"}, fmtNum(s.seconds)), h("td", {class: "num"}, fmtNum(s.peak_rss_mb, 0)), h("td", {class: "small"}, s.error || ""))), {id: "nightly-stages"});
  return section("Last nightly run", "nightly",
    h("p", {}, badge(n.status === "ok" ? "ok" : "degraded", n.status), ` run ${n.run_id} started ${n.started_at} · ${fmtNum(n.seconds)} s · peak RSS ${fmtNum(n.peak_rss_mb, 0)} MB · data ${n.data}`),
    h("p", {class: "small"}, "counts: ", attrChips(n.counts)),
    stages, h("p", {class: "muted small"}, n.path));
}

function evaluationSection(e, plot) {
  if (!e) return section("Offline evaluation", "evaluation", message("info", "No evaluation report found under EVAL_DIR (run `python -m trainer evaluate --out var/eval/...`).", "no-evaluation"));
  const cols = e.columns;
  const rows = e.rows.map((r) => h("tr", {"data-row": r.name}, h("td", {}, r.name === "merged" ? h("strong", {}, "merged") : r.name), h("td", {}, r.kind || ""),
    cols.map((c) => h("td", {class: "num"}, fmtNum(r[c])))));
  return section("Offline evaluation", "evaluation",
    h("p", {}, `${e.dataset} · ${fmtNum(e.n_eval_users)} evaluated users · catalogue ${fmtNum(e.catalog_size)} · ${e.protocol || ""}`),
    table(["row", "kind", ...cols.map((c) => ({label: c, num: true}))], rows, {id: "evaluation-table"}),
    plot ? h("img", {id: "eval-plot", src: plot, alt: "HR@K of every channel and the merged answer"}) : h("p", {class: "muted"}, "no HR@K plot in the report directory"),
    h("p", {class: "muted small"}, e.path));
}

// -- user ----------------------------------------------------------------------------------------------------
let lastAnswer = null;  // the previous answer's item ids on this user page (to show what a click changed)

async function showUser(userId, note) {
  document.title = `User ${userId} · multirecall inspector`;
  document.getElementById("user-search-input").value = userId;
  const k = new URLSearchParams(location.search).get("k");
  const res = await getJSON(`/ui/api/users/${enc(userId)}${k ? `?k=${enc(k)}` : ""}`);
  if (!res.ok) {
    render(h("h1", {}, "User ", h("code", {}, userId)), message("error", `Cannot show user ${JSON.stringify(userId)}: ${detailText(res)}`, "error"));
    return;
  }
  const u = res.body;
  const items = u.items || {};
  const answerIds = u.recall.items.map((x) => x.item_id);
  const inAnswer = new Set(answerIds);
  const before = note && lastAnswer ? lastAnswer : null;
  lastAnswer = answerIds;
  const parts = [h("h1", {}, "User ", h("code", {id: "user-id"}, u.user_id))];
  if (u.message) parts.push(message("warn", u.message, "user-message"));
  const degraded = Object.entries(u.degraded || {});
  if (degraded.length) parts.push(message("warn", `Degraded channels: ${degraded.map(([n, d]) => `${n} (${d})`).join("; ")}`, "degraded"));
  if (note) parts.push(note);
  if (before) parts.push(answerDiff(before, answerIds));

  parts.push(section("Features", "features", kvTable(u.features, "features-table")));
  const recentRows = u.recent.map((r) => {
    const it = items[r.item_id];
    return h("tr", {"data-item-id": r.item_id, "data-realtime": r.realtime ? "true" : "false", class: r.realtime ? "realtime" : null},
      h("td", {class: "small"}, fmtTs(r.ts)), h("td", {}, itemLink(r.item_id)), h("td", {}, it ? fmtValue(it.category) : "–"),
      h("td", {class: "small"}, it ? attrChips(it.attrs) : h("span", {class: "muted"}, "no item record")),
      h("td", {}, r.realtime ? h("span", {class: "badge realtime"}, "real-time") : h("span", {class: "muted small"}, "batch")));
  });
  parts.push(section(`Recent clicks (${u.recent.length}, newest first)`, "recent",
    u.recent.length ? h("div", {class: "scroll"}, table(["when", "item", "category", "attributes", "source"], recentRows, {id: "recent-table"}))
      : h("p", {class: "muted"}, "no clicks")));

  const clickInput = h("input", {id: "click-item", name: "item_id", value: answerIds[0] || "", required: true, placeholder: "item id"});
  const clickButton = h("button", {type: "submit", id: "click-button"}, "Post a click");
  const clickForm = h("form", {class: "inline", id: "click-form", onsubmit: async (ev) => {
    ev.preventDefault();
    clickButton.disabled = true;
    const item = clickInput.value.trim();
    const r = await getJSON("/ui/api/clicks", {method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify({user_id: u.user_id, item_id: item})});
    clickButton.disabled = false;
    if (!r.ok) {
      document.getElementById("click-result").replaceChildren(message("error", `Click not posted: ${detailText(r)}`, "click-error"));
      return;
    }
    await showUser(u.user_id, message("info", `Posted a click on ${item} for ${u.user_id} to ${r.body.feature_server} (accepted: ${r.body.accepted}); the answer below is the new one.`, "click-result-message"));
  }}, h("label", {}, "Item ", clickInput), clickButton);
  parts.push(section("Post a click", "click", h("p", {class: "muted small"},
    "Sends {user_id, item_id} through the recall server (POST /ui/api/clicks) to the feature server's POST /events; the next answer sees it."),
    clickForm, h("div", {id: "click-result"})));

  const mergedRows = u.recall.items.map((x, i) => h("tr", {"data-item-id": x.item_id, "data-channels": JSON.stringify(x.channels)},
    h("td", {class: "num"}, i + 1), h("td", {}, itemLink(x.item_id)), h("td", {}, items[x.item_id] ? fmtValue(items[x.item_id].category) : "–"),
    h("td", {class: "num"}, fmtNum(x.score, 5)),
    h("td", {class: "chips"}, Object.entries(x.channels).map(([c, r]) => h("span", {"data-channel": c, "data-rank": r}, `${c} #${r}`)))));
  parts.push(section(`/recall answer (k=${u.k}${u.recall.cold_start ? ", cold start" : ""})`, "answer",
    h("p", {class: "muted small"}, h("a", {href: `/recall?user_id=${enc(u.user_id)}&k=${u.k}&explain=true`}, "the same answer as JSON"),
      ` · versions: ${Object.entries(u.recall.versions).map(([c, v]) => `${c} ${v || "–"}`).join(", ")}`),
    answerIds.length ? table([{label: "#", num: true}, "item", "category", {label: "score", num: true}, "channels (rank in each)"], mergedRows, {id: "merged"})
      : h("p", {class: "muted", id: "merged-empty"}, "no candidates")));

  const cols = u.columns.map((c) => {
    const cls = statusClass(c.status);
    return h("section", {class: `channel ${cls}`, "data-channel": c.channel, "data-status": c.status},
      h("h3", {}, c.channel, " ", badge(c.status)),
      h("div", {class: "meta"}, `${c.kind} · ${c.count} candidates · ${fmtNum(c.latency_ms)} ms · weight ${c.weight} · quota ${c.quota}`),
      c.detail ? h("div", {class: "meta detail"}, c.detail) : null,
      h("div", {class: "meta"}, `version ${c.version || "–"}`),
      h("ol", {}, c.items.map((x, i) => h("li", {"data-item-id": x.item_id, "data-rank": i + 1, class: inAnswer.has(x.item_id) ? "in-answer" : null},
        itemLink(x.item_id), h("span", {class: "muted small"}, ` ${fmtNum(x.score, 4)}`)))));
  });
  parts.push(section("Every channel's own list", "channel-columns", h("p", {class: "muted small"},
    "What each channel returned in this very request (highlighted: items in the merged answer)."), h("div", {class: "columns"}, cols)));

  const ov = u.overlap;
  parts.push(section("Overlap between channels (items in both lists)", "overlap",
    table(["", ...ov.channels], ov.matrix.map((row, i) => h("tr", {"data-channel": ov.channels[i]}, h("th", {}, ov.channels[i]),
      row.map((n, j) => h("td", {"data-with": ov.channels[j]}, n)))), {class: "overlap", id: "overlap-table"})));
  render(...parts);
}

function answerDiff(before, after) {
  const b = new Set(before), a = new Set(after);
  const entered = after.filter((x) => !b.has(x)), left = before.filter((x) => !a.has(x));
  const moved = after.filter((x, i) => b.has(x) && before.indexOf(x) !== i).length;
  return message("info", `The answer changed: ${entered.length} items entered (${entered.slice(0, 10).join(", ")}${entered.length > 10 ? ", …" : ""}), `
    + `${left.length} left (${left.slice(0, 10).join(", ")}${left.length > 10 ? ", …" : ""}), ${moved} moved.`, "answer-diff");
}

// -- item ----------------------------------------------------------------------------------------------------
async function showItem(itemId) {
  document.title = `Item ${itemId} · multirecall inspector`;
  document.getElementById("item-search-input").value = itemId;
  const res = await getJSON(`/ui/api/items/${enc(itemId)}`);
  if (!res.ok) {
    render(h("h1", {}, "Item ", h("code", {}, itemId)), message("error", `Cannot show item ${JSON.stringify(itemId)}: ${detailText(res)}`, "error"));
    return;
  }
  const it = res.body;
  const items = it.items || {};
  const f = it.features || {};
  const parts = [h("h1", {}, "Item ", h("code", {id: "item-id"}, it.item_id), it.cold_start ? h("span", {class: "badge degraded", id: "cold-badge"}, "cold start") : null)];
  for (const n of it.notes) parts.push(message("info", n, "item-note"));
  parts.push(section("Attributes", "item-features", kvTable({category: f.category, created: fmtTs(f.created_ts), ...(f.attrs || {}),
    registered: f.registered ? "yes (POST /items)" : "no", "internal index": it.index}, "item-table")));
  const p = it.popularity;
  parts.push(section("Popularity", "popularity", kvTable({"clicks (batch + real-time)": p.clicks, "real-time clicks": p.realtime_clicks,
    "clicks in the published features": p.batch_clicks,
    ...(p.popular_channel ? {[`rank in ${p.popular_channel}'s global list`]: p.popular_rank === null ? `not in its top ${p.popular_list_length}` : p.popular_rank} : {})}, "popularity-table")));
  const cols = it.neighbours.map((c) => h("section", {class: `channel ${statusClass(c.status)}`, "data-channel": c.channel, "data-status": c.status},
    h("h3", {}, c.channel, " ", badge(c.status)),
    h("div", {class: "meta"}, `${c.model || ""} · version ${c.version || "–"} · ${c.items.length} neighbours`),
    c.detail ? h("div", {class: "meta detail"}, c.detail) : null,
    c.vector_source ? h("div", {class: "meta vector-source", "data-testid": "vector-source"}, `vector: ${c.vector_source}`) : null,
    h("ol", {}, c.items.map((x, i) => h("li", {"data-item-id": x.item_id, "data-rank": i + 1}, itemLink(x.item_id),
      h("span", {class: "muted small"}, ` ${fmtNum(x.score, 4)}${items[x.item_id] ? ` · ${fmtValue(items[x.item_id].category)}` : ""}`))))));
  parts.push(section("Neighbours in every i2i channel", "neighbours",
    cols.length ? h("div", {class: "columns"}, cols) : h("p", {class: "muted"}, "no i2i channel is enabled")));
  render(...parts);
}

// -- routing -------------------------------------------------------------------------------------------------
function safeDecode(s) {
  try { return decodeURIComponent(s); } catch (err) { return null; }
}

async function route() {
  const path = location.pathname;
  const params = new URLSearchParams(location.search);
  let m = path.match(/^\/ui\/users\/(.*)$/);
  if (m) {
    const id = safeDecode(m[1]);
    if (id === null) { render(h("h1", {}, "User"), message("error", `Not a valid address: ${path}`, "error")); return; }
    if (!id) { render(h("h1", {}, "User"), message("error", "Enter a user id in the search box.", "error")); return; }
    return showUser(id);
  }
  m = path.match(/^\/ui\/items\/(.*)$/);
  if (m) {
    const id = safeDecode(m[1]);
    if (id === null) { render(h("h1", {}, "Item"), message("error", `Not a valid address: ${path}`, "error")); return; }
    if (!id) { render(h("h1", {}, "Item"), message("error", "Enter an item id in the search box.", "error")); return; }
    return showItem(id);
  }
  if (params.get("user_id")) { location.replace(userHref(params.get("user_id"))); return; }
  if (params.get("item_id")) { location.replace(itemHref(params.get("item_id"))); return; }
  return showOverview();
}

document.getElementById("user-search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = document.getElementById("user-search-input").value.trim();
  if (id) location.assign(userHref(id));
});
document.getElementById("item-search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = document.getElementById("item-search-input").value.trim();
  if (id) location.assign(itemHref(id));
});

route().catch((err) => render(message("error", `The page failed: ${err}`, "error")))
  .finally(() => document.body.setAttribute("data-ready", "true"));
