// kvlens dashboard: reads the same /_kvlens/api/... JSON as the CLI and draws it.
//
// Views are hash routes: #/requests (live table), #/request/ID (detail), #/conversations,
// #/conversation/KEY. The live views poll the API once a second while "live" is checked.
// Every text that comes from a record (prompts, outputs, session names, error messages) is
// inserted as a text node by h()/svg() below, never parsed as HTML; the page's
// Content-Security-Policy (script-src 'self') is the second line of defence.

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (selector) => document.querySelector(selector);

// ---- DOM helpers: children that are not Nodes become text nodes --------------------------------

function build(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (typeof value === "function") el.addEventListener(key.replace(/^on/, ""), value);
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
const svg = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);
const cls = (...names) => names.filter(Boolean).join(" ") || null;
const setContent = (el, ...children) => { el.replaceChildren(); return build(el, null, children); };

// ---- formatting ----------------------------------------------------------------------------------

const dash = "–";
const isNum = (x) => typeof x === "number" && Number.isFinite(x);
const int = (x) => (isNum(x) ? Math.round(x).toLocaleString("en-US") : dash);
const fixed = (x, digits = 1) => (isNum(x) ? x.toFixed(digits) : dash);
const pct = (x) => (isNum(x) ? `${(x * 100).toFixed(0)}%` : dash);
const secs = (x) => (isNum(x) ? (x >= 10 ? x.toFixed(1) : x.toFixed(2)) : dash);
const clock = (t) => (isNum(t) ? new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false }) : dash);
const stamp = (t) => (isNum(t) ? new Date(t * 1000).toISOString() : "");
const shortId = (id) => String(id || "").slice(0, 8);
const requestHref = (id) => `#/request/${encodeURIComponent(id)}`;
const conversationHref = (key) => `#/conversation/${encodeURIComponent(key)}`;

function topCause(a) {
  const first = (a && Array.isArray(a.causes) && a.causes[0]) || null;
  return first && first.code ? first : null;
}
const promptTokens = (r) => (r.analysis || {}).prompt_tokens ?? r.prompt_tokens;
const cachedUpstream = (r) => (r.analysis || {}).cached_upstream ?? r.cached_tokens;
const isFailed = (r) => Boolean(r.error) || (isNum(r.status) && r.status >= 400);
const isSide = (r) => { const k = (r.analysis || {}).kind; return Boolean(k) && k !== "main"; };
function reuse(r) {
  const p = promptTokens(r), c = cachedUpstream(r);
  return isNum(p) && p > 0 && isNum(c) ? c / p : null;
}

// ---- API -----------------------------------------------------------------------------------------

// With security.api_token set, the page is opened as /_kvlens/?token=...: every API call carries it on.
const TOKEN = new URLSearchParams(location.search).get("token");

async function getJSON(path, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== "") query.set(k, v);
  if (TOKEN) query.set("token", TOKEN);
  const url = query.toString() ? `${path}?${query}` : path;
  const response = await fetch(url, { headers: { accept: "application/json" } });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error((body && body.error && body.error.message) || `${url}: HTTP ${response.status}`);
  return body;
}

// ---- state, routing and the poll loop ------------------------------------------------------------

const state = {
  filters: { session: "", model: "", cause: "" },
  seen: { session: new Set(), conversation: new Set(), model: new Set(), cause: new Map() },
  known: new Set(), // ids already shown, so new rows can be marked as they arrive
  primed: false,
  refresh: null, // the current view's poll function, if it is a live view
  busy: false,
};

const VIEWS = ["requests", "request", "conversations", "conversation"];

function route() {
  const [, name = "requests", arg = ""] = location.hash.split("/");
  const view = VIEWS.includes(name) ? name : "requests";
  for (const v of VIEWS) $(`#view-${v}`).hidden = v !== view;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.id === `nav-${view.replace(/^(request|conversation)$/, "$1s")}`);
  }
  const key = decodeURIComponent(arg);
  state.refresh = { requests: refreshRequests, conversations: refreshConversations,
    conversation: () => refreshConversation(key) }[view] || null;
  if (view === "request") show(renderRequest(key));
  else tick(true);
}

async function tick(force = false) {
  if (!state.refresh || state.busy) return;
  if (!force && (!$("#live").checked || document.hidden)) return;
  state.busy = true;
  try {
    await state.refresh();
    $("#poll-status").textContent = `updated ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`;
    $("#poll-status").classList.remove("bad");
  } catch (error) {
    $("#poll-status").textContent = `API error: ${error.message}`;
    $("#poll-status").classList.add("bad");
  } finally {
    state.busy = false;
  }
}

async function show(promise) {
  try {
    await promise;
  } catch (error) {
    $("#poll-status").textContent = `API error: ${error.message}`;
    $("#poll-status").classList.add("bad");
  }
}

async function refreshTotals() {
  try {
    const t = await getJSON("api/stats");
    setContent($("#totals"),
      `${int(t.requests)} requests · ${int(t.conversations)} conversations · reuse ${pct(t.reuse)} · `,
      h("strong", {}, `${secs(t.lost_seconds)} s lost`),
      ` · ${int(t.errors)} errors`,
    );
    for (const code of Object.keys(t.requests_by_cause || {})) if (!state.seen.cause.has(code)) state.seen.cause.set(code, "");
  } catch {
    $("#totals").replaceChildren(); // totals are a convenience; the table still works without them
  }
}

// ---- requests table ------------------------------------------------------------------------------

function filterParams() {
  const { session, model, cause } = state.filters;
  const params = { limit: 200, model, cause };
  if (session.startsWith("session:")) params.session = session.slice(8);
  if (session.startsWith("conversation:")) params.conversation = session.slice(13);
  return params;
}

async function refreshRequests() {
  const [{ requests }] = await Promise.all([getJSON("api/requests", filterParams()), refreshTotals()]);
  learn(requests);
  fillFilters();
  $("#requests tbody").replaceChildren(...requests.map(requestRow));
  $("#empty").hidden = requests.length > 0;
  $("#count").textContent = `${requests.length} shown`;
  for (const r of requests) state.known.add(r.id);
  state.primed = true;
}

function learn(requests) {
  for (const r of requests) {
    const a = r.analysis || {};
    if (r.session) state.seen.session.add(r.session);
    if (a.conversation) state.seen.conversation.add(a.conversation);
    if (r.model) state.seen.model.add(r.model);
    const cause = topCause(a);
    if (cause) state.seen.cause.set(cause.code, cause.summary || "");
  }
}

function fillFilters() {
  const sorted = (values) => [...values].sort();
  const options = (values, prefix = "") => sorted(values).map((v) => h("option", { value: prefix + v }, v));
  const fill = (select, children, current) => {
    const signature = children.map((o) => (o.tagName === "OPTGROUP" ? [...o.children].map((c) => c.value) : o.value)).join("\n");
    if (select.dataset.signature === signature) return;
    select.dataset.signature = signature;
    select.replaceChildren(h("option", { value: "" }, "all"), ...children);
    select.value = current;
  };
  const groups = [];
  if (state.seen.session.size) groups.push(h("optgroup", { label: "session header" }, options(state.seen.session, "session:")));
  if (state.seen.conversation.size) {
    groups.push(h("optgroup", { label: "conversation" }, options(state.seen.conversation, "conversation:")));
  }
  fill($("#f-session"), groups, state.filters.session);
  fill($("#f-model"), options(state.seen.model), state.filters.model);
  const causes = sorted(state.seen.cause.keys()).map((code) => h("option", { value: code, title: state.seen.cause.get(code) }, code));
  fill($("#f-cause"), causes, state.filters.cause);
}

function requestRow(r) {
  const a = r.analysis || {};
  const cause = topCause(a);
  const lost = a.lost_seconds;
  const num = (text, extra) => h("td", { class: cls("num", extra) }, text);
  const tr = h("tr", {
    class: cls(isFailed(r) && "failed", isSide(r) && "side", state.primed && !state.known.has(r.id) && "fresh"),
    "data-id": r.id, tabindex: 0, title: `request ${r.id}`,
    onclick: () => { location.hash = requestHref(r.id); },
    onkeydown: (event) => { if (event.key === "Enter") location.hash = requestHref(r.id); },
  },
    h("td", { title: stamp(r.started_at) }, clock(r.started_at)),
    h("td", { class: "text" }, r.session ?? (a.conversation ? h("span", { class: "muted" }, a.conversation) : dash)),
    h("td", { class: "text" }, r.model ?? dash, isSide(r) ? h("span", { class: "tag" }, a.kind) : null),
    h("td", { class: "status", title: r.error ? r.error.message : null },
      r.status ?? dash, r.error ? h("span", { class: "tag bad" }, r.error.kind) : null),
    num(int(promptTokens(r))),
    num(`${int(cachedUpstream(r))} / ${int(a.cached_expected)}`),
    num(pct(reuse(r))),
    num(secs(lost), isNum(lost) && lost >= 0.05 && "lost"),
    num(int(r.ttft_ms)),
    num(fixed(r.prompt_tps)),
    num(fixed(r.gen_tps)),
    h("td", { title: cause ? cause.summary : null }, cause ? h("span", { class: "cause" }, cause.code) : ""),
  );
  return tr;
}

// ---- request detail ------------------------------------------------------------------------------

async function renderRequest(id) {
  const view = $("#view-request");
  setContent(view, h("p", { class: "muted" }, "loading…"));
  const r = await getJSON(`api/requests/${encodeURIComponent(id)}`);
  const a = r.analysis || {};
  const diffBox = h("div", { id: "diff" });
  setContent(view,
    h("p", {}, h("a", { href: "#/requests" }, "← requests"),
      a.conversation ? [" · ", h("a", { href: conversationHref(a.conversation) }, "conversation")] : null),
    h("h2", {}, `${r.method} ${r.path} `, h("span", { class: "muted mono" }, r.id)),
    pairs([
      ["started", stamp(r.started_at)], ["session", r.session], ["model", r.model],
      ["status", r.status], ["stream", r.stream], ["finish", r.finish_reason],
      ["prompt tokens", r.prompt_tokens], ["completion tokens", r.completion_tokens],
    ]),
    r.error ? h("p", { class: "error-box" }, h("strong", {}, r.error.kind), ": ", r.error.message) : null,
    findings((r.metadata || {}).findings),
    section("Timeline", timeline(r), upstreamTimings(r.upstream_timings)),
    section("Cache analysis", (r.metadata || {}).analysis_pending && !r.analysis
      ? h("p", { class: "muted" }, "Waiting for analysis (reload in a moment; if kvlens was killed meanwhile, it never came).")
      : analysisNumbers(a)),
    section("Divergence", divergence(a.divergence, a)),
    section("Causes", causes(a.causes)),
    section("Diff against the predecessor", diffBox),
    section("Texts", texts(r)),
  );
  if (a.predecessor_id) {
    diffBox.append(h("p", { class: "muted" }, "loading…"));
    getJSON("api/diff", { a: a.predecessor_id, b: r.id })
      .then((d) => setContent(diffBox, diffTable(d.rows, a.predecessor_id, r.id)))
      .catch((error) => setContent(diffBox, h("p", { class: "muted" }, `no diff: ${error.message}`)));
  } else {
    diffBox.append(h("p", { class: "muted" }, "No predecessor in this conversation."));
  }
}

const section = (title, ...body) => h("section", { class: "panel" }, h("h3", {}, title), body);

function pairs(entries) {
  return h("dl", { class: "pairs" }, entries.filter(([, v]) => v != null && v !== "").map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, v instanceof Node ? v : typeof v !== "number" ? String(v) : Number.isInteger(v) ? int(v) : fixed(v, 4))]));
}

function timeline(r) {
  const marks = [["received", 0], ["upstream headers", r.t_upstream_headers_ms], ["first byte", r.t_first_byte_ms],
    ["first token", r.t_first_token_ms], ["done", r.t_done_ms]].filter(([, t]) => isNum(t));
  const end = Math.max(...marks.map(([, t]) => t), 1);
  const W = 760, left = 10, right = 10, y = 34, x = (t) => left + (t / end) * (W - left - right);
  const chart = svg("svg", { class: "timeline", viewBox: `0 0 ${W} 78`, role: "img", "aria-label": "request timeline" });
  for (let i = 1; i < marks.length; i++) {
    const [name, t] = marks[i], t0 = marks[i - 1][1];
    chart.append(svg("rect", { class: `seg seg-${name.replace(/ /g, "-")}`, x: x(t0), y, height: 12,
      width: Math.max(1, x(t) - x(t0)) }, svg("title", {}, `${marks[i - 1][0]} → ${name}: ${int(t - t0)} ms`)));
  }
  marks.forEach(([name, t], i) => {
    const above = i % 2 === 0, anchor = x(t) < 90 ? "start" : x(t) > W - 90 ? "end" : "middle";
    chart.append(svg("line", { class: "tick", x1: x(t), x2: x(t), y1: above ? 22 : y, y2: above ? y + 12 : 58 }),
      svg("text", { x: x(t), y: above ? 16 : 72, "text-anchor": anchor }, `${name} ${int(t)} ms`));
  });
  return chart;
}

function upstreamTimings(t) {
  if (!t) return null;
  const keys = ["cache_n", "prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"];
  return h("p", { class: "muted" }, "upstream timings: ",
    keys.filter((k) => t[k] != null).map((k) => `${k} ${isNum(t[k]) && !Number.isInteger(t[k]) ? fixed(t[k], 2) : t[k]}`).join(" · "));
}

function analysisNumbers(a) {
  if (!a || !Object.keys(a).length) return h("p", { class: "muted" }, "Not analysed (not a chat/completion request, or analysis is off).");
  const idLink = (id) => (id ? h("a", { href: requestHref(id), class: "mono" }, shortId(id)) : null);
  const p = a.prediction || {};
  return [
    a.error ? h("p", { class: "error-box" }, a.error) : null,
    pairs([
      ["prompt tokens", a.prompt_tokens != null ? `${int(a.prompt_tokens)} (${a.tokens_source || "?"})` : null],
      ["conversation", a.conversation], ["kind", a.kind], ["predecessor", idLink(a.predecessor_id)],
      ["best match", idLink(a.best_match_id)], ["common prefix", a.common_prefix], ["best prefix", a.best_prefix],
      ["sim", a.sim], ["f_keep", a.f_keep], ["cached (upstream)", a.cached_upstream],
      ["cached (expected)", a.cached_expected], ["reusable", a.reusable_tokens], ["lost tokens", a.lost_tokens],
      ["lost seconds", isNum(a.lost_seconds) ? secs(a.lost_seconds) : null],
      ["predicted slot", p.slot], ["slot selection", p.selection], ["loaded from RAM", p.ram_loaded],
      ["checkpoint restored", p.checkpoint_restored], ["full re-processing forced", p.full_reprocess_forced],
      ["tokens error", a.tokens_error],
    ]),
  ];
}

function divergence(d, a) {
  if (!d) {
    return h("p", { class: "muted" }, a && a.predecessor_id ? "None found: the prompt extends its predecessor." : "Nothing to compare with.");
  }
  const before = String(d.before ?? ""), after = String(d.after ?? "");
  let lcp = 0;
  while (lcp < before.length && lcp < after.length && before[lcp] === after[lcp]) lcp++;
  // Both snippets start up to 60 chars before the divergence point: mark from there, minus a common tail.
  const at = Math.min(60, isNum(d.char_offset) ? d.char_offset : lcp, lcp);
  let tail = 0;
  while (tail < Math.min(before.length, after.length) - at && before[before.length - 1 - tail] === after[after.length - 1 - tail]) tail++;
  const snippet = (text, label) => h("div", { class: "snippet-row" }, h("span", { class: "snippet-label" }, label),
    h("pre", { class: "snippet" }, text.slice(0, at),
      h("mark", { class: cls("hl", text.length - tail === at && "empty") }, text.slice(at, text.length - tail)),
      text.slice(text.length - tail)));
  const where = [d.level && `${d.level} level`, d.message_index != null && `message ${d.message_index}`,
    d.role && `(${d.role})`, d.field && `field ${d.field}`, d.char_offset != null && `char ${d.char_offset}`,
    d.token_offset != null && `token ${d.token_offset}`].filter(Boolean).join(" · ");
  return [h("p", {}, where), snippet(before, "before"), snippet(after, "after")];
}

// Upstream failures flagged on the record (proxy/findings.py): upstream_died, kv_exhausted, ...
function findings(list) {
  if (!Array.isArray(list) || !list.length) return null;
  return section("Findings", h("ul", { class: "causes findings" }, list.map((f) => h("li", {},
    h("span", { class: "cause finding" }, String(f.code)), " ", f.summary || "",
    f.fix ? h("div", { class: "fix" }, h("strong", {}, "Fix: "), f.fix) : null))));
}

function causes(list) {
  if (!Array.isArray(list) || !list.length) return h("p", { class: "muted" }, "No cause reported.");
  return h("ul", { class: "causes" }, list.map((c) => h("li", {},
    h("span", { class: "cause" }, c.code), " ", c.summary || "",
    c.fix ? h("div", { class: "fix" }, h("strong", {}, "Fix: "), c.fix) : null)));
}

function diffTable(rows, idA, idB) {
  const grid = h("div", { class: "diff" },
    h("div", { class: "diff-head" }, "predecessor ", h("a", { href: requestHref(idA), class: "mono" }, shortId(idA))),
    h("div", { class: "diff-head" }, "this request ", h("span", { class: "mono" }, shortId(idB))));
  const STATUS = { "=": "same", "~": "changed", "+": "added", "-": "removed" };
  // One side of a row: an added item is absent on the left, a removed one on the right.
  const cell = (row, side) => {
    const present = row.status !== (side === "a" ? "+" : "-");
    const detail = row.status !== "~" && row.detail ? h("span", { class: "diff-detail" }, row.detail) : null;
    return h("div", { class: cls("diff-cell", `st-${STATUS[row.status]}`, !present && "absent") },
      present ? [h("span", { class: "diff-what" }, `${row.status} ${row.what}`), detail] : null);
  };
  let same = [];
  const flush = () => {
    if (same.length > 2) {
      grid.append(h("details", { class: "diff-fold" }, h("summary", {}, `${same.length} unchanged`),
        h("div", { class: "diff" }, same.map((row) => [cell(row, "a"), cell(row, "b")]))));
    } else for (const row of same) grid.append(cell(row, "a"), cell(row, "b"));
    same = [];
  };
  for (const row of rows) {
    if (row.status === "=") { same.push(row); continue; }
    flush();
    grid.append(cell(row, "a"), cell(row, "b"));
    if (row.status === "~" && row.detail) grid.append(h("div", { class: "diff-change" }, row.detail));
  }
  flush();
  return rows.length ? grid : h("p", { class: "muted" }, "The bodies are identical.");
}

function texts(r) {
  const fold = (label, text, open = false) => {
    if (text == null || text === "") return null;
    return h("details", { class: "fold", open: open || null },
      h("summary", {}, `${label} · ${int(String(text).length)} chars`), h("pre", {}, String(text)));
  };
  let body = null;
  try { body = JSON.parse(r.request_body || ""); } catch { /* truncated or not JSON: shown raw below */ }
  const messages = body && Array.isArray(body.messages) ? body.messages : [];
  const content = (m) => (typeof m.content === "string" ? m.content
    : JSON.stringify(m.content ?? m.tool_calls ?? null, null, 2));
  const message = (m, i) => fold(`[${i}] ${m.role ?? "?"}`, content(m), content(m).length < 300); // short ones open
  return [
    messages.length ? h("div", { class: "messages" }, messages.map(message)) : null,
    body && Array.isArray(body.tools) ? fold(`tools (${body.tools.length})`, JSON.stringify(body.tools, null, 2)) : null,
    fold("reasoning", r.output_reasoning), fold("output", r.output_text, true),
    fold("request body", body ? JSON.stringify(body, null, 2) : r.request_body),
    fold("response body", r.response_body),
    fold("request headers", JSON.stringify(r.request_headers || {}, null, 2)),
  ];
}

// ---- conversations -------------------------------------------------------------------------------

async function refreshConversations() {
  const [{ sessions }] = await Promise.all([getJSON("api/sessions", { limit: 200 }), refreshTotals()]);
  const byCause = {};
  for (const s of sessions) for (const [code, v] of Object.entries(s.lost_seconds_by_cause || {})) byCause[code] = (byCause[code] || 0) + v;
  setContent($("#view-conversations"),
    section("Lost seconds by cause, all conversations", causeBars(byCause)),
    h("table", { class: "grid", id: "conversations" },
      h("thead", {}, h("tr", {}, ["conversation", "requests", "side", "models", "last", "prompt", "reuse", "lost s", "errors"]
        .map((t, i) => h("th", { class: i && i !== 3 ? "num" : null }, t)))),
      h("tbody", {}, sessions.map((s) => h("tr", {
        tabindex: 0, onclick: () => { location.hash = conversationHref(s.conversation); },
        onkeydown: (event) => { if (event.key === "Enter") location.hash = conversationHref(s.conversation); },
      },
        h("td", { class: "text" }, s.conversation), h("td", { class: "num" }, int(s.requests)),
        h("td", { class: "num" }, int(s.side_requests)), h("td", { class: "text" }, s.models ?? dash),
        h("td", { class: "num", title: stamp(s.last_started_at) }, clock(s.last_started_at)),
        h("td", { class: "num" }, int(s.prompt_tokens)), h("td", { class: "num" }, pct(s.reuse)),
        h("td", { class: "num" }, secs(s.lost_seconds)), h("td", { class: cls("num", s.errors > 0 && "bad") }, int(s.errors)))))),
    sessions.length ? null : h("p", { class: "muted" }, "No analysed conversations yet."),
  );
}

async function refreshConversation(key) {
  const { requests } = await getJSON("api/requests", { conversation: key, limit: 1000 });
  const ordered = [...requests].reverse(); // oldest first, left to right
  const byCause = {};
  for (const r of ordered) {
    const a = r.analysis || {}, code = (topCause(a) || { code: "unknown" }).code;
    if (isNum(a.lost_seconds) && a.lost_seconds > 0) byCause[code] = (byCause[code] || 0) + a.lost_seconds;
  }
  const lost = Object.values(byCause).reduce((x, y) => x + y, 0);
  setContent($("#view-conversation"),
    h("p", {}, h("a", { href: "#/conversations" }, "← conversations")),
    h("h2", {}, "Conversation ", h("span", { class: "mono" }, key)),
    h("p", { class: "muted" }, `${ordered.length} requests · ${ordered.filter(isSide).length} side · ${secs(lost)} s lost`),
    section("Prompt tokens per request: reused vs re-processed", conversationChart(ordered), legend()),
    section("Lost seconds by cause", causeBars(byCause)),
    h("table", { class: "grid" }, $("#requests thead").cloneNode(true), h("tbody", {}, requests.map(requestRow))),
  );
}

function conversationChart(requests) {
  const n = Math.max(requests.length, 1), top = 12, bottom = 26, left = 56, H = 220;
  const bar = Math.max(5, Math.min(28, 900 / n - 3)), step = bar + 3, W = Math.max(320, left + n * step + 10);
  const max = Math.max(1, ...requests.map((r) => promptTokens(r) || 0));
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  const chart = svg("svg", { class: "conv-chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": "prompt tokens per request" },
    svg("line", { class: "axis", x1: left - 4, x2: W, y1: y(0), y2: y(0) }),
    svg("text", { x: left - 8, y: y(max) + 4, "text-anchor": "end" }, int(max)),
    svg("text", { x: left - 8, y: y(0) + 4, "text-anchor": "end" }, "0"));
  requests.forEach((r, i) => {
    const a = r.analysis || {}, prompt = promptTokens(r) || 0;
    const reused = Math.min(prompt, Math.max(0, cachedUpstream(r) || 0)), x = left + i * step, cause = topCause(a);
    const g = svg("g", { class: cls("bar", isSide(r) && "side", isFailed(r) && "failed"), "data-id": r.id,
      onclick: () => { location.hash = requestHref(r.id); } },
      svg("title", {}, `#${i + 1} ${clock(r.started_at)} ${a.kind || ""}\nprompt ${int(prompt)} · reused ${int(reused)}` +
        ` · expected ${int(a.cached_expected)} · lost ${secs(a.lost_seconds)} s${cause ? `\n${cause.code}: ${cause.summary || ""}` : ""}`),
      svg("rect", { class: "hit", x, y: top, width: bar, height: H - top - bottom }),
      svg("rect", { class: "reused", x, y: y(reused), width: bar, height: y(0) - y(reused) }),
      svg("rect", { class: "reprocessed", x, y: y(prompt), width: bar, height: y(reused) - y(prompt) }));
    if (isNum(a.cached_expected)) {
      const ey = y(Math.min(max, a.cached_expected));
      g.append(svg("line", { class: "expected", x1: x - 1, x2: x + bar + 1, y1: ey, y2: ey }));
    }
    if (isSide(r)) g.append(svg("text", { class: "mark", x: x + bar / 2, y: H - 12, "text-anchor": "middle" }, "S"));
    if (isFailed(r)) g.append(svg("text", { class: "mark bad", x: x + bar / 2, y: H - 2, "text-anchor": "middle" }, "✕"));
    chart.append(g);
  });
  return h("div", { class: "chart-scroll" }, chart);
}

function legend() {
  const item = (klass, label) => h("span", { class: "legend-item" }, h("span", { class: `swatch ${klass}` }), label);
  return h("p", { class: "legend" }, item("reused", "reused (cached upstream)"), item("reprocessed", "re-processed"),
    item("expected", "expected reuse"), item("side", "side request (S)"), " ✕ failed");
}

function causeBars(byCause) {
  const entries = Object.entries(byCause).filter(([, v]) => v > 0).sort((p, q) => q[1] - p[1]);
  if (!entries.length) return h("p", { class: "muted" }, "No lost seconds.");
  const W = 760, row = 22, label = 220, max = entries[0][1];
  const chart = svg("svg", { class: "cause-chart", viewBox: `0 0 ${W} ${entries.length * row + 4}`, role: "img", "aria-label": "lost seconds by cause" });
  entries.forEach(([code, v], i) => {
    const w = Math.max(1, (v / max) * (W - label - 80));
    chart.append(svg("text", { x: label - 8, y: i * row + 15, "text-anchor": "end" }, code),
      svg("rect", { class: "lostbar", x: label, y: i * row + 4, width: w, height: row - 8 }),
      svg("text", { x: label + w + 6, y: i * row + 15 }, `${secs(v)} s`));
  });
  return chart;
}

// ---- start ---------------------------------------------------------------------------------------

function onFilter(name, select) {
  select.addEventListener("change", () => { state.filters[name] = select.value; tick(true); });
}
onFilter("session", $("#f-session"));
onFilter("model", $("#f-model"));
onFilter("cause", $("#f-cause"));
$("#f-clear").addEventListener("click", () => {
  state.filters = { session: "", model: "", cause: "" };
  for (const id of ["#f-session", "#f-model", "#f-cause"]) $(id).value = "";
  tick(true);
});
$("#live").addEventListener("change", () => tick(true));
window.addEventListener("hashchange", route);
setInterval(tick, POLL_MS);
route();
