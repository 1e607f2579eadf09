//! A Llama model on this crate's own kernels (`sparse_attn::llama`, no Burn): each layer
//! kernel of `ops::llama` against its f64 reference on odd shapes, split past the binding limit;
//! the whole model's logits against `reference::llama` (a tiny random GGUF the test writes),
//! one and two sequences, all rows and the last; sparse attention with every block kept is
//! full attention, with few blocks it is not; with `train`, the sparse forward equals Burn's.

use crate::common;

use sparse_attn::gguf::random_llama;
use sparse_attn::llama::{
    DecoderOptions, ForwardOptions, Llama, Logits, ModelAttention, top_tokens,
};
use sparse_attn::ops::llama::{LlamaOps, Rope};
use sparse_attn::problem::{Scoring, SelectOptions};
use sparse_attn::reference::{Rng, compare, llama as rl};
use sparse_attn::{DType, Gpu, GpuOptions, Tensor};

fn poisoned(gpu: &Gpu, dims: &[usize]) -> Tensor {
    let t = gpu.empty(dims, DType::F32).unwrap();
    gpu.fill(&t, f32::NAN).unwrap();
    t
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Every kernel of `ops::llama` on shapes that fill no tile evenly, on a device whose binding
/// limit (16 KiB) splits the weight, the rows and the embedding table across launches.
#[test]
fn layer_kernels_equal_their_references() {
    for limit in [None, Some(16 * 1024)] {
        let Some(gpu) = common::gpu_with(&GpuOptions {
            max_storage_binding: limit,
            ..Default::default()
        }) else {
            return;
        };
        let ops = LlamaOps::new(&gpu).unwrap();
        let seed = Rng::fresh_seed();
        eprintln!("seed {seed}, binding limit {limit:?}");
        let mut rng = Rng::new(seed);
        // Linear: x [n, k] · w [m, k]ᵀ + r, tiled (67 rows) and matvec (up to 8 rows). 16 KiB
        // holds 102 rows of 40 values, so w (130 rows) and x (67 rows of max(40, 130) = 130)
        // are split.
        for (n, k, m) in [(67, 40, 130), (1, 40, 130), (8, 72, 13), (3, 40, 130)] {
            let (x, w, r) = (
                rng.normal_vec(n * k, 1.0),
                rng.normal_vec(m * k, 1.0),
                rng.normal_vec(n * m, 1.0),
            );
            let (tx, tw, tr) = (
                gpu.upload(&[n, k], &x).unwrap(),
                gpu.upload(&[m, k], &w).unwrap(),
                gpu.upload(&[n, m], &r).unwrap(),
            );
            for resid in [false, true] {
                let ty = poisoned(&gpu, &[n, m]);
                let mut enc = gpu.encoder();
                let rt = resid.then_some(&tr);
                ops.linear(&gpu, &mut enc, &tx, &tw, rt, &ty).unwrap();
                gpu.queue().submit([enc.finish()]);
                let want: Vec<f32> = x
                    .chunks(k)
                    .enumerate()
                    .flat_map(|(i, row)| {
                        let y = rl::matvec(&w, &to64(row));
                        let add = |j: usize| if resid { r[i * m + j] as f64 } else { 0.0 };
                        y.iter()
                            .enumerate()
                            .map(|(j, v)| (v + add(j)) as f32)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let e = compare(&gpu.read(&ty).unwrap(), &want);
                assert!(
                    e.rel_l2 < 1e-5 && e.non_finite == 0,
                    "linear {n} x {k} x {m}, {resid}: {e:?}"
                );
            }
        }
        // RMSNorm of rows of 150 (more than the 64 threads of a row's workgroup).
        let (n, d) = (5, 150);
        let (x, gamma) = (rng.normal_vec(n * d, 2.0), rng.normal_vec(d, 1.0));
        let ty = poisoned(&gpu, &[n, d]);
        let mut enc = gpu.encoder();
        let (tx, tg) = (
            gpu.upload(&[n, d], &x).unwrap(),
            gpu.upload(&[d], &gamma).unwrap(),
        );
        ops.rms_norm(&gpu, &mut enc, &tx, &tg, 1e-5, &ty).unwrap();
        gpu.queue().submit([enc.finish()]);
        let want: Vec<f32> = x
            .chunks(d)
            .flat_map(|row| to32(&rl::rms_norm(&to64(row), &gamma, 1e-5)))
            .collect();
        let e = compare(&gpu.read(&ty).unwrap(), &want);
        assert!(e.rel_l2 < 1e-5 && e.non_finite == 0, "rms_norm: {e:?}");
        // Heads with RoPE from position 5, two sequences of 7 tokens, 3 heads of 16; then the
        // merge back (v's path: no rotation) gives the input again.
        let (b, s, h, dh) = (2, 7, 3, 16);
        let x = rng.normal_vec(b * s * h * dh, 1.0);
        let tx = gpu.upload(&[b * s, h * dh], &x).unwrap();
        let (rot, plain, back) = (
            poisoned(&gpu, &[b, h, s, dh]),
            poisoned(&gpu, &[b, h, s, dh]),
            poisoned(&gpu, &[b * s, h * dh]),
        );
        let rope = Rope {
            pos0: 5,
            base: 10000.0,
        };
        let mut enc = gpu.encoder();
        ops.heads(&gpu, &mut enc, &tx, Some(rope), &rot).unwrap();
        ops.heads(&gpu, &mut enc, &tx, None, &plain).unwrap();
        ops.merge(&gpu, &mut enc, &plain, &back).unwrap();
        gpu.queue().submit([enc.finish()]);
        let mut want = vec![0f32; x.len()];
        for (t, row) in x.chunks(h * dh).enumerate() {
            let mut r = to64(row);
            rl::rope(&mut r, dh, 5 + t % s, 10000.0);
            for hh in 0..h {
                let dst = (((t / s) * h + hh) * s + t % s) * dh;
                want[dst..dst + dh].copy_from_slice(&to32(&r[hh * dh..(hh + 1) * dh]));
            }
        }
        let e = compare(&gpu.read(&rot).unwrap(), &want);
        assert!(e.rel_l2 < 1e-5 && e.non_finite == 0, "heads + rope: {e:?}");
        assert_eq!(gpu.read(&back).unwrap(), x, "merge(heads(x)) is x");
        // SwiGLU.
        let (g, u) = (rng.normal_vec(301, 3.0), rng.normal_vec(301, 1.0));
        let ty = poisoned(&gpu, &[301]);
        let mut enc = gpu.encoder();
        let (tg, tu) = (
            gpu.upload(&[301], &g).unwrap(),
            gpu.upload(&[301], &u).unwrap(),
        );
        ops.swiglu(&gpu, &mut enc, &tg, &tu, &ty).unwrap();
        gpu.queue().submit([enc.finish()]);
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| rl::swiglu(g as f64, u as f64) as f32)
            .collect();
        let e = compare(&gpu.read(&ty).unwrap(), &want);
        assert!(e.rel_l2 < 1e-6 && e.non_finite == 0, "swiglu: {e:?}");
        // Embedding rows: a table of 300 x 24 (28 KiB: two launches at 16 KiB).
        let (vocab, d) = (300, 24);
        let table = rng.normal_vec(vocab * d, 1.0);
        let ids = [0u32, 299, 150, 7, 171, 0];
        let tt = gpu.upload(&[vocab, d], &table).unwrap();
        let ty = poisoned(&gpu, &[ids.len(), d]);
        let mut enc = gpu.encoder();
        ops.embed(&gpu, &mut enc, &ids, &tt, &ty).unwrap();
        gpu.queue().submit([enc.finish()]);
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec())
            .collect();
        assert_eq!(gpu.read(&ty).unwrap(), want, "embedding rows");
        // Bad input names the problem.
        let mut enc = gpu.encoder();
        let e = ops.embed(&gpu, &mut enc, &[300], &tt, &ty).unwrap_err();
        assert!(e.to_string().contains("token id 300 is outside"), "{e}");
        let tw = gpu.upload(&[13, 40], &[0.5; 520]).unwrap();
        let e = ops.linear(&gpu, &mut enc, &tt, &tw, None, &ty).unwrap_err();
        assert!(e.to_string().contains("cannot multiply rows of 24"), "{e}");
    }
}

fn tiny() -> sparse_attn::gguf::LlamaParams {
    common::tiny_llama(300, 256)
}

fn run(gpu: &Gpu, m: &Llama, tokens: &[u32], opts: &ForwardOptions) -> Vec<f32> {
    let mut enc = gpu.encoder();
    let f = m.forward(gpu, &mut enc, tokens, opts).unwrap();
    gpu.queue().submit([enc.finish()]);
    gpu.read(&f.logits).unwrap()
}

fn sparse(k: usize) -> ModelAttention {
    ModelAttention::Sparse(SelectOptions {
        block: 16,
        k,
        n_init: 1,
        n_local: 0,
        scoring: Scoring::InfLlmV2,
        causal: true,
        scale: None,
        evict: 0,
    })
}

#[test]
fn tiny_model_gives_the_reference_logits() {
    let Some(gpu) = common::gpu() else {
        return;
    };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let bytes = random_llama(&tiny(), seed).unwrap();
    let g = sparse_attn::gguf::Gguf::parse(&bytes).unwrap();
    let m = Llama::from_gguf(&gpu, &bytes).unwrap();
    assert!(m.weight_bytes() > 4 * 300 * 64);
    let mut rng = Rng::new(seed ^ 1);
    // Two sequences of 61 tokens: four blocks of 16, the last partial.
    let s = 61;
    let ids: Vec<u32> = (0..2 * s).map(|_| (rng.next_u64() % 300) as u32).collect();
    let want: Vec<Vec<f32>> = ids
        .chunks(s)
        .map(|seq| to32(&rl::logits(&g, &bytes, seq).unwrap()))
        .collect();
    let all = ForwardOptions {
        logits: Logits::All,
        ..ForwardOptions::new()
    };
    // One sequence, every row.
    let got = run(&gpu, &m, &ids[..s], &all);
    let e = compare(&got, &want[0]);
    eprintln!("full forward vs f64 reference: {e:?}");
    // f32 through two layers: observed ~1e-6; RoPE on the wrong pairs gives ~0.3.
    assert!(e.rel_l2 < 1e-4 && e.non_finite == 0, "{e:?}");
    // Two sequences at once, every row and the last ones.
    let two = ForwardOptions { batch: 2, ..all };
    let got = run(&gpu, &m, &ids, &two);
    let e = compare(&got, &want.concat());
    assert!(e.rel_l2 < 1e-4 && e.non_finite == 0, "batch 2: {e:?}");
    let last = ForwardOptions {
        batch: 2,
        ..ForwardOptions::new()
    };
    let got = run(&gpu, &m, &ids, &last);
    let tail: Vec<f32> = want
        .iter()
        .flat_map(|w| w[(s - 1) * 300..].to_vec())
        .collect();
    let e = compare(&got, &tail);
    assert!(e.rel_l2 < 1e-4 && e.non_finite == 0, "last rows: {e:?}");
    // The preview's top tokens are the reference's most likely ones, probabilities summing
    // to at most 1.
    let top = top_tokens(&got[..300], 5);
    let best = (0..300)
        .max_by(|&a, &b| tail[a].total_cmp(&tail[b]))
        .unwrap();
    assert_eq!(top[0].0 as usize, best);
    assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
    assert!(top.iter().map(|t| t.1).sum::<f64>() <= 1.0 + 1e-9);
    // Block-sparse with every block kept (4 blocks) is full attention; with 2 it is not.
    let got = run(
        &gpu,
        &m,
        &ids[..s],
        &ForwardOptions {
            attention: sparse(4),
            ..all
        },
    );
    let e = compare(&got, &want[0]);
    assert!(e.rel_l2 < 1e-4, "sparse keeping everything: {e:?}");
    let got = run(
        &gpu,
        &m,
        &ids[..s],
        &ForwardOptions {
            attention: sparse(2),
            ..all
        },
    );
    let tail = (s - 1) * 300..s * 300;
    assert!(compare(&got[tail.clone()], &want[0][tail]).rel_l2 > 1e-4);
    // Kept q, k, v: one set per layer, shaped for attention.
    let mut enc = gpu.encoder();
    let keep = ForwardOptions {
        keep_qkv: true,
        ..ForwardOptions::new()
    };
    let f = m.forward(&gpu, &mut enc, &ids[..s], &keep).unwrap();
    gpu.queue().submit([enc.finish()]);
    assert_eq!(f.layers.len(), 2);
    assert_eq!(f.layers[1].q.shape(), &[1, 4, s, 16]);
    assert_eq!(f.layers[1].k.shape(), &[1, 2, s, 16]);
    assert!(
        gpu.read(&f.layers[1].v)
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    );
}

/// Decoding with a KV cache (a prompt of 70 tokens, which a cache on the GPU takes 64 at a time,
/// then one token per step to 100) gives the forward's logits at every decoded position, two
/// sequences at once: full attention, sparse
/// with the cache on the GPU, sparse with the cache offloaded (4 GPU slots per kv head for a
/// budget of 3 blocks of 16: blocks leave the slots and come back).
#[test]
fn decoding_gives_the_forwards_logits() {
    let Some(gpu) = common::gpu() else {
        return;
    };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let bytes = random_llama(&tiny(), seed).unwrap();
    let m = Llama::from_gguf(&gpu, &bytes).unwrap();
    let mut rng = Rng::new(seed ^ 3);
    let (s, prompt, v) = (100, 70, 300);
    let ids: Vec<u32> = (0..2 * s).map(|_| (rng.next_u64() % 300) as u32).collect();
    for (name, attention, offload) in [
        ("full", ModelAttention::Full, None),
        ("sparse", sparse(3), None),
        ("sparse, offloaded", sparse(3), Some(4)),
    ] {
        let all = ForwardOptions {
            logits: Logits::All,
            attention,
            ..ForwardOptions::new()
        };
        let want: Vec<Vec<f32>> = ids.chunks(s).map(|q| run(&gpu, &m, q, &all)).collect();
        let opts = DecoderOptions {
            batch: 2,
            capacity: s,
            attention,
            offload_slots: offload,
        };
        let mut dec = m.decoder(&gpu, &opts).unwrap();
        let mut feed = |t0: usize, t1: usize| {
            let tokens: Vec<u32> = ids.chunks(s).flat_map(|q| q[t0..t1].to_vec()).collect();
            let mut enc = gpu.encoder();
            let l = dec.step(&gpu, &mut enc, &tokens).unwrap();
            gpu.queue().submit([enc.finish()]);
            gpu.read(&l).unwrap()
        };
        let (mut got, mut exp) = (vec![], vec![]);
        for (t0, t1) in std::iter::once((0, prompt)).chain((prompt..s).map(|t| (t, t + 1))) {
            got.extend(feed(t0, t1));
            for w in &want {
                exp.extend_from_slice(&w[(t1 - 1) * v..t1 * v]);
            }
        }
        let e = compare(&got, &exp);
        eprintln!("{name}: decoding vs forward {e:?}");
        assert!(e.rel_l2 < 1e-4 && e.non_finite == 0, "{name}: {e:?}");
        assert_eq!(dec.len(), s);
        if offload.is_some() {
            let h = dec
                .hit_rate(&gpu)
                .unwrap()
                .expect("an offloaded cache counts hits");
            assert!((0.0..1.0).contains(&h), "hit rate {h}");
            assert!(dec.kv_bytes().1 > 0, "the cache is in host memory");
        }
        let mut enc = gpu.encoder();
        let e = dec.step(&gpu, &mut enc, &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("exceed the decoder's capacity of 100"), "{e}");
    }
}

#[test]
fn bad_models_and_inputs_are_errors_that_name_the_problem() {
    let Some(gpu) = common::gpu() else {
        return;
    };
    let bytes = random_llama(&tiny(), 3).unwrap();
    let m = Llama::from_gguf(&gpu, &bytes).unwrap();
    let mut enc = gpu.encoder();
    let mut err = |tokens: &[u32], opts: ForwardOptions| {
        m.forward(&gpu, &mut enc, tokens, &opts)
            .unwrap_err()
            .to_string()
    };
    let e = err(
        &[1, 2, 3],
        ForwardOptions {
            batch: 2,
            ..ForwardOptions::new()
        },
    );
    assert!(e.contains("3 tokens do not make 2 sequences"), "{e}");
    let e = err(&[], ForwardOptions::new());
    assert!(e.contains("0 tokens"), "{e}");
    let e = err(&[5, 400], ForwardOptions::new());
    assert!(
        e.contains("token id 400 is outside the vocabulary of 300"),
        "{e}"
    );
    let e = err(&vec![1; 257], ForwardOptions::new());
    assert!(e.contains("exceed the model's context of 256"), "{e}");
    // More blocks than the tokens have.
    let mut opts = ForwardOptions::new();
    opts.attention = sparse(4);
    let e = err(&[1; 20], opts);
    assert!(e.contains("k = 4 is larger than the 2 blocks"), "{e}");
    // A truncated file and another architecture.
    let e = Llama::from_gguf(&gpu, &bytes[..bytes.len() / 2]).unwrap_err();
    assert!(!e.to_string().is_empty());
    let mut w = sparse_attn::gguf::Writer::new();
    w = w.meta(
        "general.architecture",
        sparse_attn::gguf::Value::String("gpt2".into()),
    );
    let e = Llama::from_gguf(&gpu, &w.to_bytes()).unwrap_err();
    assert!(e.to_string().contains("`gpt2`"), "{e}");
}

/// With the training stack: the same file through Burn (`train::llama`) in sparse mode gives
/// the same logits (the same selection kernels see q and k that differ by rounding only).
#[cfg(feature = "train")]
#[test]
fn sparse_forward_equals_burns() {
    use sparse_attn::train::llama::{Pretrained, SparseSettings};
    use sparse_attn::train::model::Mode;
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let bytes = random_llama(&tiny(), seed).unwrap();
    let settings = SparseSettings {
        block: 16,
        topk: 3,
        n_init: 1,
        n_local: 0,
        scoring: Scoring::InfLlmV2,
    };
    let p = Pretrained::from_bytes(&bytes, &rt.device, settings).unwrap();
    let m = Llama::from_gguf(&rt.gpu, &bytes).unwrap();
    let mut rng = Rng::new(seed ^ 7);
    let ids: Vec<u32> = (0..77).map(|_| (rng.next_u64() % 300) as u32).collect();
    let want = common::burn_logits(&rt, &p.model, &p.config, &ids, Mode::Sparse);
    let got = run(
        &rt.gpu,
        &m,
        &ids,
        &ForwardOptions {
            attention: sparse(3),
            logits: Logits::All,
            ..ForwardOptions::new()
        },
    );
    let e = compare(&got, &want);
    eprintln!("sparse forward vs Burn's: {e:?}");
    assert!(e.rel_l2 < 1e-4 && e.non_finite == 0, "{e:?}");
}

/// The real SmolLM2 file (when scripts/fetch-model.sh has fetched it) on our own kernels agrees
/// with Hugging Face transformers (bench/smollm2/reference.json, the prompts' token ids as
/// transformers' tokenizer made them): the logits after the prompt and the argmax after every
/// position, of the first prompt on lavapipe; with SPARSE_ATTN_GPU_CHECK (scripts/gpu-check.sh),
/// of every prompt, and the 64 greedy tokens too (a forward per token, no cache: 64 prefills of
/// the growing text).
#[test]
fn smollm2_on_our_kernels_agrees_with_transformers() {
    let Some((path, prompts)) = common::smollm2() else {
        return;
    };
    let Some(gpu) = common::gpu() else {
        return;
    };
    let m = Llama::from_gguf(&gpu, &std::fs::read(&path).unwrap()).unwrap();
    let greedy = common::gpu_check();
    let v = m.params.vocab;
    for (_, c) in prompts
        .iter()
        .enumerate()
        .filter(|&(i, _)| common::smollm2_forward_for(i))
    {
        let (given, n) = (&c.given, c.ids.len());
        let t0 = std::time::Instant::now();
        let all = ForwardOptions {
            logits: Logits::All,
            ..ForwardOptions::new()
        };
        let logits = run(&gpu, &m, &c.ids, &all);
        eprintln!("forward of {n} tokens: {:.2} s", t0.elapsed().as_secs_f64());
        let worst = c.worst(&logits[(n - 1) * v..n * v]);
        let std = c.logit_std;
        eprintln!(
            "{given:?}: {n} tokens, largest logit difference {worst:.2e} (logits' std {std:.2})"
        );
        // The same bound as Burn's forward of this file (tests/llama.rs): f32 through 30 layers
        // against transformers in f64; a RoPE or norm slip moves logits by units.
        assert!(worst < 2e-4 * std, "{given:?}: {worst}");
        let got: Vec<u32> = logits.chunks_exact(v).map(common::argmax).collect();
        assert_eq!(got, c.argmax, "{given:?}");
        if !greedy {
            continue;
        }
        let t0 = std::time::Instant::now();
        let mut text = c.ids.clone();
        for _ in 0..c.greedy.len() {
            text.push(common::argmax(&run(
                &gpu,
                &m,
                &text,
                &ForwardOptions::new(),
            )));
        }
        eprintln!("greedy: {:.1} s", t0.elapsed().as_secs_f64());
        assert_eq!(&text[n..], &c.greedy[..], "{given:?}");
    }
}
