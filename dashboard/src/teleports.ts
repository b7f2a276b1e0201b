// Teleports in flight: GET /v1/teleports?follow=true sends the list again at every step
// of any of them (at most four lines a second), so the table moves without polling.

import { followLines, type TeleportInFlight } from "./api";
import { $, bytes, row, setStatus } from "./view";

export async function watchTeleports(): Promise<void> {
  for (;;) {
    try {
      await followLines<TeleportInFlight[]>("/v1/teleports?follow=true", show);
    } catch (error) {
      setStatus(`${(error as Error).message}; reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function show(teleports: TeleportInFlight[]): void {
  $("teleport-rows").replaceChildren(...teleports.map((t) => row([
    t.sandbox_name, t.target, t.mode, `${t.phase}: ${t.message}`,
    t.total ? `${bytes(t.done)} / ${bytes(t.total)}` : "",
    bytes(t.bytes_sent), `${bytes(t.rate_bytes_per_s)}/s`,
    t.paused_s === null ? "running" : `${t.paused_s.toFixed(2)} s`])));
  $("teleports-empty").hidden = teleports.length > 0;
  $("teleports-table").hidden = teleports.length === 0;
}
