// Builds the dashboard into the Python package with fixed names (the daemon serves a
// whitelist of them), no inline script (its CSP allows scripts only from itself) and no
// source maps: `npm ci && npm run build` gives the committed files byte for byte.
import { defineConfig } from "vite";

export default defineConfig({
  base: "/dashboard/",
  build: {
    outDir: "../src/kelpie/daemon/dashboard",
    emptyOutDir: true,
    assetsDir: "",
    modulePreload: { polyfill: false },
    license: { fileName: "LICENSES.md" },  // what the bundle holds of others (xterm.js)
    rolldownOptions: {
      output: {
        entryFileNames: "dashboard.js",
        assetFileNames: "dashboard[extname]",
      },
    },
  },
});
