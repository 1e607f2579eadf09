//! Attention metrics on the GPU against the f64 reference.

use crate::common;

use sparse_attn::AttnShape;
use sparse_attn::SelectConfig;
use sparse_attn::ops::metrics::AttentionMetrics;
use sparse_attn::ops::select::BlockSelect;
use sparse_attn::problem::{Scoring, SelectOptions};
use sparse_attn::reference::metrics::{kl_sparse_full, metrics};
use sparse_attn::reference::{Rng, compare};

const TOL: f64 = 2e-5;

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

#[test]
fn metrics_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    for (i, (s, block, k)) in [
        (AttnShape::new(1, 8, 2, 150, 64), 16, 4),
        (AttnShape::new(2, 2, 2, 70, 32), 32, 2),
        (
            AttnShape {
                batch: 1,
                heads_q: 4,
                heads_kv: 1,
                seq_q: 20,
                seq_k: 300,
                head_dim: 128,
            },
            64,
            3,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = seed.wrapping_add(i as u64);
        let ctx = format!("seed {seed}, {s:?}, block {block}, k {k}");
        let mut rng = Rng::new(seed);
        let q = rng.normal_vec(s.q_len(), 1.0);
        let kk = rng.normal_vec(s.kv_len(), 1.0);
        let (tq, tk) = (
            gpu.upload(&s.q_dims(), &q).unwrap(),
            gpu.upload(&s.kv_dims(), &kk).unwrap(),
        );
        let so = SelectOptions {
            block,
            k,
            n_init: 0,
            n_local: 0,
            scoring: Scoring::Ssa,
            causal: true,
            scale: None,
            evict: 0,
        };
        let (sel, _) = BlockSelect::new(&gpu, s, &SelectConfig::new(so))
            .unwrap()
            .select(&gpu, &tq, &tk)
            .unwrap();
        let sel_host = gpu.read_u32(&sel).unwrap();
        let opts = so.sparse();
        let m = AttentionMetrics::new(&gpu, s, opts, k).unwrap();
        let got = m.compute(&gpu, &tq, &tk, &sel).unwrap();
        let want = metrics(&s, &opts, &q, &kk, &sel_host, k).unwrap();
        for (name, t, w) in [
            ("block mass", &got.block_mass, &want.block_mass),
            ("sparsity", &got.sparsity, &want.sparsity),
            ("entropy", &got.entropy, &want.entropy),
        ] {
            let e = compare(&gpu.read(t).unwrap(), &f32s(w));
            assert!(e.within(TOL), "{name} {e:?} ({ctx})");
        }
        // Every row's block masses sum to 1; sparsity is a share.
        let nb = m.blocks();
        let mass = gpu.read(&got.block_mass).unwrap();
        for row in mass.chunks(nb) {
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-4, "mass sums to {total} ({ctx})");
        }
        let sp = gpu.read(&got.sparsity).unwrap();
        assert!(sp.iter().all(|&x| (0.0..=1.0 + 1e-5).contains(&x)), "{ctx}");
        // KL(sparse || full) = -ln S >= 0.
        assert!(kl_sparse_full(&want.sparsity).iter().all(|&x| x >= -1e-12));
    }
}

/// With every block kept, the selection holds all the mass.
#[test]
fn full_budget_keeps_all_mass() {
    let Some(gpu) = common::gpu() else { return };
    let s = AttnShape::new(1, 4, 1, 96, 32);
    let mut rng = Rng::new(3);
    let q = gpu
        .upload(&s.q_dims(), &rng.normal_vec(s.q_len(), 1.0))
        .unwrap();
    let k = gpu
        .upload(&s.kv_dims(), &rng.normal_vec(s.kv_len(), 1.0))
        .unwrap();
    let all: Vec<u32> = (0..s.seq_q).flat_map(|_| 0..6u32).collect();
    let sel = gpu.upload_u32(&[1, 1, s.seq_q, 6], &all).unwrap();
    let m = AttentionMetrics::new(&gpu, s, SelectOptions::ssa().sparse(), 6).unwrap();
    let sp = gpu
        .read(&m.compute(&gpu, &q, &k, &sel).unwrap().sparsity)
        .unwrap();
    assert!(sp.iter().all(|&x| (x - 1.0).abs() < 1e-5), "{sp:?}");
}
