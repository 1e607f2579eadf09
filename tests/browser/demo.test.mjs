// Browser test of the demo page (run by scripts/browser-test.sh):
//   node tests/browser/demo.test.mjs SITE_URL NATIVE_BIN ARTIFACT_DIR
// Drives Debian's Chromium headless with WebGPU on SwiftShader, waits for the page's GPU result,
// checks the numbers it shows against the native library (`sparse-attn explore`, same config
// and seed), moves the budget slider and checks again, saves a screenshot, and checks that a
// browser without WebGPU gets the explanation instead of a blank page.
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import path from "node:path";

const [url, nativeBin, outDir] = process.argv.slice(2);
if (!url || !nativeBin || !outDir) {
  console.error("usage: demo.test.mjs SITE_URL NATIVE_BIN ARTIFACT_DIR");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const common = [
  "--no-sandbox", "--disable-background-networking", "--disable-component-update",
  "--disable-sync", "--no-first-run",
];
const webgpu = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"];

let failures = 0;
function check(ok, what) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures += 1;
}

function native(config) {
  const out = execFileSync(nativeBin, ["explore", "--config", config], {
    encoding: "utf8",
    env: { ...process.env, RUST_LOG: "error" },
  });
  return JSON.parse(out);
}

async function pageNumbers(page) {
  return page.evaluate(() => {
    const v = (id) => parseFloat(document.getElementById(id).dataset.value);
    const s = document.getElementById("status");
    return {
      config: s.dataset.config,
      runs: parseInt(s.dataset.runs, 10),
      kept_blocks: v("kept"),
      mean_sparsity: v("sparsity"),
      output_error: v("error"),
      mean_entropy: v("entropy"),
      full_ms: v("t-full"),
    };
  });
}

function compare(got, want, label) {
  check(Math.abs(got.kept_blocks - want.kept_blocks) < 1e-9,
    `${label}: kept blocks ${got.kept_blocks} = native ${want.kept_blocks}`);
  check(Math.abs(got.mean_sparsity - want.mean_sparsity) < 2e-3,
    `${label}: mass kept ${got.mean_sparsity.toFixed(5)} ~ native ${want.mean_sparsity.toFixed(5)}`);
  check(Math.abs(got.output_error - want.output_error) <= 0.02 * want.output_error + 1e-4,
    `${label}: output error ${got.output_error.toFixed(5)} ~ native ${want.output_error.toFixed(5)}`);
  check(Math.abs(got.mean_entropy - want.mean_entropy) < 1e-2,
    `${label}: entropy ${got.mean_entropy.toFixed(4)} ~ native ${want.mean_entropy.toFixed(4)}`);
}

async function waitDone(page, runsAbove) {
  await page.waitForFunction(
    (n) => {
      const s = document.getElementById("status");
      return s.dataset.state === "error" || (s.dataset.state === "done" && parseInt(s.dataset.runs, 10) > n);
    },
    runsAbove,
    { timeout: 180_000 },
  );
  const state = await page.locator("#status").getAttribute("data-state");
  if (state === "error") throw new Error(await page.locator("#status").textContent());
}

const browser = await chromium.launch({ executablePath, args: [...common, ...webgpu] });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await waitDone(page, 0);
  const adapter = await page.locator("#adapter").textContent();
  console.log(`page adapter: ${adapter}`);
  const first = await pageNumbers(page);
  compare(first, native(first.config), `initial ${first.config}`);
  check(first.full_ms > 0, `GPU timing shown (${first.full_ms} ms full attention)`);
  await page.screenshot({ path: path.join(outDir, "demo-initial.png") });

  // Lower the budget: the page recomputes, keeps less, and still agrees with the native library.
  await page.locator("#topk").fill("3");
  await waitDone(page, first.runs);
  const second = await pageNumbers(page);
  check(JSON.parse(second.config).topk === 3, `slider moved to top-3 (${second.config})`);
  compare(second, native(second.config), "top-3");
  check(second.mean_sparsity <= first.mean_sparsity + 1e-6 && second.kept_blocks < first.kept_blocks,
    `a smaller budget keeps less (${second.mean_sparsity.toFixed(4)} <= ${first.mean_sparsity.toFixed(4)})`);
  const shot = path.join(outDir, "demo.png");
  await page.screenshot({ path: shot });
  console.log(`screenshot: ${shot}`);
  // Every kernel family (backward passes and the alignment loss too) against the f64
  // references, compiled by the browser's own WGSL compiler.
  const sc = await page.evaluate(() => window.sparseAttnSelfcheck(7));
  for (const c of sc.checks) check(c.ok, `selfcheck in the browser: ${c.name} (error ${c.error})`);
  check(sc.checks.length >= 15, `selfcheck ran ${sc.checks.length} checks`);
  check(errors.length === 0, `no console errors (${errors.join(" | ")})`);
} finally {
  await browser.close();
}

// Without WebGPU the page explains what to enable.
const plain = await chromium.launch({ executablePath, args: common });
try {
  const page = await plain.newPage({ viewport: { width: 1280, height: 800 } });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("status").dataset.state === "nowebgpu",
    null, { timeout: 60_000 });
  check(await page.locator("#nowebgpu").isVisible(), "without WebGPU: the notice is shown");
  check(await page.locator("#maps").isHidden(), "without WebGPU: no empty maps");
  await page.screenshot({ path: path.join(outDir, "no-webgpu.png") });
} finally {
  await plain.close();
}

console.log(failures === 0 ? "browser test: all checks passed" : `browser test: ${failures} FAILED`);
process.exit(failures === 0 ? 0 : 1);
