//! Dynamic loss scaling for f16 products ([`Precision::F16`]): the loss is multiplied by a
//! scale S before the backward pass so that small gradients survive f16's range inside the
//! products, and the parameters' (f32) gradients are divided by S before the optimizer.
//! PyTorch's `GradScaler` rule: S starts at 2^16, halves on a step whose gradients are not
//! finite, doubles after [`GROWTH_EVERY`] finite steps in a row.
//!
//! The state stays on the GPU so that the training loop never waits for it: a step whose
//! gradients are not finite is skipped there, not on the host (which would need a readback per
//! step): its gradients are zeroed and the optimizer of [`LossScale::optimizer`] keeps the
//! parameters and AdamW's moments as they were, as PyTorch's `GradScaler` skips
//! `optimizer.step()`. (Zero gradients alone still moved the weights by AdamW's momentum and
//! weight decay. In five seeds of f16 training the two that dropped a step, both near the peak
//! learning rate, stalled longest; skipping did not shorten the stalls: docs/RESULTS.md.)

use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::train::model::{Lm, Precision};

/// The scale a run starts with.
pub const INIT: f32 = 65536.0;
/// Finite steps in a row after which the scale doubles.
pub const GROWTH_EVERY: u32 = 2000;
/// The scale never grows past this (f16 gradients would overflow long before).
pub const MAX: f32 = 16_777_216.0;
/// Nor shrinks below this (a run whose loss itself is not finite stops on its own check).
pub const MIN: f32 = 1.0;

/// Where a run's loss scaling stands (see [`LossScale::read`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleState {
    pub scale: f32,
    /// Finite steps since the scale last changed.
    pub good: u32,
    /// Steps of the run whose gradients were not finite (applied as zero gradients).
    pub dropped: u32,
}

impl ScaleState {
    /// A run's start.
    pub const START: Self = Self {
        scale: INIT,
        good: 0,
        dropped: 0,
    };
}

/// The scale, the count of finite steps since it last changed and the count of dropped steps,
/// on the GPU; nothing in f32.
pub struct LossScale {
    state: Option<[Tensor<1>; 3]>,
    /// 1 if the last unscaled step is to be applied, 0 if dropped; read by the optimizer.
    apply: Flag,
}

/// The step-applies flag that [`LossScale::unscale`] sets and [`SkipAdamW`] reads.
type Flag = Arc<Mutex<Option<Tensor<1>>>>;

impl LossScale {
    /// Scaling for runs in `precision` (none for f32); `device` is the parameters' device
    /// without autodiff.
    pub fn new(precision: Precision, device: &Device) -> Self {
        Self::with_state(precision, device, ScaleState::START)
    }

    /// Scaling that continues from a saved state (see [`Self::read`]).
    pub fn with_state(precision: Precision, device: &Device, st: ScaleState) -> Self {
        let t = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v], [1]), device);
        Self {
            state: (precision == Precision::F16)
                .then(|| [t(st.scale), t(st.good as f32), t(st.dropped as f32)]),
            apply: Flag::default(),
        }
    }

    /// AdamW with decoupled weight decay `weight_decay` and gradient clipping `clip`; with
    /// scaling, one that skips the steps [`Self::unscale`] drops (parameters and moments
    /// unchanged), as PyTorch's `GradScaler` skips `optimizer.step()`.
    pub fn optimizer(
        &self,
        weight_decay: f32,
        clip: Option<GradientClippingConfig>,
    ) -> ModuleOptimizer {
        if self.state.is_none() {
            return AdamWConfig::new()
                .with_weight_decay(weight_decay)
                .with_grad_clipping(clip)
                .init();
        }
        let optim = ModuleOptimizer::from(SkipAdamW {
            inner: AdamWConfig::new().with_weight_decay(weight_decay).build(),
            apply: self.apply.clone(),
        });
        match clip {
            Some(c) => optim.with_grad_clipping(c.init()),
            None => optim,
        }
    }

    pub fn is_active(&self) -> bool {
        self.state.is_some()
    }

    /// `loss` times the scale (`loss` unchanged in f32).
    pub fn scaled(&self, loss: Tensor<1>) -> Tensor<1> {
        match &self.state {
            Some([s, ..]) => loss * Tensor::from_inner(s.clone()),
            None => loss,
        }
    }

    /// Divide `model`'s gradients in `grads` by the scale; if any is not finite, zero them all
    /// and halve the scale; after [`GROWTH_EVERY`] finite steps double it. No readback.
    pub fn unscale(&mut self, grads: &mut GradientsParams, model: &Lm) {
        let Some([scale, good, dropped]) = self.state.take() else {
            return;
        };
        let mut sums = Sums {
            grads,
            sums: Vec::new(),
        };
        model.visit(&mut sums);
        // The sum of a gradient is finite exactly when all of its elements are (f32 sums of
        // f16-ranged values cannot overflow).
        let ok = match sums.sums.is_empty() {
            true => scale.ones_like(),
            false => Tensor::cat(sums.sums, 0).is_finite().all().float(),
        };
        let factor = ok.clone() / scale.clone();
        model.visit(&mut Apply {
            grads,
            factor: factor.clone(),
        });
        *self.apply.lock().unwrap_or_else(|e| e.into_inner()) = Some(ok.clone());
        let good = (good + 1.0) * ok.clone();
        let grow = good.clone().greater_equal_elem(GROWTH_EVERY as f32).float();
        let dropped = dropped - ok.clone() + 1.0;
        let scale = (scale * (ok * 0.5 + 0.5) * (grow.clone() + 1.0)).clamp(MIN, MAX);
        self.state = Some([scale, good * (grow.neg() + 1.0), dropped]);
    }

    /// The state now (waits for the GPU); `None` in f32.
    pub fn read(&self) -> Result<Option<ScaleState>> {
        let Some([s, g, d]) = &self.state else {
            return Ok(None);
        };
        let v = |t: &Tensor<1>| -> Result<f32> {
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| Error::Gpu(format!("reading the loss scale: {e:?}")))
                .map(|v| v[0])
        };
        Ok(Some(ScaleState {
            scale: v(s)?,
            good: v(g)? as u32,
            dropped: v(d)? as u32,
        }))
    }
}

/// Each parameter's gradient summed to one value.
struct Sums<'a> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<1>>,
}

impl ModuleVisitor for Sums<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sums.push(g.sum());
        }
    }
}

/// Each parameter's gradient times `factor`; non-finite elements (of a dropped step) zeroed.
struct Apply<'a> {
    grads: &'a mut GradientsParams,
    factor: Tensor<1>,
}

impl ModuleVisitor for Apply<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            let g = g * self.factor.clone().reshape([1; D]);
            // inf x 0 is NaN in IEEE arithmetic; WGSL leaves non-finite results undefined.
            let bad = g.clone().is_finite().bool_not();
            self.grads.register::<D>(param.id, g.mask_fill(bad, 0.0));
        }
    }
}

/// AdamW whose step is undone on the GPU when the loss scale dropped it: the parameter and both
/// moments blend old and new by the flag (exact for a flag of 0 or 1: x * 1 + y * 0 = x for
/// finite y, and a dropped step's gradients are zeroed so every value is finite). The step
/// count still advances (it lives on the host), so the bias correction of later steps counts
/// one step more per dropped one. The state is AdamW's: checkpoints of either load into the
/// other. Cost on the H200 at batch 16 in f16: ~2.8 ms a step more at the optimizer (AdamW
/// written out with the flag folded in, in fewer tensor operations, cost the same).
#[derive(Clone)]
struct SkipAdamW {
    inner: AdamW,
    apply: Flag,
}

impl Optimizer for SkipAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let flag = self.apply.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(flag) = flag else {
            return self.inner.step(lr, tensor, grad, state);
        };
        let old = state.as_ref().map(|s| {
            let m = &s.momentum;
            (m.moment_1.clone(), m.moment_2.clone())
        });
        let (new, state) = self.inner.step(lr, tensor.clone(), grad, state);
        let on = flag.reshape([1; D]);
        let off = on.clone().neg() + 1.0;
        // `before`: None for the first step's moments (they start at zero).
        let blend = |before: Option<Tensor<D>>, after: Tensor<D>| match before {
            Some(b) => after * on.clone() + b * off.clone(),
            None => after * on.clone(),
        };
        let new = blend(Some(tensor), new);
        let state = state.map(|mut s| {
            let (m1, m2) = old.map_or((None, None), |(a, b)| (Some(a), Some(b)));
            s.momentum.moment_1 = blend(m1, s.momentum.moment_1);
            s.momentum.moment_2 = blend(m2, s.momentum.moment_2);
            s
        });
        (new, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Rng;

    fn bits<const D: usize>(t: &Tensor<D>) -> Vec<u32> {
        let v = t
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// SkipAdamW: with the flag at 1 it is AdamW to the bit; at 0 (a dropped step, zeroed
    /// gradients) the parameter and both moments come back unchanged, where AdamW moves the
    /// parameter.
    #[test]
    fn skip_adamw_is_adamw_or_leaves_everything() {
        let rt = match crate::train::Runtime::new(&Default::default()) {
            Ok(rt) => rt,
            Err(e) if std::env::var("SPARSE_ATTN_ALLOW_NO_GPU").as_deref() == Ok("1") => {
                eprintln!("skipping GPU test: {e}");
                return;
            }
            Err(e) => panic!("{e}\n(set SPARSE_ATTN_ALLOW_NO_GPU=1 to skip GPU tests)"),
        };
        let dev = rt.device.clone();
        let mut rng = Rng::new(3);
        let mut rand =
            || Tensor::<2>::from_data(TensorData::new(rng.normal_vec(15, 1.0), [3, 5]), &dev);
        let (p0, g1) = (rand(), rand());
        let zero = p0.zeros_like();
        let config = AdamWConfig::new().with_weight_decay(0.1);
        let adamw = config.build();
        let skip = SkipAdamW {
            inner: config.build(),
            apply: Flag::default(),
        };
        let set = |on: f32| {
            let t = Tensor::<1>::from_data(TensorData::new(vec![on], [1]), &dev);
            *skip.apply.lock().unwrap() = Some(t);
        };
        let moments = |s: &Option<AdamWState<2>>| {
            let m = &s.as_ref().unwrap().momentum;
            (bits(&m.moment_1), bits(&m.moment_2))
        };
        let lr = 1e-2;

        set(1.0);
        let (p1, s1) = skip.step(lr, p0.clone(), g1.clone(), None);
        let (q1, r1) = adamw.step(lr, p0.clone(), g1.clone(), None);
        assert_eq!(bits(&p1), bits(&q1));
        assert_eq!(moments(&s1), moments(&r1));

        set(0.0);
        let (p2, s2) = skip.step(lr, p1.clone(), zero.clone(), s1.clone());
        assert_eq!(bits(&p2), bits(&p1), "a dropped step leaves the parameter");
        assert_eq!(moments(&s2), moments(&s1), "and the moments");
        let (q2, _) = adamw.step(lr, q1.clone(), zero.clone(), r1.clone());
        assert_ne!(bits(&q2), bits(&q1), "AdamW alone moves it");

        // A dropped first step: the parameter stays, the moments start at zero.
        let (p, s) = skip.step(lr, p0.clone(), zero.clone(), None);
        assert_eq!(bits(&p), bits(&p0));
        let z = bits(&zero);
        assert_eq!(moments(&s), (z.clone(), z));
    }
}
