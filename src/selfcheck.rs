//! Does this GPU compute our kernels correctly? Every kernel family (full attention forward and
//! backward, block selection, NOSA's selection and biased sparse attention, block-sparse
//! forward and backward, metrics, the alignment loss, decoding over a KV cache, a tiny Llama
//! model's layers)
//! on small random inputs against the f64 references. Async, so it runs the same in the browser
//! (the demo page exposes it, and the browser test runs it: WGSL that one compiler accepts and
//! another rejects shows up here) and natively (`sparse-attn selfcheck`).

use crate::error::Result;
use crate::gpu::Encoder;
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::align::{AlignLoss, AlignOut};
use crate::ops::attention::{AttnGrads, AttnOutput, FullAttention};
use crate::ops::metrics::AttentionMetrics;
use crate::ops::select::{BlockSelect, SelectInputs};
use crate::ops::sparse::SparseAttention;
use crate::problem::{AttnOptions, AttnShape};
use crate::problem::{SENTINEL, SelectOptions};
use crate::reference::{self, Rng, compare};
use crate::{FullConfig, SelectConfig, SparseConfig};
use crate::{Qkv, SparseInputs};

/// Relative L2 error every f32 kernel must stay within against its f64 reference.
pub const TOLERANCE: f64 = 1e-4;

/// One compared output.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    /// Relative L2 error (see `reference::stats`); infinite when an output is not finite.
    pub error: f64,
    pub ok: bool,
}

fn push(out: &mut Vec<Check>, name: &'static str, got: &[f32], want: &[f32], tol: f64) {
    let e = compare(got, want);
    let error = if e.non_finite > 0 {
        f64::INFINITY
    } else {
        e.rel_l2
    };
    out.push(Check {
        name,
        error,
        ok: e.within(tol),
    });
}

/// O, LSE, dQ, dK, dV of one attention op against the reference's; returns the GPU's O.
async fn push_attention(
    gpu: &Gpu,
    out: &mut Vec<Check>,
    names: [&'static str; 5],
    o: &AttnOutput,
    g: &AttnGrads,
    want: &reference::attention::Forward,
    want_g: &reference::attention::Grads,
) -> Result<Vec<f32>> {
    let got = [&o.o, &o.lse, &g.dq, &g.dk, &g.dv];
    let want = [&want.o, &want.lse, &want_g.dq, &want_g.dk, &want_g.dv];
    let mut first = Vec::new();
    for (i, ((name, t), w)) in names.into_iter().zip(got).zip(want).enumerate() {
        let x = gpu.read_async(t).await?;
        push(out, name, &x, w, TOLERANCE);
        if i == 0 {
            first = x;
        }
    }
    Ok(first)
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Run every kernel family once on `seed`'s inputs and compare with the references.
pub async fn selfcheck(gpu: &Gpu, seed: u64) -> Result<Vec<Check>> {
    // Lengths that are not multiples of the tiles or blocks, GQA 2:1, causal.
    let shape = AttnShape::new(1, 4, 2, 70, 32);
    let causal = AttnOptions::causal(true);
    let mut rng = Rng::new(seed);
    let q = rng.normal_vec(shape.q_len(), 1.0);
    let k = rng.normal_vec(shape.kv_len(), 1.0);
    let v = rng.normal_vec(shape.kv_len(), 1.0);
    let d_o = rng.normal_vec(shape.q_len(), 1.0);
    let up = |dims: &[usize], x: &[f32]| gpu.upload(dims, x);
    let (tq, tk, tv, tdo) = (
        up(&shape.q_dims(), &q)?,
        up(&shape.kv_dims(), &k)?,
        up(&shape.kv_dims(), &v)?,
        up(&shape.q_dims(), &d_o)?,
    );
    let mut out = Vec::new();

    // Full attention.
    let full = FullAttention::new(gpu, shape, &FullConfig::new(causal))?;
    let fo = AttnOutput::empty(gpu, &shape)?;
    let fg = AttnGrads::empty(gpu, &shape)?;
    let mut enc = gpu.encoder();
    full.encode_forward(gpu, &mut enc, Qkv::new(&tq, &tk, &tv), &fo)?;
    full.encode_backward(gpu, &mut enc, Qkv::new(&tq, &tk, &tv), &fo, &tdo, &fg)?;
    gpu.queue().submit([enc.finish()]);
    let want = reference::attention::forward(&shape, &causal, &q, &k, &v)?;
    let want_g = reference::attention::backward(&shape, &causal, &q, &k, &v, &d_o)?;
    let names = [
        "full forward O",
        "full forward LSE",
        "full backward dQ",
        "full backward dK",
        "full backward dV",
    ];
    let h_full = push_attention(gpu, &mut out, names, &fo, &fg, &want, &want_g).await?;

    // Block selection: the GPU's choice may differ from the reference's only on near-ties, so
    // the check is on the share of the reference's best scores it reaches.
    let sel_opts = SelectOptions {
        block: 16,
        k: 3,
        n_init: 1,
        n_local: 0,
        ..SelectOptions::ssa()
    };
    let selector = BlockSelect::new(gpu, shape, &SelectConfig::new(sel_opts))?;
    let (sel, _) = {
        let scratch = selector.scratch(gpu)?;
        let sel = gpu.empty(&selector.selection_dims(), DType::U32)?;
        let mut enc = gpu.encoder();
        selector.encode(gpu, &mut enc, &SelectInputs::new(&tq, &tk), &scratch, &sel)?;
        gpu.queue().submit([enc.finish()]);
        (sel, scratch)
    };
    let want_sel = reference::select::select(&shape, &sel_opts, &q, &k)?;
    let got_sel = gpu.read_u32_async(&sel).await?;
    let nb = sel_opts.blocks(shape.seq_k);
    let score_sum = |idx: &[u32], row: usize| -> f64 {
        idx.iter()
            .filter(|&&b| b != SENTINEL)
            .map(|&b| want_sel.scores[row * nb + b as usize])
            .filter(|s| s.is_finite())
            .sum()
    };
    let (mut got_total, mut want_total) = (0.0, 0.0);
    for (row, (g, w)) in got_sel
        .chunks(sel_opts.k)
        .zip(want_sel.indices.chunks(sel_opts.k))
        .enumerate()
    {
        got_total += score_sum(g, row);
        want_total += score_sum(w, row);
    }
    let shortfall = ((want_total - got_total) / want_total.abs().max(1e-30)).max(0.0);
    out.push(Check {
        name: "block selection (score shortfall)",
        error: shortfall,
        ok: shortfall <= 1e-5 && got_sel.len() == want_sel.indices.len(),
    });

    // Block-sparse attention over the reference's selection (independent of near-ties).
    let sp_opts = sel_opts.sparse();
    let tsel: Tensor = gpu.upload_u32(&selector.selection_dims(), &want_sel.indices)?;
    let sparse = SparseAttention::new(gpu, shape, &SparseConfig::new(sp_opts, sel_opts.k))?;
    let so = AttnOutput::empty(gpu, &shape)?;
    let sg = AttnGrads::empty(gpu, &shape)?;
    let mut enc = gpu.encoder();
    sparse.encode_forward(gpu, &mut enc, &SparseInputs::new(&tq, &tk, &tv, &tsel), &so)?;
    sparse.encode_backward(
        gpu,
        &mut enc,
        &SparseInputs::new(&tq, &tk, &tv, &tsel),
        &so,
        &tdo,
        &sg,
    )?;
    gpu.queue().submit([enc.finish()]);
    let (idx, kk) = (&want_sel.indices, sel_opts.k);
    let want = reference::sparse::forward(&shape, &sp_opts, &q, &k, &v, idx, kk, None)?;
    let want_g = reference::sparse::backward(&shape, &sp_opts, &q, &k, &v, idx, kk, None, &d_o)?;
    let names = [
        "sparse forward O",
        "sparse forward LSE",
        "sparse backward dQ",
        "sparse backward dK",
        "sparse backward dV",
    ];
    let h_sparse = push_attention(gpu, &mut out, names, &so, &sg, &want, &want_g).await?;

    // Metrics of the reference's selection.
    let metrics = AttentionMetrics::new(gpu, shape, sp_opts, kk)?;
    let m = metrics.compute(gpu, &tq, &tk, &tsel)?;
    let want = reference::metrics::metrics(&shape, &sp_opts, &q, &k, idx, kk)?;
    for (name, t, w) in [
        ("metrics block mass", &m.block_mass, &want.block_mass),
        ("metrics sparsity", &m.sparsity, &want.sparsity),
        ("metrics entropy", &m.entropy, &want.entropy),
    ] {
        push(
            &mut out,
            name,
            &gpu.read_async(t).await?,
            &f32s(w),
            TOLERANCE,
        );
    }

    // NOSA: the selection with an eviction score (rows identical to the reference's, up to
    // near-ties), then sparse attention with the score as its per-key bias, forward and
    // backward with d bias, where the device binds the 11 storage buffers that takes.
    let nosa = SelectOptions {
        scoring: crate::problem::Scoring::InfLlmV2,
        ..SelectOptions::nosa_budget(16, 4, 1, 0, 1)?
    };
    let evict = rng.normal_vec(shape.batch * shape.heads_kv * shape.seq_k, 1.0);
    let te = gpu.upload(&crate::ops::attention::bias_dims(&shape), &evict)?;
    let nosa_sel = BlockSelect::new(gpu, shape, &SelectConfig::new(nosa))?;
    let tnsel = gpu.empty(&nosa_sel.selection_dims(), DType::U32)?;
    let scratch = nosa_sel.scratch(gpu)?;
    let mut enc = gpu.encoder();
    let x = SelectInputs::new(&tq, &tk).evict(Some(&te));
    nosa_sel.encode(gpu, &mut enc, &x, &scratch, &tnsel)?;
    gpu.queue().submit([enc.finish()]);
    let want_n = reference::select::select_nosa(&shape, &nosa, &q, &k, Some(&evict))?;
    let got_n = gpu.read_u32_async(&tnsel).await?;
    let rows = got_n.len() / nosa.k;
    let differ = got_n
        .chunks(nosa.k)
        .zip(want_n.indices.chunks(nosa.k))
        .filter(|(a, b)| a != b)
        .count();
    let share = differ as f64 / rows.max(1) as f64;
    out.push(Check {
        name: "NOSA selection (rows unlike the reference)",
        error: share,
        ok: share <= 0.02 && got_n.len() == want_n.indices.len(),
    });
    if gpu.limits().max_storage_buffers_per_shader_stage >= 11 {
        let idx = &want_n.indices;
        let tsel = gpu.upload_u32(&nosa_sel.selection_dims(), idx)?;
        let cfg = SparseConfig::for_selection(&nosa).bias(true);
        let biased = SparseAttention::new(gpu, shape, &cfg)?;
        let bo = AttnOutput::empty(gpu, &shape)?;
        let bg = AttnGrads::empty_with(gpu, &shape, DType::F32, true)?;
        let x = SparseInputs::new(&tq, &tk, &tv, &tsel).bias(Some(&te));
        let mut enc = gpu.encoder();
        biased.encode_forward(gpu, &mut enc, &x, &bo)?;
        biased.encode_backward(gpu, &mut enc, &x, &bo, &tdo, &bg)?;
        gpu.queue().submit([enc.finish()]);
        let sp = nosa.sparse();
        let b = Some(evict.as_slice());
        let want = reference::sparse::forward(&shape, &sp, &q, &k, &v, idx, nosa.k, b)?;
        let want_g = reference::sparse::backward(&shape, &sp, &q, &k, &v, idx, nosa.k, b, &d_o)?;
        let names = [
            "biased sparse forward O",
            "biased sparse forward LSE",
            "biased sparse backward dQ",
            "biased sparse backward dK",
            "biased sparse backward dV",
        ];
        push_attention(gpu, &mut out, names, &bo, &bg, &want, &want_g).await?;
        let db = bg.dbias.as_ref().expect("made with a bias");
        push(
            &mut out,
            "biased sparse backward d bias",
            &gpu.read_async(db).await?,
            want_g.dbias.as_deref().unwrap_or_default(),
            TOLERANCE,
        );
    }

    decoding(gpu, &mut out, &q, &k, &v).await?;
    staged_offload(gpu, &mut out, &q, &k, &v).await?;

    // SSA's alignment loss between the two streams' outputs.
    let dims = shape.q_dims();
    let align = AlignLoss::new(gpu, &dims, 1.0)?;
    let ao = AlignOut::empty(gpu, &dims)?;
    let mut enc = gpu.encoder();
    align.encode(gpu, &mut enc, &fo.o, &so.o, 10.0, &ao)?;
    gpu.queue().submit([enc.finish()]);
    let want = reference::align::align(&h_full, &h_sparse, 1.0, 10.0)?;
    push(
        &mut out,
        "alignment loss",
        &gpu.read_async(&ao.loss).await?,
        &[want.loss as f32],
        TOLERANCE,
    );
    // Gradients are ψ(d)·scale/N: compare ψ (order 1) so the relative error means something.
    let unit = shape.q_len() as f64 / 10.0;
    let norm = |x: Vec<f32>| -> Vec<f32> { x.iter().map(|&g| (g as f64 * unit) as f32).collect() };
    let norm64 = |x: &[f64]| -> Vec<f32> { x.iter().map(|&g| (g * unit) as f32).collect() };
    push(
        &mut out,
        "alignment dL/dh_full",
        &norm(gpu.read_async(&ao.g_full).await?),
        &norm64(&want.g_full),
        TOLERANCE,
    );
    push(
        &mut out,
        "alignment dL/dh_sparse",
        &norm(gpu.read_async(&ao.g_sparse).await?),
        &norm64(&want.g_sparse),
        TOLERANCE,
    );
    llama(gpu, &mut out, seed).await?;
    Ok(out)
}

/// A tiny random Llama (`gguf::random_llama`: 2 layers, 4 query / 2 kv heads of 16) through
/// `crate::llama` (embedding, norms, projections, RoPE, attention, SwiGLU, the tied head),
/// every position's logits against `reference::llama`.
async fn llama(gpu: &Gpu, out: &mut Vec<Check>, seed: u64) -> Result<()> {
    use crate::llama::{ForwardOptions, Llama, Logits};
    let p = crate::gguf::LlamaParams::tiny(270, 64);
    let bytes = crate::gguf::random_llama(&p, seed)?;
    let mut rng = Rng::new(seed ^ 0x11a);
    let ids: Vec<u32> = (0..37).map(|_| (rng.next_u64() % 270) as u32).collect();
    let want = reference::llama::logits(&crate::gguf::Gguf::parse(&bytes)?, &bytes, &ids)?;
    let m = Llama::from_gguf(gpu, &bytes)?;
    let mut enc = gpu.encoder();
    let opts = ForwardOptions {
        logits: Logits::All,
        ..ForwardOptions::new()
    };
    let f = m.forward(gpu, &mut enc, &ids, &opts)?;
    gpu.queue().submit([enc.finish()]);
    let got = gpu.read_async(&f.logits).await?;
    push(out, "Llama model logits", &got, &f32s(&want), TOLERANCE);
    Ok(())
}

/// NOSA's offloaded cache by the staged path (the browser's: the host reads back the new
/// tokens and the load list, and writes the missing blocks), six GPU slots per kv head (two
/// blocks by the eviction score) over ten blocks: a 40-token prompt, then 120 steps (token t
/// takes row t % 70 of the inputs), each step's O against on-GPU sparse decoding with the same
/// selection (blocks leave the slots and come back).
async fn staged_offload(
    gpu: &Gpu,
    out: &mut Vec<Check>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<()> {
    use crate::decode::{
        CacheConfig, DecodeAttention, DecodeConfig, DecodeInputs, KvCache, OffloadCache,
        OffloadConfig, OffloadPath,
    };
    use crate::problem::{CacheShape, DecodeKeys};
    let (hq, hkv, d, seq, n0, total) = (4, 2, 32, 70, 40, 160);
    let opts = SelectOptions::nosa_budget(16, 6, 1, 1, 1)?;
    let cs = CacheShape {
        batch: 1,
        heads_kv: hkv,
        capacity: total,
        head_dim: d,
    };
    let config = OffloadConfig::new(DType::F32, opts, opts.k).path(OffloadPath::Staged);
    let mut off = OffloadCache::new(gpu, cs, &config)?;
    let cache = CacheConfig::new(DType::F32).bias(true).select(Some(opts));
    let mut on = KvCache::new(gpu, cs, &cache)?;
    let step = cs.step(hq, 1);
    let keys = DecodeKeys::Sparse {
        block: opts.block,
        nsel: opts.k,
    };
    let att_off = DecodeAttention::new(gpu, step, &off.attention_config())?;
    let att_on = DecodeAttention::new(gpu, step, &DecodeConfig::new(keys).bias(true))?;
    // Rows t0 .. t0 + n of every head of x `[heads, seq, d]`; the eviction score is a
    // function of the key.
    let rows = |x: &[f32], heads: usize, t0: usize, n: usize| -> Vec<f32> {
        (0..heads)
            .flat_map(|h| {
                (t0..t0 + n).flat_map(move |t| {
                    let r = (h * seq + t % seq) * d;
                    x[r..r + d].to_vec()
                })
            })
            .collect()
    };
    let evict = |t0: usize, n: usize| -> Vec<f32> {
        (0..hkv)
            .flat_map(|h| (t0..t0 + n).map(move |t| k[(h * seq + t % seq) * d] * 2.0))
            .collect()
    };
    let append =
        |off: &mut OffloadCache, on: &mut KvCache, t0: usize, n: usize| -> Result<Encoder> {
            let kn = gpu.upload(&[1, hkv, n, d], &rows(k, hkv, t0, n))?;
            let vn = gpu.upload(&[1, hkv, n, d], &rows(v, hkv, t0, n))?;
            let en = gpu.upload(&[1, hkv, n], &evict(t0, n))?;
            let mut enc = gpu.encoder();
            off.append(gpu, &mut enc, &kn, &vn, Some(&en), None)?;
            on.append(gpu, &mut enc, &kn, &vn, Some(&en), None)?;
            Ok(enc)
        };
    let enc = append(&mut off, &mut on, 0, n0)?;
    gpu.queue().submit([enc.finish()]);
    let sel_on = gpu.empty(&step.sel_dims(opts.k), DType::U32)?;
    let (mut got, mut want) = (vec![], vec![]);
    for t in n0..total {
        let mut enc = append(&mut off, &mut on, t, 1)?;
        let tq = gpu.upload(&step.q_dims(), &rows(q, hq, t, 1))?;
        let o = |gpu: &Gpu| -> Result<AttnOutput> {
            Ok(AttnOutput {
                o: gpu.empty(&step.q_dims(), DType::F32)?,
                lse: gpu.empty(&step.lse_dims(), DType::F32)?,
            })
        };
        let (o_off, o_on) = (o(gpu)?, o(gpu)?);
        off.prepare_async(gpu, &mut enc, &tq).await?;
        att_off.encode(gpu, &mut enc, &off.inputs(&tq), &o_off)?;
        on.select(gpu, &mut enc, &tq, &sel_on)?;
        let x = DecodeInputs::new(&tq, on.k(), on.v(), on.lens_tensor())
            .sel(Some(&sel_on))
            .bias(on.bias());
        att_on.encode(gpu, &mut enc, &x, &o_on)?;
        gpu.queue().submit([enc.finish()]);
        got.extend(gpu.read_async(&o_off.o).await?);
        want.extend(gpu.read_async(&o_on.o).await?);
    }
    push(
        out,
        "offloaded decoding (staged copies) O",
        &got,
        &want,
        TOLERANCE,
    );
    Ok(())
}

/// Decoding: two sequences of 70 and 41 tokens appended to a KV cache at once (ragged), the
/// newest token of each attending to its cache in full and over a selection of blocks.
async fn decoding(gpu: &Gpu, out: &mut Vec<Check>, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
    use crate::decode::{CacheConfig, DecodeAttention, DecodeConfig, DecodeInputs, KvCache};
    use crate::problem::{CacheShape, DecodeKeys};
    let (hq, hkv, d, seq) = (4, 2, 32, 70);
    let cs = CacheShape {
        batch: 2,
        heads_kv: hkv,
        capacity: 80,
        head_dim: d,
    };
    let lens = [70u32, 41];
    let twice = |x: &[f32]| [x, x].concat();
    let (kn, vn) = (
        gpu.upload(&[2, hkv, seq, d], &twice(k))?,
        gpu.upload(&[2, hkv, seq, d], &twice(v))?,
    );
    let mut cache = KvCache::new(gpu, cs, &CacheConfig::new(DType::F32))?;
    let step = cs.step(hq, 1);
    // Each sequence's newest token's queries, and the caches as the reference reads them.
    let (mut qs, mut kc, mut vc) = (
        vec![],
        vec![0.0; 2 * hkv * 80 * d],
        vec![0.0; 2 * hkv * 80 * d],
    );
    for (b, &len) in lens.iter().enumerate() {
        let len = len as usize;
        for h in 0..hq {
            qs.extend_from_slice(&q[(h * seq + len - 1) * d..(h * seq + len) * d]);
        }
        for h in 0..hkv {
            let at = (b * hkv + h) * 80 * d;
            kc[at..at + len * d].copy_from_slice(&k[h * seq * d..(h * seq + len) * d]);
            vc[at..at + len * d].copy_from_slice(&v[h * seq * d..(h * seq + len) * d]);
        }
    }
    // Blocks of 16: the initial one, one in the middle, the current one.
    let sel: Vec<u32> = [[0u32, 2, 4], [0, 1, 2]]
        .iter()
        .flat_map(|r| [*r, *r])
        .flatten()
        .collect();
    let tq = gpu.upload(&step.q_dims(), &qs)?;
    let tsel = gpu.upload_u32(&step.sel_dims(3), &sel)?;
    let sparse = DecodeKeys::Sparse { block: 16, nsel: 3 };
    let mut enc = gpu.encoder();
    cache.append(gpu, &mut enc, &kn, &vn, None, Some(&lens))?;
    let mut results = vec![];
    for (keys, name) in [
        (DecodeKeys::Full, "decoding (full) O"),
        (sparse, "decoding (sparse) O"),
    ] {
        let op = DecodeAttention::new(gpu, step, &DecodeConfig::new(keys).split_keys(Some(64)))?;
        let o = AttnOutput {
            o: gpu.empty(&step.q_dims(), DType::F32)?,
            lse: gpu.empty(&step.lse_dims(), DType::F32)?,
        };
        let x = DecodeInputs::new(&tq, cache.k(), cache.v(), cache.lens_tensor());
        let x = if keys == DecodeKeys::Full {
            x
        } else {
            x.sel(Some(&tsel))
        };
        op.encode(gpu, &mut enc, &x, &o)?;
        results.push((keys, name, o));
    }
    gpu.queue().submit([enc.finish()]);
    for (keys, name, o) in results {
        let data = reference::decode::DecodeData {
            q: &qs,
            k: &kc,
            v: &vc,
            lens: &lens,
            sel: (keys != DecodeKeys::Full).then_some(sel.as_slice()),
            bias: None,
        };
        let want = reference::decode::forward(&step, &keys, None, &data)?;
        push(out, name, &gpu.read_async(&o.o).await?, &want.o, TOLERANCE);
    }
    Ok(())
}

/// The checks as JSON: `{"ok": bool, "checks": [{"name", "error", "ok"}]}`.
pub fn to_json(checks: &[Check]) -> serde_json::Value {
    serde_json::json!({
        "ok": checks.iter().all(|c| c.ok),
        "checks": checks.iter().map(|c| serde_json::json!({
            "name": c.name,
            "error": if c.error.is_finite() { Some(c.error) } else { None },
            "ok": c.ok,
        })).collect::<Vec<_>>(),
    })
}
