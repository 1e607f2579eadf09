// Browser test of the demo page (run by scripts/browser-test.sh):
//   node tests/browser/demo.test.mjs SITE_URL NATIVE_BIN ARTIFACT_DIR
// Drives Debian's Chromium headless with WebGPU on SwiftShader, waits for the page's GPU result,
// checks the numbers it shows against the native library (`sparse-attn explore`, same config
// and seed), moves the budget slider and checks again, saves a screenshot, runs the model mode
// on a GGUF file it writes (`sparse-attn gguf --random`) against `sparse-attn explore --gguf`,
// and checks that a browser without WebGPU gets the explanation instead of a blank page.
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

  // Model mode: a GGUF file the test writes (random weights in SmolLM2's layout and tensor
  // types, a byte-level BPE tokenizer), chosen through the file input; the page's maps,
  // numbers and next-token previews against the native library on the same file and text.
  const gguf = path.resolve(outDir, "tiny.gguf");
  execFileSync(nativeBin, ["gguf", "--random", gguf, "--layers", "3", "--seed", "5"], {
    env: { ...process.env, RUST_LOG: "error" },
  });
  let runs = (await pageNumbers(page)).runs;
  await page.locator("#mode-model").check();
  await page.locator("#gguf").setInputFiles(gguf);
  await waitDone(page, runs);
  const text = await page.locator("#text").inputValue();
  const modelCheck = async (label) => {
    const got = await pageNumbers(page);
    const top = await page.evaluate(() => {
      const d = (id) => document.getElementById(id).dataset;
      return {
        full: JSON.parse(d("top-full").ids), sparse: JSON.parse(d("top-sparse").ids),
        pFull: JSON.parse(d("top-full").p), pSparse: JSON.parse(d("top-sparse").p),
        mode: document.getElementById("status").dataset.mode,
      };
    });
    check(top.mode === "model", `${label}: the page is in model mode`);
    const out = execFileSync(nativeBin, ["explore", "--gguf", gguf, "--text", text, "--config", got.config], {
      encoding: "utf8",
      env: { ...process.env, RUST_LOG: "error" },
    });
    const want = JSON.parse(out);
    compare(got, want, `model ${label} ${got.config}`);
    for (const [which, ids, ps, w] of [
      ["full", top.full, top.pFull, want.top_full],
      ["sparse", top.sparse, top.pSparse, want.top_sparse],
    ]) {
      check(ids[0] === w[0].id && Math.abs(ps[0] - w[0].p) < 1e-3,
        `${label}: next token with ${which} attention ${ids[0]} (p ${ps[0].toFixed(4)}) = native ${w[0].id} (p ${w[0].p.toFixed(4)})`);
    }
    return { got, want };
  };
  const m1 = await modelCheck("initial");
  const v1 = JSON.parse(m1.got.config);
  check(m1.want.seq > 4 * m1.want.block, `the text makes ${m1.want.seq} tokens (${m1.want.blocks} blocks)`);
  await page.screenshot({ path: path.join(outDir, "demo-model.png") });
  // Another layer and head, a larger budget: the view changes without reading the text again.
  runs = m1.got.runs;
  await page.locator("#layer").selectOption("2");
  await waitDone(page, runs);
  runs = (await pageNumbers(page)).runs;
  await page.locator("#mhead").selectOption("3");
  await waitDone(page, runs);
  runs = (await pageNumbers(page)).runs;
  await page.locator("#topk").fill("8");
  await waitDone(page, runs);
  const m2 = await modelCheck("layer 2, head 3, top-8");
  const v2 = JSON.parse(m2.got.config);
  check(v1.topk < 8 && v2.layer === 2 && v2.head === 3 && v2.topk === 8,
    `controls reached the view (${m1.got.config} -> ${m2.got.config})`);
  check(m2.got.kept_blocks > m1.got.kept_blocks, `a larger budget keeps more blocks (${m2.got.kept_blocks} > ${m1.got.kept_blocks})`);
  await page.screenshot({ path: path.join(outDir, "demo-model-2.png") });
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
