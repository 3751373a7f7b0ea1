// Arc Fabric explorer: a single page over the arcfab service API (/api/...).
// Plain ES module + the vendored D3 v7 (loaded before this module as a classic script,
// so it is the global `d3`). No build step, no network beyond the page's own server.

const d3 = window.d3;
const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const fmt = (v, spec = ".4~g") => (typeof v === "number" && Number.isFinite(v) ? d3.format(spec)(v) : "\u2014");
const TOKEN_KEY = "arcfab-token";
const NO_REWARD = "#c4c8cf";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  backends: [],
  sessions: [],
  session: null, // SessionInfo of the session the buttons act on
  treeId: null,
  root: null, // d3 hierarchy of the tree
  byId: new Map(), // node id -> hierarchy node (including folded ones)
  collapsed: new Set(),
  selected: null,
  pickA: null,
  pickB: null,
  colorMode: "branch",
  userZoomed: false,
  frames: new Map(), // frame url -> Promise<object or data URL>
  ws: null,
  wsRetry: 0,
  compare: null,
  busy: 0,
};

// ---------------------------------------------------------------- status bar
function setStatus(text, kind = "info") {
  const bar = $("status-bar");
  bar.textContent = text;
  bar.dataset.state = kind;
}
function showError(err) {
  console.warn(err); // not console.error: the page reports errors in the status bar
  setStatus(err && err.message ? err.message : String(err), "error");
}

// ---------------------------------------------------------------- API
class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function formatDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    // FastAPI validation errors: [{loc: [...], msg: "..."}]
    return detail
      .map((d) => (d && d.msg ? `${(d.loc || []).filter((x) => x !== "body").join(".")}: ${d.msg}` : JSON.stringify(d)))
      .join("; ");
  }
  return JSON.stringify(detail);
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path, { method = "GET", body, raw = false } = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(`cannot reach the server (${e.message}); is \`arcfab serve\` running?`, 0);
  }
  if (!res.ok) {
    let detail = `${res.status} ${res.statusText}`;
    try {
      const j = await res.json();
      if (j && j.detail !== undefined) detail = `${formatDetail(j.detail)} (HTTP ${res.status})`;
    } catch {
      /* not JSON: keep the status line */
    }
    if (res.status === 401 || res.status === 403) detail += " \u2014 enter the API token at the top right";
    throw new ApiError(`${method} ${path}: ${detail}`, res.status);
  }
  if (raw) return res;
  if (res.status === 204) return null;
  return res.json();
}

// Frames go through fetch (so the Authorization header is sent) and are cached by URL:
// a node's checkpoint never changes, so neither does its frame.
function nodeFrameUrl(nodeId, treeId = state.treeId) {
  return `/api/trees/${enc(treeId)}/nodes/${enc(nodeId)}/frame.png`;
}
function loadFrame(url) {
  let p = state.frames.get(url);
  if (!p) {
    p = api(url, { raw: true })
      .then((r) => r.blob())
      .then((b) => URL.createObjectURL(b));
    p.catch(() => state.frames.delete(url));
    state.frames.set(url, p);
  }
  return p;
}
async function showFrame(img, url, { cache = true } = {}) {
  img.dataset.src = url;
  let src;
  if (cache) {
    src = await loadFrame(url);
  } else {
    const blob = await (await api(url, { raw: true })).blob();
    src = URL.createObjectURL(blob);
  }
  if (img.dataset.src !== url) return; // a newer request won
  if (!cache && img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  if (!cache) img.dataset.objectUrl = src;
  img.src = src;
}

// ---------------------------------------------------------------- busy / buttons
const ACTION_BUTTONS = ["step-button", "random-button", "rewind-button", "fork-button", "create-session", "open-session"];
async function run(label, fn) {
  state.busy += 1;
  document.body.dataset.busy = "1";
  for (const id of ACTION_BUTTONS) $(id).disabled = true;
  setStatus(`${label}\u2026`, "busy");
  try {
    const msg = await fn();
    setStatus(msg || `${label}: done`, "ok");
  } catch (e) {
    showError(e);
  } finally {
    state.busy -= 1;
    if (!state.busy) document.body.dataset.busy = "0";
    updateButtons();
  }
}
function updateButtons() {
  const has = !!state.session;
  const idle = !state.busy;
  $("step-button").disabled = !has || !idle;
  $("random-button").disabled = !has || !idle;
  $("rewind-button").disabled = !has || !idle;
  $("fork-button").disabled = !has || !idle;
  $("create-session").disabled = !idle || !state.backends.length;
  $("open-session").disabled = !idle || !state.sessions.length;
  const sel = state.selected && state.byId.get(state.selected);
  $("set-a").disabled = !sel;
  $("set-b").disabled = !sel;
  $("open-branch").disabled = !sel || !sessionFor(sel.data.session_id) ||
    (state.session && sel.data.session_id === state.session.session_id);
  $("fork-button").textContent = state.selected ? `Fork from ${state.selected}` : "Fork from current frame";
}

// ---------------------------------------------------------------- server status
async function refreshServerStatus() {
  const el = $("server-status");
  try {
    const s = await api("/api/status");
    const size = (b) => (typeof b !== "number" ? "unlimited" : b < 2 ** 20 ? `${(b / 2 ** 10).toFixed(0)} KB`
      : `${(b / 2 ** 20).toFixed(1)} MB`);
    el.textContent = `${s.sessions}/${s.max_sessions} sessions \u00b7 store ${size(s.store_bytes)} of ${size(s.store_budget_bytes)}`;
    el.title = `backends: ${(s.backends || []).map((b) => (typeof b === "string" ? b : b.name)).join(", ")}; up ${Math.round(s.uptime_s || 0)} s`;
  } catch (e) {
    el.textContent = "server status unavailable";
    el.title = e.message;
  }
}

// ---------------------------------------------------------------- backends, sessions
function fillPrompts(select, prompts, keepOption) {
  const old = select.value;
  select.replaceChildren();
  if (keepOption) select.append(new Option(keepOption, ""));
  for (const p of prompts) select.append(new Option(p, p));
  if ([...select.options].some((o) => o.value === old)) select.value = old;
}
function currentBackend(name) {
  return state.backends.find((b) => b.name === name);
}
async function loadBackends() {
  state.backends = await api("/api/backends");
  const sel = $("backend-select");
  sel.replaceChildren(...state.backends.map((b) => {
    const o = new Option(b.name, b.name);
    o.title = `action dim ${b.action_dim}${b.frame_size ? `, ${b.frame_size} px frames` : ""}`;
    return o;
  }));
  if (state.backends.some((b) => b.name === "pusht-sim")) sel.value = "pusht-sim";
  onBackendChange();
}
function onBackendChange() {
  const b = currentBackend($("backend-select").value);
  fillPrompts($("prompt-select"), b ? b.prompts : [], null);
}
async function loadSessions() {
  state.sessions = await api("/api/sessions");
  const sel = $("session-select");
  const old = sel.value;
  if (!state.sessions.length) {
    sel.replaceChildren(new Option("(no sessions yet)", ""));
  } else {
    sel.replaceChildren(
      ...state.sessions.map(
        (s) => new Option(`${s.session_id} \u00b7 ${s.backend} \u00b7 f${s.frame_index} \u00b7 ${s.tree_id}`, s.session_id),
      ),
    );
    if (state.session && state.sessions.some((s) => s.session_id === state.session.session_id)) {
      sel.value = state.session.session_id;
    } else if (state.sessions.some((s) => s.session_id === old)) sel.value = old;
  }
  updateButtons();
}
function sessionFor(sessionId) {
  return state.sessions.find((s) => s.session_id === sessionId) ||
    (state.session && state.session.session_id === sessionId ? state.session : null);
}

/** Append a term and its value (with an optional colour swatch) to a <dl>. */
function appendTerm(dl, term, value, swatch) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  if (swatch) {
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = swatch;
    dd.append(sw);
  }
  dd.append(String(value));
  dl.append(dt, dd);
}

function renderSessionInfo() {
  const s = state.session;
  const dl = $("current-session");
  dl.replaceChildren();
  const add = (k, v, swatch) => appendTerm(dl, k, v, swatch);
  if (!s) {
    add("Session", "none: create or open one");
    return;
  }
  add("Session", s.session_id, branchColor(s.session_id));
  add("Backend", s.backend);
  add("Prompt", s.prompt);
  add("Seed", s.seed);
  add("Frame", `${s.frame_index} (history ${s.history_length})`);
  add("Reward", fmt(s.reward));
  if (s.terminated) add("Status", "terminated (goal reached)");
}

function setSession(info, { select = true } = {}) {
  const treeChanged = !state.session || state.session.tree_id !== info.tree_id;
  state.session = info;
  if (treeChanged) {
    state.treeId = info.tree_id;
    state.collapsed.clear();
    state.pickA = state.pickB = null;
    state.selected = null;
    state.userZoomed = false;
    clearCompare();
    subscribe();
  }
  if (select && info.node_id) state.selected = info.node_id;
  history.replaceState(null, "", `#session=${enc(info.session_id)}`);
  setupActionInputs(info.action_dim);
  const b = currentBackend(info.backend);
  fillPrompts($("fork-prompt"), b ? b.prompts : [], "(keep)");
  renderSessionInfo();
}

async function openSession(sessionId) {
  const info = await api(`/api/sessions/${enc(sessionId)}`);
  setSession(info);
  await refreshAll();
  return `Opened ${info.session_id} (tree ${info.tree_id}, frame ${info.frame_index})`;
}

async function refreshAll() {
  await Promise.all([refreshTree(), loadSessions().catch(showError), refreshServerStatus()]);
  renderSessionInfo();
  await showSelected();
  updatePadImage();
}

// ---------------------------------------------------------------- actions
function actionLimits() {
  // Both backends (pusht-sim, mini-dreamzero) take actions in the env's Box(-1, 1); for
  // Push-T an action a maps to the pusher's target (a + 1) * 256 px in the 512 px workspace.
  return [-1, 1];
}
function setupActionInputs(dim) {
  const box = $("action-inputs");
  if (box.dataset.dim === String(dim)) return;
  box.dataset.dim = String(dim);
  box.replaceChildren();
  const names = dim === 2 ? ["x", "y"] : Array.from({ length: dim }, (_, i) => `a${i}`);
  const [lo, hi] = actionLimits();
  names.forEach((name, i) => {
    const label = document.createElement("label");
    label.htmlFor = `action-${i}`;
    label.textContent = name;
    const input = document.createElement("input");
    input.type = "number";
    input.id = `action-${i}`;
    input.setAttribute("data-testid", `action-input-${i}`);
    input.min = lo;
    input.max = hi;
    input.step = "0.05";
    input.value = "0";
    input.addEventListener("input", drawPad);
    box.append(label, input);
  });
  const px = document.createElement("div");
  px.className = "px";
  px.id = "action-px";
  box.append(px);
  $("action-pad").style.display = dim === 2 ? "" : "none";
  $("action-hint").textContent = dim === 2
    ? "Click the frame to aim the pusher, or type x, y in [-1, 1]."
    : `Type the action: ${dim} numbers in [-1, 1].`;
  drawPad();
}
function readAction() {
  const box = $("action-inputs");
  const dim = Number(box.dataset.dim || 0);
  const [lo, hi] = actionLimits();
  const a = [];
  for (let i = 0; i < dim; i++) {
    const v = Number($(`action-${i}`).value);
    if ($(`action-${i}`).value === "" || !Number.isFinite(v)) throw new Error(`action component ${i + 1} is not a number`);
    if (v < lo || v > hi) throw new Error(`action component ${i + 1} = ${v} is outside [${lo}, ${hi}]`);
    a.push(v);
  }
  return a;
}
function setAction(values) {
  values.forEach((v, i) => {
    const input = $(`action-${i}`);
    if (input) input.value = String(Math.round(v * 1000) / 1000);
  });
  drawPad();
}

const PAD = 140;
function drawPad() {
  const svg = d3.select("#action-pad");
  if (svg.select("image").empty()) {
    svg.append("image").attr("width", PAD).attr("height", PAD).attr("preserveAspectRatio", "none");
    const g = svg.append("g").attr("class", "grid");
    for (const t of [0.25, 0.5, 0.75]) {
      g.append("line").attr("x1", t * PAD).attr("x2", t * PAD).attr("y1", 0).attr("y2", PAD);
      g.append("line").attr("y1", t * PAD).attr("y2", t * PAD).attr("x1", 0).attr("x2", PAD);
    }
    svg.append("circle").attr("class", "target").attr("r", 6);
    svg.append("circle").attr("class", "target-dot").attr("r", 1.5).attr("fill", "#e11d48");
    svg.on("click", (event) => {
      const [mx, my] = d3.pointer(event);
      setAction([(mx / PAD) * 2 - 1, (my / PAD) * 2 - 1].map((v) => Math.max(-1, Math.min(1, v))));
    });
  }
  const x = Number(($("action-0") || {}).value || 0);
  const y = Number(($("action-1") || {}).value || 0);
  const cx = ((x + 1) / 2) * PAD;
  const cy = ((y + 1) / 2) * PAD;
  svg.selectAll("circle.target, circle.target-dot").attr("cx", cx).attr("cy", cy);
  const px = $("action-px");
  if (px && $("action-1")) {
    px.textContent = `target (${Math.round((x + 1) * 256)}, ${Math.round((y + 1) * 256)}) px`;
    px.title = "Push-T: the pusher's target is (a + 1) \u00d7 256 px in the 512 px workspace";
  }
}
async function updatePadImage() {
  const s = state.session;
  const image = d3.select("#action-pad image");
  if (!s || image.empty()) return;
  try {
    const url = s.node_id ? nodeFrameUrl(s.node_id, s.tree_id) : `/api/sessions/${enc(s.session_id)}/frame.png?f=${s.frame_index}`;
    const src = s.node_id ? await loadFrame(url) : URL.createObjectURL(await (await api(url, { raw: true })).blob());
    image.attr("href", src);
  } catch (e) {
    /* the pad works without a background */
  }
}

async function doStep() {
  const s = state.session;
  const action = readAction();
  const checkpoint = $("step-checkpoint").checked;
  const info = await api(`/api/sessions/${enc(s.session_id)}/step`, { method: "POST", body: { action, checkpoint } });
  setSession(info);
  await refreshAll();
  return `Stepped ${info.session_id} to frame ${info.frame_index} with [${action.map((v) => fmt(v, ".3~f")).join(", ")}]`
    + ` \u00b7 reward ${fmt(info.reward)}${info.terminated ? " \u00b7 terminated" : ""}`;
}
async function doRewind() {
  const s = state.session;
  const n = Number($("rewind-steps").value);
  if (!Number.isInteger(n) || n < 1) throw new Error("rewind needs a whole number of steps >= 1");
  const info = await api(`/api/sessions/${enc(s.session_id)}/rewind`, { method: "POST", body: { n_steps: n } });
  setSession(info);
  await refreshAll();
  return `Rewound ${info.session_id} by ${n} to frame ${info.frame_index}`;
}
async function doFork() {
  const s = state.session;
  const prompt = $("fork-prompt").value || null;
  const seedText = $("fork-seed").value.trim();
  let seed = null;
  if (seedText !== "") {
    seed = Number(seedText);
    if (!Number.isInteger(seed) || seed < 0) throw new Error("the new seed must be a whole number >= 0");
  }
  const from = state.selected;
  const info = await api(`/api/sessions/${enc(s.session_id)}/fork`, {
    method: "POST",
    body: { checkpoint_id: from, prompt, seed },
  });
  setSession(info);
  await refreshAll();
  const what = [prompt !== null ? `prompt \u201c${prompt}\u201d` : null, seed !== null ? `seed ${seed}` : null]
    .filter(Boolean).join(", ");
  return `Forked ${info.session_id} from ${from || "the current frame"}${what ? ` with ${what}` : ""}; it is now the current session`;
}
async function doCreate() {
  const backend = $("backend-select").value;
  const prompt = $("prompt-select").value;
  const seed = Number($("seed-input").value);
  if (!Number.isInteger(seed) || seed < 0) throw new Error("the seed must be a whole number >= 0");
  const info = await api("/api/sessions", { method: "POST", body: { backend, prompt, seed } });
  setSession(info);
  await refreshAll();
  return `Created ${info.session_id} on ${info.backend} (tree ${info.tree_id})`;
}

// ---------------------------------------------------------------- the tree
const DX = 24; // between sibling rows (px)
const DY = 58; // between depths (px)
const svg = d3.select("#tree-svg");
const zoomLayer = svg.append("g");
const linkLayer = zoomLayer.append("g").attr("class", "links");
const nodeLayer = zoomLayer.append("g").attr("class", "nodes");
const zoom = d3.zoom().scaleExtent([0.08, 4]).on("zoom", (event) => {
  zoomLayer.attr("transform", event.transform);
  if (event.sourceEvent) state.userZoomed = true;
});
svg.call(zoom).on("dblclick.zoom", null);

let sessionOrder = [];
let branchScale = d3.scaleOrdinal(d3.schemeTableau10);
function branchColor(sessionId) {
  return branchScale(sessionId);
}

let refreshing = null;
let refreshAgain = false;
async function refreshTree() {
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = (async () => {
    try {
      do {
        refreshAgain = false;
        if (!state.treeId) return;
        const data = await api(`/api/trees/${enc(state.treeId)}/d3`);
        buildTree(data);
        renderTree();
      } while (refreshAgain);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

function buildTree(data) {
  const root = d3.hierarchy(data, (d) => d.children); // iterative: deep chains are fine
  const byId = new Map();
  const seen = [];
  for (const d of root) {
    // iteration is breadth-first: a parent comes before its children
    d.synthetic = d.data.id === null || d.data.id === undefined;
    d.id = d.synthetic ? "__forest__" : d.data.id;
    const meta = d.data.meta || {};
    d.reward = typeof meta.reward === "number" && Number.isFinite(meta.reward) ? meta.reward : null;
    // The server records the return (sum of rewards from the root) as meta.return.
    d.ret = typeof meta.return === "number" && Number.isFinite(meta.return) ? meta.return
      : (d.parent && !d.parent.synthetic ? d.parent.ret : 0) + (d.reward || 0);
    d.nkids = d.children ? d.children.length : 0;
    byId.set(d.id, d);
    if (!d.synthetic && !seen.includes(d.data.session_id)) seen.push(d.data.session_id);
  }
  // Keep earlier sessions' colours stable when new branches appear.
  for (const s of seen) if (!sessionOrder.includes(s)) sessionOrder.push(s);
  branchScale = d3.scaleOrdinal(sessionOrder, sessionOrder.length <= 10 ? d3.schemeTableau10
    : d3.quantize((t) => d3.interpolateSinebow(t * 0.9), sessionOrder.length));
  for (const d of root) {
    if (d.children && state.collapsed.has(d.id)) {
      d._children = d.children;
      d.children = null;
    }
  }
  for (const id of [...state.collapsed]) if (!byId.has(id)) state.collapsed.delete(id);
  if (state.selected && !byId.has(state.selected)) state.selected = null;
  state.root = root;
  state.byId = byId;
  state.treeSessions = seen;
}

function nodeFill() {
  const mode = state.colorMode;
  if (mode === "branch") return (d) => (d.synthetic ? "#999" : branchColor(d.data.session_id));
  const key = mode === "return" ? "ret" : "reward";
  const values = [...state.byId.values()].filter((d) => !d.synthetic && d[key] !== null).map((d) => d[key]);
  let [lo, hi] = values.length ? d3.extent(values) : [0, 1];
  if (lo === hi) {
    lo -= 0.5;
    hi += 0.5;
  }
  const scale = d3.scaleSequential(d3.interpolateViridis).domain([lo, hi]);
  const fill = (d) => (d.synthetic || d[key] === null ? NO_REWARD : scale(d[key]));
  fill.scale = scale;
  fill.domain = [lo, hi];
  fill.empty = !values.length;
  return fill;
}

function renderLegend(fill) {
  const legend = d3.select("#legend");
  legend.selectAll("*").remove();
  if (!state.root) return;
  if (state.colorMode === "branch") {
    legend.append("div").attr("class", "head").text("Branch (session)");
    const shown = state.treeSessions.slice(0, 14);
    for (const s of shown) {
      const item = legend.append("div").attr("class", "item")
        .classed("current", !!state.session && s === state.session.session_id);
      item.append("span").attr("class", "dot").style("background", branchColor(s));
      item.append("span").text(s + (state.session && s === state.session.session_id ? " (current)" : ""));
    }
    if (state.treeSessions.length > shown.length) {
      legend.append("div").attr("class", "item").text(`+ ${state.treeSessions.length - shown.length} more`);
    }
  } else {
    const title = state.colorMode === "return" ? "Return (\u03a3 reward from the root)" : "Reward of the step";
    legend.append("div").attr("class", "head").text(title);
    if (fill.empty) {
      legend.append("div").attr("class", "item").text("no rewards yet: step to get some");
    } else {
      const w = 150;
      const bar = legend.append("svg").attr("width", w + 10).attr("height", 32).attr("aria-hidden", "true");
      const id = "legend-grad";
      const grad = bar.append("defs").append("linearGradient").attr("id", id);
      const [lo, hi] = fill.domain;
      for (let i = 0; i <= 10; i++) {
        grad.append("stop").attr("offset", `${i * 10}%`).attr("stop-color", fill.scale(lo + ((hi - lo) * i) / 10));
      }
      bar.append("rect").attr("x", 4).attr("y", 2).attr("width", w).attr("height", 12).attr("rx", 2)
        .attr("fill", `url(#${id})`);
      bar.append("text").attr("x", 4).attr("y", 28).attr("font-size", 10).text(fmt(lo, ".3~g"));
      bar.append("text").attr("x", 4 + w).attr("y", 28).attr("font-size", 10).attr("text-anchor", "end")
        .text(fmt(hi, ".3~g"));
    }
    if (state.colorMode === "reward") {
      const item = legend.append("div").attr("class", "item");
      item.append("span").attr("class", "dot").style("background", NO_REWARD);
      item.append("span").text("no reward (a root)");
    }
  }
  legend.append("div").attr("class", "head").style("margin-top", "6px").text("Marks");
  const mark = (draw, label) => {
    const item = legend.append("div").attr("class", "item");
    draw(item.append("svg").attr("width", 22).attr("height", 16).attr("aria-hidden", "true"));
    item.append("span").text(label);
  };
  mark((s) => s.append("circle").attr("cx", 11).attr("cy", 8).attr("r", 6).attr("fill", "none")
    .attr("stroke", "#f59e0b").attr("stroke-width", 3), "selected");
  mark((s) => s.append("circle").attr("cx", 11).attr("cy", 8).attr("r", 6).attr("fill", "none")
    .attr("stroke", "#111827").attr("stroke-width", 2).attr("stroke-dasharray", "3 2"), "current frame");
  mark((s) => s.append("line").attr("x1", 0).attr("x2", 22).attr("y1", 8).attr("y2", 8)
    .attr("stroke", "#b7bcc5").attr("stroke-width", 1.5).attr("stroke-dasharray", "4 3"), "fork");
  if (state.pickA || state.pickB) {
    mark((s) => s.append("line").attr("x1", 0).attr("x2", 22).attr("y1", 8).attr("y2", 8)
      .attr("stroke", "#2563eb").attr("stroke-width", 3.5), "branch A");
    mark((s) => s.append("line").attr("x1", 0).attr("x2", 22).attr("y1", 8).attr("y2", 8)
      .attr("stroke", "#c2410c").attr("stroke-width", 3.5), "branch B");
  }
}

function lineageIds(id) {
  const d = id && state.byId.get(id);
  return new Set(d ? d.ancestors().map((a) => a.id) : []);
}

function tooltip(d) {
  if (d.synthetic) return `forest of ${d.nkids} roots`;
  const m = d.data.meta || {};
  const lines = [`${d.id}`, `session ${d.data.session_id} \u00b7 frame ${d.data.frame_index}`];
  if (m.kind) lines.push(`kind: ${m.kind}`);
  lines.push(`reward: ${fmt(d.reward)} \u00b7 return: ${fmt(d.ret)}`);
  if (Array.isArray(m.action)) lines.push(`action: [${m.action.map((v) => fmt(v, ".3~f")).join(", ")}]`);
  if (d._children) lines.push(`folded: ${d._children.length} child branch(es) hidden`);
  lines.push("click: select \u00b7 shift+click: compare with the selected node");
  return lines.join("\n");
}

function isForkPoint(d) {
  return (d.children ? d.children.length : 0) + (d._children ? d._children.length : 0) > 1;
}

function renderTree() {
  const root = state.root;
  $("tree-empty").style.display = root ? "none" : "";
  $("tree-title").textContent = state.treeId ? `\u00b7 ${state.treeId}` : "";
  if (!root) return;
  d3.tree().nodeSize([DX, DY]).separation((a, b) => (a.parent === b.parent ? 1 : 1.3))(root);
  // Horizontal position = frame index, so branches line up frame by frame; a node that does
  // not advance the frame (a fork point's child) sits a little right of its parent.
  for (const d of root) {
    if (d.synthetic) {
      d.y = -DY;
      continue;
    }
    const p = d.parent && !d.parent.synthetic ? d.parent : null;
    d.y = DY * d.data.frame_index;
    if (p) d.y = Math.max(d.y, p.y + DY * 0.45);
  }
  const nodes = root.descendants().filter((d) => !d.synthetic);
  const links = root.links().filter((l) => !l.source.synthetic);
  const fill = nodeFill();
  const lineA = lineageIds(state.pickA);
  const lineB = lineageIds(state.pickB);
  const head = state.session && state.session.tree_id === state.treeId ? state.session.node_id : null;
  const labelled = (d) => !d.children || isForkPoint(d) || d.id === state.selected;
  const short = (s) => (s.length > 16 ? `${s.slice(0, 15)}\u2026` : s);

  linkLayer.selectAll("path").data(links, (l) => l.target.id).join("path")
    .attr("class", (l) => {
      const c = ["link"];
      if ((l.target.data.meta || {}).kind === "fork") c.push("fork");
      if (lineA.has(l.target.id)) c.push("compare-a");
      if (lineB.has(l.target.id)) c.push("compare-b");
      return c.join(" ");
    })
    .attr("d", d3.linkHorizontal().x((p) => p.y).y((p) => p.x));
  linkLayer.selectAll("path.compare-a, path.compare-b").raise();

  const g = nodeLayer.selectAll("g.node").data(nodes, (d) => d.id).join((enter) => {
    const e = enter.append("g")
      .attr("data-testid", "tree-node")
      .attr("tabindex", 0)
      .attr("role", "button");
    e.append("circle").attr("class", "halo");
    e.append("circle").attr("class", "dot");
    e.append("title");
    e.append("text").attr("class", "label").attr("dy", -10).attr("text-anchor", "middle");
    e.append("text").attr("class", "ab").attr("dy", 18).attr("text-anchor", "middle");
    const t = e.append("g").attr("class", "toggle").attr("data-testid", "node-toggle").attr("role", "button");
    t.append("rect").attr("x", -6).attr("y", -6).attr("width", 12).attr("height", 12);
    t.append("text").attr("y", 3.5);
    t.on("click", (event, d) => {
      event.stopPropagation();
      toggleFold(d.id);
    });
    e.on("click", (event, d) => onNodeClick(event, d));
    e.on("keydown", (event, d) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        onNodeClick(event, d);
      }
    });
    return e;
  });
  g.attr("class", (d) => {
    const c = ["node"];
    if (d.id === state.selected) c.push("selected");
    if (d.id === head) c.push("head");
    if (d.id === state.pickA) c.push("pick-a");
    if (d.id === state.pickB) c.push("pick-b");
    if (d._children) c.push("collapsed");
    return c.join(" ");
  })
    .attr("transform", (d) => `translate(${d.y},${d.x})`)
    .attr("data-node-id", (d) => d.id)
    .attr("data-session", (d) => d.data.session_id)
    .attr("data-frame", (d) => d.data.frame_index)
    .attr("data-fill", (d) => fill(d))
    .attr("aria-label", (d) => `node ${d.id}, session ${d.data.session_id}, frame ${d.data.frame_index}`);
  const r = (d) => (isForkPoint(d) ? 8 : 6);
  g.select("circle.dot").attr("r", r).attr("fill", fill);
  g.select("circle.halo").attr("r", (d) => r(d) + 4);
  g.select("title").text(tooltip);
  g.select("text.label").text((d) => (labelled(d) ? `f${d.data.frame_index}` : ""))
    .attr("dy", (d) => -(r(d) + 6));
  g.select("text.ab")
    .attr("class", (d) => `ab ${d.id === state.pickA ? "a" : d.id === state.pickB ? "b" : ""}`)
    .attr("dy", (d) => r(d) + 14)
    .text((d) => (d.id === state.pickA && d.id === state.pickB ? "A=B" : d.id === state.pickA ? "A" : d.id === state.pickB ? "B" : ""));
  // Fold toggles on fork points, folded nodes and the selected node (less clutter on chains).
  g.select("g.toggle")
    .style("display", (d) => ((d.children || d._children) && (isForkPoint(d) || d._children || d.id === state.selected) ? null : "none"))
    .attr("transform", (d) => `translate(${-(r(d) + 12)},0)`)
    .attr("aria-label", (d) => (d._children ? "unfold subtree" : "fold subtree"))
    .select("text").text((d) => (d._children ? "+" : "\u2212"));
  // Leaf labels name their branch.
  g.select("text.label").filter((d) => !d.children && !d._children)
    .attr("text-anchor", "start").attr("dx", (d) => r(d) + 5).attr("dy", 3.5)
    .text((d) => `${short(d.data.session_id)} \u00b7 f${d.data.frame_index}`);
  g.select("text.label").filter((d) => d.children || d._children)
    .attr("text-anchor", "middle").attr("dx", 0);

  renderLegend(fill);
  if (!state.userZoomed) fit(false);
}

function fit(animate = true) {
  const root = state.root;
  if (!root) return;
  const nodes = root.descendants().filter((d) => !d.synthetic);
  const box = svg.node().getBoundingClientRect();
  const legendW = $("legend").getBoundingClientRect().width || 0;
  const [x0, x1] = d3.extent(nodes, (d) => d.x);
  const [y0, y1] = d3.extent(nodes, (d) => d.y);
  const padL = 50;
  const padR = 90 + legendW; // leaf labels + legend
  const availW = Math.max(100, box.width - padL - padR);
  const availH = Math.max(100, box.height - 80);
  let k = Math.min(1.6, availW / Math.max(1, y1 - y0), availH / Math.max(1, x1 - x0));
  k = Math.max(0.25, k);
  let tx = padL - k * y0;
  if (k * (y1 - y0) > availW) {
    // Too long to fit: keep the newest frames (right end) in view.
    tx = padL + availW - k * y1;
  }
  const ty = box.height / 2 - (k * (x0 + x1)) / 2;
  const t = d3.zoomIdentity.translate(tx, ty).scale(k);
  (animate ? svg.transition().duration(300) : svg).call(zoom.transform, t);
}

function toggleFold(id) {
  if (state.collapsed.has(id)) state.collapsed.delete(id);
  else state.collapsed.add(id);
  const d = state.byId.get(id);
  if (d) {
    if (d.children) {
      d._children = d.children;
      d.children = null;
    } else if (d._children) {
      d.children = d._children;
      d._children = null;
    }
  }
  renderTree();
}

function onNodeClick(event, d) {
  if (d.synthetic) return;
  if (event.shiftKey) {
    if (!state.selected || state.selected === d.id) {
      selectNode(d.id);
      setStatus("Now shift+click a second node to compare the two branches.", "info");
      return;
    }
    state.pickA = state.selected;
    state.pickB = d.id;
    renderTree();
    run("Comparing branches", runCompare);
    return;
  }
  selectNode(d.id);
}

function selectNode(id) {
  state.selected = id;
  renderTree();
  updateButtons();
  showSelected().catch(showError);
}

async function showSelected() {
  const img = $("node-frame");
  const dl = $("node-meta");
  const cap = $("node-caption");
  const d = state.selected && state.byId.get(state.selected);
  dl.replaceChildren();
  updateButtons();
  if (!d) {
    img.removeAttribute("src");
    img.alt = "No node selected";
    cap.textContent = "Click a node in the tree.";
    return;
  }
  const m = d.data.meta || {};
  cap.textContent = `${d.id} \u00b7 frame ${d.data.frame_index}`;
  img.alt = `Frame ${d.data.frame_index} of node ${d.id}`;
  const add = (k, v, swatch) => {
    if (v === undefined || v === null || v === "") return;
    appendTerm(dl, k, v, swatch);
  };
  add("Node", d.id);
  add("Session", d.data.session_id, branchColor(d.data.session_id));
  add("Frame", d.data.frame_index);
  add("Depth", d.depth - (state.root.synthetic ? 1 : 0));
  add("Kind", m.kind);
  add("Reward", fmt(d.reward));
  add("Return", fmt(d.ret));
  if (Array.isArray(m.action)) add("Action", `[${m.action.map((v) => fmt(v, ".3~f")).join(", ")}]`);
  add("Prompt", m.prompt);
  add("Seed", m.seed);
  add("Forked from", m.forked_from);
  add("Children", (d.children || d._children || []).length + (d._children ? " (folded)" : ""));
  const known = new Set(["kind", "reward", "action", "prompt", "seed", "forked_from"]);
  for (const [k, v] of Object.entries(m)) {
    if (!known.has(k)) add(k, typeof v === "object" ? JSON.stringify(v) : typeof v === "number" ? fmt(v) : v);
  }
  await showFrame(img, nodeFrameUrl(d.id));
}

// ---------------------------------------------------------------- compare
function clearCompare() {
  state.compare = null;
  $("compare-body").hidden = true;
  $("compare-empty").hidden = false;
  $("compare-a-id").textContent = state.pickA || "\u2014";
  $("compare-b-id").textContent = state.pickB || "\u2014";
  $("compare-divergence").textContent = "";
}

function byFrame(lineage) {
  // The last entry per frame_index wins (a fork node repeats its parent's frame index).
  const m = new Map();
  let ret = 0;
  for (const row of lineage) {
    ret += typeof row.reward === "number" ? row.reward : 0;
    m.set(row.frame_index, { ...row, ret: typeof row.return === "number" ? row.return : ret });
  }
  return m;
}

async function runCompare() {
  const { pickA, pickB } = state;
  $("compare-a-id").textContent = pickA || "\u2014";
  $("compare-b-id").textContent = pickB || "\u2014";
  if (!pickA || !pickB) {
    renderTree();
    return `Branch ${pickA ? "A" : "B"} set; pick the other one to compare`;
  }
  const url = (id) => `/api/trees/${enc(state.treeId)}/nodes/${enc(id)}/lineage`;
  const [la, lb] = await Promise.all([api(url(pickA)), api(url(pickB))]);
  let k = 0;
  while (k < la.length && k < lb.length && la[k].node_id === lb[k].node_id) k++;
  const common = k > 0 ? la[k - 1] : null;
  const divergeAt = common ? common.frame_index : -1; // last shared frame
  const ma = byFrame(la);
  const mb = byFrame(lb);
  const frames = [...new Set([...ma.keys(), ...mb.keys()])];
  const lo = d3.min(frames);
  const hi = d3.max(frames);
  const rows = [];
  for (let f = lo; f <= hi; f++) {
    const a = ma.get(f) || null;
    const b = mb.get(f) || null;
    let kind;
    if (a && b && a.node_id === b.node_id) kind = "shared";
    else if (f === divergeAt) kind = "fork";
    else if (f <= divergeAt) kind = "shared";
    else kind = "diverged";
    rows.push({ frame: f, a, b, kind });
  }
  state.compare = { rows, lo, hi, divergeAt, common, la, lb };

  let text;
  if (!common) text = "The two nodes share no history (different roots).";
  else if (k === la.length && k === lb.length) text = "A and B are the same node.";
  else if (k === la.length) text = `A is an ancestor of B: B continues ${hi - divergeAt} frame(s) past frame ${divergeAt}.`;
  else if (k === lb.length) text = `B is an ancestor of A: A continues ${hi - divergeAt} frame(s) past frame ${divergeAt}.`;
  else text = `Shared up to frame ${divergeAt} (node ${common.node_id}); diverged from frame ${divergeAt + 1}.`;
  $("compare-divergence").textContent = text;

  renderStrips();
  const slider = $("compare-slider");
  slider.min = String(lo);
  slider.max = String(hi);
  $("compare-body").hidden = false;
  $("compare-empty").hidden = true;
  const start = rows.some((r) => r.frame === divergeAt + 1) ? divergeAt + 1 : hi;
  await setCompareFrame(start);
  renderTree();
  return `Comparing A=${pickA} with B=${pickB}: ${text}`;
}

let stripObserver = null;
function renderStrips() {
  const c = state.compare;
  const box = $("compare-strips");
  box.replaceChildren();
  if (stripObserver) stripObserver.disconnect();
  // Thumbnails load when they scroll into view.
  stripObserver = new IntersectionObserver((entries) => {
    for (const e of entries) {
      if (!e.isIntersecting) continue;
      const img = e.target;
      stripObserver.unobserve(img);
      showFrame(img, img.dataset.lazy).catch(() => img.closest(".cell").classList.add("empty"));
    }
  }, { root: box, rootMargin: "0px 200px" });
  box.style.gridTemplateColumns = `28px repeat(${c.rows.length}, 40px)`;
  box.append(Object.assign(document.createElement("span"), { className: "tick" }));
  for (const r of c.rows) {
    const t = document.createElement("span");
    t.className = `tick${r.frame === c.divergeAt + 1 ? " diverge" : ""}`;
    t.textContent = r.frame === c.divergeAt + 1 ? `\u2937${r.frame}` : String(r.frame);
    t.title = r.frame === c.divergeAt + 1 ? "first diverged frame" : `frame ${r.frame}`;
    box.append(t);
  }
  for (const side of ["a", "b"]) {
    const label = document.createElement("span");
    label.className = `rowlabel ${side}`;
    label.textContent = side.toUpperCase();
    box.append(label);
    for (const r of c.rows) {
      const entry = r[side];
      const cell = document.createElement("button");
      cell.type = "button";
      cell.className = `cell ${r.kind}`;
      cell.dataset.frame = String(r.frame);
      if (!entry) {
        cell.classList.add("empty");
        cell.disabled = true;
        cell.title = `frame ${r.frame}: not in branch ${side.toUpperCase()}`;
        cell.setAttribute("aria-label", cell.title);
      } else {
        cell.title = `${side.toUpperCase()} frame ${r.frame} \u00b7 ${entry.node_id} \u00b7 ${r.kind}`;
        cell.setAttribute("aria-label", cell.title);
        const img = document.createElement("img");
        img.alt = "";
        img.dataset.lazy = nodeFrameUrl(entry.node_id);
        cell.append(img);
        stripObserver.observe(img);
        cell.addEventListener("click", () => setCompareFrame(r.frame).catch(showError));
      }
      box.append(cell);
    }
  }
}

async function setCompareFrame(f) {
  const c = state.compare;
  if (!c) return;
  f = Math.max(c.lo, Math.min(c.hi, f));
  $("compare-slider").value = String(f);
  $("compare-frame-out").textContent = String(f);
  const row = c.rows.find((r) => r.frame === f);
  const st = $("compare-state");
  st.dataset.state = row.kind;
  st.textContent = row.kind === "shared" ? "shared frame (same node on both branches)"
    : row.kind === "fork" ? "fork point: last shared frame"
      : "diverged: the branches differ here";
  for (const cell of $("compare-strips").querySelectorAll(".cell")) {
    cell.classList.toggle("current", cell.dataset.frame === String(f));
  }
  const cur = $("compare-strips").querySelector(`.cell.current`);
  if (cur) cur.scrollIntoView({ block: "nearest", inline: "nearest" });
  await Promise.all(["a", "b"].map(async (side) => {
    const img = $(`compare-frame-${side}`);
    const cap = $(`compare-cap-${side}`);
    const e = row[side];
    if (!e) {
      img.classList.add("missing");
      img.dataset.src = "";
      img.removeAttribute("src");
      img.alt = `Branch ${side.toUpperCase()} has no frame ${f}`;
      cap.textContent = `${side.toUpperCase()}: no frame ${f}`;
      return;
    }
    img.classList.remove("missing");
    img.alt = `Branch ${side.toUpperCase()}, frame ${f}, node ${e.node_id}`;
    cap.textContent = `${side.toUpperCase()} \u00b7 ${e.session_id} \u00b7 r ${fmt(e.reward, ".3~f")} \u00b7 return ${fmt(e.ret, ".3~f")}`;
    await showFrame(img, nodeFrameUrl(e.node_id));
  }));
}

// ---------------------------------------------------------------- live updates
function setWs(s, text) {
  const el = $("ws-status");
  el.dataset.state = s;
  el.textContent = text || `live: ${s}`;
}
function subscribe() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN && state.treeId) {
    state.ws.send(JSON.stringify({ subscribe: state.treeId }));
    setWs("on", `live: ${state.treeId}`);
  }
}
function connectWs() {
  if (state.ws) {
    state.ws.onclose = null;
    state.ws.close();
  }
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${proto}//${location.host}/api/ws${state.token ? `?token=${enc(state.token)}` : ""}`;
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (e) {
    setWs("error", "live: unavailable");
    return;
  }
  state.ws = ws;
  ws.onopen = () => {
    state.wsRetry = 0;
    setWs("on", state.treeId ? `live: ${state.treeId}` : "live: on");
    subscribe();
  };
  ws.onmessage = (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    onEvent(msg);
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    setWs("off", "live: reconnecting");
    state.wsRetry = Math.min(state.wsRetry + 1, 6);
    setTimeout(connectWs, 1000 * 2 ** (state.wsRetry - 1));
  };
}

let eventTimer = null;
function onEvent(msg) {
  if (!msg) return;
  if (msg.type === "error") {
    setStatus(`Live updates: ${formatDetail(msg.detail)}`, "error");
    return;
  }
  if (msg.type === "subscribed" || msg.type === "unsubscribed" || msg.tree_id !== state.treeId) return;
  if (msg.node_id && msg.frame_png) {
    state.frames.set(nodeFrameUrl(msg.node_id), Promise.resolve(`data:image/png;base64,${msg.frame_png}`));
  }
  const mine = state.session && msg.session_id === state.session.session_id;
  // Follow the session's new frame only if the user was looking at its previous one.
  const selAtEvent = state.selected;
  const wasAtHead = mine && msg.node_id && (!selAtEvent || selAtEvent === state.session.node_id);
  clearTimeout(eventTimer);
  eventTimer = setTimeout(async () => {
    try {
      const followHead = wasAtHead && state.selected === selAtEvent && !state.busy;
      const closed = msg.type === "session_closed";
      if (mine && closed) {
        state.session = null;
        history.replaceState(null, "", location.pathname + location.search);
      } else if (mine && !state.busy) {
        const info = await api(`/api/sessions/${enc(msg.session_id)}`);
        setSession(info, { select: !!followHead });
      }
      await refreshTree();
      if (followHead) await showSelected();
      renderSessionInfo();
      updatePadImage();
      // A live notice never hides an error: it stays until the user's next action.
      if (!state.busy && $("status-bar").dataset.state !== "error") {
        const what = (msg.type || "event").replace("_", " ");
        setStatus(closed ? `Live: ${msg.session_id} was closed${mine ? "; open or create another session" : ""}`
          : `Live: ${what} in ${msg.session_id || "?"} at frame ${msg.frame_index ?? "?"}`, "info");
      }
      updateButtons();
      loadSessions().catch(() => {});
    } catch (e) {
      showError(e);
    }
  }, 120);
}

// ---------------------------------------------------------------- wiring
function wire() {
  $("token-input").value = state.token;
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    state.frames.clear();
    connectWs();
    run("Reloading with the token", start);
  });
  $("backend-select").addEventListener("change", onBackendChange);
  $("create-form").addEventListener("submit", (e) => {
    e.preventDefault();
    run("Creating a session", doCreate);
  });
  $("open-session").addEventListener("click", () => {
    const sid = $("session-select").value;
    if (sid) run(`Opening ${sid}`, () => openSession(sid));
  });
  $("reload-sessions").addEventListener("click", () => run("Reloading sessions", async () => {
    await loadSessions();
    return `${state.sessions.length} session(s)`;
  }));
  $("step-button").addEventListener("click", () => run("Stepping", doStep));
  $("random-button").addEventListener("click", () => {
    const dim = Number($("action-inputs").dataset.dim || 0);
    setAction(Array.from({ length: dim }, () => Math.random() * 2 - 1));
  });
  $("rewind-button").addEventListener("click", () => run("Rewinding", doRewind));
  $("fork-form").addEventListener("submit", (e) => {
    e.preventDefault();
    run("Forking", doFork);
  });
  for (const input of document.querySelectorAll("input[name=color-mode]")) {
    input.addEventListener("change", () => {
      state.colorMode = input.value;
      renderTree();
      showSelected().catch(showError);
    });
  }
  $("fit-button").addEventListener("click", () => {
    state.userZoomed = false;
    fit(true);
  });
  $("refresh-button").addEventListener("click", () => run("Refreshing", async () => {
    await refreshAll();
    return "Tree refreshed";
  }));
  $("set-a").addEventListener("click", () => {
    state.pickA = state.selected;
    run("Comparing branches", runCompare);
  });
  $("set-b").addEventListener("click", () => {
    state.pickB = state.selected;
    run("Comparing branches", runCompare);
  });
  $("swap-ab").addEventListener("click", () => {
    [state.pickA, state.pickB] = [state.pickB, state.pickA];
    run("Comparing branches", runCompare);
  });
  $("open-branch").addEventListener("click", () => {
    const d = state.byId.get(state.selected);
    if (d) run(`Opening ${d.data.session_id}`, () => openSession(d.data.session_id));
  });
  $("compare-slider").addEventListener("input", (e) => setCompareFrame(Number(e.target.value)).catch(showError));
  $("compare-prev").addEventListener("click", () => state.compare &&
    setCompareFrame(Number($("compare-slider").value) - 1).catch(showError));
  $("compare-next").addEventListener("click", () => state.compare &&
    setCompareFrame(Number($("compare-slider").value) + 1).catch(showError));
  window.addEventListener("resize", () => {
    if (!state.userZoomed) fit(false);
  });
  setInterval(refreshServerStatus, 15000);
}

async function start() {
  await loadBackends();
  await loadSessions();
  await refreshServerStatus();
  const m = /session=([^&]+)/.exec(location.hash);
  if (m) {
    const sid = decodeURIComponent(m[1]);
    if (state.sessions.some((s) => s.session_id === sid)) return openSession(sid);
  }
  return state.sessions.length
    ? `Ready: ${state.backends.length} backend(s), ${state.sessions.length} session(s) to open`
    : `Ready: ${state.backends.length} backend(s); create a session to start`;
}

wire();
setupActionInputs(2);
updateButtons();
connectWs();
run("Loading", start);
