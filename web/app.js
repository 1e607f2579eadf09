// The page: reads the controls, runs the library's kernels through the wasm module (pkg/, made
// by scripts/web-build.sh) on the visitor's GPU, and draws what comes back.
import init, { Demo } from "./pkg/sparse_attn_web.js";

const $ = (id) => document.getElementById(id);
const status = $("status");

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

// Magma (matplotlib), sampled at 9 stops; linear in between.
const MAGMA = [
  [0, 0, 4], [28, 16, 68], [79, 18, 123], [129, 37, 129], [181, 54, 122],
  [229, 80, 100], [251, 135, 97], [254, 194, 135], [252, 253, 191],
];
function magma(x) {
  const t = Math.min(1, Math.max(0, x)) * (MAGMA.length - 1);
  const i = Math.min(MAGMA.length - 2, Math.floor(t));
  const f = t - i;
  return MAGMA[i].map((c, j) => Math.round(c + f * (MAGMA[i + 1][j] - c)));
}
// Block mass -> [0, 1] on a log scale from 1e-4 to 1.
const LOG_MIN = -4;
const massColour = (m) => magma((Math.log10(Math.max(m, 1e-12)) - LOG_MIN) / -LOG_MIN);
const EMPTY = [14, 16, 22];     // blocks after the token (causal: nothing to attend)
const DROPPED = [58, 62, 74];   // blocks the selector left out

function keptColour(s) {
  // 1 = all of the attention kept (cyan), 0.5 and below = half lost (red).
  const t = Math.min(1, Math.max(0, (s - 0.5) / 0.5));
  const lo = [210, 64, 52], mid = [229, 163, 58], hi = [90, 209, 230];
  const [a, b, f] = t < 0.5 ? [lo, mid, t / 0.5] : [mid, hi, (t - 0.5) / 0.5];
  return a.map((c, j) => Math.round(c + f * (b[j] - c)));
}

const modelMode = () => $("mode-model").checked;
// The loaded model's shape and the tokens of its last prefill (model mode).
let model = null;
let prefilled = null;

function modelView() {
  const num = (id) => parseInt($(id).value, 10);
  return {
    layer: num("layer"), head: num("mhead"), block: num("mblock"), topk: num("topk"),
    n_init: num("n_init"), n_local: num("n_local"), scoring: $("mscoring").value,
  };
}

function config() {
  const num = (id) => parseInt($(id).value, 10);
  return {
    seq: num("seq"), heads: num("heads"), kv_heads: num("kv_heads"), head_dim: 64,
    block: num("block"), topk: num("topk"), n_init: num("n_init"), n_local: num("n_local"),
    scoring: $("scoring").value, inputs: $("inputs").value, seed: num("seed"), head: num("head"),
    needles: num("needles"), locality: parseFloat($("locality").value),
  };
}

function fillSelect(sel, n) {
  const keep = Math.min(parseInt(sel.value || "0", 10), n - 1);
  sel.replaceChildren(...Array.from({ length: n }, (_, i) => new Option(String(i))));
  sel.value = String(Math.max(0, keep));
}

// Keep the controls consistent: kv heads divide heads, k <= blocks, forced blocks < k.
function syncControls() {
  const m = modelMode();
  $("model-controls").hidden = !m;
  $("problem-controls").hidden = m;
  $("preview").hidden = !m || !prefilled;
  if (model) {
    fillSelect($("layer"), model.layers);
    fillSelect($("mhead"), model.heads);
  }
  const heads = parseInt($("heads").value, 10);
  for (const o of $("kv_heads").options) o.disabled = heads % parseInt(o.value, 10) !== 0;
  if ($("kv_heads").selectedOptions[0].disabled) $("kv_heads").value = "1";
  const head = $("head");
  const keep = Math.min(parseInt(head.value || "0", 10), heads - 1);
  head.replaceChildren(...Array.from({ length: heads }, (_, i) => new Option(String(i))));
  head.value = String(keep);
  const nb = m
    ? Math.max(1, Math.ceil((prefilled ? prefilled.tokens : 1) / parseInt($("mblock").value, 10)))
    : Math.ceil(parseInt($("seq").value, 10) / parseInt($("block").value, 10));
  // Before the model has read a text its block count is unknown: leave the budget as it is.
  if (m && !prefilled) return;
  const topk = $("topk");
  topk.max = String(nb);
  if (parseInt(topk.value, 10) > nb) topk.value = String(nb);
  const k = parseInt(topk.value, 10);
  $("n_init").max = String(Math.max(0, Math.min(4, k - 1)));
  $("n_local").max = String(Math.max(0, Math.min(4, k - 1 - parseInt($("n_init").value, 10))));
  for (const id of ["topk", "n_init", "n_local", "needles", "locality"]) {
    $(`${id}-out`).textContent = $(id).value;
  }
  const structured = $("inputs").value === "structured";
  $("needles").disabled = !structured;
  $("locality").disabled = !structured;
  $("nb-out").textContent = String(nb);
}

function drawMap(ctx, x, y, w, h, r, sparse) {
  const { seq, blocks: nb, topk } = r;
  const img = new ImageData(nb, seq);
  for (let t = 0; t < seq; t++) {
    const kept = new Set(r.selection.slice(t * topk, (t + 1) * topk));
    const visible = Math.floor(t / r.block) + 1;   // causal: blocks up to the token's own
    for (let b = 0; b < nb; b++) {
      let c = EMPTY;
      if (b < visible) c = !sparse || kept.has(b) ? massColour(r.block_mass[t * nb + b]) : DROPPED;
      const p = 4 * (t * nb + b);
      img.data[p] = c[0]; img.data[p + 1] = c[1]; img.data[p + 2] = c[2]; img.data[p + 3] = 255;
    }
  }
  const off = new OffscreenCanvas(nb, seq);
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, x, y, w, h);
  ctx.strokeStyle = "#3a3f4b";
  ctx.strokeRect(x - 0.5, y - 0.5, w + 1, h + 1);
}

function axes(ctx, x, y, w, h, r, title) {
  ctx.fillStyle = "#e6e8ee";
  ctx.font = "600 14px system-ui, sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(title, x, y - 12);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#9aa1b2";
  ctx.textAlign = "right";
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    const t = Math.round(f * r.seq);
    ctx.fillText(String(t), x - 6, y + f * h + 4);
  }
  ctx.textAlign = "center";
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    const b = Math.round(f * r.blocks);
    ctx.fillText(String(b), x + f * w, y + h + 15);
  }
  ctx.fillText(`key block (${r.block} tokens each)`, x + w / 2, y + h + 31);
  ctx.save();
  ctx.translate(x - 36, y + h / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText("query token", 0, 0);
  ctx.restore();
}

function draw(r) {
  const cv = $("maps");
  const ctx = cv.getContext("2d");
  ctx.fillStyle = "#181b23";
  ctx.fillRect(0, 0, cv.width, cv.height);
  const S = 390, Y = 40, X1 = 62, X2 = 500, XS = 920;
  drawMap(ctx, X1, Y, S, S, r, false);
  const which = r.layer === undefined ? `head ${r.head}` : `layer ${r.layer}, head ${r.head}`;
  axes(ctx, X1, Y, S, S, r, `Full attention (${which})`);
  drawMap(ctx, X2, Y, S, S, r, true);
  axes(ctx, X2, Y, S, S, r, `Block-sparse: top ${r.topk} of ${r.blocks} blocks kept`);
  // Kept-mass strip.
  const strip = new ImageData(1, r.seq);
  r.sparsity.forEach((s, t) => {
    const c = keptColour(s);
    strip.data.set([c[0], c[1], c[2], 255], 4 * t);
  });
  const off = new OffscreenCanvas(1, r.seq);
  off.getContext("2d").putImageData(strip, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, XS, Y, 22, S);
  ctx.strokeStyle = "#3a3f4b";
  ctx.strokeRect(XS - 0.5, Y - 0.5, 23, S + 1);
  ctx.fillStyle = "#e6e8ee";
  ctx.font = "600 12px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.fillText("mass kept", XS + 11, Y - 12);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#9aa1b2";
  ctx.fillText("per token", XS + 11, Y + S + 31);
  // Colour scales.
  const LY = Y + S + 44;
  const LW = 300;
  for (let i = 0; i < LW; i++) {
    const c = magma(i / (LW - 1));
    ctx.fillStyle = `rgb(${c})`;
    ctx.fillRect(X1 + i, LY, 1, 12);
  }
  ctx.fillStyle = "#9aa1b2";
  ctx.textAlign = "center";
  ["0.0001", "0.001", "0.01", "0.1", "1"].forEach((t, i) => ctx.fillText(t, X1 + (i * (LW - 1)) / 4, LY + 24));
  ctx.textAlign = "left";
  ctx.fillText("attention mass per block (log scale)", X1 + LW + 14, LY + 10);
  const sw = (x, c, label) => {
    ctx.fillStyle = `rgb(${c})`;
    ctx.fillRect(x, LY, 12, 12);
    ctx.fillStyle = "#9aa1b2";
    ctx.fillText(label, x + 18, LY + 10);
  };
  sw(X2 + 150, DROPPED, "dropped block");
  sw(X2 + 270, EMPTY, "future (causal)");
  for (let i = 0; i < 60; i++) {
    ctx.fillStyle = `rgb(${keptColour(0.5 + (0.5 * i) / 59)})`;
    ctx.fillRect(XS - 38 + i, LY, 1, 12);
  }
  ctx.fillStyle = "#9aa1b2";
  ctx.textAlign = "center";
  ctx.fillText("≤0.5", XS - 38, LY + 24);
  ctx.fillText("1", XS + 21, LY + 24);
}

function show(id, value, text) {
  const el = $(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text;
}

function report(r) {
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  show("kept", r.kept_blocks, pct(r.kept_blocks));
  show("sparsity", r.mean_sparsity, pct(r.mean_sparsity));
  show("error", r.output_error, r.output_error.toFixed(4));
  show("entropy", r.mean_entropy, `${r.mean_entropy.toFixed(2)} nats`);
  const ms = (x) => (x === null ? "n/a" : `${x.toFixed(2)} ms`);
  show("t-full", r.full_ms, ms(r.full_ms));
  const sp = r.select_ms === null || r.sparse_ms === null ? null : r.select_ms + r.sparse_ms;
  show("t-sparse", sp, ms(sp));
  $("t-split").textContent =
    sp === null ? "" : `selection ${r.select_ms.toFixed(1)} + sparse ${r.sparse_ms.toFixed(1)}`;
}

function showTop(id, top) {
  const list = $(id);
  list.dataset.ids = JSON.stringify(top.map((t) => t.id));
  list.dataset.p = JSON.stringify(top.map((t) => t.p));
  list.replaceChildren(...top.map((t) => {
    const li = document.createElement("li");
    const tok = document.createElement("code");
    tok.textContent = JSON.stringify(t.text);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = `${(100 * t.p).toFixed(1)}%`;
    li.append(tok, p);
    return li;
  }));
}

let demo = null;
let busy = false;
let again = false;
let runs = 0;
// Work queued while the GPU is busy: the model's text is read again ("prefill") or only the
// view changes ("view").
let pending = null;

async function run(what = "view") {
  if (!demo) return;
  if (busy) {
    again = true;
    if (what === "prefill" || pending === null) pending = what;
    return;
  }
  busy = true;
  setStatus("running", "Running on the GPU...");
  try {
    const t0 = performance.now();
    let cfg;
    let r;
    if (modelMode()) {
      if (!model) {
        setStatus("idle", "Choose a GGUF model file (it is read here, never uploaded).");
        return;
      }
      if (what === "prefill" || !prefilled) {
        setStatus("running", "Running the model over the text...");
        prefilled = JSON.parse(await demo.model_prefill($("text").value));
        $("ntokens").textContent = String(prefilled.tokens);
        $("pieces").replaceChildren(...prefilled.pieces.map((p) => {
          const el = document.createElement("span");
          el.textContent = p;
          return el;
        }));
        syncControls();
      }
      cfg = modelView();
      r = JSON.parse(await demo.model_view(JSON.stringify(cfg), true));
      showTop("top-full", r.top_full);
      showTop("top-sparse", r.top_sparse);
    } else {
      cfg = config();
      r = JSON.parse(await demo.run(JSON.stringify(cfg), true));
    }
    draw(r);
    report(r);
    runs += 1;
    status.dataset.runs = String(runs);
    status.dataset.config = JSON.stringify(cfg);
    status.dataset.mode = modelMode() ? "model" : "synthetic";
    setStatus("done", `Done in ${(performance.now() - t0).toFixed(0)} ms (page round trip, including readback).`);
  } catch (e) {
    setStatus("error", `Error: ${e.message ?? e}`);
  } finally {
    busy = false;
    if (again) {
      again = false;
      const next = pending ?? "view";
      pending = null;
      run(next);
    }
  }
}

async function loadModel(file) {
  if (busy) { setStatus("error", "Error: wait for the running computation, then choose the file again."); return; }
  busy = true;
  setStatus("running", `Reading ${file.name}...`);
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    setStatus("running", `Loading ${file.name} onto the GPU...`);
    model = JSON.parse(demo.load_model(bytes));
    prefilled = null;
    $("model-info").textContent =
      `${file.name}: ${model.layers} layers, ${model.heads} query / ${model.kv_heads} kv heads of ` +
      `${model.head_dim}, vocabulary ${model.vocab}, ${(model.weight_bytes / 2 ** 20).toFixed(1)} MiB of f32 weights on the GPU.`;
    syncControls();
  } catch (e) {
    model = null;
    setStatus("error", `Error: ${e.message ?? e}`);
    return;
  } finally {
    busy = false;
  }
  await run("prefill");
}

async function main() {
  syncControls();
  if (!("gpu" in navigator)) {
    $("nowebgpu").hidden = false;
    $("app").hidden = true;
    setStatus("nowebgpu", "No WebGPU.");
    return;
  }
  try {
    await init();
    demo = await Demo.open();
  } catch (e) {
    $("nowebgpu").hidden = false;
    $("nowebgpu-detail").textContent = `Details: ${e.message ?? e}`;
    $("app").hidden = true;
    setStatus("nowebgpu", "No usable WebGPU adapter.");
    return;
  }
  $("adapter").textContent = demo.adapter();
  // For the browser test and the curious: every kernel against the f64 references, here.
  window.sparseAttnSelfcheck = async (seed = 7) => JSON.parse(await demo.selfcheck(seed));
  $("controls").addEventListener("input", (ev) => {
    if (ev.target.id === "gguf" || ev.target.id === "text") return;
    syncControls();
    run();
  });
  $("gguf").addEventListener("change", () => {
    const f = $("gguf").files[0];
    if (f) loadModel(f);
  });
  $("prefill").addEventListener("click", () => run("prefill"));
  await run();
}

main();
