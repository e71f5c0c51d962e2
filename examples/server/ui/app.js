// The reference server's UI: a small single-page app over the JSON API (see README).
"use strict";

const view = document.getElementById("view");
const statusEl = document.getElementById("status");
let timer = null;

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function api(path, options) {
  const res = await fetch(path, options);
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

function short(hash) { return hash ? `<code title="${esc(hash)}">${esc(hash.slice(0, 12))}</code>` : '<span class="muted">—</span>'; }

async function listView() {
  const agents = await api("/api/agents");
  statusEl.textContent = `${agents.length} agent(s), ${agents.filter(a => a.connected).length} connected`;
  if (agents.length === 0) {
    view.innerHTML = '<p class="muted">No agents yet. Start one with <code>cargo run --release --example agent -- --endpoint ws://127.0.0.1:4320/v1/opamp</code>.</p>';
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
  </tr>`).join("");
  view.innerHTML = `<table id="agents"><thead><tr><th>Instance uid</th><th>Service</th><th>Version</th><th>Host</th>
    <th>Transport</th><th>Connection</th><th>Health</th><th>Remote config</th><th>Config hash</th></tr></thead><tbody>${rows}</tbody></table>`;
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

async function agentView(uid) {
  const a = await api(`/api/agents/${encodeURIComponent(uid)}`);
  statusEl.textContent = "";
  view.innerHTML = `
  <section><h2>Agent <span class="mono">${esc(a.instance_uid)}</span></h2>
    <dl><dt>Connection</dt><dd>${a.connected ? '<span class="ok">connected</span>' : `last seen ${ago(a.last_seen_unix_ms)}`} over ${esc(a.transport || "—")} from ${esc(a.remote_addr || "—")}</dd>
    <dt>Sequence number</dt><dd>${esc(a.sequence_num)}</dd>
    <dt>Capabilities</dt><dd>${(a.capabilities || []).map(c => `<span class="pill">${esc(c)}</span>`).join(" ")}</dd></dl>
    ${a.connected && (a.capabilities || []).includes("ACCEPTS_RESTART_COMMAND") ? '<p><button id="restart">Restart agent</button> <span id="restart-result" class="muted"></span></p>' : ""}</section>
  <section><h2>Identifying attributes</h2>${attrs(a.identifying_attributes)}</section>
  <section><h2>Non-identifying attributes</h2>${attrs(a.non_identifying_attributes)}</section>
  <section><h2>Health</h2>${healthTree(a.health)}</section>
  <section><h2>Remote config status</h2>${rcsCell(a.remote_config_status)} ${short(a.remote_config_status && a.remote_config_status.hash)}</section>
  <section><h2>Remote config offered</h2>${a.remote_config ? `<p>hash ${short(a.remote_config.hash)}</p>${configMap(a.remote_config.config)}` : '<p class="muted">none</p>'}</section>
  <section><h2>Effective config</h2>${configMap(a.effective_config)}</section>
  <section><h2>Push a config to this agent</h2>${editor(`/api/agents/${encodeURIComponent(a.instance_uid)}/config`)}<div id="acks"></div></section>`;
  wireEditor(false);
  const restart = document.getElementById("restart");
  if (restart) restart.addEventListener("click", async () => {
    const out = document.getElementById("restart-result");
    try {
      await api(`/api/agents/${encodeURIComponent(a.instance_uid)}/restart`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
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

function configView() {
  statusEl.textContent = "";
  view.innerHTML = `<section><h2>Push a config to every agent whose attributes match</h2>
    <p>Selector <input type="text" id="selector" placeholder="service.name=my-agent"> <span class="muted">(key=value; empty = every agent)</span></p>
    ${editor("/api/config")}</section><div id="acks"></div>`;
  wireEditor(true);
}

function wireEditor(withSelector) {
  const form = document.getElementById("push");
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    let target = form.dataset.target;
    if (withSelector) {
      const sel = document.getElementById("selector").value.trim();
      if (sel) target += `?selector=${encodeURIComponent(sel)}`;
    }
    const result = document.getElementById("result");
    try {
      const r = await api(target, { method: "PUT", headers: { "content-type": "text/yaml" }, body: document.getElementById("body").value });
      result.innerHTML = `pushed, hash ${short(r.config_hash)} to ${r.agents.length} agent(s)`;
      watchAcks(r);
    } catch (e) {
      result.innerHTML = `<span class="bad">${esc(e.message)}</span>`;
    }
  });
}

// Shows each targeted agent's APPLIED / FAILED as it comes back.
function watchAcks(push) {
  const acks = document.getElementById("acks");
  const tick = async () => {
    const agents = await api("/api/agents");
    const byUid = Object.fromEntries(agents.map(a => [a.instance_uid, a]));
    acks.innerHTML = `<table><thead><tr><th>Agent</th><th>Service</th><th>Status for ${short(push.config_hash)}</th></tr></thead><tbody>${
      push.agents.map(uid => {
        const a = byUid[uid] || {};
        const r = a.remote_config_status;
        const cell = r && r.hash === push.config_hash ? rcsCell(r) : '<span class="warn">pending</span>';
        return `<tr><td class="mono">${esc(uid)}</td><td>${esc(a.service_name)}</td><td>${cell}</td></tr>`;
      }).join("")}</tbody></table>`;
  };
  clearInterval(timer);
  tick();
  timer = setInterval(tick, 1000);
}

async function route() {
  clearInterval(timer);
  const hash = location.hash || "#/";
  try {
    if (hash.startsWith("#/agents/")) {
      const uid = decodeURIComponent(hash.slice("#/agents/".length));
      await agentView(uid);
    } else if (hash === "#/config") {
      configView();
    } else {
      await listView();
      timer = setInterval(() => listView().catch(showError), 2000);
    }
  } catch (e) {
    showError(e);
  }
}

function showError(e) { view.innerHTML = `<p class="bad">${esc(e.message)}</p>`; }

window.addEventListener("hashchange", route);
route();
