// Files in a sandbox: browse its directories (GET /dir), download a file (a plain link to
// GET /files: the browser saves what streams back) and upload into the directory shown
// (PUT /files, with the CSRF token).

import { api, ApiError, type FileEntry, q, upload } from "./api";
import { $, bytes, input, linkButton, row, setStatus } from "./view";

export class FileBrowser {
  private sandboxId: string | null = null;
  private dir = "/";

  constructor() {
    $("files-up").addEventListener("click", () => this.open(parent(this.dir)));
    $("files-go").addEventListener("submit", (event) => {
      event.preventDefault();
      this.open(input("files-path").value.trim() || "/");
    });
    $("files-upload").addEventListener("submit", (event) => {
      event.preventDefault();
      void this.upload();
    });
  }

  show(sandboxId: string, startAt: string): void {
    if (this.sandboxId === sandboxId) return;
    this.sandboxId = sandboxId;
    void this.open(startAt);
  }

  hide(): void {
    this.sandboxId = null;
    $("file-rows").replaceChildren();
  }

  async open(dir: string): Promise<void> {
    const id = this.sandboxId;
    if (!id) return;
    let entries: FileEntry[];
    try {
      entries = await api<FileEntry[]>("GET", `/v1/sandboxes/${q(id)}/dir?path=${q(dir)}`);
    } catch (error) {
      setStatus(`files: ${(error as Error).message}`);
      return;
    }
    this.dir = dir;
    input("files-path").value = dir;
    entries.sort((a, b) => Number(b.type === "dir") - Number(a.type === "dir") ||
      a.name.localeCompare(b.name));
    $("file-rows").replaceChildren(...entries.map((entry) => {
      const path = join(dir, entry.name);
      let name: Node;
      if (entry.type === "dir") {
        name = linkButton(`${entry.name}/`, `open directory ${entry.name}`, () => this.open(path));
      } else if (entry.type === "file") {
        const link = document.createElement("a");
        link.href = `/v1/sandboxes/${q(id)}/files?path=${q(path)}`;
        link.download = entry.name;
        link.textContent = entry.name;
        link.setAttribute("aria-label", `download ${entry.name}`);
        name = link;
      } else {
        name = document.createTextNode(entry.name);
      }
      return row([name, entry.type, entry.type === "file" ? bytes(entry.size) : "",
        (entry.mode & 0o7777).toString(8).padStart(4, "0")]);
    }));
    $("files-empty").hidden = entries.length > 0;
  }

  private async upload(): Promise<void> {
    const id = this.sandboxId;
    const chosen = input("files-choose").files;
    if (!id || !chosen?.length) {
      setStatus("choose a file to upload first");
      return;
    }
    try {
      for (const file of Array.from(chosen)) {
        setStatus(`uploading ${file.name} (${bytes(file.size)})…`);
        await upload(`/v1/sandboxes/${q(id)}/files?path=${q(join(this.dir, file.name))}`, file);
      }
      setStatus(`uploaded ${chosen.length} file${chosen.length === 1 ? "" : "s"} to ${this.dir}`);
    } catch (error) {
      setStatus(`upload: ${error instanceof ApiError ? error.message : String(error)}`);
    }
    input("files-choose").value = "";
    await this.open(this.dir);
  }
}

function join(dir: string, name: string): string {
  return dir.endsWith("/") ? `${dir}${name}` : `${dir}/${name}`;
}

function parent(dir: string): string {
  const trimmed = dir.replace(/\/+$/, "");
  const cut = trimmed.lastIndexOf("/");
  return cut <= 0 ? "/" : trimmed.slice(0, cut);
}
