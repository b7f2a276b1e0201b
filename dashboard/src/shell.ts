// A shell in the browser: xterm.js over the daemon's exec WebSocket (a tty, resized with
// the terminal). Binary messages carry the stream (byte 0 is the channel); text messages
// carry control (the start, resizes, the exit).

import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import "@xterm/xterm/css/xterm.css";

import { q } from "./api";

export class Shell {
  private readonly terminal = new Terminal({ cursorBlink: true, fontSize: 14 });
  private readonly fit = new FitAddon();
  private readonly socket: WebSocket;
  private readonly refit = () => this.fit.fit();
  private closed = false;

  constructor(sandboxId: string, into: HTMLElement) {
    const terminal = this.terminal;
    terminal.loadAddon(this.fit);
    terminal.open(into);
    this.fit.fit();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/v1/sandboxes/${q(sandboxId)}/exec/ws`);
    this.socket = socket;
    socket.binaryType = "arraybuffer";
    const encoder = new TextEncoder();
    socket.addEventListener("open", () => {
      this.send(JSON.stringify({ argv: ["/bin/sh"], tty: true, rows: terminal.rows,
        cols: terminal.cols }));
      terminal.focus();
    });
    socket.addEventListener("message", (message: MessageEvent<ArrayBuffer | string>) => {
      if (typeof message.data !== "string") {
        terminal.write(new Uint8Array(message.data).subarray(1));
        return;
      }
      const control = JSON.parse(message.data);
      if (control.type === "exit") terminal.write(`\r\n[exited ${control.exit_code}]\r\n`);
      if (control.type === "error") terminal.write(`\r\n[${control.error.message}]\r\n`);
    });
    socket.addEventListener("close", () => {
      if (!this.closed) terminal.write("\r\n[closed]\r\n");
    });
    terminal.onData((data) => this.send(encoder.encode(data)));
    terminal.onResize(({ cols, rows }) => this.send(JSON.stringify({ type: "resize", cols, rows })));
    window.addEventListener("resize", this.refit);
  }

  private send(data: string | Uint8Array<ArrayBuffer>): void {
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(data);
  }

  close(): void {
    this.closed = true;
    window.removeEventListener("resize", this.refit);
    this.socket.close();
    this.terminal.dispose();
  }
}
