//! Block selection on the GPU against the f64 reference (PAPERS.md §1).

mod common;

use sparse_attn::SelectConfig;
use sparse_attn::gpu::DType;
use sparse_attn::gpu::Gpu;
use sparse_attn::ops::select::{BlockSelect, SelectScratch, TopK};
use sparse_attn::problem::{SENTINEL, Scoring, SelectOptions};
use sparse_attn::reference::select::{self as refsel, current_and_end, forced};
use sparse_attn::reference::{Rng, compare};
use sparse_attn::{AttnShape, Error};

/// Scores and block keys: relative L2 against the reference. A selected block may differ from
/// the reference's only when the two scores are closer than this (relative to the row's spread).
const TOL: f64 = 2e-5;
const POISON: u32 = 0xDEAD_BEEF;

fn shape(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize) -> AttnShape {
    AttnShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        seq_q: sq,
        seq_k: sk,
        head_dim: d,
    }
}

fn opts(block: usize, k: usize, n_init: usize, n_local: usize, scoring: Scoring) -> SelectOptions {
    SelectOptions {
        block,
        k,
        n_init,
        n_local,
        scoring,
        causal: true,
        scale: None,
    }
}

/// The properties every selection row must have, checked against reference scores.
fn check_rows(s: &AttnShape, o: &SelectOptions, sel: &[u32], ref_scores: &[f64], ctx: &str) {
    let nb = o.blocks(s.seq_k);
    for bkv in 0..s.batch * s.heads_kv {
        for t in 0..s.seq_q {
            let row = bkv * s.seq_q + t;
            let got = &sel[row * o.k..(row + 1) * o.k];
            let (cur, end) = current_and_end(o, nb, s.q_offset() + t);
            let n = o.k.min(end);
            let where_ = format!("row {row} (token {t}, cur {cur}): {got:?} ({ctx})");
            assert!(
                got[..n].windows(2).all(|w| w[0] < w[1]),
                "not ascending: {where_}"
            );
            assert!(
                got[..n].iter().all(|&j| (j as usize) < end),
                "not a candidate: {where_}"
            );
            assert!(
                got[n..].iter().all(|&j| j == SENTINEL),
                "bad padding: {where_}"
            );
            for j in 0..end {
                if forced(o, cur, j) {
                    assert!(
                        got.contains(&(j as u32)),
                        "forced block {j} missing: {where_}"
                    );
                }
            }
            // No selected (non-forced) score below an unselected candidate's.
            let sc = &ref_scores[row * nb..row * nb + end];
            let spread = sc
                .iter()
                .cloned()
                .fold(0.0f64, |a, b| a.max(b.abs()))
                .max(1e-30);
            let min_sel = got[..n]
                .iter()
                .filter(|&&j| !forced(o, cur, j as usize))
                .map(|&j| sc[j as usize])
                .fold(f64::INFINITY, f64::min);
            let max_unsel = (0..end)
                .filter(|&j| !got.contains(&(j as u32)))
                .map(|j| sc[j])
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                min_sel >= max_unsel - TOL * spread,
                "selected score {min_sel} below unselected {max_unsel}: {where_}"
            );
        }
    }
}

/// Both top-k kernels (the subgroup one skipped with the reason where the device lacks it).
fn run(gpu: &Gpu, s: AttnShape, o: SelectOptions, seed: u64) {
    for topk in [TopK::Sort, TopK::Subgroup] {
        match TopK::subgroup_supported(gpu) {
            Err(e) if topk == TopK::Subgroup => eprintln!("SKIPPED subgroup top-k: {e}"),
            _ => run_with(gpu, s, o, seed, topk),
        }
    }
}

fn run_with(gpu: &Gpu, s: AttnShape, o: SelectOptions, seed: u64, topk: TopK) {
    let ctx = format!("seed {seed}, {s:?}, {o:?}, top-k {}", topk.name());
    let mut rng = Rng::new(seed);
    let q = rng.normal_vec(s.q_len(), 1.0);
    let k = rng.normal_vec(s.kv_len(), 1.0);
    let want = refsel::select(&s, &o, &q, &k).expect(&ctx);
    check_rows(
        &s,
        &o,
        &want.indices,
        &want.scores,
        &format!("reference, {ctx}"),
    );

    let op =
        BlockSelect::new(gpu, s, &SelectConfig::new(o).dtype(DType::F32).topk(topk)).expect(&ctx);
    assert_eq!(op.topk_kernel(), topk);
    let np = op.pooled();
    let (tq, tk) = (
        gpu.upload(&s.q_dims(), &q).unwrap(),
        gpu.upload(&s.kv_dims(), &k).unwrap(),
    );
    let scratch = SelectScratch {
        block_keys: gpu
            .upload(
                &[s.batch, s.heads_kv, np, s.head_dim],
                &vec![f32::NAN; s.batch * s.heads_kv * np * s.head_dim],
            )
            .unwrap(),
        scores: gpu
            .upload(
                &[s.batch, s.heads_kv, s.seq_q, np],
                &vec![f32::NAN; s.batch * s.heads_kv * s.seq_q * np],
            )
            .unwrap(),
    };
    let n_sel = op.selection_dims().iter().product();
    let out = gpu
        .upload_u32(&op.selection_dims(), &vec![POISON; n_sel])
        .unwrap();
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    op.encode(gpu, &mut enc, &tq, &tk, &scratch, &out)
        .expect(&ctx);
    gpu.queue().submit([enc.finish()]);

    let kb = compare(
        &gpu.read(&scratch.block_keys).unwrap(),
        &refsel::block_keys(&s, &o, &k),
    );
    assert!(kb.within(TOL), "block keys {kb:?} ({ctx})");
    // Candidate (pooled) scores against the reference; the others hold the NEG marker.
    let got_scores = gpu.read(&scratch.scores).unwrap();
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (i, (&x, &y)) in got_scores.iter().zip(&want.pooled).enumerate() {
        if y.is_nan() {
            assert_eq!(x, -3.0e38, "non-candidate score at {i} ({ctx})");
        } else {
            g.push(x);
            w.push(y as f32);
        }
    }
    let e = compare(&g, &w);
    assert!(e.within(TOL), "scores {e:?} ({ctx})");
    let sel = gpu.read_u32(&out).unwrap();
    assert!(
        !sel.contains(&POISON),
        "unwritten selection entries ({ctx})"
    );
    check_rows(&s, &o, &sel, &want.scores, &format!("GPU, {ctx}"));
    let same = sel == want.indices;
    eprintln!("{ctx}: identical to the reference: {same}");
}

#[test]
fn selection_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let cases = [
        // SSA defaults, GQA 16:1, seq not a multiple of B
        (
            shape(1, 16, 1, 100, 100, 64),
            opts(16, 4, 0, 0, Scoring::Ssa),
        ),
        // seq < B: one block
        (shape(1, 2, 2, 10, 10, 32), opts(16, 1, 0, 0, Scoring::Ssa)),
        // B 64, forced init + local, GQA 4:1, 2 batches
        (
            shape(2, 8, 2, 300, 300, 32),
            opts(64, 4, 1, 1, Scoring::Ssa),
        ),
        // MoBA scoring, 1:1
        (
            shape(1, 2, 2, 130, 130, 64),
            opts(32, 3, 0, 1, Scoring::Moba),
        ),
        // queries at the end of a longer key range (decoding-like), B 128
        (
            shape(1, 4, 1, 7, 700, 128),
            opts(128, 5, 1, 2, Scoring::Ssa),
        ),
        // k = every block: all candidates kept
        (shape(1, 2, 1, 90, 90, 16), opts(16, 6, 0, 0, Scoring::Ssa)),
        // InfLLM-V2 kernels (32 tokens at stride 16) with blocks of 64 and of 16
        (
            shape(1, 8, 2, 333, 333, 32),
            opts(64, 3, 1, 1, Scoring::InfLlmV2),
        ),
        (
            shape(1, 4, 1, 120, 120, 64),
            opts(16, 4, 0, 0, Scoring::InfLlmV2),
        ),
        // More pooled keys than one score tile (69 blocks), a group of 3 (padding rows in the
        // score kernel's token tiles)
        (
            shape(1, 6, 2, 1100, 1100, 32),
            opts(16, 8, 1, 2, Scoring::Ssa),
        ),
        (
            shape(1, 3, 1, 1100, 1100, 16),
            opts(16, 5, 0, 0, Scoring::InfLlmV2),
        ),
        // 188 blocks: more candidates than threads for the top-k kernels (several per thread),
        // k = 70 past the subgroup kernel's automatic range
        (
            shape(1, 2, 1, 3000, 3000, 16),
            opts(16, 70, 1, 2, Scoring::Ssa),
        ),
        (
            shape(1, 2, 1, 3000, 3000, 16),
            opts(16, 9, 0, 0, Scoring::Moba),
        ),
        // A group of 32 query heads: more than 16 rows per thread column of the score tile
        (
            shape(1, 32, 1, 150, 150, 16),
            opts(16, 4, 0, 0, Scoring::Moba),
        ),
    ];
    for (i, (s, o)) in cases.into_iter().enumerate() {
        run(&gpu, s, o, seed.wrapping_add(i as u64));
    }
    // Non-causal: every block is a candidate.
    let mut o = opts(16, 3, 1, 0, Scoring::Ssa);
    o.causal = false;
    run(&gpu, shape(1, 4, 2, 50, 70, 32), o, seed ^ 0x55);
    o.scoring = Scoring::InfLlmV2;
    run(&gpu, shape(1, 4, 2, 50, 70, 32), o, seed ^ 0x56);
}

#[test]
fn bad_selection_options_name_the_problem() {
    let Some(gpu) = common::gpu() else { return };
    let s = shape(1, 4, 2, 100, 100, 64);
    let err = |o: SelectOptions| {
        BlockSelect::new(&gpu, s, &SelectConfig::new(o))
            .unwrap_err()
            .to_string()
    };
    assert!(err(opts(24, 2, 0, 0, Scoring::Ssa)).contains("block size 24 is not supported"));
    assert!(err(opts(16, 0, 0, 0, Scoring::Ssa)).contains("k = 0"));
    assert!(err(opts(16, 8, 0, 0, Scoring::Ssa)).contains("larger than the 7 blocks"));
    assert!(err(opts(16, 3, 1, 2, Scoring::Ssa)).contains("exceed k = 3"));
    let bad = shape(1, 3, 2, 100, 100, 64);
    assert!(
        BlockSelect::new(
            &gpu,
            bad,
            &SelectConfig::new(opts(16, 2, 0, 0, Scoring::Ssa))
        )
        .unwrap_err()
        .to_string()
        .contains("not a multiple")
    );
    // A selection tensor from another shape, or of the wrong dtype.
    let op =
        BlockSelect::new(&gpu, s, &SelectConfig::new(opts(16, 2, 0, 0, Scoring::Ssa))).unwrap();
    let q = gpu.upload(&s.q_dims(), &vec![0.0; s.q_len()]).unwrap();
    let k = gpu.upload(&s.kv_dims(), &vec![0.0; s.kv_len()]).unwrap();
    let scratch = op.scratch(&gpu).unwrap();
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    let wrong = gpu.upload_u32(&[1, 2, 100, 3], &vec![0; 600]).unwrap();
    let e = op
        .encode(&gpu, &mut enc, &q, &k, &scratch, &wrong)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)) && e.to_string().contains("selection"));
    let as_f32 = gpu.upload(&[1, 2, 100, 2], &vec![0.0; 400]).unwrap();
    let e = op
        .encode(&gpu, &mut enc, &q, &k, &scratch, &as_f32)
        .unwrap_err();
    assert!(e.to_string().contains("U32"), "{e}");
}

/// Equal scores (every block key the same) go to the lower block index, on the GPU as in the
/// reference.
#[test]
fn ties_go_to_the_lower_index() {
    let Some(gpu) = common::gpu() else { return };
    let s = shape(1, 4, 1, 200, 200, 32);
    let o = opts(16, 5, 0, 1, Scoring::Ssa);
    let mut rng = Rng::new(9);
    let q = rng.normal_vec(s.q_len(), 1.0);
    let row: Vec<f32> = rng.normal_vec(s.head_dim, 1.0);
    let k: Vec<f32> = row.iter().cycle().take(s.kv_len()).copied().collect();
    let want = refsel::select(&s, &o, &q, &k).unwrap();
    for topk in [TopK::Sort, TopK::Subgroup] {
        let op = match BlockSelect::new(&gpu, s, &SelectConfig::new(o).dtype(DType::F32).topk(topk))
        {
            Ok(op) => op,
            Err(e) if topk == TopK::Subgroup => {
                eprintln!("SKIPPED subgroup top-k: {e}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let (sel, _) = op
            .select(
                &gpu,
                &gpu.upload(&s.q_dims(), &q).unwrap(),
                &gpu.upload(&s.kv_dims(), &k).unwrap(),
            )
            .unwrap();
        let got = gpu.read_u32(&sel).unwrap();
        assert_eq!(got, want.indices, "top-k {}", topk.name());
        // Token 150 sits in block 9: forced 9 and 8 (local), then the lowest: 0, 1, 2.
        assert_eq!(&got[150 * 5..151 * 5], &[0, 1, 2, 8, 9]);
    }
}

/// The automatic top-k kernel: subgroup rounds where k <= blocks / 32 and the device has
/// subgroups, the sort otherwise.
#[test]
fn automatic_topk_kernel() {
    let Some(gpu) = common::gpu() else { return };
    let s = shape(1, 4, 1, 2000, 2000, 16); // 125 blocks
    let pick = |k| {
        BlockSelect::new(&gpu, s, &SelectConfig::new(opts(16, k, 0, 0, Scoring::Ssa)))
            .unwrap()
            .topk_kernel()
    };
    let sg = TopK::subgroup_supported(&gpu).is_ok();
    assert_eq!(pick(3), if sg { TopK::Subgroup } else { TopK::Sort });
    assert_eq!(pick(4), TopK::Sort);
    assert!(
        TopK::parse("heap")
            .unwrap_err()
            .to_string()
            .contains("unknown top-k")
    );
}

/// Under WebGPU's default limits (what a browser grants) the score kernel takes smaller tiles.
#[test]
fn selection_under_webgpu_default_limits() {
    let Some(gpu) = common::gpu_with(&sparse_attn::GpuOptions {
        webgpu_default_limits: true,
        ..Default::default()
    }) else {
        return;
    };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    run(
        &gpu,
        shape(1, 16, 1, 300, 300, 128),
        opts(16, 4, 1, 1, Scoring::Ssa),
        seed,
    );
    run(
        &gpu,
        shape(1, 8, 2, 200, 200, 64),
        opts(16, 3, 0, 0, Scoring::InfLlmV2),
        seed ^ 1,
    );
}

/// Tensors past the device's binding limit are split by (batch, kv-head) and give the same result.
#[test]
fn selection_splits_past_the_binding_limit() {
    let Some(gpu) = common::gpu_with(&sparse_attn::GpuOptions {
        max_storage_binding: Some(64 * 1024),
        ..Default::default()
    }) else {
        return;
    };
    let s = shape(2, 4, 2, 200, 200, 16); // q: 102 KB in all, 25.6 KB per (batch, kv head)
    let o = opts(16, 4, 1, 0, Scoring::Ssa);
    assert!(
        BlockSelect::new(&gpu, s, &SelectConfig::new(o))
            .unwrap()
            .chunks()
            > 1
    );
    run(&gpu, s, o, Rng::fresh_seed());
}

/// Causal selection sees no key after the token (NOSA.md §2): replacing every key after token
/// t by fresh random values leaves token t's selection unchanged, in the reference and on the
/// GPU (bit for bit: the masked windows never enter the sums), for every scoring.
#[test]
fn causal_selection_ignores_future_keys() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let cases = [
        (
            shape(1, 4, 2, 150, 150, 32),
            opts(16, 4, 1, 1, Scoring::Ssa),
        ),
        (
            shape(1, 4, 1, 150, 150, 32),
            opts(16, 3, 0, 0, Scoring::Moba),
        ),
        (
            shape(1, 8, 2, 333, 333, 32),
            opts(64, 3, 1, 0, Scoring::InfLlmV2),
        ),
        (
            shape(1, 4, 1, 150, 150, 16),
            opts(16, 4, 0, 1, Scoring::InfLlmV2),
        ),
        // decoding-like: 20 queries at the end of 300 keys
        (
            shape(1, 4, 1, 20, 300, 32),
            opts(32, 4, 1, 1, Scoring::InfLlmV2),
        ),
    ];
    for (i, (s, o)) in cases.into_iter().enumerate() {
        let mut rng = Rng::new(seed.wrapping_add(i as u64));
        let q = rng.normal_vec(s.q_len(), 1.0);
        let k = rng.normal_vec(s.kv_len(), 1.0);
        let op = BlockSelect::new(&gpu, s, &SelectConfig::new(o)).unwrap();
        let gpu_sel = |k: &[f32]| {
            let (sel, _) = op
                .select(
                    &gpu,
                    &gpu.upload(&s.q_dims(), &q).unwrap(),
                    &gpu.upload(&s.kv_dims(), k).unwrap(),
                )
                .unwrap();
            gpu.read_u32(&sel).unwrap()
        };
        let (want, got) = (refsel::select(&s, &o, &q, &k).unwrap().indices, gpu_sel(&k));
        for t in [0, 1, 15, 16, 17, 31, 32, 47, 63, 64, 100, s.seq_q - 1] {
            if t >= s.seq_q {
                continue;
            }
            let pos = s.q_offset() + t;
            let mut k2 = k.clone();
            for u in 0..s.batch * s.heads_kv {
                for key in pos + 1..s.seq_k {
                    for c in 0..s.head_dim {
                        k2[(u * s.seq_k + key) * s.head_dim + c] = rng.normal() as f32 * 3.0;
                    }
                }
            }
            let want2 = refsel::select(&s, &o, &q, &k2).unwrap().indices;
            let got2 = gpu_sel(&k2);
            for u in 0..s.batch * s.heads_kv {
                let r = (u * s.seq_q + t) * o.k..(u * s.seq_q + t + 1) * o.k;
                let ctx = format!("token {t}, unit {u}, case {i}, seed {seed}, {o:?}");
                assert_eq!(want[r.clone()], want2[r.clone()], "reference, {ctx}");
                assert_eq!(got[r.clone()], got2[r.clone()], "GPU, {ctx}");
            }
        }
    }
}
