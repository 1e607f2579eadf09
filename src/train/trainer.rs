//! The training loop: AdamW with warmup and cosine decay, per-parameter gradient-norm clipping,
//! the SSA objective (CE + alpha · mean-over-layers alignment), checkpoints that resume exactly
//! (model, optimizer state, data-sampler state, log), and a progress line with loss, tokens/s
//! and ETA.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Error, Result, invalid};
use crate::reference::Rng;
use crate::train::checkpoint;
use crate::train::data::{Batch, Corpus, random_batch, sequential_batches};
use crate::train::model::{Lm, LmConfig, Mode, Precision, Run, cross_entropy};
use crate::train::scale::{LossScale, ScaleState};

/// Everything a training run is made of besides the data.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub model: LmConfig,
    pub mode: Mode,
    pub steps: usize,
    pub batch: usize,
    pub seq: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub weight_decay: f32,
    pub clip: f32,
    /// Weight of the alignment loss (SSA: 10).
    pub alpha: f32,
    /// Share of the training windows that are pass-key samples.
    pub passkey_rate: f64,
    pub seed: u64,
    /// Validation loss every this many steps (0: never) over `eval_windows` windows.
    pub eval_every: usize,
    pub eval_windows: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub ckpt_every: usize,
    /// Operands of the linear layers' products (f16: with loss scaling).
    pub precision: Precision,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.steps == 0 || self.batch == 0 || self.seq == 0 {
            invalid!("steps, batch and seq must be at least 1");
        }
        if self.seq > self.model.max_seq {
            invalid!(
                "seq {} exceeds the model's max_seq {}",
                self.seq,
                self.model.max_seq
            );
        }
        if self.mode != Mode::Full && self.model.receptive_field() > self.seq {
            invalid!(
                "the sparse budget (block {} x topk {} = {} tokens) exceeds the context of {} \
                 tokens: every block would be kept",
                self.model.block,
                self.model.topk,
                self.model.receptive_field(),
                self.seq
            );
        }
        match (self.mode.nosa(), self.model.has_evict_head()) {
            (true, false) => invalid!(
                "mode {} needs NOSA's budget: give k_query (blocks chosen by the query besides \
                 the forced ones; the rest of topk goes to the eviction head)",
                self.mode.name()
            ),
            (false, true) => invalid!(
                "k_query (NOSA's eviction head) is set but mode {} does not train it: use nosa \
                 or nosa-ssa",
                self.mode.name()
            ),
            _ => {}
        }
        // NaN fails every comparison: each check is written so that NaN fails it.
        let lr_ok = self.lr > 0.0 && self.lr.is_finite();
        if !(lr_ok && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            invalid!(
                "need 0 <= min_lr <= lr and a finite lr > 0 (got lr {}, min_lr {})",
                self.lr,
                self.min_lr
            );
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("clip", self.clip),
            ("alpha", self.alpha),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                invalid!("{name} must be a finite number >= 0, got {v}");
            }
        }
        if self.clip == 0.0 {
            invalid!("clip must be > 0 (gradient-norm clipping to 0 would stop training)");
        }
        if !(0.0..=1.0).contains(&self.passkey_rate) {
            invalid!("passkey_rate must be in [0, 1], got {}", self.passkey_rate);
        }
        // eval_every and ckpt_every 0 mean "never" and "only at the end"; validation itself
        // needs windows.
        if self.eval_every > 0 && self.eval_windows == 0 {
            invalid!("eval_windows must be at least 1 when eval_every is set");
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warmup, then cosine to `min_lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps - self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model.to_json(), "mode": self.mode.name(), "steps": self.steps,
            "batch": self.batch, "seq": self.seq, "lr": self.lr, "min_lr": self.min_lr,
            "warmup": self.warmup, "weight_decay": self.weight_decay, "clip": self.clip,
            "alpha": self.alpha, "passkey_rate": self.passkey_rate, "seed": self.seed,
            "eval_every": self.eval_every, "eval_windows": self.eval_windows,
            "ckpt_every": self.ckpt_every, "precision": self.precision.name(),
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let bad = |k: &str| Error::InvalidInput(format!("training config lacks `{k}`"));
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).ok_or_else(|| bad(k));
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| bad(k));
        let c = Self {
            model: LmConfig::from_json(v.get("model").ok_or_else(|| bad("model"))?)?,
            mode: Mode::parse(
                v.get("mode")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| bad("mode"))?,
            )?,
            steps: u("steps")? as usize,
            batch: u("batch")? as usize,
            seq: u("seq")? as usize,
            lr: f("lr")?,
            min_lr: f("min_lr")?,
            warmup: u("warmup")? as usize,
            weight_decay: f("weight_decay")? as f32,
            clip: f("clip")? as f32,
            alpha: f("alpha")? as f32,
            passkey_rate: f("passkey_rate")?,
            seed: u("seed")?,
            eval_every: u("eval_every")? as usize,
            eval_windows: u("eval_windows")? as usize,
            ckpt_every: u("ckpt_every")? as usize,
            // Runs from before mixed precision were f32.
            precision: match v.get("precision").and_then(|x| x.as_str()) {
                Some(p) => Precision::parse(p)?,
                None => Precision::F32,
            },
        };
        c.validate()?;
        Ok(c)
    }
}

/// One logged step.
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub step: usize,
    pub loss: f64,
    pub ce: f64,
    pub align: Option<f64>,
    pub lr: f64,
    pub valid_ce: Option<f64>,
    pub tokens_per_s: f64,
    /// f16 runs: the loss scale and the steps dropped so far (non-finite gradients).
    pub loss_scale: Option<ScaleState>,
}

/// Burn tensors of a batch.
pub fn batch_tensors(b: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let t = |v: &[i32]| {
        Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [b.batch, b.seq]), device)
    };
    (t(&b.inputs), t(&b.targets))
}

/// Mean validation cross-entropy (nats per token) of `model` on the first `windows` windows.
#[allow(clippy::too_many_arguments)]
pub fn valid_ce(
    model: &Lm,
    cfg: &LmConfig,
    corpus: &Corpus,
    device: &Device,
    seq: usize,
    batch: usize,
    windows: usize,
    mode: Mode,
) -> Result<f64> {
    let batches = sequential_batches(&corpus.valid, batch, seq, windows);
    let (mut sum, mut n) = (0.0, 0usize);
    for b in &batches {
        let (x, y) = batch_tensors(b, device);
        let fwd = model.forward(cfg, x, Run::new(mode))?;
        let ce = cross_entropy(fwd.logits, y).into_scalar::<f32>() as f64;
        sum += ce * b.batch as f64;
        n += b.batch;
    }
    Ok(sum / n.max(1) as f64)
}

/// How one invocation runs: resume or start, output, and where to stop early (a checkpoint is
/// written when stopping, so a later `resume` continues the same schedule).
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    pub resume: bool,
    pub quiet: bool,
    /// Stop after this many steps of this invocation.
    pub stop_after: Option<usize>,
    /// Stop at the first step boundary after this many seconds.
    pub time_limit_s: Option<f64>,
    /// Stop at the next step boundary once this is set (the CLI sets it on SIGINT/SIGTERM).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Train (or resume) into `out`. Returns the log of this invocation.
pub fn train(
    cfg: &TrainConfig,
    corpus: &Corpus,
    device: &Device,
    out: &Path,
    inv: &Invocation,
) -> Result<Vec<LogEntry>> {
    let (resume, quiet) = (inv.resume, inv.quiet);
    cfg.validate()?;
    corpus.check_len(cfg.seq)?;
    let max_binding = crate::train::bridge::gpu_for(device)?.max_binding();
    cfg.model.check_fits(max_binding, cfg.batch, cfg.seq)?;
    let found = checkpoint::find(out)?;
    if resume && found.is_none() {
        invalid!(
            "--resume: {} holds no checkpoint; drop --resume to start a new run",
            out.display()
        );
    }
    if found.is_some() && !resume {
        invalid!(
            "{} already holds a checkpoint; pass --resume to continue it or choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .map_err(|e| Error::InvalidInput(format!("creating {}: {e}", out.display())))?;
    let device = device.clone().autodiff();
    let mut model = seeded_init(&cfg.model, &device, cfg.seed)?;
    let scale = LossScale::new(cfg.precision, &device.clone().inner());
    let mut st = RunState {
        optim: optimizer(cfg, &scale),
        scale,
        rng: Rng::new(cfg.seed),
        step: 0,
        earlier_log: Vec::new(),
        log: Vec::new(),
    };
    if let Some((set, state)) = found {
        let saved = TrainConfig::from_json(&state["config"])?;
        if saved.model != cfg.model || saved.mode != cfg.mode || saved.seed != cfg.seed {
            invalid!(
                "{} holds a run of another model, mode or seed; use another --out or drop \
                 --resume",
                out.display()
            );
        }
        st.step = state["step"].as_u64().unwrap_or(0) as usize;
        st.rng = Rng::from_state(
            state["rng"]
                .as_u64()
                .ok_or_else(|| Error::InvalidInput("checkpoint lacks rng".into()))?,
        );
        st.earlier_log = state["log"].as_array().cloned().unwrap_or_default();
        // [scale, good steps, dropped steps]; checkpoints before the dropped count hold two.
        if let Some([s, g, d]) = state["loss_scale"]
            .as_array()
            .map(|v| [0, 1, 2].map(|i| v.get(i).and_then(serde_json::Value::as_f64).unwrap_or(0.0)))
        {
            let st_scale = ScaleState {
                scale: s as f32,
                good: g as u32,
                dropped: d as u32,
            };
            st.scale = LossScale::with_state(cfg.precision, &device.clone().inner(), st_scale);
            // The optimizer reads the flag of the scale it was made with.
            st.optim = optimizer(cfg, &st.scale);
        }
        model = load_weights(model, &set.model)?;
        st.optim = st
            .optim
            .load(&set.optim)
            .map_err(|e| Error::InvalidInput(format!("loading {}: {e}", set.optim.display())))?;
        if !quiet {
            eprintln!("resuming at step {} from {}", st.step, out.display());
        }
    }
    let start = Instant::now();
    let first = st.step;
    let tokens_per_step = (cfg.batch * cfg.seq) as f64;
    // The losses of the last step whose loss was not read yet: read before any save, so that a
    // diverged model is never saved over a good checkpoint.
    let mut pending = None;
    let check =
        |ce: Tensor<1>, align: Option<Tensor<1>>, step: usize| -> Result<(f64, Option<f64>, f64)> {
            let ce_v = ce.into_scalar::<f32>() as f64;
            let al = align.map(|a| a.into_scalar::<f32>() as f64);
            let loss_v = ce_v + al.unwrap_or(0.0) * cfg.alpha as f64;
            if !loss_v.is_finite() {
                return Err(Error::Gpu(format!(
                    "the loss is {loss_v} at step {step}; stopping without saving over the last \
                 checkpoint (lower the learning rate?)"
                )));
            }
            Ok((ce_v, al, loss_v))
        };
    while st.step < cfg.steps {
        let interrupted = inv
            .stop
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
        if interrupted
            || inv.stop_after.is_some_and(|n| st.step - first >= n)
            || inv
                .time_limit_s
                .is_some_and(|t| start.elapsed().as_secs_f64() >= t)
        {
            if !quiet {
                let why = if interrupted {
                    "interrupted"
                } else {
                    "limit of this invocation"
                };
                eprintln!("\nstopping at step {} ({why}); --resume continues", st.step);
            }
            break;
        }
        let lr = cfg.lr_at(st.step);
        let b = random_batch(
            &mut st.rng,
            &corpus.train,
            cfg.batch,
            cfg.seq,
            cfg.passkey_rate,
        );
        let sparse_main = st.rng.uniform() < 0.5;
        let (m, ce, align) = train_step(
            model,
            &mut st.optim,
            &mut st.scale,
            cfg,
            &b,
            sparse_main,
            lr,
            &device,
        )?;
        model = m;
        st.step += 1;
        let step = st.step;
        // Reading the loss waits for the GPU: report every 1% of the run (at most every 10 steps).
        let every = (cfg.steps / 100).clamp(1, 10);
        let report = step == cfg.steps || step.is_multiple_of(every) || step == first + 1;
        let do_eval = cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every);
        let saving = cfg.ckpt_every > 0 && step.is_multiple_of(cfg.ckpt_every) && step < cfg.steps;
        if !(report || do_eval) {
            pending = Some((ce, align, step));
        } else {
            pending = None;
            let (ce_v, al, loss_v) = check(ce, align, step)?;
            let valid = if do_eval {
                let m = model.valid();
                Some(valid_ce(
                    &m,
                    &cfg.model,
                    corpus,
                    &device.clone().inner(),
                    cfg.seq,
                    cfg.batch,
                    cfg.eval_windows,
                    if cfg.mode.sparse_only() {
                        Mode::Sparse
                    } else {
                        Mode::Full
                    },
                )?)
            } else {
                None
            };
            let el = start.elapsed().as_secs_f64();
            let tps = (step - first) as f64 * tokens_per_step / el.max(1e-9);
            let eta = (cfg.steps - step) as f64 * tokens_per_step / tps.max(1e-9);
            let e = LogEntry {
                step,
                loss: loss_v,
                ce: ce_v,
                align: al,
                lr,
                valid_ce: valid,
                tokens_per_s: tps,
                // The loss was just read, so the GPU has caught up: this read costs no wait.
                loss_scale: st.scale.read()?,
            };
            if !quiet {
                progress(cfg, &e, eta);
            }
            st.log.push(e);
        }
        if saving {
            if let Some((ce, al, at)) = pending.take() {
                check(ce, al, at)?;
            }
            save(&model, &st, cfg, out)?;
        }
    }
    if let Some((ce, al, at)) = pending.take() {
        check(ce, al, at)?;
    }
    save(&model, &st, cfg, out)?;
    if !quiet {
        eprintln!();
    }
    Ok(st.log)
}

/// A model initialised from `seed`. The initial weights come from Burn's generator, which is
/// global to the device: seeding and drawing happen under one lock, and the lazily
/// initialised parameters are materialised inside it, so that concurrent runs (tests) cannot
/// interleave their draws.
pub fn seeded_init(cfg: &LmConfig, device: &Device, seed: u64) -> Result<Lm> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    Ok(cfg.init(device)?.materialize())
}

/// AdamW with the run's weight decay and clipping, skipping the steps `scale` drops.
fn optimizer(cfg: &TrainConfig, scale: &LossScale) -> ModuleOptimizer {
    scale.optimizer(
        cfg.weight_decay,
        Some(GradientClippingConfig::Norm(cfg.clip)),
    )
}

/// One optimizer step on batch `b`; returns the model and the (unread) CE and alignment losses.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: Lm,
    optim: &mut ModuleOptimizer,
    scale: &mut LossScale,
    cfg: &TrainConfig,
    b: &Batch,
    sparse_main: bool,
    lr: f64,
    device: &Device,
) -> Result<(Lm, Tensor<1>, Option<Tensor<1>>)> {
    let (x, y) = batch_tensors(b, device);
    let fwd = model.forward(
        &cfg.model,
        x,
        Run {
            sparse_main,
            precision: cfg.precision,
            ..Run::new(cfg.mode)
        },
    )?;
    let ce = cross_entropy(fwd.logits, y);
    let (loss, align) = match fwd.align {
        Some(a) => (ce.clone() + a.clone() * cfg.alpha, Some(a)),
        None => (ce.clone(), None),
    };
    let mut grads = GradientsParams::from_grads(scale.scaled(loss).backward(), &model);
    scale.unscale(&mut grads, &model);
    Ok((optim.step(lr, model, grads), ce, align))
}

/// Training speed of one configuration (`sparse-attn bench train`).
#[derive(Clone, Debug)]
pub struct StepTiming {
    pub mode: Mode,
    pub steps: usize,
    /// Wall time per step (the GPU is waited for at the end of the timed steps).
    pub step_s: f64,
    /// Host time per step to record the work (the timed steps' wall time until the last step
    /// is recorded, before the wait). Only a host time well below `step_s` tells that the GPU
    /// sets the pace: the host never got more than about a step ahead on the H200, so there it
    /// equals `step_s` either way; [`Self::gaps`] says where the GPU waits.
    pub host_s: f64,
    pub tokens_per_s: f64,
    /// GPU time per step in our kernels, by kernel (`file:entry`, seconds, dispatches).
    pub ours: Vec<(String, f64, u32)>,
    /// Every one of our dispatches in the profiled steps, in order (`Gpu::profile_end_events`).
    pub timeline: Vec<crate::gpu::ProfileEvent>,
}

impl StepTiming {
    pub fn ours_s(&self) -> f64 {
        self.ours.iter().map(|k| k.1).sum()
    }

    /// The time between consecutive dispatches of ours in the profiled steps, summed by the
    /// pair of kernels around it, per step, largest first: where the rest of the step (Burn's
    /// kernels, submissions, idle GPU) sits between ours.
    pub fn gaps(&self) -> Vec<(String, f64, u32)> {
        let mut out = crate::gpu::sum_by_label(self.timeline.windows(2).map(|w| {
            let key = format!("{} -> {}", w[0].kernel, w[1].kernel);
            (key, (w[1].start - w[0].end).max(0.0))
        }));
        let n = self.steps.max(1);
        for g in &mut out {
            g.1 /= n as f64;
            g.2 = g.2.div_ceil(n as u32);
        }
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }
}

/// Time `steps` training steps after `warmup` untimed ones (fresh model, random batches).
/// With timestamp queries, our kernels' GPU time is measured in a separate pass of the same
/// number of steps (timestamps around every one of our dispatches), so that the wall-clock
/// figure carries no profiling overhead.
pub fn measure_steps(
    cfg: &TrainConfig,
    corpus: &Corpus,
    device: &Device,
    gpu: &crate::Gpu,
    warmup: usize,
    steps: usize,
) -> Result<StepTiming> {
    cfg.validate()?;
    corpus.check_len(cfg.seq)?;
    cfg.model
        .check_fits(gpu.max_binding(), cfg.batch, cfg.seq)?;
    let device = device.clone().autodiff();
    let mut model = seeded_init(&cfg.model, &device, cfg.seed)?;
    let mut scale = LossScale::new(cfg.precision, &device.clone().inner());
    let mut optim = optimizer(cfg, &scale);
    let mut rng = Rng::new(cfg.seed);
    // Returns the wall time and the host's share: the time to record the steps, before
    // waiting for the GPU.
    // `warm`: SSA's stream alternates so that both branches' fused kernels are compiled before
    // the timed steps (a random draw left one branch's first compilation in them: 139.6 against
    // 126.7 ms a step, H200, batch 16, f16).
    let mut run = |model: Lm, n: usize, rng: &mut Rng, warm: bool| -> Result<(Lm, f64, f64)> {
        let mut model = model;
        let t = Instant::now();
        let mut last = None;
        for i in 0..n {
            let b = random_batch(rng, &corpus.train, cfg.batch, cfg.seq, 0.0);
            let main = if warm {
                i % 2 == 1
            } else {
                rng.uniform() < 0.5
            };
            let (m, ce, _) = train_step(
                model,
                &mut optim,
                &mut scale,
                cfg,
                &b,
                main,
                cfg.lr_at(i),
                &device,
            )?;
            model = m;
            last = Some(ce);
        }
        let host = t.elapsed().as_secs_f64();
        // Reading the last loss waits for every step's work.
        if let Some(ce) = last {
            let _ = ce.into_scalar::<f32>();
        }
        Ok((model, t.elapsed().as_secs_f64(), host))
    };
    (model, _, _) = run(model, warmup.max(2), &mut rng, true)?;
    let (m, wall, host) = run(model, steps.max(1), &mut rng, false)?;
    model = m;
    let (ours, timeline) = if gpu.has_timestamps() {
        gpu.profile_begin()?;
        let r = run(model, steps.max(1), &mut rng, false);
        let events = gpu.profile_end_events()?;
        r?;
        let n = steps.max(1);
        let per_step = crate::gpu::by_kernel(&events)
            .into_iter()
            .map(|(l, s, k)| (l, s / n as f64, k.div_ceil(n as u32)))
            .collect();
        (per_step, events)
    } else {
        (Vec::new(), Vec::new())
    };
    let step_s = wall / steps.max(1) as f64;
    Ok(StepTiming {
        mode: cfg.mode,
        steps,
        step_s,
        host_s: host / steps.max(1) as f64,
        timeline,
        tokens_per_s: (cfg.batch * cfg.seq) as f64 / step_s,
        ours,
    })
}

fn progress(cfg: &TrainConfig, e: &LogEntry, eta: f64) {
    let width = 30;
    let done = (e.step * width / cfg.steps).min(width);
    let bar: String = "#".repeat(done) + &"-".repeat(width - done);
    let mut line = format!(
        "\r[{bar}] {}/{} loss {:.4} ce {:.4}",
        e.step, cfg.steps, e.loss, e.ce
    );
    if let Some(a) = e.align {
        line += &format!(" align {a:.4}");
    }
    if let Some(v) = e.valid_ce {
        line += &format!(" valid {v:.4}");
    }
    if let Some(s) = e.loss_scale {
        line += &format!(" scale 2^{} dropped {}", s.scale.log2().round(), s.dropped);
    }
    line += &format!(
        " lr {:.2e} {:.0} tok/s ETA {}",
        e.lr,
        e.tokens_per_s,
        fmt_secs(eta)
    );
    let mut err = std::io::stderr();
    let _ = write!(err, "{line}\x1b[K");
    if e.valid_ce.is_some() {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// What a checkpoint holds besides the model and the configuration: the optimizer, the loss
/// scale, the data sampler, the step and the log (earlier invocations' entries, then this
/// one's).
struct RunState {
    optim: ModuleOptimizer,
    scale: LossScale,
    rng: Rng,
    step: usize,
    earlier_log: Vec<serde_json::Value>,
    log: Vec<LogEntry>,
}

fn save(model: &Lm, st: &RunState, cfg: &TrainConfig, out: &Path) -> Result<()> {
    let io = |p: &Path, e: String| Error::InvalidInput(format!("writing {}: {e}", p.display()));
    // This invocation's log continues what earlier ones wrote.
    let mut entries = st.earlier_log.to_vec();
    let last = entries.last().and_then(|e| e["step"].as_u64()).unwrap_or(0) as usize;
    entries.extend(st.log.iter().filter(|e| e.step > last).map(|e| {
        serde_json::json!({
            "step": e.step, "loss": e.loss, "ce": e.ce, "align": e.align, "lr": e.lr,
            "valid_ce": e.valid_ce, "tokens_per_s": e.tokens_per_s,
            "loss_scale": e.loss_scale.map(|s| s.scale),
            "dropped_steps": e.loss_scale.map(|s| s.dropped),
        })
    }));
    let mut state = serde_json::json!({
        "config": cfg.to_json(),
        "step": st.step,
        "rng": st.rng.state(),
        "log": entries,
    });
    if let Some(s) = st.scale.read()? {
        state["loss_scale"] = serde_json::json!([s.scale, s.good, s.dropped]);
    }
    checkpoint::commit(
        out,
        |set| {
            model
                .clone()
                .save_file(&set.model)
                .map_err(|e| io(&set.model, e.to_string()))?;
            st.optim
                .save(&set.optim)
                .map_err(|e| io(&set.optim, e.to_string()))
        },
        state,
    )
}

/// Load a trained model and its configuration from a checkpoint folder.
pub fn load(dir: &Path, device: &Device) -> Result<(Lm, TrainConfig)> {
    let (set, state) = checkpoint::find(dir)?
        .ok_or_else(|| Error::InvalidInput(format!("{} holds no checkpoint", dir.display())))?;
    let cfg = TrainConfig::from_json(&state["config"])?;
    let model = load_weights(cfg.model.init(device)?, &set.model)?;
    Ok((model, cfg))
}

/// The weights of a checkpoint file into `model`, read into memory first: Burn's file loader
/// reads tensors lazily, so a model loaded from a folder that was replaced or deleted later
/// (the next checkpoint, a cleaned-up run) failed when a tensor was first used.
fn load_weights(model: Lm, path: &Path) -> Result<Lm> {
    use burn::module::Module;
    let err = |e: String| Error::InvalidInput(format!("loading {}: {e}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let record = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| err(e.to_string()))?;
    model
        .try_load_record(record)
        .map_err(|e| err(e.to_string()))
}

/// The state (configuration, step, log) of the checkpoint in a run folder, verified.
pub fn load_state(dir: &Path) -> Result<serde_json::Value> {
    checkpoint::find(dir)?
        .map(|(_, state)| state)
        .ok_or_else(|| Error::InvalidInput(format!("{} holds no checkpoint", dir.display())))
}
