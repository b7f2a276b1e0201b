// Kelpie's dashboard: logs in (a one-time token from the URL fragment, or a pasted token,
// traded for a session cookie and a CSRF token), then shows the sandboxes, the stores and
// the teleports in flight and the fleet, all through the daemon's public REST API.

import "./style.css";

import { api, followLines, type SandboxEvent, setCsrf } from "./api";
import { Sandboxes } from "./sandboxes";
import { watchFleet } from "./fleet";
import { refreshStores } from "./stores";
import { watchTeleports } from "./teleports";
import { $, input, setStatus } from "./view";

interface Session { csrf: string }

const sandboxes = new Sandboxes(refresh);
let refreshing: number | undefined;
let watching = false;

async function start(): Promise<void> {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    void login(input("login-token").value);
  });
  $("logout").addEventListener("click", () => void logout());
  $("store-close").addEventListener("click", () => { $("store-detail").hidden = true; });
  // a new link opened in this tab changes only the fragment: no reload, so listen
  window.addEventListener("hashchange", () => {
    const token = takeToken();
    if (token) void login(token);
  });
  const token = takeToken();
  if (token) {
    await login(token);
    return;
  }
  try {
    setCsrf((await api<Session>("GET", "/v1/dashboard/session")).csrf);
  } catch {
    showLogin("");
    return;
  }
  await enter();
}

function takeToken(): string | null {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) history.replaceState(null, "", location.pathname);  // it works once anyway
  return token;
}

async function login(token: string): Promise<void> {
  try {
    setCsrf((await api<Session>("POST", "/v1/dashboard/session", { token })).csrf);
  } catch (error) {
    showLogin((error as Error).message);
    return;
  }
  await enter();
}

const SIGNED_IN = ["sandboxes", "teleports", "stores", "logout"];

function showLogin(message: string): void {
  $("login").hidden = false;
  for (const id of [...SIGNED_IN, "detail"]) $(id).hidden = true;
  $("login-error").textContent = message;
}

async function logout(): Promise<void> {
  await api("DELETE", "/v1/dashboard/session");
  setCsrf(null);
  location.reload();
}

async function enter(): Promise<void> {
  $("login").hidden = true;
  $("login-error").textContent = "";
  for (const id of SIGNED_IN) $(id).hidden = false;
  try {
    const version = await api<{ version: string }>("GET", "/v1/version");
    $("daemon").textContent = `daemon ${version.version}`;
  } catch { /* the list says what is wrong */ }
  await refresh();
  if (!watching) {
    watching = true;
    void watchEvents();
    void watchTeleports();
    void watchFleet();
  }
}

async function refresh(): Promise<void> {
  await sandboxes.refresh();
  await refreshStores();
}

function scheduleRefresh(): void {
  clearTimeout(refreshing);
  refreshing = window.setTimeout(() => void refresh(), 150);  // a burst of events, one refresh
}

async function watchEvents(): Promise<void> {
  for (;;) {
    try {
      await followLines<SandboxEvent>("/v1/events", (event) => {
        scheduleRefresh();
        sandboxes.heard(event);
      });
    } catch (error) {
      setStatus(`${(error as Error).message}; reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

void start();
