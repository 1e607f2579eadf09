//! Bad input gets an error that names the problem: never a panic, never a wrong answer.

use crate::common;

use sparse_attn::FullConfig;
use sparse_attn::reference::{self, Rng, compare};
use sparse_attn::{
    AttnOptions, AttnOutput, AttnShape, Error, FullAttention, GpuOptions, attention_forward,
};

fn msg<T: std::fmt::Debug>(r: sparse_attn::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn shape_errors_name_the_problem() {
    let Some(gpu) = common::gpu() else { return };
    let opts = AttnOptions::causal(false);
    let t = |shape: &[usize]| {
        gpu.upload(shape, &vec![0.5; shape.iter().product()])
            .unwrap()
    };

    // head_dim disagreement between q and k
    let e = msg(attention_forward(
        &gpu,
        &t(&[1, 2, 16, 32]),
        &t(&[1, 2, 16, 64]),
        &t(&[1, 2, 16, 64]),
        &opts,
    ));
    assert!(e.contains("disagree"), "{e}");
    // v differs from k
    let e = msg(attention_forward(
        &gpu,
        &t(&[1, 2, 16, 32]),
        &t(&[1, 2, 16, 32]),
        &t(&[1, 2, 15, 32]),
        &opts,
    ));
    assert!(e.contains("v has shape"), "{e}");
    // heads not a GQA multiple
    let e = msg(attention_forward(
        &gpu,
        &t(&[1, 3, 16, 32]),
        &t(&[1, 2, 16, 32]),
        &t(&[1, 2, 16, 32]),
        &opts,
    ));
    assert!(e.contains("not a multiple of heads_kv"), "{e}");
    // unsupported head dims
    for d in [24usize, 8, 512] {
        let e = msg(attention_forward(
            &gpu,
            &t(&[1, 1, 4, d]),
            &t(&[1, 1, 4, d]),
            &t(&[1, 1, 4, d]),
            &opts,
        ));
        assert!(
            e.contains(&format!("head_dim = {d} is not supported")),
            "{e}"
        );
    }
    // zero-length sequence
    let e = msg(attention_forward(
        &gpu,
        &t(&[1, 1, 0, 32]),
        &t(&[1, 1, 8, 32]),
        &t(&[1, 1, 8, 32]),
        &opts,
    ));
    assert!(e.contains("seq_q is 0"), "{e}");
    // 3-D tensors
    let e = msg(attention_forward(
        &gpu,
        &t(&[2, 16, 32]),
        &t(&[2, 16, 32]),
        &t(&[2, 16, 32]),
        &opts,
    ));
    assert!(e.contains("must be 4-D"), "{e}");
    // causal with more queries than keys
    let e = msg(attention_forward(
        &gpu,
        &t(&[1, 1, 9, 32]),
        &t(&[1, 1, 8, 32]),
        &t(&[1, 1, 8, 32]),
        &AttnOptions::causal(true),
    ));
    assert!(e.contains("seq_q = 9 > seq_k = 8"), "{e}");
    // bad scale
    let bad = AttnOptions {
        causal: false,
        scale: Some(f32::NAN),
    };
    let e = msg(attention_forward(
        &gpu,
        &t(&[1, 1, 8, 32]),
        &t(&[1, 1, 8, 32]),
        &t(&[1, 1, 8, 32]),
        &bad,
    ));
    assert!(e.contains("scale"), "{e}");
    // upload with the wrong number of elements
    let e = msg(gpu.upload(&[2, 3], &[1.0; 5]));
    assert!(e.contains("holds 6 elements but 5 were given"), "{e}");
    // an output that aliases an input
    let s = AttnShape::new(1, 1, 1, 8, 32);
    let att = FullAttention::new(&gpu, s, &FullConfig::new(opts)).unwrap();
    let q = t(&s.q_dims());
    let out = AttnOutput {
        o: q,
        lse: t(&s.lse_dims()),
    };
    let e = msg(att.forward_into(&gpu, &out.o, &t(&s.kv_dims()), &t(&s.kv_dims()), &out));
    assert!(e.contains("overlaps"), "{e}");
    // wrong output shape
    let bad_out = AttnOutput {
        o: t(&[1, 1, 8, 16]),
        lse: t(&s.lse_dims()),
    };
    let e = msg(att.forward_into(
        &gpu,
        &t(&s.q_dims()),
        &t(&s.kv_dims()),
        &t(&s.kv_dims()),
        &bad_out,
    ));
    assert!(e.contains("o has shape [1, 1, 8, 16]"), "{e}");
}

#[test]
fn reference_rejects_what_the_gpu_rejects() {
    let s = AttnShape::new(1, 3, 2, 8, 32);
    let e = reference::attention::forward(
        &s,
        &AttnOptions::default(),
        &[0.0; 768],
        &[0.0; 512],
        &[0.0; 512],
    );
    assert!(msg(e).contains("not a multiple"));
    let s = AttnShape::new(1, 2, 2, 8, 32);
    let e = reference::attention::forward(
        &s,
        &AttnOptions::default(),
        &[0.0; 10],
        &[0.0; 512],
        &[0.0; 512],
    );
    assert!(msg(e).contains("q has 10 elements"));
}

/// Tensors larger than the device's storage-binding limit are split across launches (by
/// (batch, kv-head) groups) and still give the reference answer.
#[test]
fn tensors_past_the_binding_limit_are_split() {
    let limit = 64 * 1024;
    let Some(gpu) = common::gpu_with(&GpuOptions {
        max_storage_binding: Some(limit),
        ..Default::default()
    }) else {
        return;
    };
    assert_eq!(gpu.max_binding(), limit);
    // q: 3 x 4 x 70 x 32 x 4 B = 107 KiB > 64 KiB; kv heads 2 -> groups of 2 query heads.
    let s = AttnShape {
        batch: 3,
        heads_q: 4,
        heads_kv: 2,
        seq_q: 70,
        seq_k: 70,
        head_dim: 32,
    };
    let opts = AttnOptions::causal(true);
    let att = FullAttention::new(&gpu, s, &FullConfig::new(opts)).unwrap();
    assert!(
        att.chunks() > 1,
        "expected a split, got {} chunk(s)",
        att.chunks()
    );
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let (q, k, v, d_o) = (
        rng.normal_vec(s.q_len(), 1.0),
        rng.normal_vec(s.kv_len(), 1.0),
        rng.normal_vec(s.kv_len(), 1.0),
        rng.normal_vec(s.q_len(), 1.0),
    );
    let up = |dims: &[usize], x: &[f32]| gpu.upload(dims, x).unwrap();
    let (tq, tk, tv) = (
        up(&s.q_dims(), &q),
        up(&s.kv_dims(), &k),
        up(&s.kv_dims(), &v),
    );
    let out = AttnOutput {
        o: up(&s.q_dims(), &vec![f32::NAN; s.q_len()]),
        lse: up(&s.lse_dims(), &vec![f32::NAN; s.lse_len()]),
    };
    att.forward_into(&gpu, &tq, &tk, &tv, &out).unwrap();
    let want = reference::attention::forward(&s, &opts, &q, &k, &v).unwrap();
    let e = compare(&gpu.read(&out.o).unwrap(), &want.o);
    assert!(e.within(2e-5), "O {e:?} seed {seed}");
    let grads = att
        .backward(&gpu, &tq, &tk, &tv, &out, &up(&s.q_dims(), &d_o))
        .unwrap();
    let want = reference::attention::backward(&s, &opts, &q, &k, &v, &d_o).unwrap();
    for (n, t, w) in [
        ("dQ", &grads.dq, &want.dq),
        ("dK", &grads.dk, &want.dk),
        ("dV", &grads.dv, &want.dv),
    ] {
        let e = compare(&gpu.read(t).unwrap(), w);
        assert!(e.within(2e-5), "{n} {e:?} seed {seed}");
    }

    // One (batch, kv-head) slice alone is larger than the limit: refused with a clear error.
    let big = AttnShape::new(1, 1, 1, 1000, 32); // 128 KB per head
    match FullAttention::new(&gpu, big, &FullConfig::new(opts)) {
        Err(Error::Unsupported(m)) => assert!(m.contains("more than this device can bind"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn pipelines_are_built_once() {
    let Some(gpu) = common::gpu() else { return };
    let s = AttnShape::new(1, 2, 1, 40, 64);
    let _a = FullAttention::new(&gpu, s, &FullConfig::new(AttnOptions::causal(true))).unwrap();
    let n = gpu.pipelines_built();
    assert!(n >= 4);
    // Another shape with the same head dim reuses every pipeline.
    let _b = FullAttention::new(
        &gpu,
        AttnShape::new(2, 4, 2, 99, 64),
        &FullConfig::new(AttnOptions::causal(false)),
    )
    .unwrap();
    assert_eq!(gpu.pipelines_built(), n);
}

/// A GPU error no error scope catches (here: a buffer larger than the device allows, made
/// outside the library's checked paths, as a driver's out-of-memory mid-run would be) fails the
/// next wait with its cause, once; the device stays usable after it.
#[test]
fn uncaptured_gpu_errors_fail_the_next_wait() {
    let Some(gpu) = common::gpu() else { return };
    gpu.wait().unwrap();
    let _bad = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("too large"),
        size: gpu.limits().max_buffer_size.saturating_add(4),
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let e = msg(gpu.wait());
    assert!(
        e.contains("a GPU command failed") && e.contains("too large"),
        "{e}"
    );
    gpu.wait().unwrap();
    let t = gpu.upload(&[3], &[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(gpu.read(&t).unwrap(), [1.0, 2.0, 3.0]);
}

/// Decoding: shapes, lengths, split sizes and inputs that do not match the op are errors that
/// say which, from the op and the reference alike.
#[test]
fn decoding_errors_name_the_problem() {
    use sparse_attn::reference::decode::{self as refdec, DecodeData};
    use sparse_attn::{DecodeAttention, DecodeConfig, DecodeInputs, DecodeKeys, DecodeShape};
    let Some(gpu) = common::gpu() else { return };
    let s = DecodeShape {
        batch: 2,
        heads_q: 4,
        heads_kv: 2,
        n_q: 1,
        capacity: 64,
        head_dim: 32,
    };
    let full = DecodeConfig::new(DecodeKeys::Full);
    let sp = DecodeConfig::new(DecodeKeys::Sparse { block: 16, nsel: 2 });
    for (shape, want) in [
        (
            DecodeShape { n_q: 65, ..s },
            "do not fit a cache of capacity 64",
        ),
        (DecodeShape { batch: 0, ..s }, "batch is 0"),
        (
            DecodeShape { heads_q: 3, ..s },
            "not a multiple of heads_kv",
        ),
        (DecodeShape { head_dim: 40, ..s }, "head_dim = 40"),
    ] {
        let e = msg(DecodeAttention::new(&gpu, shape, &full));
        assert!(e.contains(want), "{e}");
    }
    for split in [0, 1 << 20] {
        let e = msg(DecodeAttention::new(&gpu, s, &full.split_keys(Some(split))));
        assert!(
            e.contains(&format!("split_keys = {split}")) && e.contains("1 to"),
            "{e}"
        );
    }
    let bad_block = DecodeConfig::new(DecodeKeys::Sparse { block: 48, nsel: 2 });
    let e = msg(DecodeAttention::new(&gpu, s, &bad_block));
    assert!(e.contains("block size 48"), "{e}");
    let e = msg(DecodeAttention::new(
        &gpu,
        DecodeShape {
            heads_q: 66,
            heads_kv: 1,
            ..s
        },
        &full,
    ));
    assert!(e.contains("up to 32"), "{e}");

    let t = |dims: &[usize]| gpu.upload(dims, &vec![0.5; dims.iter().product()]).unwrap();
    let (q, kv) = (t(&s.q_dims()), t(&s.cache_dims()));
    let lens = gpu.upload_u32(&[2], &[10, 64]).unwrap();
    let sel = gpu.upload_u32(&s.sel_dims(2), &[0; 8]).unwrap();
    let bias = t(&s.bias_dims());
    let op = DecodeAttention::new(&gpu, s, &full).unwrap();
    let ops = DecodeAttention::new(&gpu, s, &sp).unwrap();
    let x = DecodeInputs::new(&q, &kv, &kv, &lens);
    let e = msg(op.forward(&gpu, &x.sel(Some(&sel))));
    assert!(e.contains("selection was given to full"), "{e}");
    let e = msg(ops.forward(&gpu, &x));
    assert!(e.contains("over a selection; none was given"), "{e}");
    let e = msg(op.forward(&gpu, &x.bias(Some(&bias))));
    assert!(e.contains("built without one"), "{e}");
    let short = t(&[2, 2, 63, 32]);
    let e = msg(op.forward(&gpu, &DecodeInputs::new(&q, &short, &kv, &lens)));
    assert!(e.contains("k has shape [2, 2, 63, 32]"), "{e}");
    let flens = t(&[2]);
    let e = msg(op.forward(&gpu, &DecodeInputs::new(&q, &kv, &kv, &flens)));
    assert!(e.contains("lens has shape [2] and dtype F32"), "{e}");

    // The reference checks the host-side lengths.
    let (hq, hk) = (vec![0.5; 2 * 4 * 32], vec![0.5; 2 * 2 * 64 * 32]);
    let data = |lens: &'static [u32]| DecodeData {
        q: &hq,
        k: &hk,
        v: &hk,
        lens,
        sel: None,
        bias: None,
    };
    let e = msg(refdec::forward(&s, &DecodeKeys::Full, None, &data(&[0, 3])));
    assert!(e.contains("sequence 0 has length 0"), "{e}");
    let e = msg(refdec::forward(
        &s,
        &DecodeKeys::Full,
        None,
        &data(&[3, 65]),
    ));
    assert!(e.contains("sequence 1 has length 65"), "{e}");
    let e = msg(refdec::forward(&s, &DecodeKeys::Full, None, &data(&[3])));
    assert!(
        e.contains("1 sequence lengths given for a batch of 2"),
        "{e}"
    );
}

/// Caches and layers built from options that contradict each other are errors that say which.
#[test]
fn decoding_caches_refuse_contradictory_options() {
    use sparse_attn::decode::{DecodeLayer, LayerConfig};
    use sparse_attn::gpu::DType;
    use sparse_attn::problem::SelectOptions;
    use sparse_attn::{CacheConfig, CacheShape, KvCache};
    let Some(gpu) = common::gpu() else { return };
    let cs = CacheShape {
        batch: 1,
        heads_kv: 2,
        capacity: 256,
        head_dim: 32,
    };
    let nosa = SelectOptions::nosa_budget(16, 6, 1, 1, 2).unwrap();
    // NOSA ranks blocks by the eviction score, which is the cache's bias.
    let e = msg(KvCache::new(
        &gpu,
        cs,
        &CacheConfig::new(DType::F32).select(Some(nosa)),
    ));
    assert!(e.contains("needs the bias"), "{e}");
    let acausal = SelectOptions {
        causal: false,
        ..SelectOptions::ssa()
    };
    let e = msg(KvCache::new(
        &gpu,
        cs,
        &CacheConfig::new(DType::F32).select(Some(acausal)),
    ));
    assert!(e.contains("causal"), "{e}");
    // A ring of recent keys serves the pooled state: it needs a selection, and more rows than
    // a pooling window (InfLLM-V2's 32 tokens here).
    let e = msg(KvCache::new(
        &gpu,
        cs,
        &CacheConfig::new(DType::F32).ring(Some(64)),
    ));
    assert!(e.contains("needs select"), "{e}");
    let ring = |r| {
        CacheConfig::new(DType::F32)
            .bias(true)
            .select(Some(nosa))
            .ring(Some(r))
    };
    for r in [32, 300] {
        let e = msg(KvCache::new(&gpu, cs, &ring(r)));
        assert!(e.contains(&format!("a ring of {r} rows")), "{e}");
    }
    assert!(KvCache::new(&gpu, cs, &ring(64)).is_ok());
    // An offloaded cache serves a selection; full attention reads the whole cache.
    let layer = LayerConfig {
        offload_slots: Some(8),
        ..LayerConfig::new(cs, 4, DType::F32)
    };
    let e = msg(DecodeLayer::new(&gpu, &layer).map(|_| ()));
    assert!(e.contains("not full attention"), "{e}");
    // It takes several tokens only as its prompt (its first step), then one at a time.
    let mut off = DecodeLayer::new(
        &gpu,
        &LayerConfig {
            select: Some(SelectOptions { evict: 0, ..nosa }),
            ..layer
        },
    )
    .unwrap();
    let step = |off: &mut DecodeLayer, n: usize| {
        let q = gpu.upload(&[1, 4, n, 32], &vec![0.5; 4 * n * 32]).unwrap();
        let kv = gpu.upload(&[1, 2, n, 32], &vec![0.5; 2 * n * 32]).unwrap();
        let o = gpu.empty(&[1, 4, n, 32], DType::F32).unwrap();
        let mut enc = gpu.encoder();
        let r = off.encode_step(&gpu, &mut enc, &q, &kv, &kv, None, &o);
        gpu.queue().submit([enc.finish()]);
        r
    };
    step(&mut off, 20).unwrap();
    step(&mut off, 1).unwrap();
    let e = msg(step(&mut off, 3));
    assert!(e.contains("3 were given after the prompt"), "{e}");
    // Appending past the capacity, or a count larger than the rows given.
    let mut c = KvCache::new(&gpu, cs, &CacheConfig::new(DType::F32)).unwrap();
    let k = gpu.upload(&[1, 2, 4, 32], &[0.5; 256]).unwrap();
    let mut enc = gpu.encoder();
    let e = msg(c.append(&gpu, &mut enc, &k, &k, None, Some(&[5])));
    assert!(e.contains("exceeds the 4 rows given"), "{e}");
    let e = msg(c.append(&gpu, &mut enc, &k, &k, None, Some(&[1, 1])));
    assert!(e.contains("2 counts given for a batch of 1"), "{e}");
    let q = gpu.upload(&[1, 4, 1, 32], &[0.5; 128]).unwrap();
    let sel = gpu.empty(&[1, 2, 1, 6], DType::U32).unwrap();
    let e = msg(c.select(&gpu, &mut enc, &q, &sel));
    assert!(e.contains("keeps no selection state"), "{e}");
}
