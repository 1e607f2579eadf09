//! NOSA's offloaded KV cache: k and v in host memory, a few GPU slots per (sequence, kv head),
//! only missing blocks copied each step. Nothing may be lost: offloaded decoding gives what
//! on-GPU sparse decoding gives with the same selection, step for step, while blocks are
//! evicted and loaded again thousands of times, and every slot holds exactly its block.

use crate::common;

use sparse_attn::decode::{OffloadCache, OffloadConfig, OffloadPath};
use sparse_attn::gpu::DType;
use sparse_attn::problem::{SENTINEL, SelectOptions};
use sparse_attn::reference::{Rng, compare};
use sparse_attn::{
    AttnOutput, CacheConfig, CacheShape, DecodeAttention, DecodeConfig, DecodeInputs, DecodeKeys,
    Gpu, GpuOptions, KvCache,
};

fn host_gpu() -> Option<Gpu> {
    common::gpu_with(&GpuOptions {
        host_memory: true,
        ..Default::default()
    })
}

fn outputs(gpu: &Gpu, dims: &[usize], lse: &[usize]) -> AttnOutput {
    AttnOutput {
        o: gpu
            .upload(dims, &vec![f32::NAN; dims.iter().product()])
            .unwrap(),
        lse: gpu
            .upload(lse, &vec![f32::NAN; lse.iter().product()])
            .unwrap(),
    }
}

/// FNV-1a over a block's f32 words.
fn checksum(x: &[f32]) -> u64 {
    x.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The in-place path: kernels read the host store.
#[test]
fn offloaded_decoding_loses_nothing() {
    let Some(gpu) = host_gpu() else { return };
    assert!(
        gpu.has_host_memory(),
        "this adapter has no MAPPABLE_PRIMARY_BUFFERS: the in-place path cannot be tested"
    );
    loses_nothing(&gpu, OffloadPath::InPlace, 0);
}

/// The in-place path with 4 slots beyond the selection: the freed slots are handed out least
/// recently used first, so recent blocks survive in the spare slots and come back as hits.
#[test]
fn offloaded_decoding_with_spare_slots_loses_nothing() {
    let Some(gpu) = host_gpu() else { return };
    loses_nothing(&gpu, OffloadPath::InPlace, 4);
}

/// The staged path, on a device opened without host-memory tensors (as in the browser): the
/// host files the new tokens and writes the missing blocks each step.
#[test]
fn staged_offloaded_decoding_loses_nothing() {
    let Some(gpu) = common::gpu() else { return };
    assert!(!gpu.has_host_memory());
    loses_nothing(&gpu, OffloadPath::Staged, 0);
}

/// The diff kernel's slot policy, on the host (shaders/offload.wgsl): the last slot (the tail)
/// holds the block being filled and takes only the rows of it that it lacks; of the others,
/// slots whose block is selected keep it, and each other selected block takes a freed slot,
/// empty slots first, then the longest unselected, then the lowest index. Returns (selected,
/// found on the GPU, loaded, tail rows copied). With `lru` false: the lowest freed index first
/// (the policy before, for comparison).
fn diff_model(
    map: &mut [u32],
    ages: &mut [u32],
    sel: &[u32],
    len: usize,
    blk: usize,
    lru: bool,
) -> (u64, u64, u64, u64) {
    const OLDEST: u32 = u32::MAX - 1;
    let tail = map.len() - 1;
    let cur = if len > 0 {
        ((len - 1) / blk) as u32
    } else {
        SENTINEL
    };
    let nb = len.div_ceil(blk) as u32;
    let sel: Vec<u32> = sel
        .iter()
        .map(|&b| if b < nb { b } else { SENTINEL })
        .collect();
    let mut slot_of = vec![SENTINEL; sel.len()];
    let mut kept = vec![false; tail];
    let mut age = vec![0u32; tail];
    for s in 0..tail {
        let b = map[s];
        let whole = b < nb && b != cur;
        for (j, &x) in sel.iter().enumerate() {
            if whole && x == b {
                kept[s] = true;
                slot_of[j] = s as u32;
            }
        }
        age[s] = if whole {
            ages[s].min(OLDEST - 1)
        } else {
            OLDEST
        };
    }
    let mut order: Vec<usize> = (0..tail).filter(|&s| !kept[s]).collect();
    if lru {
        order.sort_by_key(|&s| (std::cmp::Reverse(age[s]), s));
    }
    let (mut selected, mut hits, mut loaded) = (0, 0, 0);
    for (j, &b) in sel.iter().enumerate() {
        if b == SENTINEL {
            continue;
        }
        selected += 1;
        if b == cur {
            hits += (map[tail] == cur) as u64;
            continue;
        }
        if slot_of[j] != SENTINEL {
            hits += 1;
            continue;
        }
        let s = order[loaded as usize];
        kept[s] = true;
        slot_of[j] = s as u32;
        map[s] = b;
        loaded += 1;
    }
    for (s, a) in ages[..tail].iter_mut().enumerate() {
        *a = if kept[s] {
            0
        } else if *a >= OLDEST - 1 {
            *a
        } else {
            *a + 1
        };
    }
    let mut rows = 0;
    if len > 0 {
        let base = cur as usize * blk;
        let from = match map[tail] == cur {
            true => base + (ages[tail] as usize).min(len - base),
            false => base,
        };
        rows = (len - from) as u64;
        map[tail] = cur;
        ages[tail] = (len - base) as u32;
    }
    (selected, hits, loaded, rows)
}

/// 700 single-token steps of two sequences (prompts of different lengths) over an offloaded
/// cache with the fewest slots the selection allows (NOSA: blocks of 16, k = 6) plus `spare`,
/// against the same steps over an on-GPU cache: the selections agree bit for bit, O and LSE to
/// float tolerance, every step, and the slot map is the policy's (`diff_model`) every step. Every 100 steps, every slot's rows equal the host rows of the block
/// the map names (checksums per block), and the counters show blocks evicted and loaded
/// again many times.
fn loses_nothing(gpu: &Gpu, path: OffloadPath, spare: usize) {
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    let (b, hq, hkv, d) = (2usize, 4usize, 2usize, 32usize);
    let steps = 700;
    let prompts = [40u32, 97];
    let cap = (97 + steps + 16usize).next_multiple_of(16);
    let opts = SelectOptions::nosa_budget(16, 6, 1, 1, 2).unwrap();
    let cs = CacheShape {
        batch: b,
        heads_kv: hkv,
        capacity: cap,
        head_dim: d,
    };
    let config = OffloadConfig::new(DType::F32, opts, opts.k + spare).path(path);
    let nslot = config.slots;
    // Host models of the slot policy (LRU) and of lowest-slot-first, for comparison: maps, ages
    // and counters (selected, hits, loaded).
    let fresh = (
        vec![SENTINEL; b * hkv * nslot],
        vec![0u32; b * hkv * nslot],
        (0u64, 0u64, 0u64, 0u64),
    );
    let mut models = [fresh.clone(), fresh];
    let mut off = OffloadCache::new(gpu, cs, &config).unwrap();
    assert_eq!(off.path(), path);
    let mut on = KvCache::new(
        gpu,
        cs,
        &CacheConfig::new(DType::F32).bias(true).select(Some(opts)),
    )
    .unwrap();
    let step = cs.step(hq, 1);
    let keys = DecodeKeys::Sparse {
        block: opts.block,
        nsel: opts.k,
    };
    let att_off = DecodeAttention::new(gpu, step, &off.attention_config()).unwrap();
    let att_on = DecodeAttention::new(gpu, step, &DecodeConfig::new(keys).bias(true)).unwrap();

    // Prompts, ragged, into both.
    let n = 97;
    let kp = gpu
        .upload(&[b, hkv, n, d], &rng.normal_vec(b * hkv * n * d, 1.0))
        .unwrap();
    let vp = gpu
        .upload(&[b, hkv, n, d], &rng.normal_vec(b * hkv * n * d, 1.0))
        .unwrap();
    let ep = gpu
        .upload(&[b, hkv, n], &rng.normal_vec(b * hkv * n, 1.0))
        .unwrap();
    let mut enc = gpu.encoder();
    off.append(gpu, &mut enc, &kp, &vp, Some(&ep), Some(&prompts))
        .unwrap();
    on.append(gpu, &mut enc, &kp, &vp, Some(&ep), Some(&prompts))
        .unwrap();
    gpu.queue().submit([enc.finish()]);

    let sel_on = gpu.empty(&step.sel_dims(opts.k), DType::U32).unwrap();
    for t in 0..steps {
        // A drifting query keeps the selection moving (blocks leave and come back).
        let k1 = gpu
            .upload(&[b, hkv, 1, d], &rng.normal_vec(b * hkv * d, 1.0))
            .unwrap();
        let v1 = gpu
            .upload(&[b, hkv, 1, d], &rng.normal_vec(b * hkv * d, 1.0))
            .unwrap();
        let e1 = gpu
            .upload(&[b, hkv, 1], &rng.normal_vec(b * hkv, 1.0))
            .unwrap();
        let q = gpu
            .upload(&step.q_dims(), &rng.normal_vec(b * hq * d, 2.0))
            .unwrap();
        let o_off = outputs(gpu, &step.q_dims(), &step.lse_dims());
        let o_on = outputs(gpu, &step.q_dims(), &step.lse_dims());
        let mut enc = gpu.encoder();
        off.append(gpu, &mut enc, &k1, &v1, Some(&e1), None)
            .unwrap();
        on.append(gpu, &mut enc, &k1, &v1, Some(&e1), None).unwrap();
        off.prepare(gpu, &mut enc, &q).unwrap();
        att_off
            .encode(gpu, &mut enc, &off.inputs(&q), &o_off)
            .unwrap();
        on.select(gpu, &mut enc, &q, &sel_on).unwrap();
        let x = DecodeInputs::new(&q, on.k(), on.v(), on.lens_tensor())
            .sel(Some(&sel_on))
            .bias(on.bias());
        att_on.encode(gpu, &mut enc, &x, &o_on).unwrap();
        gpu.queue().submit([enc.finish()]);
        let ctx = format!("step {t} (lengths {:?})", off.lens());
        let sel = gpu.read_u32(off.selection()).unwrap();
        assert_eq!(sel, gpu.read_u32(&sel_on).unwrap(), "selection ({ctx})");
        // The slots the kernel handed out are the policy's, step for step.
        for ((map, ages, st), lru) in models.iter_mut().zip([true, false]) {
            for u in 0..b * hkv {
                let (s0, k) = (u * nslot, opts.k);
                let (a, h, l, r) = diff_model(
                    &mut map[s0..s0 + nslot],
                    &mut ages[s0..s0 + nslot],
                    &sel[u * k..(u + 1) * k],
                    off.lens()[u / hkv] as usize,
                    opts.block,
                    lru,
                );
                *st = (st.0 + a, st.1 + h, st.2 + l, st.3 + r);
            }
        }
        assert_eq!(gpu.read_u32(off.map()).unwrap(), models[0].0, "map ({ctx})");
        for (what, a, w) in [("O", &o_off.o, &o_on.o), ("LSE", &o_off.lse, &o_on.lse)] {
            let e = compare(&gpu.read(a).unwrap(), &gpu.read(w).unwrap());
            assert!(e.within(1e-6), "{what} {e:?} ({ctx})");
        }
        if t % 100 == 99 || t == steps - 1 {
            // Every slot holds exactly the rows of the block its map entry names.
            let map = gpu.read_u32(off.map()).unwrap();
            let (sk, sv) = (
                gpu.read(off.slot_k()).unwrap(),
                gpu.read(off.slot_v()).unwrap(),
            );
            let (hk, hv) = off.read_store(gpu).unwrap();
            let rows = opts.block * d;
            let mut checked = 0;
            for u in 0..b * hkv {
                let len = off.lens()[u / hkv] as usize;
                for s in 0..nslot {
                    let m = map[u * nslot + s];
                    if m == SENTINEL {
                        continue;
                    }
                    let blk = m as usize;
                    // The tail holds the rows of the block being filled so far.
                    let n = match s == nslot - 1 {
                        true => {
                            assert_eq!(blk, (len - 1) / opts.block, "tail of unit {u} ({ctx})");
                            (len - blk * opts.block) * d
                        }
                        false => {
                            assert!(
                                (blk + 1) * opts.block <= len,
                                "slot {s} of unit {u} holds block {blk} past the complete ones \
                                 ({ctx})"
                            );
                            rows
                        }
                    };
                    let slot = (u * nslot + s) * rows;
                    let host = (u * cap + blk * opts.block) * d;
                    for (name, sx, hx) in [("k", &sk, &hk), ("v", &sv, &hv)] {
                        assert_eq!(
                            checksum(&sx[slot..slot + n]),
                            checksum(&hx[host..host + n]),
                            "{name} of block {blk} in slot {s} of unit {u} is stale ({ctx})"
                        );
                    }
                    checked += 1;
                }
            }
            assert!(checked > 0, "{ctx}");
        }
    }
    let st = off.stats(gpu).unwrap();
    eprintln!(
        "{st:?} hit rate {:.3} (lowest freed slot first: {:.3})",
        st.hit_rate(),
        models[1].2.1 as f64 / st.selected.max(1) as f64
    );
    assert_eq!(
        (st.selected, st.hits, st.loaded, st.tail_rows),
        models[0].2,
        "the counters are the policy's"
    );
    // Blocks came and went: far more loads than the slots could hold at once.
    let units = (b * hkv) as u64;
    // The tail takes one row a step (and a prompt's last block once).
    assert!(
        st.tail_rows >= units * steps as u64 && st.tail_rows < units * (steps + opts.block) as u64,
        "{st:?}"
    );
    assert!(st.loaded > 20 * units * config.slots as u64, "{st:?}");
    assert!(st.hits > 0 && st.hits < st.selected, "{st:?}");
}

/// A GPU budget below one step's selection is an error that names the minimum; host memory
/// missing (the browser) is an error that says what is needed.
#[test]
fn offload_budget_errors_name_the_minimum() {
    let Some(gpu) = host_gpu() else { return };
    let opts = SelectOptions::nosa_budget(16, 6, 1, 1, 2).unwrap();
    let cs = CacheShape {
        batch: 2,
        heads_kv: 2,
        capacity: 256,
        head_dim: 32,
    };
    let e = OffloadCache::new(&gpu, cs, &OffloadConfig::new(DType::F32, opts, 5))
        .unwrap_err()
        .to_string();
    assert!(e.contains("the minimum is 6 slots"), "{e}");
    let e = OffloadCache::new(
        &gpu,
        CacheShape {
            capacity: 250,
            ..cs
        },
        &OffloadConfig::new(DType::F32, opts, 6),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a multiple of the block size 16"), "{e}");
    // A host cache past what the device can map is an error, not a crash.
    let huge = CacheShape {
        batch: 64,
        heads_kv: 8,
        capacity: 1 << 20,
        head_dim: 128,
    };
    let e = OffloadCache::new(&gpu, huge, &OffloadConfig::new(DType::F32, opts, 6))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes"), "{e}");
    // Without host-memory tensors (the browser): the in-place path says what it needs, and
    // the automatic choice stages the copies.
    let Some(plain) = common::gpu() else { return };
    let config = OffloadConfig::new(DType::F32, opts, 6);
    let e = OffloadCache::new(&plain, cs, &config.path(OffloadPath::InPlace))
        .unwrap_err()
        .to_string();
    assert!(e.contains("MAPPABLE_PRIMARY_BUFFERS"), "{e}");
    let off = OffloadCache::new(&plain, cs, &config).unwrap();
    assert_eq!(off.path(), OffloadPath::Staged);
    // The staged store is the host's own memory: a store past it fails cleanly too.
    let e = OffloadCache::new(&plain, huge, &config)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes"), "{e}");
}
