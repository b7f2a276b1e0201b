// The sandboxes: the live list (refreshed when /v1/events says something happened, never
// by a timer per row) and the one selected: its facts, state history, followed log, a
// shell, its files and the buttons that act on it.

import {
  api, type Sandbox, type SandboxEvent, type Snapshot, type Stats, follow, q,
} from "./api";
import { FileBrowser } from "./files";
import { Shell } from "./shell";
import {
  $, bytes, duration, facts, input, linkButton, row, setStatus, shortImage,
} from "./view";

const CONFIRM: Record<string, (name: string) => string> = {
  stop: (name) => `Stop ${name}? Its processes end.`,
  remove: (name) => `Remove ${name}? Its disk and logs are deleted.`,
};

export class Sandboxes {
  private all: Sandbox[] = [];
  private stats = new Map<string, Stats>();
  private selected: string | null = null;
  private log: AbortController | null = null;
  private shell: Shell | null = null;
  private readonly files = new FileBrowser();

  constructor(private readonly onChange: () => Promise<void>) {
    input("filter").addEventListener("input", () => this.render());
    for (const button of document.querySelectorAll<HTMLButtonElement>("[data-action]")) {
      button.addEventListener("click", () => void this.act(button.dataset.action ?? ""));
    }
    $("fork-form").addEventListener("submit", (event) => {
      event.preventDefault();
      void this.act("fork");
    });
  }

  async refresh(): Promise<void> {
    try {
      const [all, samples] = await Promise.all([
        api<Sandbox[]>("GET", "/v1/sandboxes?all=true"), api<Stats[]>("GET", "/v1/stats")]);
      this.all = all;
      this.stats = new Map(samples.map((sample) => [sample.id, sample]));
    } catch (error) {
      setStatus((error as Error).message);
      return;
    }
    this.render();
    if (this.selected) this.showDetail(this.find(this.selected));
  }

  /** An event of the /v1/events stream: the selected sandbox's history grows. */
  heard(event: SandboxEvent): void {
    if (event.sandbox_id === this.selected) addHistory(event);
  }

  private find(id: string): Sandbox | null {
    return this.all.find((s) => s.id === id) ?? null;
  }

  private render(): void {
    const wanted = input("filter").value.trim().toLowerCase();
    const shown = this.all.filter((s) => !wanted ||
      [s.name, s.state, s.image ?? ""].some((text) => text.toLowerCase().includes(wanted)));
    $("rows").replaceChildren(...shown.map((s) => {
      const guest = this.stats.get(s.id)?.guest;
      const tr = row([
        linkButton(s.name, s.name, () => void this.select(s.id)), stateBadge(s.state),
        shortImage(s.image), s.backend, s.arch, `${s.cpus}`,
        guest ? `${bytes(guest.memory_used_bytes)} / ${s.memory_mib} MiB` : `${s.memory_mib} MiB`,
        guest ? `${bytes(guest.disk_used_bytes)} / ${bytes(guest.disk_total_bytes)}` : "",
        duration(Math.max(0, Date.now() / 1000 - s.updated_at)),
        s.ports.map((p) => `${p.host_port}→${p.guest_port}/${p.protocol}`).join(", ")]);
      tr.dataset.sandbox = s.name;
      return tr;
    }));
    $("empty").hidden = shown.length > 0;
  }

  private async select(id: string): Promise<void> {
    if (this.selected !== id) this.closeShell();
    this.selected = id;
    this.showDetail(this.find(id));
    $("history").replaceChildren();
    setStatus("");
    try {
      for (const event of await api<SandboxEvent[]>("GET", `/v1/sandboxes/${q(id)}/events`)) {
        addHistory(event);
      }
    } catch (error) {
      setStatus((error as Error).message);
    }
    void this.followLog(id);
  }

  private showDetail(sandbox: Sandbox | null): void {
    if (!sandbox) {
      this.closeDetail();
      return;
    }
    $("detail").hidden = false;
    $("detail-title").textContent = sandbox.name;
    facts($("facts"), [["Id", sandbox.id], ["State", sandbox.state],
      ["Image", sandbox.image ?? "(guest kit)"], ["Backend", `${sandbox.backend} (${sandbox.arch})`],
      ["CPUs", `${sandbox.cpus}`], ["Memory", `${sandbox.memory_mib} MiB`],
      ["Network", sandbox.network], ["Command", (sandbox.command ?? []).join(" ") || "-"],
      ["Last error", sandbox.last_error ?? "-"]]);
    const at = sandbox.state;
    const live = at === "running" || at === "paused";
    const enabled: Record<string, boolean> = {
      pause: at === "running", resume: at === "paused", stop: live, snapshot: live,
      remove: true, close: true, terminal: at === "running",
      "close-terminal": this.shell !== null,
    };
    for (const button of document.querySelectorAll<HTMLButtonElement>("[data-action]")) {
      button.disabled = !enabled[button.dataset.action ?? ""];
    }
    ($("fork-button") as HTMLButtonElement).disabled = !live;
    $("terminal").hidden = this.shell === null;
    $("files").hidden = at !== "running";
    if (at === "running") this.files.show(sandbox.id, sandbox.workdir || "/");
    else this.files.hide();
  }

  private closeDetail(): void {
    this.selected = null;
    this.log?.abort();
    this.closeShell();
    this.files.hide();
    $("detail").hidden = true;
  }

  private closeShell(): void {
    this.shell?.close();
    this.shell = null;
  }

  private async followLog(id: string): Promise<void> {
    this.log?.abort();
    const controller = new AbortController();
    this.log = controller;
    const log = $("log");
    log.textContent = "";
    try {
      await follow(`/v1/sandboxes/${q(id)}/logs?follow=true&tail=500`, (text) => {
        log.textContent += text;
        log.scrollTop = log.scrollHeight;
      }, controller.signal);
    } catch (error) {
      if ((error as Error).name !== "AbortError") setStatus((error as Error).message);
    }
  }

  private async act(action: string): Promise<void> {
    const sandbox = this.selected ? this.find(this.selected) : null;
    if (action === "close" || !sandbox) {
      this.closeDetail();
      return;
    }
    if (action === "terminal" || action === "close-terminal") {
      this.closeShell();
      if (action === "terminal") {
        $("terminal").hidden = false;  // before it opens: it fits itself to its box
        this.shell = new Shell(sandbox.id, $("terminal"));
      }
      this.showDetail(sandbox);
      return;
    }
    const confirmation = CONFIRM[action];
    if (confirmation && !window.confirm(confirmation(sandbox.name))) return;
    setStatus(`${action}: ${sandbox.name}…`);
    const path = `/v1/sandboxes/${q(sandbox.id)}`;
    try {
      if (action === "snapshot") {
        const made = await api<Snapshot>("POST", "/v1/snapshots", { sandbox: sandbox.id });
        setStatus(`snapshot ${made.name} taken (${bytes(made.size)})`);
      } else if (action === "fork") {
        const count = Number(input("fork-count").value) || 1;
        const prefix = input("fork-prefix").value.trim();
        const children = await api<Sandbox[]>("POST", `${path}/fork`,
          { count, ...(prefix ? { name_prefix: prefix } : {}) });
        setStatus(`forked ${sandbox.name} into ${children.map((c) => c.name).join(", ")}`);
      } else if (action === "remove") {
        await api("DELETE", `${path}?force=true`);
        this.closeDetail();
        setStatus(`${sandbox.name} removed`);
      } else {
        await api("POST", `${path}/${action}`);
        setStatus(`${sandbox.name}: ${action} done`);
      }
    } catch (error) {
      setStatus((error as Error).message);
    }
    await this.onChange();
  }
}

function stateBadge(name: string): HTMLSpanElement {
  const span = document.createElement("span");
  span.className = `state-${name}`;
  span.textContent = name;
  return span;
}

function addHistory(event: SandboxEvent): void {
  const item = document.createElement("li");
  const at = new Date(event.at * 1000).toLocaleTimeString();
  item.textContent = `${at} ${event.kind}: ${event.state}${event.reason ? ` (${event.reason})` : ""}`;
  $("history").append(item);
}
