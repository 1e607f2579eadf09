//! The `Autodiff` side of our Burn ops: the forward ops record what their backward needs, and
//! the backward structs run our backward kernels (dQ, dK, dV; the alignment loss's own
//! gradients scaled by the upstream one). Selection and metrics are not differentiable.

use burn::backend::AutodiffBackend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::Shape;

use crate::train::generate::DecodeCfg;
use crate::train::ops::{AttnBackend, FullCfg, MetricsCfg, SparseCfg};

/// Register the gradients of q, k, v for the parents that need them.
macro_rules! register3 {
    ($b:ty, $parents:expr, $grads:expr, $g:expr) => {{
        let [nq, nk, nv] = $parents;
        let (dq, dk, dv) = $g;
        for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let Some(n) = node {
                $grads.register::<$b>(n.id, g);
            }
        }
    }};
}

#[derive(Debug)]
struct FullBackward;

impl<B: AttnBackend> Backward<B, 3> for FullBackward {
    /// q, k, v, o, lse, options.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FullCfg,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<B>(&ops.node);
        let (q, k, v, o, lse, cfg) = ops.state;
        register3!(
            B,
            ops.parents,
            grads,
            B::sa_full_bwd(q, k, v, o, lse, d_o, cfg)
        );
    }
}

#[derive(Debug)]
struct SparseBackward;

impl<B: AttnBackend> Backward<B, 3> for SparseBackward {
    /// q, k, v, selection, o, lse, options.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        IntTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        SparseCfg,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<B>(&ops.node);
        let (q, k, v, sel, o, lse, cfg) = ops.state;
        register3!(
            B,
            ops.parents,
            grads,
            B::sa_sparse_bwd(q, k, v, sel, o, lse, d_o, cfg)
        );
    }
}

/// Register the gradients of q, k, v and the bias for the parents that need them.
macro_rules! register4 {
    ($b:ty, $parents:expr, $grads:expr, $g:expr) => {{
        let [nq, nk, nv, nb] = $parents;
        let (dq, dk, dv, db) = $g;
        for (node, g) in [(nq, dq), (nk, dk), (nv, dv), (nb, db)] {
            if let Some(n) = node {
                $grads.register::<$b>(n.id, g);
            }
        }
    }};
}

#[derive(Debug)]
struct FullBiasBackward;

impl<B: AttnBackend> Backward<B, 4> for FullBiasBackward {
    /// q, k, v, bias, o, lse, options.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FullCfg,
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<B>(&ops.node);
        let (q, k, v, bias, o, lse, cfg) = ops.state;
        register4!(
            B,
            ops.parents,
            grads,
            B::sa_full_bwd_bias(q, k, v, bias, o, lse, d_o, cfg)
        );
    }
}

#[derive(Debug)]
struct SparseBiasBackward;

impl<B: AttnBackend> Backward<B, 4> for SparseBiasBackward {
    /// q, k, v, selection, bias, o, lse, options.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        IntTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        SparseCfg,
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<B>(&ops.node);
        let (q, k, v, sel, bias, o, lse, cfg) = ops.state;
        register4!(
            B,
            ops.parents,
            grads,
            B::sa_sparse_bwd_bias(q, k, v, sel, bias, o, lse, d_o, cfg)
        );
    }
}

#[derive(Debug)]
struct AlignBackward;

impl<B: AttnBackend> Backward<B, 2> for AlignBackward {
    /// dL/dh_full, dL/dh_sparse (for an upstream gradient of 1).
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let (gf, gs) = ops.state;
        let rank = burn::backend::TensorMetadata::shape(&gf).num_dims();
        // The upstream gradient of a one-element loss, broadcast over the inputs.
        let g = B::float_reshape(g, Shape::from(vec![1; rank]));
        let [nf, ns] = ops.parents;
        if let Some(n) = nf {
            grads.register::<B>(n.id, B::float_mul(gf, g.clone()));
        }
        if let Some(n) = ns {
            grads.register::<B>(n.id, B::float_mul(gs, g));
        }
    }
}

impl<B: AttnBackend, C: CheckpointStrategy> AttnBackend for Autodiff<B, C> {
    fn sa_full_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (q, nq) = q.into_parts();
        let (k, nk) = k.into_parts();
        let (v, nv) = v.into_parts();
        let prep = FullBackward
            .prepare::<C>([nq, nk, nv])
            .compute_bound()
            .stateful();
        let (o, lse) = B::sa_full_fwd(q.clone(), k.clone(), v.clone(), cfg);
        let o = match prep {
            OpsKind::Tracked(p) => p.finish((q, k, v, o.clone(), lse.clone(), cfg), o),
            OpsKind::UnTracked(p) => p.finish(o),
        };
        (o, Self::from_inner(lse))
    }

    fn sa_full_bwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::sa_full_bwd(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            o.into_primitive(),
            lse.into_primitive(),
            d_o.into_primitive(),
            cfg,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }

    fn sa_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cfg: DecodeCfg,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::sa_decode(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            cfg,
        ))
    }

    fn sa_decode_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cfg: DecodeCfg,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::sa_decode_bias(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            bias.into_primitive(),
            cfg,
        ))
    }

    fn sa_select(q: FloatTensor<Self>, k: FloatTensor<Self>, cfg: SparseCfg) -> IntTensor<Self> {
        B::sa_select(q.into_primitive(), k.into_primitive(), cfg)
    }

    fn sa_select_nosa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        evict: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> IntTensor<Self> {
        B::sa_select_nosa(
            q.into_primitive(),
            k.into_primitive(),
            evict.into_primitive(),
            cfg,
        )
    }

    fn sa_full_fwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (q, nq) = q.into_parts();
        let (k, nk) = k.into_parts();
        let (v, nv) = v.into_parts();
        let (bias, nb) = bias.into_parts();
        let prep = FullBiasBackward
            .prepare::<C>([nq, nk, nv, nb])
            .compute_bound()
            .stateful();
        let (o, lse) = B::sa_full_fwd_bias(q.clone(), k.clone(), v.clone(), bias.clone(), cfg);
        let o = match prep {
            OpsKind::Tracked(p) => p.finish((q, k, v, bias, o.clone(), lse.clone(), cfg), o),
            OpsKind::UnTracked(p) => p.finish(o),
        };
        (o, Self::from_inner(lse))
    }

    fn sa_full_bwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: FullCfg,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (dq, dk, dv, db) = B::sa_full_bwd_bias(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            bias.into_primitive(),
            o.into_primitive(),
            lse.into_primitive(),
            d_o.into_primitive(),
            cfg,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
            Self::from_inner(db),
        )
    }

    fn sa_sparse_fwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        bias: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (q, nq) = q.into_parts();
        let (k, nk) = k.into_parts();
        let (v, nv) = v.into_parts();
        let (bias, nb) = bias.into_parts();
        let prep = SparseBiasBackward
            .prepare::<C>([nq, nk, nv, nb])
            .compute_bound()
            .stateful();
        let (o, lse) = B::sa_sparse_fwd_bias(
            q.clone(),
            k.clone(),
            v.clone(),
            sel.clone(),
            bias.clone(),
            cfg,
        );
        let o = match prep {
            OpsKind::Tracked(p) => p.finish((q, k, v, sel, bias, o.clone(), lse.clone(), cfg), o),
            OpsKind::UnTracked(p) => p.finish(o),
        };
        (o, Self::from_inner(lse))
    }

    fn sa_sparse_bwd_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        bias: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (dq, dk, dv, db) = B::sa_sparse_bwd_bias(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            sel,
            bias.into_primitive(),
            o.into_primitive(),
            lse.into_primitive(),
            d_o.into_primitive(),
            cfg,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
            Self::from_inner(db),
        )
    }

    fn sa_sparse_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        cfg: SparseCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (q, nq) = q.into_parts();
        let (k, nk) = k.into_parts();
        let (v, nv) = v.into_parts();
        let prep = SparseBackward
            .prepare::<C>([nq, nk, nv])
            .compute_bound()
            .stateful();
        let (o, lse) = B::sa_sparse_fwd(q.clone(), k.clone(), v.clone(), sel.clone(), cfg);
        let o = match prep {
            OpsKind::Tracked(p) => p.finish((q, k, v, sel, o.clone(), lse.clone(), cfg), o),
            OpsKind::UnTracked(p) => p.finish(o),
        };
        (o, Self::from_inner(lse))
    }

    fn sa_sparse_bwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        sel: IntTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        cfg: SparseCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::sa_sparse_bwd(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            sel,
            o.into_primitive(),
            lse.into_primitive(),
            d_o.into_primitive(),
            cfg,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }

    fn sa_metrics(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        sel: IntTensor<Self>,
        cfg: MetricsCfg,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (sp, en) = B::sa_metrics(q.into_primitive(), k.into_primitive(), sel, cfg);
        (Self::from_inner(sp), Self::from_inner(en))
    }

    fn sa_align(
        h_full: FloatTensor<Self>,
        h_sparse: FloatTensor<Self>,
        beta: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (hf, nf) = h_full.into_parts();
        let (hs, ns) = h_sparse.into_parts();
        let prep = AlignBackward
            .prepare::<C>([nf, ns])
            .compute_bound()
            .stateful();
        let (loss, gf, gs) = B::sa_align(hf, hs, beta);
        let loss = match prep {
            OpsKind::Tracked(p) => p.finish((gf.clone(), gs.clone()), loss),
            OpsKind::UnTracked(p) => p.finish(loss),
        };
        (loss, Self::from_inner(gf), Self::from_inner(gs))
    }
}
