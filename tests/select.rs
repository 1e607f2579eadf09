//! Block selection on the GPU against the f64 reference (PAPERS.md §1).

use crate::common;

use sparse_attn::SelectConfig;
use sparse_attn::gpu::{DType, Gpu, round_f16};
use sparse_attn::ops::select::{BlockSelect, ScoreKernel, SelectInputs, SelectScratch, TopK};
use sparse_attn::problem::{SENTINEL, Scoring, SelectOptions};
use sparse_attn::reference::select::{self as refsel, current_and_end, forced};
use sparse_attn::reference::{Rng, compare};
use sparse_attn::{AttnShape, Error};

/// Scores and block keys: relative L2 against the reference. A selected block may differ from
/// the reference's only when the two scores are closer than this (relative to the row's spread).
const TOL: f64 = 2e-5;
/// The same with f16 q and k on tensor cores, whose products round the pooled keys to f16.
const TOL_F16: f64 = 2e-3;
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
        evict: 0,
    }
}

/// The properties every selection row must have, checked against reference scores.
fn check_rows(
    s: &AttnShape,
    o: &SelectOptions,
    sel: &[u32],
    ref_scores: &[f64],
    tol: f64,
    ctx: &str,
) {
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
                min_sel >= max_unsel - tol * spread,
                "selected score {min_sel} below unselected {max_unsel}: {where_}"
            );
        }
    }
}

/// Both top-k kernels (the subgroup one skipped with the reason where the device lacks it),
/// each with every row's pooled keys scored by one workgroup and split as finely as the key
/// tile allows (each split's log-sum-exp merged by the score pass).
/// Returns the most splits a row's scores had.
fn run(gpu: &Gpu, s: AttnShape, o: SelectOptions, seed: u64) -> usize {
    let mut most = 0;
    for topk in [TopK::Sort, TopK::Subgroup] {
        match TopK::subgroup_supported(gpu) {
            Err(e) if topk == TopK::Subgroup => eprintln!("SKIPPED subgroup top-k: {e}"),
            _ => {
                let k = Kernels::f32(topk);
                run_with(gpu, s, o, seed, k.split(Some(usize::MAX)));
                most = most.max(run_with(gpu, s, o, seed, k.split(Some(1))));
            }
        }
    }
    most
}

/// How a GPU selection runs: top-k and block-score kernels, the score split, the dtype of q and
/// k (f16: the reference gets the same rounded values).
#[derive(Clone, Copy, Debug)]
struct Kernels {
    topk: TopK,
    split: Option<usize>,
    scores: ScoreKernel,
    dtype: DType,
}

impl Kernels {
    fn f32(topk: TopK) -> Self {
        Self {
            topk,
            split: None,
            scores: ScoreKernel::Tiled,
            dtype: DType::F32,
        }
    }

    fn split(self, split: Option<usize>) -> Self {
        Self { split, ..self }
    }
}

/// Checks one selection against the reference; returns the splits a row's scores had.
fn run_with(gpu: &Gpu, s: AttnShape, o: SelectOptions, seed: u64, kn: Kernels) -> usize {
    let Kernels {
        topk,
        split,
        scores: score_kernel,
        dtype,
    } = kn;
    let ctx = format!("seed {seed}, {s:?}, {o:?}, {kn:?}");
    let tol = if dtype == DType::F16 { TOL_F16 } else { TOL };
    let held = |x: Vec<f32>| {
        if dtype == DType::F16 {
            round_f16(&x)
        } else {
            x
        }
    };
    let mut rng = Rng::new(seed);
    let q = held(rng.normal_vec(s.q_len(), 1.0));
    let k = held(rng.normal_vec(s.kv_len(), 1.0));
    let want = refsel::select(&s, &o, &q, &k).expect(&ctx);
    check_rows(
        &s,
        &o,
        &want.indices,
        &want.scores,
        TOL,
        &format!("reference, {ctx}"),
    );

    let cfg = SelectConfig::new(o)
        .dtype(dtype)
        .topk(topk)
        .scores(score_kernel)
        .score_split(split);
    let op = BlockSelect::new(gpu, s, &cfg).expect(&ctx);
    assert_eq!(op.topk_kernel(), topk);
    if score_kernel != ScoreKernel::Auto {
        assert_eq!(op.score_kernel(), score_kernel, "{ctx}");
    }
    let np = op.pooled();
    let (n_split, _) = op.score_split();
    if split == Some(usize::MAX) {
        assert_eq!(n_split, 1, "{ctx}");
    }
    let rows = s.batch * s.heads_kv * s.seq_q * s.group();
    let (tq, tk) = (
        gpu.upload_as(&s.q_dims(), &q, dtype).unwrap(),
        gpu.upload_as(&s.kv_dims(), &k, dtype).unwrap(),
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
        evict_pooled: None,
        // Every split statistic is written before it is merged: NaN would reach the scores.
        partials: op
            .split_dims()
            .map(|d| gpu.upload(&d, &vec![f32::NAN; rows * n_split * 2]).unwrap()),
        logits: None,
    };
    let n_sel = op.selection_dims().iter().product();
    let out = gpu
        .upload_u32(&op.selection_dims(), &vec![POISON; n_sel])
        .unwrap();
    let mut enc = gpu.encoder();
    op.encode(gpu, &mut enc, &SelectInputs::new(&tq, &tk), &scratch, &out)
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
    assert!(e.within(tol), "scores {e:?} ({ctx})");
    let sel = gpu.read_u32(&out).unwrap();
    assert!(
        !sel.contains(&POISON),
        "unwritten selection entries ({ctx})"
    );
    check_rows(&s, &o, &sel, &want.scores, tol, &format!("GPU, {ctx}"));
    let same = sel == want.indices;
    eprintln!("{ctx}: identical to the reference: {same}");
    n_split
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
        // Head dim 48 (the training model's: the narrow score tile), GQA 4, blocks of 16
        (
            shape(2, 8, 2, 300, 300, 48),
            opts(16, 6, 1, 1, Scoring::Ssa),
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
        // k = 32 of 188: the subgroup top-k's slots win several times each (their runners-up
        // and their scans after a take: block_topk_sg.wgsl's `Lead`)
        (
            shape(1, 2, 1, 3000, 3000, 16),
            opts(16, 32, 0, 0, Scoring::Ssa),
        ),
        // A group of 32 query heads: more than 16 rows per thread column of the score tile
        (
            shape(1, 32, 1, 150, 150, 16),
            opts(16, 4, 0, 0, Scoring::Moba),
        ),
    ];
    let mut splits = vec![];
    for (i, (s, o)) in cases.into_iter().enumerate() {
        splits.push(run(&gpu, s, o, seed.wrapping_add(i as u64)));
    }
    // The long cases (more pooled keys than a key tile) ran split, SSA, InfLLM-V2 and MoBA.
    assert!(splits[8..12].iter().all(|&n| n > 1), "{splits:?}");
    // Non-causal: every block is a candidate.
    let mut o = opts(16, 3, 1, 0, Scoring::Ssa);
    o.causal = false;
    run(&gpu, shape(1, 4, 2, 50, 70, 32), o, seed ^ 0x55);
    o.scoring = Scoring::InfLlmV2;
    run(&gpu, shape(1, 4, 2, 50, 70, 32), o, seed ^ 0x56);
}

/// The block scores on tensor cores (f16 q and k) against the reference on the same rounded
/// inputs: groups from 1 to 32 query heads (summed by shuffles over 0 to 4 rounds up to 16: 1,
/// 2, 4, 8, 16; a token per subgroup at 16, across two subgroups at 32), head dims 16 to 128,
/// more pooled keys than a key tile, lengths that are not multiples of the block or of the
/// tile's tokens, every scoring, causal or not, one token.
/// Skipped with the reason where the device has no cooperative matrices (a failure under
/// scripts/gpu-check.sh on one that has them).
#[test]
fn coop_block_scores_match_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut non_causal = opts(16, 3, 1, 0, Scoring::Ssa);
    non_causal.causal = false;
    let cases = [
        (
            shape(1, 16, 1, 100, 100, 64),
            opts(16, 4, 0, 0, Scoring::Ssa),
        ),
        (
            shape(2, 8, 2, 300, 300, 128),
            opts(16, 6, 1, 1, Scoring::Ssa),
        ),
        (
            shape(1, 16, 1, 1100, 1100, 48),
            opts(16, 8, 1, 2, Scoring::Ssa),
        ),
        (
            shape(1, 4, 1, 7, 700, 128),
            opts(128, 5, 1, 2, Scoring::Ssa),
        ),
        (
            shape(1, 2, 2, 130, 130, 64),
            opts(32, 3, 0, 1, Scoring::Moba),
        ),
        (
            shape(1, 8, 2, 333, 333, 32),
            opts(64, 3, 1, 1, Scoring::InfLlmV2),
        ),
        (
            shape(1, 32, 1, 150, 150, 16),
            opts(16, 4, 0, 0, Scoring::Ssa),
        ),
        (shape(1, 8, 1, 77, 77, 64), opts(16, 3, 1, 0, Scoring::Ssa)),
        (shape(1, 16, 1, 1, 1, 64), opts(16, 1, 0, 0, Scoring::Ssa)),
        (shape(1, 4, 2, 50, 70, 32), non_causal),
    ];
    let kn = Kernels {
        topk: TopK::Sort,
        split: None,
        scores: ScoreKernel::Coop,
        dtype: DType::F16,
    };
    for (i, (s, o)) in cases.into_iter().enumerate() {
        let cfg = SelectConfig::new(o)
            .dtype(DType::F16)
            .scores(ScoreKernel::Coop);
        if let Err(e) = BlockSelect::new(&gpu, s, &cfg) {
            common::skip_coop(&gpu, "tensor-core block scores", false, &e);
            return;
        }
        run_with(&gpu, s, o, seed.wrapping_add(i as u64), kn);
    }
    // A group of 3 never fills whole tokens into 16-row matrices: declined by name; the
    // automatic choice then takes the tiled kernel, and f32 inputs always do.
    let s3 = shape(1, 6, 2, 300, 300, 64);
    let o = opts(16, 4, 0, 0, Scoring::Ssa);
    let err = BlockSelect::new(
        &gpu,
        s3,
        &SelectConfig::new(o)
            .dtype(DType::F16)
            .scores(ScoreKernel::Coop),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 query heads per kv head"), "{err}");
    // Decoding keeps the tiled kernel (the tensor-core one is for prefill).
    let dec = SelectConfig::new(o)
        .dtype(DType::F16)
        .scores(ScoreKernel::Coop)
        .decoding(true);
    let err = BlockSelect::new(&gpu, shape(2, 16, 1, 16, 600, 64), &dec)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefill"), "{err}");
    let auto = |s, dt| {
        BlockSelect::new(&gpu, s, &SelectConfig::new(o).dtype(dt))
            .unwrap()
            .score_kernel()
    };
    assert_eq!(auto(s3, DType::F16), ScoreKernel::Tiled);
    let big = shape(4, 16, 1, 4096, 4096, 128);
    assert_eq!(auto(big, DType::F32), ScoreKernel::Tiled);
    assert_eq!(auto(big, DType::F16), ScoreKernel::Coop);
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
    let mut enc = gpu.encoder();
    let wrong = gpu.upload_u32(&[1, 2, 100, 3], &vec![0; 600]).unwrap();
    let e = op
        .encode(&gpu, &mut enc, &SelectInputs::new(&q, &k), &scratch, &wrong)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)) && e.to_string().contains("selection"));
    let as_f32 = gpu.upload(&[1, 2, 100, 2], &vec![0.0; 400]).unwrap();
    let e = op
        .encode(
            &gpu,
            &mut enc,
            &SelectInputs::new(&q, &k),
            &scratch,
            &as_f32,
        )
        .unwrap_err();
    assert!(e.to_string().contains("U32"), "{e}");
    // Split block scores: a workgroup scores at least one key, and the scratch must hold the
    // splits' statistics (one made for an unsplit selection does not).
    let cfg = SelectConfig::new(opts(16, 2, 0, 0, Scoring::Ssa));
    let e = BlockSelect::new(&gpu, s, &cfg.score_split(Some(0))).unwrap_err();
    assert!(e.to_string().contains("score_split = 0"), "{e}");
    let long = shape(1, 4, 2, 100, 2000, 64);
    let split = BlockSelect::new(&gpu, long, &cfg.score_split(Some(1))).unwrap();
    assert!(split.score_split().0 > 1 && split.split_dims().is_some());
    let whole = BlockSelect::new(&gpu, long, &cfg.score_split(Some(usize::MAX))).unwrap();
    assert_eq!(whole.score_split().0, 1);
    let unsplit = whole.scratch(&gpu).unwrap();
    let out = gpu
        .upload_u32(&split.selection_dims(), &vec![0; 400])
        .unwrap();
    let k = gpu
        .upload(&long.kv_dims(), &vec![0.0; long.kv_len()])
        .unwrap();
    let e = split
        .encode(&gpu, &mut enc, &SelectInputs::new(&q, &k), &unsplit, &out)
        .unwrap_err();
    assert!(e.to_string().contains("split scores"), "{e}");
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

/// The automatic top-k kernel: subgroup rounds where k <= blocks / 32 (NOSA: / 8) and the
/// device has subgroups, the sort otherwise.
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
    // NOSA ranks twice with the sort: the rounds from k <= blocks / 8.
    let nosa = |k| {
        let o = SelectOptions::nosa_budget(16, k, 1, 1, 2).unwrap();
        BlockSelect::new(&gpu, s, &SelectConfig::new(o))
            .unwrap()
            .topk_kernel()
    };
    assert_eq!(nosa(15), if sg { TopK::Subgroup } else { TopK::Sort });
    assert_eq!(nosa(16), TopK::Sort);
    // The subgroup rounds take a subgroup per row where the adapter has one subgroup size and
    // k fits its lanes; a workgroup per row otherwise (k = 70 in selection_matches_reference).
    let rows = |k, kernel| {
        let c = SelectConfig::new(opts(16, k, 0, 0, Scoring::Ssa)).topk(kernel);
        BlockSelect::new(&gpu, s, &c).unwrap().topk_rows()
    };
    let (lo, hi) = gpu.adapter_subgroup_sizes();
    eprintln!("subgroup sizes {lo}..{hi}");
    assert_eq!(rows(3, TopK::Sort), 1);
    if sg {
        assert_eq!(rows(3, TopK::Subgroup) > 1, lo == hi && lo >= 4);
        assert_eq!(rows(lo as usize + 1, TopK::Subgroup), 1);
    }
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

/// NOSA's selection (NOSA.md §2) on the GPU against the reference, both top-k kernels: every
/// row holds the query-aware top-(k − evict) (forced blocks first; the same as a plain selection
/// of k − evict blocks) and fills the rest with the best eviction scores among the other
/// candidates; the pooled eviction scores match the reference's.
fn run_nosa(gpu: &Gpu, s: AttnShape, o: SelectOptions, seed: u64, topk: TopK) {
    let ctx = format!("NOSA, seed {seed}, {s:?}, {o:?}, top-k {}", topk.name());
    let mut rng = Rng::new(seed);
    let q = rng.normal_vec(s.q_len(), 1.0);
    let k = rng.normal_vec(s.kv_len(), 1.0);
    let e = rng.normal_vec(s.batch * s.heads_kv * s.seq_k, 1.0);
    let want = refsel::select_nosa(&s, &o, &q, &k, Some(&e)).expect(&ctx);
    let plain = SelectOptions {
        k: o.query_k(),
        evict: 0,
        ..o
    };
    let want_q = refsel::select(&s, &plain, &q, &k).expect(&ctx).indices;
    let (tq, tk) = (
        gpu.upload(&s.q_dims(), &q).unwrap(),
        gpu.upload(&s.kv_dims(), &k).unwrap(),
    );
    let te = gpu.upload(&[s.batch, s.heads_kv, s.seq_k], &e).unwrap();
    let cfg = |o| SelectConfig::new(o).topk(topk);
    let op = BlockSelect::new(gpu, s, &cfg(o)).expect(&ctx);
    let x = SelectInputs::new(&tq, &tk).evict(Some(&te));
    let (sel, scratch) = op.select_inputs(gpu, &x).expect(&ctx);
    let got = gpu.read_u32(&sel).unwrap();
    let (sel_q, _) = BlockSelect::new(gpu, s, &cfg(plain))
        .unwrap()
        .select(gpu, &tq, &tk)
        .unwrap();
    let got_q = gpu.read_u32(&sel_q).unwrap();
    let pooled = compare(
        &gpu.read(scratch.evict_pooled.as_ref().unwrap()).unwrap(),
        &refsel::pooled_scores(&s, &o, &e),
    );
    assert!(
        pooled.within(TOL),
        "pooled eviction scores {pooled:?} ({ctx})"
    );
    let nb = o.blocks(s.seq_k);
    for (name, sel, sel_q) in [("reference", &want.indices, &want_q), ("GPU", &got, &got_q)] {
        for row in 0..s.batch * s.heads_kv * s.seq_q {
            let t = row % s.seq_q;
            let (_, end) = current_and_end(&o, nb, s.q_offset() + t);
            let r = &sel[row * o.k..(row + 1) * o.k];
            let rq = &sel_q[row * plain.k..(row + 1) * plain.k];
            let w = format!("{name} row {row}: {r:?}, query-aware {rq:?} ({ctx})");
            let n = o.k.min(end);
            assert!(r[..n].windows(2).all(|p| p[0] < p[1]), "not ascending: {w}");
            assert!(r[n..].iter().all(|&j| j == SENTINEL), "bad padding: {w}");
            let q_part: Vec<u32> = rq.iter().copied().filter(|&j| j != SENTINEL).collect();
            assert!(
                q_part.iter().all(|j| r.contains(j)),
                "query-aware block missing: {w}"
            );
            let es = &want.evict_scores[row * nb..row * nb + end];
            let spread = es
                .iter()
                .filter(|x| x.is_finite())
                .fold(1e-30f64, |a, b| a.max(b.abs()));
            let min_sel = r[..n]
                .iter()
                .filter(|j| !q_part.contains(j))
                .map(|&j| es[j as usize])
                .fold(f64::INFINITY, f64::min);
            let max_unsel = (0..end)
                .filter(|&j| !r.contains(&(j as u32)))
                .map(|j| es[j])
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                min_sel >= max_unsel - TOL * spread,
                "eviction-stage block {min_sel} below an unselected {max_unsel}: {w}"
            );
        }
    }
    eprintln!("{ctx}: identical to the reference: {}", got == want.indices);
}

#[test]
fn nosa_selection_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let nosa = |block, k, n_init, n_local, k_query, scoring| SelectOptions {
        scoring,
        ..SelectOptions::nosa_budget(block, k, n_init, n_local, k_query).unwrap()
    };
    let cases = [
        // The official shape of the budget, scaled down: blocks of 64, InfLLM-V2 kernels.
        (
            shape(1, 8, 2, 1000, 1000, 32),
            nosa(64, 12, 1, 3, 3, Scoring::InfLlmV2),
        ),
        // Blocks of 16, GQA 4:1, odd length, 2 batches
        (
            shape(2, 8, 2, 333, 333, 32),
            nosa(16, 9, 1, 2, 2, Scoring::InfLlmV2),
        ),
        // SSA scoring with eviction, no forced blocks besides the current one
        (
            shape(1, 4, 1, 300, 300, 64),
            nosa(16, 6, 0, 0, 2, Scoring::Ssa),
        ),
        // decoding-like: queries at the end of a long key range
        (
            shape(1, 4, 1, 9, 900, 32),
            nosa(32, 10, 1, 2, 3, Scoring::InfLlmV2),
        ),
        // more candidates than threads of the top-k kernels
        (
            shape(1, 2, 1, 3000, 3000, 16),
            nosa(16, 20, 1, 2, 5, Scoring::InfLlmV2),
        ),
    ];
    for (i, (s, o)) in cases.into_iter().enumerate() {
        for topk in [TopK::Sort, TopK::Subgroup] {
            match TopK::subgroup_supported(&gpu) {
                Err(e) if topk == TopK::Subgroup => eprintln!("SKIPPED subgroup top-k: {e}"),
                _ => run_nosa(&gpu, s, o, seed.wrapping_add(i as u64), topk),
            }
        }
    }
}

/// Budgets that do not fit say which number is wrong; a NOSA selection without its eviction
/// score (or a plain one with one) is refused.
#[test]
fn bad_nosa_budgets_name_the_number() {
    let e = SelectOptions::nosa_budget(64, 20, 1, 15, 16)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("k_query (16)") && e.contains("exceed k = 20"),
        "{e}"
    );
    let e = SelectOptions::nosa_budget(48, 64, 1, 15, 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block size 48"), "{e}");
    let s = shape(1, 4, 1, 500, 500, 32);
    let o = SelectOptions::nosa_budget(64, 9, 1, 2, 3).unwrap();
    let e = o.validate(&s).unwrap_err().to_string();
    assert!(e.contains("larger than the 8 blocks"), "{e}");
    let Some(gpu) = common::gpu() else { return };
    let o = SelectOptions::nosa_budget(16, 9, 1, 2, 3).unwrap();
    let op = BlockSelect::new(&gpu, s, &SelectConfig::new(o)).unwrap();
    let q = gpu.upload(&s.q_dims(), &vec![0.0; s.q_len()]).unwrap();
    let k = gpu.upload(&s.kv_dims(), &vec![0.0; s.kv_len()]).unwrap();
    let e = op.select(&gpu, &q, &k).unwrap_err().to_string();
    assert!(e.contains("eviction score; none was given"), "{e}");
    let plain =
        BlockSelect::new(&gpu, s, &SelectConfig::new(SelectOptions { evict: 0, ..o })).unwrap();
    let ev = gpu.upload(&[1, 1, 500], &vec![0.0; 500]).unwrap();
    let e = plain
        .select_inputs(&gpu, &SelectInputs::new(&q, &k).evict(Some(&ev)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("evict = 0"), "{e}");
}

/// NOSA's selection is causal too: keys and eviction scores after token t do not change token
/// t's selection (reference and GPU).
#[test]
fn nosa_selection_ignores_the_future() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    let s = shape(1, 4, 2, 400, 400, 32);
    let o = SelectOptions::nosa_budget(16, 8, 1, 1, 2).unwrap();
    let mut rng = Rng::new(seed);
    let q = rng.normal_vec(s.q_len(), 1.0);
    let (k, e) = (
        rng.normal_vec(s.kv_len(), 1.0),
        rng.normal_vec(2 * 400, 1.0),
    );
    let op = BlockSelect::new(&gpu, s, &SelectConfig::new(o)).unwrap();
    let run = |k: &[f32], e: &[f32]| {
        let (tq, tk) = (
            gpu.upload(&s.q_dims(), &q).unwrap(),
            gpu.upload(&s.kv_dims(), k).unwrap(),
        );
        let te = gpu.upload(&[1, 2, 400], e).unwrap();
        let x = SelectInputs::new(&tq, &tk).evict(Some(&te));
        let got = gpu
            .read_u32(&op.select_inputs(&gpu, &x).unwrap().0)
            .unwrap();
        (
            refsel::select_nosa(&s, &o, &q, k, Some(e)).unwrap().indices,
            got,
        )
    };
    let base = run(&k, &e);
    for t in [0, 15, 16, 40, 47, 48, 200, 399] {
        let (mut k2, mut e2) = (k.clone(), e.clone());
        for u in 0..2 {
            for key in t + 1..400 {
                e2[u * 400 + key] = rng.normal() as f32 * 5.0;
                for c in 0..32 {
                    k2[(u * 400 + key) * 32 + c] = rng.normal() as f32 * 3.0;
                }
            }
        }
        let other = run(&k2, &e2);
        for u in 0..2 {
            let r = (u * 400 + t) * o.k..(u * 400 + t + 1) * o.k;
            assert_eq!(
                base.0[r.clone()],
                other.0[r.clone()],
                "reference, token {t}, seed {seed}"
            );
            assert_eq!(
                base.1[r.clone()],
                other.1[r.clone()],
                "GPU, token {t}, seed {seed}"
            );
        }
    }
}
