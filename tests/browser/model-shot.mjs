// The page's model mode with a real model, for the README's picture (not part of CI: the model
// is fetched by scripts/fetch-model.sh and SwiftShader takes minutes over it):
//   node tests/browser/model-shot.mjs SITE_URL MODEL.gguf OUT.png [LAYER HEAD TOPK REPEAT]
// (REPEAT: the page's default text that many times over: a model attends to the earlier copy.)
// Drives headless Chromium (WebGPU on SwiftShader) through the file input and the controls,
// and prints what the page computed (the view's numbers and both next-token previews).
import { chromium } from "playwright-core";

const [url, gguf, out, layer = "3", head = "0", topk = "4", repeat = "1"] = process.argv.slice(2);
if (!url || !gguf || !out) {
  console.error("usage: model-shot.mjs SITE_URL MODEL.gguf OUT.png [LAYER HEAD TOPK]");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"],
});
const done = async (page, n) => {
  await page.waitForFunction((n) => {
    const s = document.getElementById("status");
    return s.dataset.state === "error" || (s.dataset.state === "done" && parseInt(s.dataset.runs, 10) > n);
  }, n, { timeout: 1_800_000 });
  const s = page.locator("#status");
  if ((await s.getAttribute("data-state")) === "error") throw new Error(await s.textContent());
  return parseInt(await s.getAttribute("data-runs"), 10);
};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 960 } });
  page.on("console", (m) => console.log(`page: ${m.text()}`));
  await page.goto(url);
  let runs = await done(page, 0);
  await page.locator("#mode-model").check();
  const text = await page.locator("#text").inputValue();
  await page.locator("#text").fill(Array(parseInt(repeat, 10)).fill(text).join(" "));
  const t0 = Date.now();
  await page.locator("#gguf").setInputFiles(gguf);
  runs = await done(page, runs);
  console.log(`loaded and ran in ${((Date.now() - t0) / 1000).toFixed(0)} s: ${await page.locator("#model-info").textContent()}`);
  for (const [id, v] of [["#layer", layer], ["#mhead", head]]) {
    await page.locator(id).selectOption(v);
    runs = await done(page, runs);
  }
  await page.locator("#topk").fill(topk);
  runs = await done(page, runs);
  const r = await page.evaluate(() => ({
    config: document.getElementById("status").dataset.config,
    tokens: document.getElementById("ntokens").textContent,
    kept: document.getElementById("sparsity").textContent,
    error: document.getElementById("error").textContent,
    full: document.getElementById("top-full").innerText,
    sparse: document.getElementById("top-sparse").innerText,
  }));
  console.log(JSON.stringify(r, null, 1));
  await page.screenshot({ path: out });
} finally {
  await browser.close();
}
