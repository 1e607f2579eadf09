//! The smallest real use of the library: causal attention forward and backward on the GPU,
//! checked against the CPU reference.
//!
//!     cargo run --release --example quickstart

use sparse_attn::FullConfig;
use sparse_attn::reference::{self, Rng, compare};
use sparse_attn::{AttnOptions, AttnShape, FullAttention, Gpu, GpuOptions};

fn main() -> sparse_attn::Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!("running on {}", gpu.adapter());

    // 4 query heads sharing 2 key/value heads (GQA), 300 tokens, head_dim 64.
    let shape = AttnShape::new(1, 4, 2, 300, 64);
    let opts = AttnOptions::causal(true);
    let mut rng = Rng::new(7);
    let q = rng.normal_vec(shape.q_len(), 1.0);
    let k = rng.normal_vec(shape.kv_len(), 1.0);
    let v = rng.normal_vec(shape.kv_len(), 1.0);

    let attn = FullAttention::new(&gpu, shape, &FullConfig::new(opts))?; // validates, compiles pipelines once
    let (gq, gk, gv) = (
        gpu.upload(&shape.q_dims(), &q)?,
        gpu.upload(&shape.kv_dims(), &k)?,
        gpu.upload(&shape.kv_dims(), &v)?,
    );
    let out = attn.forward(&gpu, &gq, &gk, &gv)?; // O and log-sum-exp
    let d_o = gpu.upload(&shape.q_dims(), &rng.normal_vec(shape.q_len(), 1.0))?;
    let grads = attn.backward(&gpu, &gq, &gk, &gv, &out, &d_o)?;

    let want = reference::attention::forward(&shape, &opts, &q, &k, &v)?;
    let err = compare(&gpu.read(&out.o)?, &want.o);
    println!("O: relative L2 error vs f64 reference = {:.2e}", err.rel_l2);
    println!("dK[0..4] = {:?}", &gpu.read(&grads.dk)?[..4]);
    Ok(())
}
