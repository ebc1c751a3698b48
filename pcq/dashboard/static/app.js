// pcq dashboard: polls /api/state and draws every pipeline; no library, no build step.
// Everything from the server is put in the page as text (textContent), never as HTML.
"use strict";

const COLORS = ["#2f6fdb", "#d9480f", "#2b8a3e", "#ae3ec9", "#0c8599", "#e8590c", "#5c7cfa"];
const NUMBERS = [["ready", "ready"], ["in_flight", "in flight"], ["pending", "pending"],
  ["done", "done"], ["failed", "failed"], ["retried", "retried"], ["dead", "dead"],
  ["delayed", "delayed"]];
const SVG = "http://www.w3.org/2000/svg";
let every = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) if (child) node.appendChild(child);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// Colors go through the CSSOM: the page's policy forbids inline style attributes.
function colored(node, color) { node.style.setProperty("--c", color); return node; }

function fmt(n) { return Number(n).toLocaleString("en-US"); }
function rate(r) { return r >= 100 ? fmt(Math.round(r)) : (Math.round(r * 10) / 10).toString(); }
function ago(seconds) {
  if (seconds == null) return "—";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}
function since(unix) { return unix ? ago(Date.now() / 1000 - unix) + " ago" : "—"; }

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) sessionStorage.setItem("pcq-token", decodeURIComponent(m[1]));
  let t = sessionStorage.getItem("pcq-token");
  if (!t) {
    t = prompt("Token printed by the dashboard at start:");
    if (t) sessionStorage.setItem("pcq-token", t);
  }
  return t;
}

async function act(action, queue) {
  const t = token();
  if (!t || !confirm(action + " queue " + queue + "?")) return;
  const reply = await fetch("/api/" + action, {method: "POST", body: JSON.stringify({queue}),
    headers: {"Content-Type": "application/json", "X-Pcq-Token": t}});
  const answer = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    if (reply.status === 403) sessionStorage.removeItem("pcq-token");
    alert(answer.error || reply.statusText);
  }
  refresh();
}

function stageBox(q, color, slowest, actions) {
  const nums = el("div", {class: "nums"});
  for (const [field, label] of NUMBERS) {
    const bad = (field === "failed" || field === "dead") && q[field] > 0;
    nums.appendChild(el("div", {},
      el("span", {class: "k", text: label}),
      el("span", {class: "v" + (bad ? " bad" : ""), "data-field": field, text: fmt(q[field])})));
  }
  const box = colored(el("div", {class: "stage" + (slowest ? " bottleneck" : ""),
                                 "data-queue": q.queue}, 
    el("div", {}, el("span", {class: "name", text: q.queue}),
       el("span", {class: "state " + q.state, "data-field": "state", text: q.state})),
    nums,
    el("div", {class: "rate"}, el("b", {"data-field": "rate", text: rate(q.rate)}),
       document.createTextNode(" tasks/s done · " + q.consumers + " consumer(s), " +
                               q.producers + " producer(s)"))), color);
  if (slowest) box.appendChild(el("div", {class: "muted", text: "bottleneck: most tasks wait here"}));
  if (actions) {
    if (q.dead > 0) box.appendChild(el("button", {text: "requeue dead"}));
    if (q.state === "open") box.appendChild(el("button", {text: "close"}));
    for (const b of box.querySelectorAll("button")) {
      b.onclick = () => act(b.textContent === "close" ? "close" : "requeue", q.queue);
    }
  }
  return box;
}

function chart(stages) {
  // Drawn at the page's width, so that text is never stretched.
  const W = Math.max(300, document.getElementById("pipelines").clientWidth - 70);
  const H = 150, L = 52, B = 18, span = 600;
  const root = svg("svg", {class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  let top = 1;
  for (const q of stages) for (const [, r] of q.history) top = Math.max(top, r);
  const x = (ago) => L + (W - L - 4) * (1 - Math.min(ago, span) / span);
  const y = (r) => 6 + (H - B - 6) * (1 - r / top);
  for (const f of [0, 0.5, 1]) {
    root.appendChild(svg("line", {x1: L, x2: W - 4, y1: y(top * f), y2: y(top * f),
                                  stroke: "#e3e6ea"}));
    const label = svg("text", {x: 2, y: y(top * f) + 3});
    label.textContent = rate(top * f) + "/s";
    root.appendChild(label);
  }
  for (const [at, text] of [[span, "10 min ago"], [span / 2, "5 min"], [0, "now"]]) {
    const anchor = at === span ? "start" : at === 0 ? "end" : "middle";
    const label = svg("text", {x: x(at), y: H - 4, "text-anchor": anchor});
    label.textContent = text;
    root.appendChild(label);
  }
  // A pipeline's stages often run at one rate: earlier stages are drawn wider,
  // underneath, so that a line on top never hides one.
  stages.forEach((q, i) => {
    if (q.history.length < 1) return;
    const points = q.history.map(([a, r]) => `${x(a).toFixed(1)},${y(r).toFixed(1)}`).join(" ");
    root.appendChild(svg("polyline", {points, fill: "none", "stroke-linejoin": "round",
      "stroke-width": 1.5 + 2 * (stages.length - 1 - i), stroke: COLORS[i % COLORS.length]}));
  });
  return root;
}

function table(headers, rows) {
  const t = el("table", {}, el("tr", {}, ...headers.map((h) => el("th", {text: h}))));
  for (const row of rows) {
    t.appendChild(el("tr", {}, ...row.map(([text, cls]) => el("td", {class: cls || "", text}))));
  }
  return t;
}

function details(q) {
  const box = el("section", {"data-details": q.queue}, el("h3", {text: q.queue}));
  box.appendChild(q.hosts.length ? table(["host", "consumers", "since", "last heartbeat"],
    q.hosts.map((h) => [[h.host], [fmt(h.consumers)], [since(h.since)],
                        [h.heartbeat_age_s == null ? "—" : ago(h.heartbeat_age_s) + " ago"]]))
    : el("div", {class: "muted", text: q.consumers ? q.consumers + " consumer(s) on this host"
                                                   : "no consumer attached"}));
  if (q.producer_list.length) {
    box.appendChild(table(["producer host", "pid", "since"],
      q.producer_list.map((p) => [[p.host], [String(p.pid)], [since(p.since)]])));
  }
  const oldest = q.oldest_in_flight;
  if (oldest) {
    box.appendChild(el("div", {class: "muted", text: "oldest in flight: put " +
      ago(oldest.age_s) + " ago, attempt " + (oldest.attempts + 1) + ", id " + oldest.id}));
    box.appendChild(table(["task"], [[[oldest.body, "body"]]]));
  }
  if (q.dead_letters.length) {
    box.appendChild(table(["dead letter", "attempts", "error"],
      q.dead_letters.map((d) => [[d.body, "body"], [String(d.attempts ?? "—")], [d.error, "err"]])));
    if (q.dead > q.dead_letters.length) {
      box.appendChild(el("div", {class: "muted",
        text: "… and " + fmt(q.dead - q.dead_letters.length) + " more (pcq dead list)"}));
    }
  }
  return box;
}

function pipeline(p, actions) {
  const stages = p.stages;
  // The bottleneck: where most tasks wait; on a tie (every queue full up to its
  // maxsize) the last such stage, since a full queue holds back the ones before it.
  const waiting = stages.map((q) => q.ready + q.delayed);
  const top = Math.max(...waiting);
  let most = -1;
  if (stages.length > 1 && top > 0) waiting.forEach((w, i) => { if (w >= 0.9 * top) most = i; });
  const chain = el("div", {class: "chain"});
  stages.forEach((q, i) => {
    if (i) chain.appendChild(el("span", {class: "arrow", text: "→"}));
    chain.appendChild(stageBox(q, COLORS[i % COLORS.length], i === most, actions));
  });
  const kind = stages.length > 1 ? ` pipeline of ${stages.length} stages` : " queue";
  const legend = el("div", {class: "legend"});
  stages.forEach((q, i) => legend.appendChild(colored(el("span", {},
    el("i"), document.createTextNode(q.queue + " done/s")), COLORS[i % COLORS.length])));
  return el("section", {class: "pipeline", "data-pipeline": p.name},
    el("h2", {}, document.createTextNode(p.name), el("span", {class: "kind", text: kind})),
    chain, chart(stages), legend, el("div", {class: "details"}, ...stages.map(details)));
}

function render(state) {
  document.getElementById("where").textContent = state.where || "";
  const link = document.getElementById("link");
  const stale = state.updated && Date.now() / 1000 - state.updated > 5 * (state.every_s || 1);
  if (state.connected === false) {
    link.textContent = "disconnected: " + state.error;
    link.className = "pill bad";
  } else if (state.connected == null) {
    link.textContent = "connecting…";
    link.className = "pill";
  } else {
    link.textContent = stale ? "stale" : "connected";
    link.className = "pill " + (stale ? "bad" : "ok");
  }
  document.body.classList.toggle("disconnected", state.connected === false);
  document.getElementById("updated").textContent = state.updated ?
    "updated " + new Date(state.updated * 1000).toLocaleTimeString() +
    (state.refresh_ms != null ? " · read in " + state.refresh_ms + " ms" : "") : "";
  const main = document.getElementById("pipelines");
  const parts = (state.pipelines || []).map((p) => pipeline(p, state.actions));
  if (!parts.length) parts.push(el("p", {class: "empty", text: "No queue yet."}));
  if (state.left_out) parts.push(el("p", {class: "muted", text: state.left_out + " more queue(s) not shown"}));
  main.replaceChildren(...parts);
  every = Math.min(2000, Math.max(250, (state.every_s || 1) * 1000));
}

async function refresh() {
  try {
    const reply = await fetch("/api/state", {cache: "no-store"});
    if (!reply.ok) throw new Error(reply.status + " " + reply.statusText);
    render(await reply.json());
  } catch (e) {
    const link = document.getElementById("link");
    link.textContent = "dashboard unreachable: " + e.message;
    link.className = "pill bad";
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, every);
}
loop();
