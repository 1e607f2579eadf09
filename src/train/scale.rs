//! Dynamic loss scaling for f16 products ([`Precision::F16`]): the loss is multiplied by a
//! scale S before the backward pass so that small gradients survive f16's range inside the
//! products, and the parameters' (f32) gradients are divided by S before the optimizer.
//! PyTorch's `GradScaler` rule: S starts at 2^16, halves on a step whose gradients are not
//! finite, doubles after [`GROWTH_EVERY`] finite steps in a row.
//!
//! The state stays on the GPU so that the training loop never waits for it: a step whose
//! gradients are not finite gets zero gradients (AdamW then moves the weights by its momentum
//! and weight decay only) instead of being skipped on the host, which would need a readback
//! per step.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
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
}

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
