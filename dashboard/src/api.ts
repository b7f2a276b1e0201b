// The daemon's public REST API as the page uses it: the session cookie goes with every
// request, and the session's CSRF token with every state-changing one. The types mirror
// the models of kelpie.api (docs/openapi.json), the fields the page reads.

export interface Port { host_port: number; guest_port: number; protocol: string }

export interface Sandbox {
  id: string; name: string; state: string; backend: string; arch: string;
  image: string | null; image_digest: string | null; cpus: number; memory_mib: number;
  network: string; ports: Port[]; workdir: string | null; command: string[] | null;
  last_error: string | null; updated_at: number;
}

export interface GuestStats {
  memory_used_bytes: number; disk_used_bytes: number; disk_total_bytes: number;
}
export interface Stats { id: string; guest: GuestStats | null }

export interface SandboxEvent {
  sandbox_id: string; at: number; kind: string; state: string; reason: string | null;
}

export interface Snapshot {
  id: string; name: string; kind: string; template: boolean; backend: string;
  sandbox_name: string | null; image: string | null; memory_mib: number; size: number;
  created_at: number;
}

export interface Compatibility {
  kind: string; backend: string; backend_version: string; arch: string; cpu_model: string;
  machine: string; vcpus: number; memory_mib: number; guestkit_digest: string | null;
  base_image_digest: string | null; restorable_here: boolean; reasons: string[];
}

export interface Image { id: string; digest: string; tags: string[]; size: number }

export interface ImageDetails extends Image {
  platform: string; media_type: string; working_dir: string;
  entrypoint: string[]; cmd: string[];
  layers: { digest: string; size: number; media_type: string }[];
  held_by: string[];
}

export interface FileEntry { name: string; type: string; size: number; mode: number }

export interface TeleportInFlight {
  id: string; sandbox_name: string; target: string; mode: string; phase: string;
  message: string; done: number; total: number; bytes_sent: number;
  rate_bytes_per_s: number; paused_s: number | null;
}

export class ApiError extends Error {
  constructor(message: string, readonly status: number) {
    super(message);
  }
}

/** The daemon's error message of a failed reply (its JSON error body), else the status. */
async function failure(reply: Response, what: string): Promise<ApiError> {
  let message = `${what} failed (HTTP ${reply.status})`;
  try {
    message = (await reply.json()).error?.message ?? message;
  } catch { /* not JSON: keep the status */ }
  return new ApiError(message, reply.status);
}

const SAFE = new Set(["GET", "HEAD"]);
let csrf: string | null = null;

export function setCsrf(token: string | null): void {
  csrf = token;
}

async function send(method: string, path: string, body?: BodyInit, type?: string,
): Promise<Response> {
  const headers: Record<string, string> = {};
  if (!SAFE.has(method) && csrf) headers["X-CSRF-Token"] = csrf;
  if (type) headers["Content-Type"] = type;
  const reply = await fetch(path, { method, headers, credentials: "same-origin", body });
  if (!reply.ok) throw await failure(reply, `${method} ${path}`);
  return reply;
}

/** A JSON request; its JSON answer (null for 204). */
export async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  const reply = await send(method, path,
    body === undefined ? undefined : JSON.stringify(body),
    body === undefined ? undefined : "application/json");
  return (reply.status === 204 ? null : await reply.json()) as T;
}

/** Bytes up (a file's content). */
export async function upload(path: string, data: Blob): Promise<void> {
  await send("PUT", path, data, "application/octet-stream");
}

/** Follow a streamed answer, a piece of text at a time, until it ends or is aborted. */
export async function follow(path: string, onText: (text: string) => void,
                             signal?: AbortSignal): Promise<void> {
  const reply = await fetch(path, { credentials: "same-origin", signal });
  if (!reply.ok || !reply.body) throw await failure(reply, path);
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}

/** Follow an NDJSON stream, one parsed line at a time. */
export async function followLines<T>(path: string, onLine: (line: T) => void,
                                     signal?: AbortSignal): Promise<void> {
  let buffer = "";
  await follow(path, (text) => {
    buffer += text;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.trim()) onLine(JSON.parse(line) as T);
    }
  }, signal);
}

/** A path segment or query value, escaped. */
export const q = encodeURIComponent;
