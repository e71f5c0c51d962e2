// The reference server's UI: a small single-page app over the JSON API (see README).
"use strict";

const view = document.getElementById("view");
const statusEl = document.getElementById("status");

// Every navigation starts a new generation: fetches of an older one are aborted, and whatever
// still resolves from them is ignored, so a slow list refresh cannot paint over an agent page.
let generation = 0;
let controller = new AbortController();
const timers = new Set();

function isCurrent(gen) { return gen === generation; }

// Runs `fn` now and again `ms` after each run ends, for as long as generation `gen` lasts
// (one request at a time: no overlapping refreshes); `fn` returning false ends it.
function poll(gen, ms, fn, onError = showError) {
  const tick = async () => {
    try {
      if (await fn() === false) return;
    } catch (e) {
      if (isCurrent(gen) && e.name !== "AbortError") onError(e);
    }
    if (!isCurrent(gen)) return;
    const id = setTimeout(() => { timers.delete(id); tick(); }, ms);
    timers.add(id);
  };
  return tick();
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function api(path, options) {
  const res = await fetch(path, { signal: controller.signal, ...options });
  const text = await res.text();
  if (!res.ok) throw new Error(`${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
}

function healthCell(h) {
  if (!h) return '<span class="muted">unknown</span>';
  return h.healthy ? `<span class="ok">healthy</span>` : `<span class="bad">unhealthy</span>`;
}

function rcsCell(r) {
  if (!r) return '<span class="muted">—</span>';
  const cls = { APPLIED: "ok", FAILED: "bad", APPLYING: "warn" }[r.status] || "muted";
  const err = r.error_message ? ` <span class="muted">${esc(r.error_message)}</span>` : "";
  return `<span class="${cls}">${esc(r.status)}</span>${err}`;
}

function desiredText(d) {
  if (!d) return '<span class="muted">none</span>';
  const src = d.source === "override" ? "its own config" : `config ${esc(d.name)} v${esc(d.version)} (priority ${esc(d.priority)})`;
  const over = (d.outranked || []).length ? ` <span class="muted">over ${d.outranked.map(esc).join(", ")}</span>` : "";
  return src + over;
}

function driftCell(d) {
  if (!d) return '<span class="muted">—</span>';
  return d.drifted ? `<span class="bad" title="${esc(d.reason)}">drifted</span>` : '<span class="ok">in sync</span>';
}

function short(hash) { return hash ? `<code title="${esc(hash)}">${esc(hash.slice(0, 12))}</code>` : '<span class="muted">—</span>'; }

async function listView(gen) {
  const agents = await api("/api/v1/agents");
  if (!isCurrent(gen)) return;
  statusEl.textContent = `${agents.length} agent(s), ${agents.filter(a => a.connected).length} connected`;
  if (agents.length === 0) {
    view.innerHTML = '<p class="muted">No agents yet. Start one with <code>cargo run --release -p opamp-reference-agent -- --endpoint ws://127.0.0.1:4320/v1/opamp</code>.</p>';
    return;
  }
  const rows = agents.map(a => `<tr class="agent" data-uid="${esc(a.instance_uid)}">
    <td><a href="#/agents/${esc(a.instance_uid)}" class="mono">${esc(a.instance_uid)}</a></td>
    <td>${esc(a.service_name) || '<span class="muted">—</span>'}</td>
    <td>${esc(a.service_version) || '<span class="muted">—</span>'}</td>
    <td>${esc(a.host) || '<span class="muted">—</span>'}</td>
    <td><span class="pill">${esc(a.transport || "—")}</span></td>
    <td>${a.connected ? '<span class="ok">connected</span>' : `<span class="muted">last seen ${ago(a.last_seen_unix_ms)}</span>`}</td>
    <td>${healthCell(a.health)}</td>
    <td>${rcsCell(a.remote_config_status)}</td>
    <td>${short(a.remote_config_status && a.remote_config_status.hash)}</td>
    <td>${driftCell(a.drift)}</td>
    <td class="muted">${esc(a.node || "—")}</td>
  </tr>`).join("");
  view.innerHTML = `<table id="agents"><thead><tr><th>Instance uid</th><th>Service</th><th>Version</th><th>Host</th>
    <th>Transport</th><th>Connection</th><th>Health</th><th>Remote config</th><th>Config hash</th><th>Drift</th><th>Node</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function attrs(obj) {
  const keys = Object.keys(obj || {});
  if (keys.length === 0) return '<p class="muted">none</p>';
  return `<dl>${keys.map(k => `<dt>${esc(k)}</dt><dd>${esc(typeof obj[k] === "string" ? obj[k] : JSON.stringify(obj[k]))}</dd>`).join("")}</dl>`;
}

function healthTree(h) {
  if (!h) return '<p class="muted">not reported</p>';
  const node = (name, n) => `<li>${name ? `<b>${esc(name)}</b>: ` : ""}${n.healthy ? '<span class="ok">healthy</span>' : '<span class="bad">unhealthy</span>'}
    ${n.status ? ` <span class="pill">${esc(n.status)}</span>` : ""}${n.last_error ? ` <span class="bad">${esc(n.last_error)}</span>` : ""}
    ${Object.keys(n.components || {}).length ? `<ul class="tree">${Object.entries(n.components).map(([k, v]) => node(k, v)).join("")}</ul>` : ""}</li>`;
  return `<ul class="tree">${node("", h)}</ul>`;
}

function configMap(map) {
  const entries = Object.entries(map || {});
  if (entries.length === 0) return '<p class="muted">none</p>';
  return entries.map(([name, f]) => `<p><b>${esc(name || '""')}</b> <span class="muted">${esc(f.content_type)}</span>${f.role ? ` <span class="pill">role ${esc(f.role)}</span>` : ""}</p><pre>${esc(f.body)}</pre>`).join("");
}

// The agent page: the editor is drawn once; the rest is redrawn from the agent's own endpoint
// every poll, so a push's APPLIED / FAILED shows without a reload.
function agentView(gen, uid) {
  statusEl.textContent = "";
  const target = `/api/v1/agents/${encodeURIComponent(uid)}/config`;
  view.innerHTML = `<div id="agent-page" data-uid="${esc(uid)}"><div id="agent-info"><p class="muted">Loading…</p></div>
  <section><h2>Push a config to this agent</h2>${editor(target)}<div id="acks"></div></section></div>`;
  wireEditor(gen, false, uid);
  return poll(gen, 2000, async () => {
    const a = await api(`/api/v1/agents/${encodeURIComponent(uid)}`);
    if (!isCurrent(gen)) return;
    renderAgent(a);
  }, e => {
    const info = document.getElementById("agent-info");
    if (info) info.innerHTML = `<p class="bad">${esc(e.message)}</p>`;
  });
}

// PKG-13..PKG-20: what the agent reports of its packages, by name.
function packagesTable(statuses, sync) {
  const entries = Object.entries(statuses || {});
  if (entries.length === 0) return '<p class="muted">none reported</p>';
  const cls = { INSTALLED: "ok", INSTALL_FAILED: "bad", DOWNLOADING: "warn", INSTALLING: "warn", INSTALL_PENDING: "warn" };
  const rows = entries.map(([name, p]) => `<tr><td>${esc(name)}</td>
    <td><span class="${cls[p.status] || "muted"}">${esc(p.status)}</span>${p.download_percent != null ? ` ${esc(Math.round(p.download_percent))}%` : ""}</td>
    <td>${esc(p.agent_has_version || "—")}</td><td>${esc(p.server_offered_version || "—")}</td>
    <td>${p.error_message ? `<span class="bad">${esc(p.error_message)}</span>` : ""}</td></tr>`).join("");
  const err = sync && sync.error_message ? `<p class="bad">${esc(sync.error_message)}</p>` : "";
  return `<table><thead><tr><th>Package</th><th>Status</th><th>Has</th><th>Offered</th><th>Error</th></tr></thead><tbody>${rows}</tbody></table>${err}`;
}

function truncatedNote(t) {
  const parts = Object.entries(t || {});
  if (parts.length === 0) return "";
  return `<section><h2>Cut by the server</h2><dl>${parts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("")}</dl></section>`;
}

function renderAgent(a) {
  const info = document.getElementById("agent-info");
  if (!info) return;
  info.innerHTML = `
  <section><h2>Agent <span class="mono">${esc(a.instance_uid)}</span></h2>
    <dl><dt>Connection</dt><dd>${a.connected ? '<span class="ok">connected</span>' : `last seen ${ago(a.last_seen_unix_ms)}`} over ${esc(a.transport || "—")} from ${esc(a.remote_addr || "—")}</dd>
    <dt>Node</dt><dd>${esc(a.node || "—")}</dd>
    <dt>Desired config</dt><dd>${desiredText(a.desired_config)}</dd>
    <dt>Drift</dt><dd>${driftCell(a.drift)}${a.drift && a.drift.drifted ? ` <span class="muted">${esc(a.drift.reason)}</span>` : ""}</dd>
    <dt>Sequence number</dt><dd>${esc(a.sequence_num)}</dd>
    <dt>Capabilities</dt><dd>${(a.capabilities || []).map(c => `<span class="pill">${esc(c)}</span>`).join(" ")}</dd></dl>
    ${a.connected && (a.capabilities || []).includes("ACCEPTS_RESTART_COMMAND") ? '<p><button id="restart">Restart agent</button> <span id="restart-result" class="muted"></span></p>' : ""}</section>
  ${truncatedNote(a.truncated)}
  <section><h2>Identifying attributes</h2>${attrs(a.identifying_attributes)}</section>
  <section><h2>Non-identifying attributes</h2>${attrs(a.non_identifying_attributes)}</section>
  <section><h2>Health</h2>${healthTree(a.health)}</section>
  <section><h2>Remote config status</h2><span id="rcs">${rcsCell(a.remote_config_status)} ${short(a.remote_config_status && a.remote_config_status.hash)}</span></section>
  <section><h2>Remote config offered</h2>${a.remote_config ? `<p>hash ${short(a.remote_config.hash)}</p>${configMap(a.remote_config.config)}` : '<p class="muted">none</p>'}</section>
  <section><h2>Effective config</h2>${configMap(a.effective_config)}</section>
  <section><h2>Packages</h2><div id="packages">${packagesTable(a.package_statuses, a.package_sync)}</div></section>`;
  const restart = document.getElementById("restart");
  if (restart) restart.addEventListener("click", async () => {
    const out = document.getElementById("restart-result");
    try {
      await api(`/api/v1/agents/${encodeURIComponent(a.instance_uid)}/restart`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
      out.textContent = "restart sent";
    } catch (e) {
      out.innerHTML = `<span class="bad">${esc(e.message)}</span>`;
    }
  });
}

function editor(target) {
  return `<form id="push" data-target="${esc(target)}">
    <textarea id="body" placeholder="receivers:&#10;  otlp: {}"></textarea>
    <p><button type="submit">Push</button> <span id="result" class="muted"></span></p></form>`;
}

function configView(gen) {
  statusEl.textContent = "";
  view.innerHTML = `<section><h2>A named config for every agent whose attributes match</h2>
    <p>Name <input type="text" id="config-name" value="ui" pattern="[A-Za-z0-9._-]{1,128}"> Priority <input type="number" id="priority" value="0"></p>
    <p>Selector <input type="text" id="selector" placeholder="service.name=my-agent, environment=prod"> <span class="muted">(key=value pairs, all must match; empty = every agent; an agent's own config wins over named ones)</span></p>
    ${editor("/api/v1/configs/")}</section><div id="acks"></div>`;
  wireEditor(gen, true, null);
}

// "k=v, k2=v2" -> {k: "v", k2: "v2"}
function parseSelector(text) {
  const out = {};
  for (const pair of text.split(",").map(p => p.trim()).filter(Boolean)) {
    const i = pair.indexOf("=");
    if (i <= 0) throw new Error(`selector: ${pair} is not key=value`);
    out[pair.slice(0, i).trim()] = pair.slice(i + 1).trim();
  }
  return out;
}

// `uid`: the push goes to that one agent, whose own endpoint is then watched.
function wireEditor(gen, withSelector, uid) {
  const form = document.getElementById("push");
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    let target = form.dataset.target;
    const result = document.getElementById("result");
    try {
      const body = document.getElementById("body").value;
      let r;
      if (withSelector) {
        const name = document.getElementById("config-name").value.trim();
        const json = { selector: parseSelector(document.getElementById("selector").value), body,
          content_type: "text/yaml", priority: Number(document.getElementById("priority").value || 0) };
        r = await api(target + encodeURIComponent(name), { method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify(json) });
        if (!isCurrent(gen)) return;
        result.innerHTML = `config ${esc(r.name)} version ${esc(r.version)} given to ${r.agents.length} agent(s)`;
      } else {
        r = await api(target, { method: "PUT", headers: { "content-type": "text/yaml" }, body });
        if (!isCurrent(gen)) return;
        result.innerHTML = `pushed, hash ${short(r.config_hash)} to ${r.agents.length} agent(s)`;
      }
      watchAcks(gen, r, uid);
    } catch (e) {
      result.innerHTML = `<span class="bad">${esc(e.message)}</span>`;
    }
  });
}

// Shows each targeted agent's APPLIED / FAILED as it comes back (one watch per page).
let ackWatch = 0;
function watchAcks(gen, push, uid) {
  const watch = ++ackWatch;
  poll(gen, 1000, async () => {
    if (watch !== ackWatch) return false;
    const agents = uid ? [await api(`/api/v1/agents/${encodeURIComponent(uid)}`)] : await api("/api/v1/agents");
    const acks = document.getElementById("acks");
    if (!isCurrent(gen) || watch !== ackWatch || !acks) return;
    const byUid = Object.fromEntries(agents.map(a => [a.instance_uid, a]));
    const what = push.config_hash ? short(push.config_hash) : `config ${esc(push.name)} v${esc(push.version)}`;
    acks.innerHTML = `<table><thead><tr><th>Agent</th><th>Service</th><th>Status for ${what}</th></tr></thead><tbody>${
      push.agents.map(uid => {
        const a = byUid[uid] || {};
        const r = a.remote_config_status;
        // A named config may render per agent: each agent's own offered hash.
        const want = push.config_hash || (a.remote_config && a.remote_config.hash);
        const cell = r && want && r.hash === want ? rcsCell(r) : '<span class="warn">pending</span>';
        return `<tr><td class="mono">${esc(uid)}</td><td>${esc(a.service_name)}</td><td>${cell}</td></tr>`;
      }).join("")}</tbody></table>`;
  }, e => {
    const acks = document.getElementById("acks");
    if (acks && watch === ackWatch) acks.innerHTML = `<p class="bad">${esc(e.message)}</p>`;
  });
}

function route() {
  const gen = ++generation;
  controller.abort();
  controller = new AbortController();
  timers.forEach(clearTimeout);
  timers.clear();
  const hash = location.hash || "#/";
  if (hash.startsWith("#/agents/")) {
    agentView(gen, decodeURIComponent(hash.slice("#/agents/".length)));
  } else if (hash === "#/config") {
    configView(gen);
  } else {
    poll(gen, 2000, () => listView(gen));
  }
}

function showError(e) { view.innerHTML = `<p class="bad">${esc(e.message)}</p>`; }

window.addEventListener("hashchange", route);
route();
