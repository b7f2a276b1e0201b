// The fleet this daemon's host belongs to, if any: GET /v1/fleet?follow=true sends the
// view its controller last sent, then again each round. A daemon in no fleet answers 404:
// the section stays hidden, and the page asks again now and then (a fleet may come up).

import { ApiError, followLines } from "./api";
import { $, bytes, row, setStatus } from "./view";

interface FleetHost {
  host: string; status: string; reason: string | null; arches: string[]; backends: string[];
  cpus: number; free_vcpus: number; memory_mib: number; free_memory_mib: number;
  free_disk_bytes: number; sandboxes: { name: string; status: string; state: string | null }[];
}
interface FleetView { at: number; hosts: FleetHost[] }

const NOT_IN_FLEET_RETRY_MS = 30_000;

export async function watchFleet(): Promise<void> {
  for (;;) {
    let wait = 2000;
    try {
      await followLines<FleetView>("/v1/fleet?follow=true", show);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        $("fleet").hidden = true;
        wait = NOT_IN_FLEET_RETRY_MS;
      } else {
        setStatus(`${(error as Error).message}; reconnecting`);
      }
    }
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

function show(view: FleetView): void {
  $("fleet").hidden = false;
  $("fleet-at").textContent = `as its controller saw it at ${new Date(view.at * 1000).toLocaleTimeString()}`;
  $("fleet-rows").replaceChildren(...view.hosts.map((h) => row([
    h.host, h.reason ? `${h.status} (${h.reason})` : h.status,
    `${h.arches.join(", ")} · ${h.backends.join(", ")}`,
    `${h.free_vcpus} / ${h.cpus}`, `${h.free_memory_mib} / ${h.memory_mib} MiB`,
    bytes(h.free_disk_bytes),
    h.sandboxes.map((s) => `${s.name} (${s.state ?? s.status})`).join(", ") || "-"])));
}
