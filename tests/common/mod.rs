//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sparse_attn::{Gpu, GpuOptions};

/// The test GPU. Tests fail without one unless SPARSE_ATTN_ALLOW_NO_GPU=1 (then they are
/// skipped with a printed reason): a CI run that silently tests nothing must not pass.
pub fn gpu() -> Option<Gpu> {
    gpu_with(&GpuOptions::default())
}

pub fn gpu_with(opts: &GpuOptions) -> Option<Gpu> {
    match Gpu::new(opts) {
        Ok(g) => {
            eprintln!("adapter: {}", g.adapter());
            Some(g)
        }
        Err(e) if std::env::var("SPARSE_ATTN_ALLOW_NO_GPU").as_deref() == Ok("1") => {
            eprintln!("skipping GPU test: {e}");
            None
        }
        Err(e) => panic!("{e}\n(set SPARSE_ATTN_ALLOW_NO_GPU=1 to skip GPU tests)"),
    }
}

/// Logits `[ids.len(), vocab]` of Burn's model `m` over one sequence, in `mode`.
#[cfg(feature = "train")]
pub fn burn_logits(
    rt: &sparse_attn::train::Runtime,
    m: &sparse_attn::train::model::Lm,
    cfg: &sparse_attn::train::model::LmConfig,
    ids: &[u32],
    mode: sparse_attn::train::model::Mode,
) -> Vec<f32> {
    use burn::tensor::{Int, Tensor, TensorData};
    let n = ids.len();
    let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &rt.device);
    m.forward(cfg, tokens, sparse_attn::train::model::Run::new(mode))
        .unwrap()
        .logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

/// One Burn runtime on the test GPU, shared by every test of a binary (a device is registered
/// with Burn once). `None` where `gpu` skips.
#[cfg(feature = "train")]
pub fn burn_runtime() -> Option<sparse_attn::train::Runtime> {
    use sparse_attn::train::Runtime;
    static RT: std::sync::OnceLock<Option<Runtime>> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        let gpu = gpu_with(&Runtime::gpu_options(&GpuOptions::default()))?;
        Some(Runtime::from_gpu(std::sync::Arc::new(gpu)).expect("Burn shares our device"))
    })
    .clone()
}

/// A tensor-core (cooperative-matrix) case the device or shape cannot run: skipped with its
/// reason. Under scripts/gpu-check.sh (SPARSE_ATTN_GPU_CHECK=1) on a device that has
/// cooperative matrices a skip fails the test instead, unless `by_shape` (the case asks for
/// what the kernel declines on every device, e.g. more than 16 query heads per kv head): a
/// broken support check must not let the tensor-core path pass untested.
/// Under scripts/gpu-check.sh (SPARSE_ATTN_GPU_CHECK=1): the GPU machine, where the variants
/// lavapipe cannot run must run and the slow real-model cases run in full.
pub fn gpu_check() -> bool {
    std::env::var("SPARSE_ATTN_GPU_CHECK").as_deref() == Ok("1")
}

/// Whether the real SmolLM2's forward runs for prompt `i` of bench/smollm2/reference.json: a
/// forward takes 20-30 s on lavapipe whatever the prompt's length, so CI runs the first (the
/// chat prompt) and the GPU check all of them.
pub fn smollm2_forward_for(i: usize) -> bool {
    i == 0 || gpu_check()
}

pub fn skip_coop(gpu: &Gpu, what: &str, by_shape: bool, reason: &dyn std::fmt::Display) {
    let has = gpu
        .features()
        .contains(sparse_attn::wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    if has && !by_shape && gpu_check() {
        panic!(
            "{what} was skipped on {}, which has cooperative matrices: {reason}",
            gpu.adapter().name
        );
    }
    eprintln!("SKIPPED {what} on {}: {reason}", gpu.adapter().name);
}

/// The error of a computed d bias measured against the size of what it is computed from: d
/// bias_j = Σ_(h,i) P_hij (dP_hij − D_hi), whose terms cancel (Σ_j dS_hij = 0 in every row; one
/// key: dP = D exactly), so d bias can be far smaller than its operands and its relative error
/// is unbounded even when every term is right to f32 precision (1.4e-4 seen with a bias of std
/// 30 on 17 keys). Returns ‖got − want‖₂ / ‖T‖₂ with T_j = Σ_(h,i) P_hij (|dP_hij| + |D_hi|)
/// computed here in f64, from the same inputs
/// (q, dO `[b, hq, sq, d]`, k, v `[b, hkv, sk, d]`, bias `[b, hkv, sk]`), with `sees(b, h, i,
/// j)` saying which keys row (h, i) attends to (the mask, or a selection).
/// The inputs of a biased attention backward: q, k, v, bias, dO.
pub type BiasedInputs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

pub fn dbias_error(
    s: &sparse_attn::AttnShape,
    scale: f32,
    (q, k, v, bias, d_o): BiasedInputs,
    sees: impl Fn(usize, usize, usize, usize) -> bool,
    got: &[f32],
    want: &[f32],
) -> f64 {
    let (g, d, sq, sk, hq, hkv) = (
        s.group(),
        s.head_dim,
        s.seq_q,
        s.seq_k,
        s.heads_q,
        s.heads_kv,
    );
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum::<f64>()
    };
    let mut terms = vec![0f64; s.batch * hkv * sk];
    for b in 0..s.batch {
        for h in 0..hq {
            let u = b * hkv + h / g;
            let krow = |j: usize| &k[(u * sk + j) * d..(u * sk + j + 1) * d];
            let vrow = |j: usize| &v[(u * sk + j) * d..(u * sk + j + 1) * d];
            for i in 0..sq {
                let r = ((b * hq + h) * sq + i) * d;
                let (qi, doi) = (&q[r..r + d], &d_o[r..r + d]);
                let logit: Vec<f64> = (0..sk)
                    .map(|j| match sees(b, h, i, j) {
                        true => scale as f64 * dot(qi, krow(j)) + bias[u * sk + j] as f64,
                        false => f64::NEG_INFINITY,
                    })
                    .collect();
                let m = logit.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = logit.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let mut o = vec![0f64; d];
                for (j, ej) in e.iter().enumerate() {
                    for (x, vc) in o.iter_mut().zip(vrow(j)) {
                        *x += ej / z * *vc as f64;
                    }
                }
                let dd: f64 = doi.iter().zip(&o).map(|(a, b)| *a as f64 * b).sum();
                for (j, ej) in e.iter().enumerate() {
                    terms[u * sk + j] += ej / z * (dot(doi, vrow(j)).abs() + dd.abs());
                }
            }
        }
    }
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let size: f64 = terms.iter().map(|t| t * t).sum::<f64>().sqrt();
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    err / size.max(f64::MIN_POSITIVE)
}

/// A small Llama (2 layers, d_model 64, 4 query heads and 2 kv heads of 16, d_ff 96) for the
/// GGUF files tests write with `gguf::random_llama`.
pub fn tiny_llama(vocab: usize, context: usize) -> sparse_attn::gguf::LlamaParams {
    sparse_attn::gguf::LlamaParams::tiny(vocab, context)
}

/// One prompt of bench/smollm2/reference.json: what Hugging Face transformers computed on the
/// SmolLM2 file (bench/smollm2/reference.py, on the GPU machine).
pub struct RefPrompt {
    pub kind: String,
    pub given: String,
    pub text: String,
    pub ids: Vec<u32>,
    /// The most likely next token after every prompt position.
    pub argmax: Vec<u32>,
    /// (token, logit) after the whole prompt: its top tokens and a fixed set.
    pub logits: Vec<(u32, f64)>,
    pub logit_std: f64,
    pub greedy: Vec<u32>,
    pub greedy_text: String,
}

impl RefPrompt {
    /// The largest difference between `last` (logits after the prompt) and the reference's.
    pub fn worst(&self, last: &[f32]) -> f64 {
        self.logits
            .iter()
            .map(|&(id, want)| (last[id as usize] as f64 - want).abs())
            .fold(0.0, f64::max)
    }
}

/// ‖got − want‖₂ / ‖want‖₂, without `reference::compare`'s floor (for small values, e.g. a tiny
/// model's gradients); NaN where anything is not finite, so it fails every bound.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The most likely token of a row of logits.
pub fn argmax(row: &[f32]) -> u32 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap() as u32
}

/// The SmolLM2 file (SPARSE_ATTN_GGUF, else where scripts/fetch-model.sh puts it) and the
/// reference's prompts; `None`, saying so, where the file is not here.
pub fn smollm2() -> Option<(String, Vec<RefPrompt>)> {
    let path = std::env::var("SPARSE_ATTN_GGUF")
        .unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    if !std::path::Path::new(&path).exists() {
        eprintln!("SKIPPED: no {path} (scripts/fetch-model.sh fetches it)");
        return None;
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("bench/smollm2/reference.json").unwrap())
            .unwrap();
    let u32s = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let s = |v: &serde_json::Value| v.as_str().unwrap().to_string();
    let prompts = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut logits = vec![];
            for (ids, vals) in [("top_ids", "top_logits"), ("fixed_ids", "fixed_logits")] {
                let vals = c[vals].as_array().unwrap();
                logits.extend(
                    u32s(&c[ids])
                        .into_iter()
                        .zip(vals.iter().map(|x| x.as_f64().unwrap())),
                );
            }
            RefPrompt {
                kind: s(&c["kind"]),
                given: s(&c["given"]),
                text: s(&c["text"]),
                ids: u32s(&c["ids"]),
                argmax: u32s(&c["argmax"]),
                logits,
                logit_std: c["logit_std"].as_f64().unwrap(),
                greedy: u32s(&c["greedy"]),
                greedy_text: s(&c["greedy_text"]),
            }
        })
        .collect();
    Some((path, prompts))
}
