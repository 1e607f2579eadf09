//! The layers of a Llama model around attention (`shaders/llama.wgsl`): embedding lookup,
//! RMSNorm, linear layers (Y = X·Wᵀ, optionally + R), the split into heads with RoPE, the
//! merge back and SwiGLU, all f32. `crate::llama` builds the model's forward from them; the
//! references are `reference::llama`'s functions. Every launch checks its tensors' shapes
//! (the kernels run unchecked); weights and logits larger than one storage binding are split
//! over their rows.

use std::sync::Arc;

use crate::error::{Error, Result, invalid};
use crate::gpu::{DType, Encoder, Gpu, Pipeline, PipelineKey, Storage, Tensor};
use crate::ops::launch::{self, input, output, window};

/// Threads of the element kernels.
const NT: u32 = 256;
/// Output tile of the matmul (rows and columns).
const TILE: usize = 64;

crate::gpu::uniform::uniform!(
    "llama.wgsl",
    LlmParams,
    /// Mirrors `LlmParams` in `shaders/llama.wgsl`.
    struct LlmParams {
        n: u32,
        k: u32,
        m: u32,
        seq: u32,
        x_off: u32,
        w_off: u32,
        y_off: u32,
        r_off: u32,
        y_stride: u32,
        pos0: u32,
        grid_x: u32,
        v0: u32,
        v1: u32,
        rope: u32,
        eps: f32,
        log2_base: f32,
    }
);

impl LlmParams {
    fn zero() -> Self {
        bytemuck::Zeroable::zeroed()
    }
}

/// RoPE of [`LlamaOps::heads`]: positions `pos0..pos0 + seq` of every sequence, `base`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub pos0: usize,
    pub base: f64,
}

/// The compiled kernels (built once per device; the pipelines come from its cache).
#[derive(Debug)]
pub struct LlamaOps {
    embed: Arc<Pipeline>,
    rms_norm: Arc<Pipeline>,
    matmul: Arc<Pipeline>,
    matmul_resid: Arc<Pipeline>,
    heads: Arc<Pipeline>,
    merge: Arc<Pipeline>,
    swiglu: Arc<Pipeline>,
}

fn key(entry: &'static str, resid: bool) -> PipelineKey {
    PipelineKey {
        file: "llama.wgsl",
        entry,
        constants: vec![("NT", NT), ("RESID", resid as u32)],
        checked: false,
        storage: Storage::F32,
    }
}

/// Bytes an f32 tensor of `n` elements takes, as the binding checks count it.
fn f32_bytes(n: usize) -> u64 {
    4 * n as u64
}

impl LlamaOps {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let p = |entry, resid| gpu.pipeline(&key(entry, resid));
        Ok(Self {
            embed: p("embed", false)?,
            rms_norm: p("rms_norm", false)?,
            matmul: p("matmul", false)?,
            matmul_resid: p("matmul", true)?,
            heads: p("heads", false)?,
            merge: p("merge", false)?,
            swiglu: p("swiglu", false)?,
        })
    }

    /// Activations are bound whole: each must fit one binding (the model's forward checks
    /// this for its token count before it starts; this is the kernels' own guard).
    fn check_fits(gpu: &Gpu, what: &str, t: &Tensor) -> Result<()> {
        if t.size_bytes() > gpu.max_binding() {
            return Err(Error::Unsupported(format!(
                "{what} takes {} bytes, more than this device binds at once ({} bytes): \
                 run fewer tokens at a time",
                t.size_bytes(),
                gpu.max_binding()
            )));
        }
        Ok(())
    }

    /// A flattened grid of `groups` workgroups.
    fn grid(gpu: &Gpu, groups: usize) -> Result<(u32, u32)> {
        let max = gpu.limits().max_compute_workgroups_per_dimension as usize;
        let gx = groups.clamp(1, max);
        let gy = groups.div_ceil(gx).max(1);
        if gy > max {
            return Err(Error::Unsupported(format!(
                "{groups} workgroups exceed this device's grid of {max} x {max}"
            )));
        }
        Ok((gx as u32, gy as u32))
    }

    fn whole(t: &Tensor) -> launch::Window {
        window(0, t.len() as u64, 256)
    }

    /// One launch of `groups` workgroups that binds each tensor of `views` (binding, name,
    /// tensor) whole: the element offsets of `p` stay 0, as each binding starts at its tensor.
    fn launch_whole(
        gpu: &Gpu,
        enc: &mut Encoder,
        pipe: &Pipeline,
        groups: usize,
        p: LlmParams,
        views: &[(u32, &str, &Tensor)],
    ) -> Result<()> {
        for &(_, what, t) in views {
            Self::check_fits(gpu, what, t)?;
        }
        let grid = Self::grid(gpu, groups)?;
        let p = LlmParams {
            grid_x: grid.0,
            ..p
        };
        let views: Vec<_> = views
            .iter()
            .map(|&(b, _, t)| (b, t, Self::whole(t)))
            .collect();
        launch::dispatch(gpu, enc, pipe, bytemuck::bytes_of(&p), &views, grid);
        Ok(())
    }

    /// `y[t, :] = table[ids[t], :]`: `ids` (each below the table's rows), `table`
    /// `[vocab, d]`, `y` `[ids.len(), d]`.
    pub fn embed(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        ids: &[u32],
        table: &Tensor,
        y: &Tensor,
    ) -> Result<()> {
        let (n, [vocab, d]) = (ids.len(), dims2(table, "the embedding")?);
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            invalid!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let ids = gpu.upload_u32(&[n], ids)?;
        launch::check_args(&[
            input("the embedding", table, &[vocab, d], DType::F32),
            output("the embedded tokens", y, &[n, d], DType::F32),
        ])?;
        let ids = &ids;
        Self::check_fits(gpu, "the embedded tokens", y)?;
        let rows = rows_per_binding(gpu, f32_bytes(d), "an embedding row")?;
        let grid = Self::grid(gpu, (n * d).div_ceil(NT as usize))?;
        for v0 in (0..vocab).step_by(rows) {
            let v1 = (v0 + rows).min(vocab);
            let tw = window((v0 * d) as u64, ((v1 - v0) * d) as u64, 256);
            let (iw, yw) = (Self::whole(ids), Self::whole(y));
            let p = LlmParams {
                n: n as u32,
                k: d as u32,
                x_off: iw.skip,
                w_off: tw.skip,
                y_off: yw.skip,
                grid_x: grid.0,
                v0: v0 as u32,
                v1: v1 as u32,
                ..LlmParams::zero()
            };
            launch::dispatch(
                gpu,
                enc,
                &self.embed,
                bytemuck::bytes_of(&p),
                &[(5, ids, iw), (2, table, tw), (4, y, yw)],
                grid,
            );
        }
        Ok(())
    }

    /// `y = x / sqrt(mean(x²) + eps) · γ` per row; `x`, `y` `[n, d]`, `gamma` `[d]`.
    pub fn rms_norm(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &Tensor,
        gamma: &Tensor,
        eps: f64,
        y: &Tensor,
    ) -> Result<()> {
        let [n, d] = dims2(x, "the normed input")?;
        launch::check_args(&[
            input("the normed input", x, &[n, d], DType::F32),
            input("the norm's weight", gamma, &[d], DType::F32),
            output("the norm's output", y, &[n, d], DType::F32),
        ])?;
        let p = LlmParams {
            n: n as u32,
            k: d as u32,
            eps: eps as f32,
            ..LlmParams::zero()
        };
        let views = [
            (1, "the normed input", x),
            (2, "the norm's weight", gamma),
            (4, "the norm's output", y),
        ];
        Self::launch_whole(gpu, enc, &self.rms_norm, n, p, &views)
    }

    /// `y = x · wᵀ (+ resid)`: `x` `[n, k]`, `w` `[m, k]` (a GGUF weight: m rows of k),
    /// `resid` and `y` `[n, m]`. Rows of x and y, and rows of w, are split into launches
    /// where a tensor exceeds one binding.
    pub fn linear(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &Tensor,
        w: &Tensor,
        resid: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<()> {
        let [n, k] = dims2(x, "the linear layer's input")?;
        let [m, kw] = dims2(w, "the weight")?;
        if kw != k {
            invalid!("a weight of {m} x {kw} cannot multiply rows of {k} values");
        }
        let (nk, mk, nm) = ([n, k], [m, k], [n, m]);
        let mut args = vec![
            input("the linear layer's input", x, &nk, DType::F32),
            input("the weight", w, &mk, DType::F32),
            output("the linear layer's output", y, &nm, DType::F32),
        ];
        if let Some(r) = resid {
            args.push(input("the residual", r, &nm, DType::F32));
        }
        launch::check_args(&args)?;
        let max_grid = gpu.limits().max_compute_workgroups_per_dimension as usize * TILE;
        let row_bytes = f32_bytes(k.max(m));
        let rows = rows_per_binding(gpu, row_bytes, "a row of the linear layer")?.min(max_grid);
        let cols = rows_per_binding(gpu, f32_bytes(k), "a row of the weight")?.min(max_grid);
        let pipe = match resid {
            Some(_) => &self.matmul_resid,
            None => &self.matmul,
        };
        for r0 in (0..n).step_by(rows) {
            let r1 = (r0 + rows).min(n);
            let xw = window((r0 * k) as u64, ((r1 - r0) * k) as u64, 256);
            let yw = window((r0 * m) as u64, ((r1 - r0) * m) as u64, 256);
            for c0 in (0..m).step_by(cols) {
                let c1 = (c0 + cols).min(m);
                let ww = window((c0 * k) as u64, ((c1 - c0) * k) as u64, 256);
                let p = LlmParams {
                    n: (r1 - r0) as u32,
                    k: k as u32,
                    m: (c1 - c0) as u32,
                    x_off: xw.skip,
                    w_off: ww.skip,
                    y_off: yw.skip + c0 as u32,
                    r_off: yw.skip + c0 as u32,
                    y_stride: m as u32,
                    ..LlmParams::zero()
                };
                let mut views = vec![(1, x, xw), (2, w, ww), (4, y, yw)];
                if let Some(r) = resid {
                    views.push((3, r, yw));
                }
                launch::dispatch(
                    gpu,
                    enc,
                    pipe,
                    bytemuck::bytes_of(&p),
                    &views,
                    (
                        (c1 - c0).div_ceil(TILE) as u32,
                        (r1 - r0).div_ceil(TILE) as u32,
                    ),
                );
            }
        }
        Ok(())
    }

    /// Token rows `x` `[b·s, heads·d]` to heads `y` `[b, heads, s, d]`, rotated by `rope`.
    pub fn heads(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        x: &Tensor,
        rope: Option<Rope>,
        y: &Tensor,
    ) -> Result<()> {
        let [b, h, s, d] = dims4(y, "the heads")?;
        launch::check_args(&[
            input("the projected tokens", x, &[b * s, h * d], DType::F32),
            output("the heads", y, &[b, h, s, d], DType::F32),
        ])?;
        if !d.is_multiple_of(2) {
            invalid!("head_dim = {d}: RoPE rotates pairs");
        }
        let p = LlmParams {
            n: (b * s) as u32,
            k: d as u32,
            m: h as u32,
            seq: s as u32,
            pos0: rope.map_or(0, |r| r.pos0 as u32),
            rope: rope.is_some() as u32,
            log2_base: rope.map_or(0.0, |r| r.base.log2() as f32),
            ..LlmParams::zero()
        };
        let groups = (b * s * h * d / 2).div_ceil(NT as usize);
        let views = [(1, "the projected tokens", x), (4, "the heads", y)];
        Self::launch_whole(gpu, enc, &self.heads, groups, p, &views)
    }

    /// Heads `x` `[b, heads, s, d]` back to token rows `y` `[b·s, heads·d]`.
    pub fn merge(&self, gpu: &Gpu, enc: &mut Encoder, x: &Tensor, y: &Tensor) -> Result<()> {
        let [b, h, s, d] = dims4(x, "the attention output")?;
        launch::check_args(&[
            input("the attention output", x, &[b, h, s, d], DType::F32),
            output("the merged heads", y, &[b * s, h * d], DType::F32),
        ])?;
        let p = LlmParams {
            n: (b * s) as u32,
            k: d as u32,
            m: h as u32,
            seq: s as u32,
            ..LlmParams::zero()
        };
        let groups = (b * s * h * d).div_ceil(NT as usize);
        let views = [(1, "the attention output", x), (4, "the merged heads", y)];
        Self::launch_whole(gpu, enc, &self.merge, groups, p, &views)
    }

    /// `y = silu(gate) ⊙ up`, all of one shape.
    pub fn swiglu(
        &self,
        gpu: &Gpu,
        enc: &mut Encoder,
        gate: &Tensor,
        up: &Tensor,
        y: &Tensor,
    ) -> Result<()> {
        let dims = gate.shape().to_vec();
        launch::check_args(&[
            input("the gate", gate, &dims, DType::F32),
            input("the up projection", up, &dims, DType::F32),
            output("the SwiGLU output", y, &dims, DType::F32),
        ])?;
        let n = gate.len();
        let p = LlmParams {
            n: n as u32,
            ..LlmParams::zero()
        };
        let views = [
            (1, "the gate", gate),
            (3, "the up projection", up),
            (4, "the SwiGLU output", y),
        ];
        Self::launch_whole(gpu, enc, &self.swiglu, n.div_ceil(NT as usize), p, &views)
    }
}

/// Rows of `row_bytes` that fit one binding (with room for the window's alignment).
fn rows_per_binding(gpu: &Gpu, row_bytes: u64, what: &str) -> Result<usize> {
    let align = gpu.limits().min_storage_buffer_offset_alignment.max(256) as u64;
    let rows = gpu.max_binding().saturating_sub(align) / row_bytes.max(1);
    if rows == 0 {
        return Err(Error::Unsupported(format!(
            "{what} takes {row_bytes} bytes, more than this device binds at once ({} bytes)",
            gpu.max_binding()
        )));
    }
    // Element offsets are u32 in the kernels.
    Ok(rows.min((u32::MAX as u64 / row_bytes.max(1)).max(1)) as usize)
}

fn dims2(t: &Tensor, what: &str) -> Result<[usize; 2]> {
    match *t.shape() {
        [a, b] => Ok([a, b]),
        ref s => Err(Error::InvalidInput(format!(
            "{what} must have 2 dims, got shape {s:?}"
        ))),
    }
}

fn dims4(t: &Tensor, what: &str) -> Result<[usize; 4]> {
    match *t.shape() {
        [a, b, c, d] => Ok([a, b, c, d]),
        ref s => Err(Error::InvalidInput(format!(
            "{what} must have 4 dims, got shape {s:?}"
        ))),
    }
}
