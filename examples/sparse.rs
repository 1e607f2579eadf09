//! Block-sparse attention as SSA trains it: select k blocks per token and kv group, attend only
//! to them, and compare with full attention on the same input.
//!
//!     cargo run --release --example sparse

use sparse_attn::SparseInputs;
use sparse_attn::ops::select::BlockSelect;
use sparse_attn::ops::sparse::SparseAttention;
use sparse_attn::problem::SelectOptions;
use sparse_attn::reference::{Rng, compare};
use sparse_attn::{AttnOptions, AttnShape, FullAttention, Gpu, GpuOptions};
use sparse_attn::{FullConfig, SelectConfig, SparseConfig};

fn main() -> sparse_attn::Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!("running on {}", gpu.adapter());

    // 8 query heads sharing one kv head, 512 tokens: 32 blocks of 16, keep 8 per token.
    let shape = AttnShape::new(1, 8, 1, 512, 64);
    let mut rng = Rng::new(1);
    let q = gpu.upload(&shape.q_dims(), &rng.normal_vec(shape.q_len(), 1.0))?;
    let k = gpu.upload(&shape.kv_dims(), &rng.normal_vec(shape.kv_len(), 1.0))?;
    let v = gpu.upload(&shape.kv_dims(), &rng.normal_vec(shape.kv_len(), 1.0))?;

    let select = SelectOptions {
        k: 8,
        ..SelectOptions::ssa()
    };
    let (selection, _scratch) =
        BlockSelect::new(&gpu, shape, &SelectConfig::new(select))?.select(&gpu, &q, &k)?;
    let blocks = gpu.read_u32(&selection)?;
    println!("token 511 keeps blocks {:?}", &blocks[511 * 8..512 * 8]);

    let sparse = SparseAttention::new(&gpu, shape, &SparseConfig::for_selection(&select))?;
    let out = sparse.forward(&gpu, &SparseInputs::new(&q, &k, &v, &selection))?;
    let full = FullAttention::new(&gpu, shape, &FullConfig::new(AttnOptions::causal(true)))?
        .forward(&gpu, &q, &k, &v)?;
    let diff = compare(&gpu.read(&out.o)?, &gpu.read(&full.o)?);
    println!(
        "sparse vs full output: relative L2 difference {:.3} (random inputs spread attention \
         evenly, so dropping 3/4 of the blocks changes a lot; trained models concentrate it)",
        diff.rel_l2
    );

    let d_o = gpu.upload(&shape.q_dims(), &rng.normal_vec(shape.q_len(), 1.0))?;
    let grads = sparse.backward(&gpu, &SparseInputs::new(&q, &k, &v, &selection), &out, &d_o)?;
    println!("dK[0..4] = {:?}", &gpu.read(&grads.dk)?[..4]);
    Ok(())
}
