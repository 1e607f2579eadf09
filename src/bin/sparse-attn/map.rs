//! `map`: where full attention goes for one query head, which blocks the selector keeps, and
//! each token's kept share of the attention mass, as a PNG.

use std::process::ExitCode;

use clap::Args;
use sparse_attn::ops::metrics::AttentionMetrics;
use sparse_attn::reference;
use sparse_attn::{AttnOptions, AttnShape, BlockSelect, Error, Gpu, GpuOptions, SelectConfig};

use crate::args::SelectArgs;

#[derive(Args)]
pub struct MapArgs {
    /// Query head to draw (its kv group's selection is shown).
    #[arg(long, default_value_t = 0)]
    pub head: usize,
    /// Batch element to draw.
    #[arg(long, default_value_t = 0)]
    pub batch_index: usize,
    /// q from a file: `q.npy` (little-endian float32) or `acts.safetensors:NAME` (F32, F16,
    /// BF16 or F64); shape [batch, heads, seq, head_dim], [heads, seq, head_dim] or
    /// [seq, head_dim]. With --k. Default: structured random inputs.
    #[arg(long, requires = "k")]
    pub q: Option<String>,
    /// k from a file, as for --q (kv heads).
    #[arg(long, requires = "q")]
    pub k: Option<String>,
    /// Random inputs: sequence length.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Random inputs: query heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Random inputs: kv heads.
    #[arg(long, default_value_t = 1)]
    pub kv_heads: usize,
    /// Random inputs: head dim.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Draw individual keys up to this many (block-level beyond).
    #[arg(long, default_value_t = 1024)]
    pub token_level_max: usize,
    /// Output PNG.
    #[arg(long, default_value = "attention-map.png")]
    pub out: std::path::PathBuf,
}

/// Reshape a loaded array to [batch, heads, seq, head_dim].
fn as_4d(a: sparse_attn::npy::NpyArray, what: &str) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let dims = match a.shape.len() {
        4 => a.shape.clone(),
        3 => vec![1, a.shape[0], a.shape[1], a.shape[2]],
        2 => vec![1, 1, a.shape[0], a.shape[1]],
        _ => {
            return Err(Error::InvalidInput(format!(
                "{what} has shape {:?}; expected [batch, heads, seq, head_dim] (or fewer leading \
                 dims)",
                a.shape
            )));
        }
    };
    if let Some(i) = a.data.iter().position(|x| !x.is_finite()) {
        let n = a.data.iter().filter(|x| !x.is_finite()).count();
        return Err(Error::InvalidInput(format!(
            "{what} holds {n} values that are NaN or infinite (the first at flat index {i}, {}); \
             attention over them has no meaning",
            a.data[i]
        )));
    }
    Ok((dims, a.data))
}

/// Values the random inputs may hold (q and k together: 1 GiB of f32).
const MAX_HOST_ELEMS: usize = 1 << 28;

pub fn map(opts: &GpuOptions, a: &MapArgs) -> Result<ExitCode, Error> {
    // The output first: a bad path must not cost the work, nor leave an empty file.
    let png = a
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        return Err(Error::InvalidInput(format!(
            "--out {}: the map is written as PNG; give a path ending in .png",
            a.out.display()
        )));
    }
    sparse_attn::files::prepare_file(&a.out)?;
    let (shape, q, k) = match (&a.q, &a.k) {
        (Some(qp), Some(kp)) => {
            let (qd, q) = as_4d(sparse_attn::safetensors::load_spec(qp)?, "q")?;
            let (kd, k) = as_4d(sparse_attn::safetensors::load_spec(kp)?, "k")?;
            if qd[0] != kd[0] || qd[3] != kd[3] {
                return Err(Error::InvalidInput(format!(
                    "q {qd:?} and k {kd:?} disagree on batch or head_dim"
                )));
            }
            let shape = AttnShape {
                batch: qd[0],
                heads_q: qd[1],
                heads_kv: kd[1],
                seq_q: qd[2],
                seq_k: kd[2],
                head_dim: qd[3],
            };
            (shape, q, k)
        }
        _ => {
            let shape = AttnShape::new(1, a.heads, a.kv_heads, a.seq, a.head_dim);
            shape.validate(&AttnOptions::causal(true))?;
            // The inputs are made on the host: refuse what would not fit before making them.
            if shape.q_len() + shape.kv_len() > MAX_HOST_ELEMS {
                return Err(Error::InvalidInput(format!(
                    "random inputs of {} heads x {} tokens x {} dims are too large to make on the \
                     host (at most {MAX_HOST_ELEMS} values); use fewer heads or tokens, or give \
                     --q/--k files",
                    shape.heads_q, shape.seq_q, shape.head_dim
                )));
            }
            let (q, k) = sparse_attn::synthetic::structured_qk(&shape, a.seed);
            (shape, q, k)
        }
    };
    let att_opts = AttnOptions::causal(true);
    shape.validate(&att_opts)?;
    if a.head >= shape.heads_q || a.batch_index >= shape.batch {
        return Err(Error::InvalidInput(format!(
            "head {} / batch index {} out of range for {shape:?}",
            a.head, a.batch_index
        )));
    }
    let select = a.select.options()?;
    if select.evict > 0 {
        return Err(Error::InvalidInput(
            "--k-query asks for NOSA's selection, which needs an eviction score; map reads only \
             q and k"
                .into(),
        ));
    }
    let gpu = Gpu::new(opts)?;
    let (tq, tk) = (
        gpu.upload(&shape.q_dims(), &q)?,
        gpu.upload(&shape.kv_dims(), &k)?,
    );
    let (sel, _) =
        BlockSelect::new(&gpu, shape, &SelectConfig::new(select))?.select(&gpu, &tq, &tk)?;
    let metrics = AttentionMetrics::new(&gpu, shape, select.sparse(), select.k)?
        .compute(&gpu, &tq, &tk, &sel)?;
    let (sq, nb) = (shape.seq_q, shape.seq_k.div_ceil(select.block));
    let bh = a.batch_index * shape.heads_q + a.head;
    let bkv = bh / shape.group();
    let mass = gpu.read(&metrics.block_mass)?[bh * sq * nb..(bh + 1) * sq * nb].to_vec();
    let sparsity = gpu.read(&metrics.sparsity)?[bh * sq..(bh + 1) * sq].to_vec();
    let selection = gpu.read_u32(&sel)?[bkv * sq * select.k..(bkv + 1) * sq * select.k].to_vec();
    let probs = (shape.seq_k <= a.token_level_max)
        .then(|| reference::attention::probabilities(&shape, &att_opts, &q, &k, bh))
        .transpose()?;
    let mean = sparsity.iter().map(|&x| x as f64).sum::<f64>() / sq as f64;
    if !mean.is_finite() || mass.iter().any(|x| !x.is_finite()) {
        // Finite inputs can still overflow f32 logits (values near 1e30).
        return Err(Error::InvalidInput(format!(
            "the attention of these inputs is not finite (q·k overflows f32: largest |q| {:.3e}, \
             largest |k| {:.3e}); scale the activations down",
            q.iter().fold(0f32, |m, x| m.max(x.abs())),
            k.iter().fold(0f32, |m, x| m.max(x.abs()))
        )));
    }
    let source = match &a.q {
        Some(p) => p.clone(),
        None => format!("structured random inputs (seed {})", a.seed),
    };
    let data = sparse_attn::viz::MapData {
        title: vec![
            format!(
                "full attention, batch {} head {} of {source}",
                a.batch_index, a.head
            ),
            format!(
                "{:?} selection: B={} k={} (init {}, local {}); mean kept mass {mean:.3}",
                select.scoring, select.block, select.k, select.n_init, select.n_local
            ),
        ],
        seq_q: sq,
        seq_k: shape.seq_k,
        q_offset: shape.q_offset(),
        block: select.block,
        causal: true,
        probs: probs.as_deref(),
        block_mass: &mass,
        selection: &selection,
        k: select.k,
        sparsity: &sparsity,
    };
    let img = sparse_attn::viz::render_map(&data)?;
    sparse_attn::viz::save_png(&img, &a.out)?;
    println!(
        "wrote {} ({}x{} px, {} map) on {}; mean kept attention mass {mean:.3}",
        a.out.display(),
        img.width(),
        img.height(),
        if probs.is_some() {
            "token-level"
        } else {
            "block-level"
        },
        gpu.adapter()
    );
    Ok(ExitCode::SUCCESS)
}
