//! Training end to end on a tiny model (lavapipe-sized): every mode trains and its loss falls,
//! checkpoints resume exactly, evaluation runs on a checkpoint, bad configurations are errors.
#![cfg(feature = "train")]

use crate::common;

use std::path::PathBuf;

use sparse_attn::train::data::Corpus;
use sparse_attn::train::eval::{EvalConfig, TABLE_HEAD, evaluate, plot_reports, table_rows};
use sparse_attn::train::trainer::{Invocation, load};
use sparse_attn::train::{LmConfig, Mode, TrainConfig, train};

/// Burn's random generator is one per device and its draws may run on the device's stream
/// after the seeding thread moved on: tests that train run one at a time so that runs with the
/// same seed start from the same weights.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn corpus() -> Corpus {
    // Small but not trivial: a few sentences in varying order.
    let lines = [
        "The quick brown fox jumps over the lazy dog. ",
        "A stitch in time saves nine. ",
        "To be, or not to be, that is the question. ",
        "All that glitters is not gold. ",
        "Brevity is the soul of wit. ",
    ];
    let mut train = String::new();
    let mut r = sparse_attn::reference::Rng::new(5);
    for _ in 0..300 {
        train += lines[(r.next_u64() % 5) as usize];
    }
    let valid: String = lines.iter().rev().cycle().take(40).copied().collect();
    Corpus::from_texts(&train, &valid)
}

fn tiny(mode: Mode, steps: usize) -> TrainConfig {
    TrainConfig {
        model: LmConfig {
            vocab: 256,
            d_model: 32,
            layers: 2,
            heads_q: 2,
            heads_kv: 1,
            d_ff: 64,
            max_seq: 256,
            rope_theta: 10000.0,
            block: 16,
            // NOSA: 1 initial + the current block + 1 by the query + 1 by the eviction head.
            topk: if mode.nosa() { 4 } else { 2 },
            scoring: if mode.nosa() {
                sparse_attn::Scoring::InfLlmV2
            } else {
                sparse_attn::Scoring::Ssa
            },
            n_init: mode.nosa() as usize,
            n_local: 0,
            k_query: mode.nosa().then_some(1),
            gate: true,
            rms_eps: 1e-5,
        },
        mode,
        steps,
        batch: 2,
        seq: 64,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup: 2,
        weight_decay: 0.0,
        clip: 1.0,
        alpha: 10.0,
        passkey_rate: 0.0,
        seed: 3,
        eval_every: 0,
        eval_windows: 2,
        ckpt_every: 0,
        precision: sparse_attn::train::Precision::F32,
    }
}

fn quiet() -> Invocation {
    Invocation {
        quiet: true,
        ..Invocation::default()
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparse-attn-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn every_mode_trains_and_its_loss_falls() {
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let c = corpus();
    for mode in [
        Mode::Full,
        Mode::Sparse,
        Mode::Ssa,
        Mode::Nosa,
        Mode::NosaSsa,
    ] {
        let out = tmp(mode.name());
        let log = train(&tiny(mode, 16), &c, &rt.device, &out, &quiet()).unwrap();
        let first = log.first().unwrap();
        let last = log.last().unwrap();
        eprintln!("{mode:?}: ce {} -> {}", first.ce, last.ce);
        assert!(first.ce > 5.0, "starts near ln 256: {}", first.ce);
        assert!(
            last.ce < first.ce - 1.5,
            "{mode:?}: {} -> {}",
            first.ce,
            last.ce
        );
        assert_eq!(first.align.is_some(), mode.two_streams());
        if let Some(a) = last.align {
            assert!(a.is_finite() && a >= 0.0);
        }
        // NOSA: the eviction head's A starts at 0 and learns through our kernels' d bias.
        let (model, cfg) = load(&out, &rt.device).unwrap();
        let scales = model.evict_scales().unwrap();
        assert_eq!(scales.len(), if mode.nosa() { cfg.model.layers } else { 0 });
        if mode.nosa() {
            let moved = scales.iter().flatten().filter(|a| a.abs() > 1e-4).count();
            assert!(moved > 0, "{mode:?}: A never moved from 0: {scales:?}");
            assert!(scales.iter().flatten().all(|a| a.is_finite()));
        }
        // The loaded model holds its weights: deleting the checkpoint leaves it whole (Burn's
        // file loader alone read lazily, and a later run failed on the missing file).
        std::fs::remove_dir_all(&out).unwrap();
        let ce = sparse_attn::train::trainer::valid_ce(
            &model,
            &cfg.model,
            &c,
            &rt.device,
            64,
            2,
            1,
            Mode::Full,
        )
        .unwrap();
        assert!(ce.is_finite(), "{mode:?}: {ce}");
    }
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one() {
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let c = corpus();
    let (a, b) = (tmp("straight"), tmp("resumed"));
    let straight = train(&tiny(Mode::Ssa, 6), &c, &rt.device, &a, &quiet()).unwrap();
    let stop = Invocation {
        stop_after: Some(3),
        ..quiet()
    };
    let part = train(&tiny(Mode::Ssa, 6), &c, &rt.device, &b, &stop).unwrap();
    assert_eq!(part.last().unwrap().step, 3);
    let resume = Invocation {
        resume: true,
        ..quiet()
    };
    let resumed = train(&tiny(Mode::Ssa, 6), &c, &rt.device, &b, &resume).unwrap();
    for e in straight.iter().chain(&part).chain(&resumed) {
        eprintln!(
            "step {} ce {} align {:?} lr {}",
            e.step, e.ce, e.align, e.lr
        );
    }
    let (x, y) = (straight.last().unwrap(), resumed.last().unwrap());
    assert_eq!((x.step, y.step), (6, 6));
    assert!(
        (x.loss - y.loss).abs() <= 1e-3 * x.loss.abs(),
        "{} vs {}",
        x.loss,
        y.loss
    );
    // Without --resume an existing checkpoint is not overwritten.
    let e = train(&tiny(Mode::Ssa, 6), &c, &rt.device, &b, &quiet()).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
    // Loading gives the trained weights: same validation loss as the run reported.
    let (model, cfg) = load(&a, &rt.device).unwrap();
    assert_eq!(cfg, tiny(Mode::Ssa, 6));
    let ce = sparse_attn::train::trainer::valid_ce(
        &model,
        &cfg.model,
        &c,
        &rt.device,
        64,
        2,
        2,
        Mode::Full,
    )
    .unwrap();
    assert!(ce.is_finite() && ce < 5.0, "{ce}");
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }

    // f16: the loss scale and the optimizer that skips dropped steps (its state is AdamW's)
    // resume too.
    let f16 = TrainConfig {
        precision: sparse_attn::train::Precision::F16,
        ..tiny(Mode::Full, 6)
    };
    let (a, b) = (tmp("straight-f16"), tmp("resumed-f16"));
    let straight = train(&f16, &c, &rt.device, &a, &quiet()).unwrap();
    train(&f16, &c, &rt.device, &b, &stop).unwrap();
    let resumed = train(&f16, &c, &rt.device, &b, &resume).unwrap();
    let (x, y) = (straight.last().unwrap(), resumed.last().unwrap());
    eprintln!(
        "f16: loss {} vs {}, scale {:?} vs {:?}",
        x.loss, y.loss, x.loss_scale, y.loss_scale
    );
    assert_eq!(x.loss_scale, y.loss_scale);
    assert!(x.loss_scale.is_some());
    assert!(
        (x.loss - y.loss).abs() <= 1e-3 * x.loss.abs(),
        "{} vs {}",
        x.loss,
        y.loss
    );
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn evaluation_runs_end_to_end_on_a_checkpoint() {
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let c = corpus();
    let out = tmp("eval");
    train(&tiny(Mode::Ssa, 4), &c, &rt.device, &out, &quiet()).unwrap();
    let (model, cfg) = load(&out, &rt.device).unwrap();
    let ec = EvalConfig {
        windows: 2,
        batch: 2,
        budgets: vec![1, 2],
        lengths: vec![1, 2],
        passkeys: 2,
        metric_windows: 1,
        seed: 1,
    };
    let r = evaluate(&model, &cfg, &c, &rt.device, &ec, false).unwrap();
    let ppl = r["perplexity"]["full"]["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0);
    let s = r["layers"]["sparse"]["sparsity"].as_array().unwrap();
    assert_eq!(s.len(), 2);
    for x in s {
        let x = x.as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-6).contains(&x), "{x}");
    }
    // No eviction head in an SSA model.
    assert_eq!(r["evict_scales"].as_array().unwrap().len(), 0);
    // Decoding locality: a share per layer, in [0, 1].
    let h = r["layers"]["sparse"]["hit_rate"].as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert!(
        h.iter().all(|x| (0.0..=1.0).contains(&x.as_f64().unwrap())),
        "{h:?}"
    );
    assert_eq!(r["budgets"].as_array().unwrap().len(), 2);
    assert_eq!(r["lengths"].as_array().unwrap().len(), 2);
    let rows = table_rows(std::slice::from_ref(&r));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].len(), TABLE_HEAD.len());
    assert_eq!(rows[0][0], "ssa");
    assert!(rows[0][1].parse::<f64>().unwrap() > 1.0, "{rows:?}");
    let files = plot_reports(&[r], &out.join("plots")).unwrap();
    assert_eq!(files.len(), 6);
    for f in files {
        assert!(std::fs::metadata(&f).unwrap().len() > 1000);
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_configurations_are_clear_errors() {
    let mut c = tiny(Mode::Sparse, 4);
    c.model.topk = 8; // 128 tokens of budget in a 64-token context
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("exceeds the context")
    );
    let mut c = tiny(Mode::Full, 4);
    c.model.heads_q = 3;
    c.model.heads_kv = 2;
    c.model.d_model = 48;
    assert!(c.validate().unwrap_err().to_string().contains("multiple"));
    let mut c = tiny(Mode::Full, 4);
    c.seq = 512;
    assert!(c.validate().unwrap_err().to_string().contains("max_seq"));
    let e = Corpus::load(std::path::Path::new("/nonexistent/corpus"), 10).unwrap_err();
    assert!(e.to_string().contains("fetch-corpus"), "{e}");
    assert!(Mode::parse("dense").is_err());
    // NOSA budgets: too many query blocks, a NOSA mode without its budget, a budget without
    // a NOSA mode.
    let mut c = tiny(Mode::Nosa, 4);
    c.model.k_query = Some(3);
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("k_query (3)") && e.contains("exceed k = 4"),
        "{e}"
    );
    let mut c = tiny(Mode::Nosa, 4);
    c.model.k_query = None;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("needs NOSA's budget")
    );
    let mut c = tiny(Mode::Sparse, 4);
    c.model.k_query = Some(1);
    c.model.n_init = 1;
    c.model.topk = 4;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("does not train it")
    );
    // A model config written before NOSA (no scoring, forced blocks or k_query) still loads,
    // as what it was: SSA scoring, no eviction head.
    let mut old = tiny(Mode::Ssa, 4).model.to_json();
    for key in ["scoring", "n_init", "n_local", "k_query"] {
        old.as_object_mut().unwrap().remove(key);
    }
    let m = LmConfig::from_json(&old).unwrap();
    assert_eq!(m, tiny(Mode::Ssa, 4).model);
}

/// A run that diverges (an absurd learning rate after a resume) stops with an error and
/// leaves the last good checkpoint as it was: NaN weights are never saved over it.
#[test]
fn a_diverged_run_never_saves_over_a_good_checkpoint() {
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let c = corpus();
    let out = tmp("diverged");
    train(&tiny(Mode::Full, 2), &c, &rt.device, &out, &quiet()).unwrap();
    let before = sparse_attn::train::checkpoint::find(&out)
        .unwrap()
        .unwrap()
        .1;
    let wild = TrainConfig {
        lr: 1e30,
        min_lr: 0.0,
        ..tiny(Mode::Full, 12)
    };
    let resume = Invocation {
        resume: true,
        ..quiet()
    };
    let e = train(&wild, &c, &rt.device, &out, &resume)
        .expect_err("a loss of NaN or infinity must stop the run")
        .to_string();
    assert!(e.contains("stopping without saving"), "{e}");
    let after = sparse_attn::train::checkpoint::find(&out)
        .unwrap()
        .unwrap()
        .1;
    assert_eq!(after["step"], before["step"]);
    assert_eq!(after["files"], before["files"]);
    std::fs::remove_dir_all(&out).unwrap();
}

/// Every float parameter's gradient in `grads`, flattened in the model's visiting order.
fn all_grads(model: &sparse_attn::train::Lm, grads: &burn::optim::GradientsParams) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct V<'a>(&'a burn::optim::GradientsParams, Vec<f32>);
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(p.id) {
                let v = g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
                self.1.extend(v);
            }
        }
    }
    let mut v = V(grads, Vec::new());
    model.visit(&mut v);
    v.1
}

/// Logits and unscaled parameter gradients of one loss-scaled step in `precision`.
fn step_grads(
    rt: &sparse_attn::train::Runtime,
    cfg: &TrainConfig,
    precision: sparse_attn::train::Precision,
) -> (Vec<f32>, Vec<f32>) {
    use burn::optim::GradientsParams;
    use sparse_attn::train::model::{Run, cross_entropy};
    use sparse_attn::train::scale::LossScale;
    use sparse_attn::train::trainer::{batch_tensors, seeded_init};
    let dev = rt.device.clone().autodiff();
    let model = seeded_init(&cfg.model, &dev, 7).unwrap();
    let mut rng = sparse_attn::reference::Rng::new(11);
    let b = sparse_attn::train::data::random_batch(&mut rng, &corpus().train, 2, 64, 0.0);
    let (x, y) = batch_tensors(&b, &dev);
    let run = Run {
        precision,
        ..Run::new(cfg.mode)
    };
    let fwd = model.forward(&cfg.model, x, run).unwrap();
    // Converted at once: on lavapipe a TensorData kept across later GPU work (here the
    // backward pass) was seen to change (Burn 0.22.1: its bytes alias a reused buffer).
    let logits: Vec<f32> = fwd
        .logits
        .clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();

    let mut scale = LossScale::new(precision, &rt.device);
    let loss = cross_entropy(fwd.logits, y);
    let mut grads = GradientsParams::from_grads(scale.scaled(loss).backward(), &model);
    scale.unscale(&mut grads, &model);
    (logits, all_grads(&model, &grads))
}

/// Mixed precision (issue 20 point 2): with f16 operands in the linear layers' products (f32
/// master weights, accumulation, attention and loss; the loss scaled by 2^16 and the gradients
/// unscaled), the logits and every parameter's gradient equal f32's to f16's rounding: relative
/// L2 error at most 1e-2 (logits) and 3e-2 (gradients; measured here ~1e-3 and ~5e-3).
#[test]
fn f16_products_give_f32s_logits_and_gradients() {
    use sparse_attn::train::Precision;
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    for mode in [Mode::Full, Mode::Nosa] {
        let cfg = tiny(mode, 1);
        let (l32, g32) = step_grads(&rt, &cfg, Precision::F32);
        let (l16, g16) = step_grads(&rt, &cfg, Precision::F16);
        assert_eq!((l32.len(), g32.len()), (l16.len(), g16.len()));
        let (el, eg) = (common::rel_l2(&l16, &l32), common::rel_l2(&g16, &g32));
        eprintln!("{mode:?}: logits {el:.2e}, gradients {eg:.2e}");
        assert!(g16.iter().all(|g| g.is_finite()));
        assert!(el <= 1e-2, "{mode:?}: logits {el}");
        assert!(eg <= 3e-2, "{mode:?}: gradients {eg}");
        assert!(eg > 0.0, "the f16 run must not be the f32 run");
    }
}

/// The loss scale: a step with a non-finite gradient zeroes every gradient and halves the
/// scale; a finite step divides the gradients by the scale and counts; the count reaching
/// GROWTH_EVERY doubles the scale. f32 runs have no scale.
#[test]
fn the_loss_scale_drops_bad_steps_and_grows_after_good_ones() {
    use burn::optim::GradientsParams;
    use burn::tensor::Tensor;
    use sparse_attn::train::Precision;
    use sparse_attn::train::model::{Run, cross_entropy};
    use sparse_attn::train::scale::{GROWTH_EVERY, LossScale, ScaleState};
    use sparse_attn::train::trainer::{batch_tensors, seeded_init};
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let cfg = tiny(Mode::Full, 1);
    let dev = rt.device.clone().autodiff();
    let model = seeded_init(&cfg.model, &dev, 7).unwrap();
    let mut rng = sparse_attn::reference::Rng::new(11);
    let b = sparse_attn::train::data::random_batch(&mut rng, &corpus().train, 2, 64, 0.0);
    let (x, y) = batch_tensors(&b, &dev);
    let fwd = model.forward(&cfg.model, x, Run::new(Mode::Full)).unwrap();
    let loss = cross_entropy(fwd.logits, y);
    let raw = GradientsParams::from_grads(loss.backward(), &model);
    let plain = all_grads(&model, &raw);
    // Gradients as a scaled backward pass would leave them: times 1024.
    let scaled = |poison: bool| {
        let mut g = GradientsParams::new();
        let mut first = true;
        let ids: Vec<_> = {
            use burn::module::{Module, ModuleVisitor, Param};
            struct Ids(Vec<(burn::module::ParamId, usize)>);
            impl ModuleVisitor for Ids {
                fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                    self.0.push((p.id, D));
                }
            }
            let mut v = Ids(Vec::new());
            model.visit(&mut v);
            v.0
        };
        for (id, d) in ids {
            macro_rules! put {
                ($d:literal) => {{
                    let Some(t) = raw.get::<$d>(id) else { continue };
                    let mut t = t * 1024.0;
                    if poison && first {
                        // One gradient overflowed (an uploaded infinity: WGSL leaves x / 0
                        // undefined, lavapipe gives 0).
                        let inf = burn::tensor::TensorData::new(vec![f32::INFINITY], [1]);
                        t = t.clone() + Tensor::<1>::from_data(inf, &t.device()).reshape([1; $d]);
                        first = false;
                    }
                    g.register::<$d>(id, t);
                }};
            }
            match d {
                1 => put!(1),
                2 => put!(2),
                _ => panic!("a parameter of rank {d}"),
            }
        }
        g
    };
    let inner = rt.device.clone();
    // A finite step: the gradients come back unscaled, the count grows.
    let at = |scale: f32, good: u32, dropped: u32| ScaleState {
        scale,
        good,
        dropped,
    };
    let mut s = LossScale::with_state(Precision::F16, &inner, at(1024.0, 3, 5));
    let mut g = scaled(false);
    s.unscale(&mut g, &model);
    let got = all_grads(&model, &g);
    assert!(common::rel_l2(&got, &plain) < 1e-6);
    assert_eq!(s.read().unwrap(), Some(at(1024.0, 4, 5)));
    // A step with an overflow: every gradient zero (none NaN), the scale halves, the count
    // restarts, the dropped steps count one more.
    let mut g = scaled(true);
    s.unscale(&mut g, &model);
    let got = all_grads(&model, &g);
    eprintln!(
        "dropped step: {} NaN, {} non-zero of {}; scale {:?}",
        got.iter().filter(|v| v.is_nan()).count(),
        got.iter().filter(|&&v| v != 0.0).count(),
        got.len(),
        s.read().unwrap()
    );
    assert!(
        got.iter().all(|&v| v == 0.0),
        "a dropped step's gradients must be 0"
    );
    assert_eq!(s.read().unwrap(), Some(at(512.0, 0, 6)));
    // The last good step of a run of GROWTH_EVERY doubles the scale.
    let mut s = LossScale::with_state(Precision::F16, &inner, at(1024.0, GROWTH_EVERY - 1, 0));
    let mut g = scaled(false);
    s.unscale(&mut g, &model);
    assert_eq!(s.read().unwrap(), Some(at(2048.0, 0, 0)));
    // f32: nothing to scale.
    let mut s = LossScale::new(Precision::F32, &inner);
    let mut g = scaled(false);
    s.unscale(&mut g, &model);
    assert_eq!(s.read().unwrap(), None);
    let got = all_grads(&model, &g);
    assert!(common::rel_l2(&got, &plain.iter().map(|v| v * 1024.0).collect::<Vec<_>>()) < 1e-6);

    // The optimizer made with the scale skips the steps it drops, as PyTorch's GradScaler
    // skips optimizer.step(): a finite step moves the weights, a dropped one leaves them
    // exactly. f32's plain AdamW, given the same zeroed gradients, moves them (momentum and
    // weight decay): what the skip is for.
    let mut s = LossScale::with_state(Precision::F16, &inner, at(1024.0, 0, 0));
    let mut optim = s.optimizer(0.1, None);
    let mut plain_optim = LossScale::new(Precision::F32, &inner).optimizer(0.1, None);
    let mut g = scaled(false);
    s.unscale(&mut g, &model);
    let (mut g_plain, mut g_drop) = (GradientsParams::new(), GradientsParams::new());
    copy_grads(&model, &g, &mut g_plain);
    let m1 = optim.step(1e-2, model.clone(), g);
    let p1 = plain_optim.step(1e-2, model.clone(), g_plain);
    let w1 = all_params(&m1);
    assert!(w1 != all_params(&model), "a finite step moves the weights");
    let wp1 = all_params(&p1);
    let e = common::rel_l2(&w1, &wp1);
    assert!(e < 1e-6, "a finite step is AdamW's: {e}");
    let mut g = scaled(true);
    s.unscale(&mut g, &m1);
    assert_eq!(s.read().unwrap(), Some(at(512.0, 0, 1)));
    copy_grads(&model, &g, &mut g_drop);
    let m2 = optim.step(1e-2, m1, g);
    assert!(all_params(&m2) == w1, "a dropped step leaves the weights");
    let p2 = plain_optim.step(1e-2, p1, g_drop);
    assert!(
        all_params(&p2) != wp1,
        "zero gradients alone move the weights"
    );
    // The moments were left too: the next finite step is the one after no dropped step but
    // for the bias correction (the step count is the host's and advanced by one: with equal
    // gradients Adam's part of the step is 0.86x: 0.15 measured on lavapipe; moments lost at
    // the dropped step gave 0.35).
    let mut g = scaled(false);
    s.unscale(&mut g, &m2);
    let mut g_ref = GradientsParams::new();
    copy_grads(&model, &g, &mut g_ref);
    let m3 = optim.step(1e-2, m2, g);
    let mut ref_optim = LossScale::new(Precision::F32, &inner).optimizer(0.1, None);
    let mut g1 = scaled(false);
    LossScale::with_state(Precision::F16, &inner, at(1024.0, 0, 0)).unscale(&mut g1, &model);
    let r1 = ref_optim.step(1e-2, model.clone(), g1);
    let r2 = ref_optim.step(1e-2, r1, g_ref);
    let (d3, dr) = (all_params(&m3), all_params(&r2));
    let step = |w: &[f32]| w.iter().zip(&w1).map(|(a, b)| a - b).collect::<Vec<_>>();
    let e = common::rel_l2(&step(&d3), &step(&dr));
    eprintln!("the step after a dropped one against the step after none: rel. {e:.2e}");
    assert!(e < 0.25, "{e}");
}

/// Every parameter of `model`, flattened in visiting order.
fn all_params(model: &sparse_attn::train::Lm) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct V(Vec<f32>);
    impl ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let v = p
                .val()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            self.0.extend(v);
        }
    }
    let mut v = V(Vec::new());
    model.visit(&mut v);
    v.0
}

/// `from`'s gradients of `model`'s parameters registered again in `to` (a second optimizer
/// consumes its own copy).
fn copy_grads(
    model: &sparse_attn::train::Lm,
    from: &burn::optim::GradientsParams,
    to: &mut burn::optim::GradientsParams,
) {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct V<'a>(
        &'a burn::optim::GradientsParams,
        &'a mut burn::optim::GradientsParams,
    );
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(p.id) {
                self.1.register::<D>(p.id, g);
            }
        }
    }
    model.visit(&mut V(from, to));
}

/// f16 products train like f32 on the tiny model (the loss falls as far in the same steps, for
/// full attention and NOSA), and the checkpoint keeps the loss scale for a resumed run.
#[test]
fn f16_products_train() {
    use sparse_attn::train::Precision;
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let c = corpus();
    for mode in [Mode::Full, Mode::Nosa] {
        let mut ce = vec![];
        for precision in [Precision::F32, Precision::F16] {
            let out = tmp(&format!("{}-{}", mode.name(), precision.name()));
            let cfg = TrainConfig {
                precision,
                ..tiny(mode, 16)
            };
            let log = train(&cfg, &c, &rt.device, &out, &quiet()).unwrap();
            let (first, last) = (log.first().unwrap(), log.last().unwrap());
            eprintln!(
                "{mode:?} {precision:?}: ce {} -> {}, scale {:?}",
                first.ce, last.ce, last.loss_scale
            );
            assert!(last.ce < first.ce - 1.5, "{mode:?} {precision:?}");
            // The log says where the scaling stands; the checkpoint keeps the same.
            let state = sparse_attn::train::trainer::load_state(&out).unwrap();
            let scale = &state["loss_scale"];
            let logged = &state["log"].as_array().unwrap().last().unwrap().clone();
            match precision {
                Precision::F32 => {
                    assert!(scale.is_null(), "{scale}");
                    assert!(log.iter().all(|e| e.loss_scale.is_none()));
                    assert!(logged["loss_scale"].is_null(), "{logged}");
                }
                Precision::F16 => {
                    let s = scale[0].as_f64().unwrap();
                    assert!(
                        (1.0..=65536.0).contains(&s) && s.log2().fract() == 0.0,
                        "{scale}"
                    );
                    let st = last.loss_scale.expect("f16 runs log their scale");
                    assert_eq!(st.scale as f64, s, "{scale}");
                    assert_eq!(scale[2].as_u64(), Some(st.dropped as u64), "{scale}");
                    assert_eq!(logged["dropped_steps"].as_u64(), Some(st.dropped as u64));
                    // Each halving from 2^16 was a dropped step; none later grew it back.
                    assert_eq!(st.dropped as f64, (65536.0 / s).log2(), "{st:?}");
                    assert!(
                        st.good as usize + st.dropped as usize <= cfg.steps,
                        "{st:?}"
                    );
                }
            }
            let (_, loaded) = load(&out, &rt.device).unwrap();
            assert_eq!(loaded.precision, precision);
            ce.push(last.ce);
            std::fs::remove_dir_all(&out).unwrap();
        }
        assert!(
            (ce[0] - ce[1]).abs() < 0.1 * ce[0],
            "{mode:?}: f32 {} f16 {}",
            ce[0],
            ce[1]
        );
    }
}

/// `bench train`'s numbers: the host's share is part of the step, our kernels' timeline covers
/// every dispatch of the profiled steps in order, and the gaps between them plus the kernels
/// span the steps (what lies between ours is Burn's work and idle time).
#[test]
fn step_timing_accounts_for_the_whole_step() {
    use sparse_attn::train::trainer::measure_steps;
    let _serial = serial();
    let Some(rt) = common::burn_runtime() else {
        return;
    };
    let cfg = tiny(Mode::Ssa, 4);
    let t = measure_steps(&cfg, &corpus(), &rt.device, &rt.gpu, 2, 3).unwrap();
    assert!(t.step_s > 0.0 && t.host_s > 0.0, "{t:?}");
    assert!(t.host_s <= t.step_s * 1.0001, "{t:?}");
    if !rt.gpu.has_timestamps() {
        assert!(t.timeline.is_empty() && t.gaps().is_empty());
        return;
    }
    // 2 layers x (full forward, selection 3, sparse forward, align 2, two backward passes).
    let kernels: Vec<&str> = t.ours.iter().map(|k| k.0.as_str()).collect();
    for want in ["align.wgsl:align", "block_select.wgsl:block_topk"] {
        assert!(kernels.contains(&want), "{want} not in {kernels:?}");
    }
    let dispatches: u32 = t.ours.iter().map(|k| k.2).sum();
    assert_eq!(t.timeline.len(), 3 * dispatches as usize, "{:?}", t.ours);
    assert!(
        t.timeline
            .iter()
            .all(|e| 0.0 <= e.start && e.start <= e.end)
    );
    let span = t.timeline.last().unwrap().end - t.timeline[0].start;
    let gaps: f64 = t.gaps().iter().map(|g| g.1).sum();
    // Kernels and gaps cover the span (exactly where dispatches run one after another, as on
    // lavapipe; dispatches that overlap on a GPU count twice in the kernels' sum).
    let accounted = 3.0 * (t.ours_s() + gaps);
    assert!(
        accounted >= span * (1.0 - 1e-3) - 1e-6 && accounted.is_finite(),
        "kernels + gaps {accounted} s against the span {span} s"
    );
    // Largest first; the step boundary (optimizer, next forward) is one of them.
    let g = t.gaps();
    assert!(g.windows(2).all(|w| w[0].1 >= w[1].1), "{g:?}");
}
