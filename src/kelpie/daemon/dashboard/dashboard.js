// Kelpie's dashboard. It talks only to the daemon's public REST API, with the session
// cookie it logged in for and that session's CSRF token on every state-changing request.
// The list follows /v1/events (one stream, no polling per row); a selected sandbox's log
// follows /v1/sandboxes/{id}/logs?follow=true.

const $ = (id) => document.getElementById(id);
const SAFE = new Set(["GET", "HEAD"]);

let csrf = null;
let sandboxes = [];
let stats = new Map();
let selected = null;
let logFollow = null;
let refreshing = null;
let shell = null;
let watching = false;

class ApiError extends Error {}

async function api(method, path, body) {
  const headers = {};
  if (!SAFE.has(method) && csrf) headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!reply.ok) {
    let message = `${method} ${path} failed (HTTP ${reply.status})`;
    try {
      message = (await reply.json()).error?.message ?? message;
    } catch { /* not JSON: keep the status */ }
    throw new ApiError(message);
  }
  if (reply.status === 204) return null;
  return reply.json();
}

// ---- logging in ------------------------------------------------------------------------
async function start() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    login($("login-token").value);
  });
  $("logout").addEventListener("click", logout);
  $("filter").addEventListener("input", render);
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => act(button.dataset.action));
  }
  // a new link opened in this tab changes only the fragment: no reload, so listen
  window.addEventListener("hashchange", () => {
    const token = takeToken();
    if (token) login(token);
  });
  const token = takeToken();
  if (token) {
    await login(token);
    return;
  }
  try {
    csrf = (await api("GET", "/v1/dashboard/session")).csrf;
  } catch {
    showLogin("");
    return;
  }
  await enter();
}

function takeToken() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) history.replaceState(null, "", location.pathname);  // it works once anyway
  return token;
}

async function login(token) {
  try {
    csrf = (await api("POST", "/v1/dashboard/session", { token })).csrf;
  } catch (error) {
    showLogin(error.message);
    return;
  }
  await enter();
}

function showLogin(message) {
  $("login").hidden = false;
  $("sandboxes").hidden = true;
  $("stores").hidden = true;
  $("detail").hidden = true;
  $("logout").hidden = true;
  $("login-error").textContent = message;
}

async function logout() {
  await api("DELETE", "/v1/dashboard/session");
  csrf = null;
  location.reload();
}

async function enter() {
  $("login").hidden = true;
  $("login-error").textContent = "";
  $("sandboxes").hidden = false;
  $("stores").hidden = false;
  $("logout").hidden = false;
  try {
    const version = await api("GET", "/v1/version");
    $("daemon").textContent = `daemon ${version.version ?? ""}`;
  } catch { /* the list says what is wrong */ }
  await refresh();
  if (!watching) {
    watching = true;
    watchEvents();
  }
}

// ---- the list ----------------------------------------------------------------------------
async function refresh() {
  try {
    const [all, samples] = await Promise.all([
      api("GET", "/v1/sandboxes?all=true"), api("GET", "/v1/stats")]);
    sandboxes = all;
    stats = new Map(samples.map((sample) => [sample.id, sample]));
  } catch (error) {
    setStatus(error.message);
    return;
  }
  render();
  if (selected) showDetail(sandboxes.find((s) => s.id === selected) ?? null);
  await refreshStores();
}

async function refreshStores() {
  let snapshots, images;
  try {
    [snapshots, images] = await Promise.all([
      api("GET", "/v1/snapshots"), api("GET", "/v1/images")]);
  } catch (error) {
    setStatus(error.message);
    return;
  }
  $("snapshot-rows").replaceChildren(...snapshots.map((s) => tableRow([
    s.name, s.kind, s.template ? "(template)" : (s.sandbox_name ?? "-"), s.backend,
    shortImage(s.image), `${s.memory_mib} MiB`, bytes(s.size),
    new Date(s.created_at * 1000).toLocaleString()])));
  $("image-rows").replaceChildren(...images.map((i) => tableRow([
    i.id, i.tags.join(", ") || "(untagged)", bytes(i.size)])));
}

function tableRow(values) {
  const row = document.createElement("tr");
  for (const value of values) {
    const cell = document.createElement("td");
    cell.textContent = value;
    row.append(cell);
  }
  return row;
}

function scheduleRefresh() {
  clearTimeout(refreshing);
  refreshing = setTimeout(refresh, 150);  // a burst of events, one refresh
}

async function watchEvents() {
  for (;;) {
    try {
      const reply = await fetch("/v1/events", { credentials: "same-origin" });
      if (!reply.ok) throw new ApiError(`the event stream failed (HTTP ${reply.status})`);
      await readLines(reply, (event) => {
        scheduleRefresh();
        if (event.sandbox_id === selected) addHistory(event);
      });
    } catch (error) {
      setStatus(`${error.message}; reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function readText(reply, onText) {
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}

async function readLines(reply, onLine) {
  let buffer = "";
  await readText(reply, (text) => {
    buffer += text;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.trim()) onLine(JSON.parse(line));
    }
  });
}

function render() {
  const wanted = $("filter").value.trim().toLowerCase();
  const shown = sandboxes.filter((s) => !wanted ||
    [s.name, s.state, s.image ?? ""].some((text) => text.toLowerCase().includes(wanted)));
  const rows = shown.map((s) => {
    const row = document.createElement("tr");
    row.dataset.sandbox = s.name;
    const name = document.createElement("button");
    name.type = "button";
    name.className = "link";
    name.textContent = s.name;
    name.addEventListener("click", () => select(s.id));
    const sample = stats.get(s.id);
    const cells = [name, state(s.state), shortImage(s.image), s.backend, s.arch,
      `${s.cpus}`, memory(s, sample), disk(sample), since(s),
      s.ports.map((p) => `${p.host_port}→${p.guest_port}/${p.protocol}`).join(", ")];
    for (const value of cells) {
      const cell = document.createElement("td");
      if (value instanceof Node) cell.append(value); else cell.textContent = value;
      row.append(cell);
    }
    return row;
  });
  $("rows").replaceChildren(...rows);
  $("empty").hidden = shown.length > 0;
}

function shortImage(reference) {
  if (!reference) return "(guest kit)";
  return reference.replace(/@sha256:([0-9a-f]{12})[0-9a-f]+/, "@sha256:$1…");
}

function state(name) {
  const span = document.createElement("span");
  span.className = `state-${name}`;
  span.textContent = name;
  return span;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function memory(s, sample) {
  const guest = sample?.guest;
  return guest ? `${bytes(guest.memory_used_bytes)} / ${s.memory_mib} MiB`
    : `${s.memory_mib} MiB`;
}

function disk(sample) {
  const guest = sample?.guest;
  return guest ? `${bytes(guest.disk_used_bytes)} / ${bytes(guest.disk_total_bytes)}` : "";
}

function since(s) {
  const seconds = Math.max(0, Date.now() / 1000 - s.updated_at);
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// ---- one sandbox -------------------------------------------------------------------------
async function select(id) {
  selected = id;
  const sandbox = sandboxes.find((s) => s.id === id) ?? null;
  showDetail(sandbox);
  $("history").replaceChildren();
  setStatus("");
  try {
    for (const event of await api("GET", `/v1/sandboxes/${id}/events`)) addHistory(event);
  } catch (error) {
    setStatus(error.message);
  }
  followLog(id);
}

function showDetail(sandbox) {
  if (!sandbox) {
    closeDetail();
    return;
  }
  $("detail").hidden = false;
  $("detail-title").textContent = sandbox.name;
  const facts = [["Id", sandbox.id], ["State", sandbox.state],
    ["Image", sandbox.image ?? "(guest kit)"], ["Image digest", sandbox.image_digest ?? "-"], ["Backend", `${sandbox.backend} (${sandbox.arch})`],
    ["CPUs", `${sandbox.cpus}`], ["Memory", `${sandbox.memory_mib} MiB`],
    ["Network", sandbox.network], ["Command", (sandbox.command ?? []).join(" ") || "-"],
    ["Last error", sandbox.last_error ?? "-"]];
  $("facts").replaceChildren(...facts.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    return [dt, dd];
  }));
  const at = sandbox.state;
  const enabled = { pause: at === "running", resume: at === "paused",
    stop: at === "running" || at === "paused", snapshot: at === "running" || at === "paused",
    remove: true, close: true, terminal: at === "running", "close-terminal": shell !== null };
  for (const button of document.querySelectorAll("[data-action]")) {
    button.disabled = !enabled[button.dataset.action];
  }
}

function closeDetail() {
  selected = null;
  logFollow?.abort();
  closeShell();
  $("detail").hidden = true;
}

// ---- a shell in the browser: xterm.js over the exec WebSocket (tty, with resize) --------
function openShell(id) {
  closeShell();
  const terminal = new Terminal({ cursorBlink: true, fontSize: 14 });
  const fit = new FitAddon.FitAddon();
  terminal.loadAddon(fit);
  terminal.open($("terminal"));
  fit.fit();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/v1/sandboxes/${id}/exec/ws`);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  const send = (data) => { if (socket.readyState === WebSocket.OPEN) socket.send(data); };
  socket.addEventListener("open", () => {
    send(JSON.stringify({ argv: ["/bin/sh"], tty: true, rows: terminal.rows,
      cols: terminal.cols }));
    terminal.focus();
  });
  socket.addEventListener("message", (message) => {
    if (typeof message.data !== "string") {
      terminal.write(new Uint8Array(message.data).subarray(1));  // byte 0: the channel
      return;
    }
    const control = JSON.parse(message.data);
    if (control.type === "exit") terminal.write(`\r\n[exited ${control.exit_code}]\r\n`);
    if (control.type === "error") terminal.write(`\r\n[${control.error.message}]\r\n`);
  });
  socket.addEventListener("close", () => {
    if (shell?.socket === socket) terminal.write("\r\n[closed]\r\n");
  });
  terminal.onData((data) => send(encoder.encode(data)));
  terminal.onResize(({ cols, rows }) => send(JSON.stringify({ type: "resize", cols, rows })));
  const refit = () => fit.fit();
  window.addEventListener("resize", refit);
  shell = { terminal, socket, refit };
  showDetail(sandboxes.find((s) => s.id === id) ?? null);
}

function closeShell() {
  if (!shell) return;
  window.removeEventListener("resize", shell.refit);
  shell.socket.close();
  shell.terminal.dispose();
  shell = null;
}

function addHistory(event) {
  const item = document.createElement("li");
  const when = new Date(event.at * 1000).toLocaleTimeString();
  item.textContent = `${when} ${event.kind}: ${event.state}${event.reason ? ` (${event.reason})` : ""}`;
  $("history").append(item);
}

async function followLog(id) {
  logFollow?.abort();
  logFollow = new AbortController();
  const log = $("log");
  log.textContent = "";
  try {
    const reply = await fetch(`/v1/sandboxes/${id}/logs?follow=true&tail=500`, {
      credentials: "same-origin", signal: logFollow.signal });
    if (!reply.ok) throw new ApiError(`the log failed (HTTP ${reply.status})`);
    await readText(reply, (text) => {
      log.textContent += text;
      log.scrollTop = log.scrollHeight;
    });
  } catch (error) {
    if (error.name !== "AbortError") setStatus(error.message);
  }
}

const CONFIRM = {
  stop: (name) => `Stop ${name}? Its processes end.`,
  remove: (name) => `Remove ${name}? Its disk and logs are deleted.`,
};

async function act(action) {
  if (action === "close") {
    closeDetail();
    return;
  }
  if (action === "terminal" || action === "close-terminal") {
    if (action === "terminal") openShell(selected); else closeShell();
    showDetail(sandboxes.find((s) => s.id === selected) ?? null);
    return;
  }
  const sandbox = sandboxes.find((s) => s.id === selected);
  if (!sandbox) return;
  if (CONFIRM[action] && !window.confirm(CONFIRM[action](sandbox.name))) return;
  setStatus(`${action}: ${sandbox.name}…`);
  try {
    if (action === "snapshot") {
      const made = await api("POST", "/v1/snapshots", { sandbox: sandbox.id });
      setStatus(`snapshot ${made.name} taken (${bytes(made.size)})`);
    } else if (action === "remove") {
      await api("DELETE", `/v1/sandboxes/${sandbox.id}?force=true`);
      closeDetail();
      setStatus(`${sandbox.name} removed`);
    } else {
      await api("POST", `/v1/sandboxes/${sandbox.id}/${action}`);
      setStatus(`${sandbox.name}: ${action} done`);
    }
  } catch (error) {
    setStatus(error.message);
  }
  await refresh();
}

function setStatus(message) {
  $("status").textContent = message;
}

start();
