// Small helpers to build the page's elements (always as text, never as HTML: names and
// output come from sandboxes, which are untrusted) and to format numbers and times.

export function $(id: string): HTMLElement {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return element;
}

export function input(id: string): HTMLInputElement {
  return $(id) as HTMLInputElement;
}

type Cell = string | Node;

export function row(cells: Cell[]): HTMLTableRowElement {
  const tr = document.createElement("tr");
  for (const value of cells) {
    const td = document.createElement("td");
    if (value instanceof Node) td.append(value); else td.textContent = value;
    tr.append(td);
  }
  return tr;
}

export function linkButton(text: string, label: string, onClick: () => void,
): HTMLButtonElement {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link";
  button.textContent = text;
  if (label !== text) button.setAttribute("aria-label", label);
  button.addEventListener("click", onClick);
  return button;
}

export function facts(list: HTMLElement, pairs: [string, string][]): void {
  list.replaceChildren(...pairs.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    return [dt, dd];
  }));
}

export function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds: number): string {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function shortImage(reference: string | null): string {
  if (!reference) return "(guest kit)";
  return reference.replace(/@sha256:([0-9a-f]{12})[0-9a-f]+/, "@sha256:$1…");
}

export function shortDigest(digest: string | null): string {
  return digest ? digest.replace(/^(sha256:[0-9a-f]{12})[0-9a-f]+$/, "$1…") : "-";
}

export function when(unixSeconds: number): string {
  return new Date(unixSeconds * 1000).toLocaleString();
}

let statusLine: HTMLElement | null = null;

/** Say what happened (or went wrong) in the page's status line, read out politely. */
export function setStatus(message: string): void {
  statusLine ??= $("status");
  statusLine.textContent = message;
}
