//! Generation with a KV cache: a trained tiny model decoding one token at a time gives the
//! logits of its full forward over the same tokens, position by position, for full, sparse and
//! NOSA attention, with the cache on the GPU and offloaded; the sampler is greedy at
//! temperature 0, reproducible with a seed, and keeps to the top-p set.
#![cfg(feature = "train")]

use crate::common;

use burn::tensor::{Int, Tensor, TensorData};
use sparse_attn::GpuOptions;
use sparse_attn::reference::{Rng, compare};
use sparse_attn::train::data::Corpus;
use sparse_attn::train::generate::{Attention, Decoder, GenerateOptions, Sampler};
use sparse_attn::train::model::Run;
use sparse_attn::train::trainer::{Invocation, load};
use sparse_attn::train::{LmConfig, Mode, Runtime, TrainConfig, train};

fn runtime() -> Option<Runtime> {
    let opts = Runtime::gpu_options(&GpuOptions {
        host_memory: true,
        ..Default::default()
    });
    let gpu = common::gpu_with(&opts)?;
    Some(Runtime::from_gpu(std::sync::Arc::new(gpu)).expect("Burn shares our device"))
}

/// Like tests/train.rs's tiny model but with 16-wide heads at d_model 64 and two kv heads: with
/// train.rs's (d_model 32, one kv head) keys one position off changed full attention's logits
/// by only 1.3e-6, under this test's tolerance; here by 1.5e-5.
fn tiny(mode: Mode) -> TrainConfig {
    let nosa = mode.nosa();
    TrainConfig {
        model: LmConfig {
            vocab: 256,
            d_model: 64,
            layers: 2,
            heads_q: 4,
            heads_kv: 2,
            d_ff: 64,
            max_seq: 256,
            rope_theta: 10000.0,
            block: 16,
            topk: if nosa { 4 } else { 2 },
            scoring: if nosa {
                sparse_attn::Scoring::InfLlmV2
            } else {
                sparse_attn::Scoring::Ssa
            },
            n_init: nosa as usize,
            n_local: 0,
            k_query: nosa.then_some(1),
            gate: true,
            rms_eps: 1e-5,
        },
        mode,
        steps: 12,
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

fn corpus() -> Corpus {
    let text = "To be, or not to be, that is the question. All that glitters is not gold. ";
    Corpus::from_texts(&text.repeat(40), &text.repeat(4))
}

#[test]
fn decoding_gives_the_full_forward_logits() {
    let Some(rt) = runtime() else { return };
    // 84 tokens: six blocks of 16, more than either model's budget.
    let text: Vec<u32> =
        "All that glitters is not gold; to be, or not to be, that is the question \
                          whether tis"
            .bytes()
            .map(u32::from)
            .collect();
    let n = text.len();
    for mode in [Mode::Ssa, Mode::Nosa] {
        let dir =
            std::env::temp_dir().join(format!("sa-gen-{}-{}", mode.name(), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let quiet = Invocation {
            quiet: true,
            ..Invocation::default()
        };
        train(&tiny(mode), &corpus(), &rt.device, &dir, &quiet).unwrap();
        let (model, cfg) = load(&dir, &rt.device).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let mut runs = vec![
            (Attention::Full, Mode::Full, None),
            (Attention::Sparse, Mode::Sparse, None),
        ];
        if mode.nosa() {
            // NOSA's selection, on the GPU and offloaded with the fewest slots.
            runs = vec![
                (Attention::Full, Mode::Full, None),
                (Attention::Nosa, Mode::Nosa, None),
                (Attention::Nosa, Mode::Nosa, Some(cfg.model.topk)),
            ];
        }
        for (att, fwd_mode, slots) in runs {
            let ctx = format!(
                "{} model, {} attention, slots {slots:?}",
                mode.name(),
                att.name()
            );
            let ids: Vec<i64> = text.iter().map(|&t| t as i64).collect();
            let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &rt.device);
            let want = model
                .forward(&cfg.model, tokens, Run::new(fwd_mode))
                .unwrap()
                .logits
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            let opts = GenerateOptions {
                offload_slots: slots,
                ..GenerateOptions::new(att, n)
            };
            let mut dec = Decoder::new(&rt, model.clone(), &cfg.model, &opts).unwrap();
            let mut got = vec![];
            for &t in &text {
                let l = dec.step(&[t]).unwrap();
                got.extend(l.into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
            }
            let e = compare(&got, &want);
            eprintln!("{ctx}: {e:?}");
            // Observed ~7e-8 on lavapipe; keys one position off (a RoPE slip) give ~2e-5.
            assert!(e.within(2e-6), "{e:?} ({ctx})");
            if slots.is_some() {
                let st = dec.offload_stats().unwrap().unwrap();
                assert!(st.loaded > 0 && st.hits > 0, "{st:?} ({ctx})");
            }
            // The same tokens fed as a prompt (37, then 40 more in one call, then one at a
            // time): several tokens per layer step where the cache is on the GPU (causal among
            // themselves), one at a time offloaded; the same logits.
            let mut fed = Decoder::new(&rt, model.clone(), &cfg.model, &opts).unwrap();
            let mut got = vec![];
            for (a, b) in [(0, 37), (37, 77)] {
                let l = fed.feed(&text[a..b], b - a).unwrap();
                assert_eq!(l.dims(), [1, b - a, 256]);
                got.extend(l.into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
            }
            for &t in &text[77..] {
                let l = fed.step(&[t]).unwrap();
                got.extend(l.into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
            }
            let e = compare(&got, &want);
            eprintln!("{ctx}, fed as a prompt: {e:?}");
            assert!(e.within(2e-6), "{e:?} ({ctx}, fed as a prompt)");
            // A prompt through `prefill`: only the next token's logits come back (offloaded:
            // the whole prompt in one pass of the prefill kernels).
            let mut pre = Decoder::new(&rt, model.clone(), &cfg.model, &opts).unwrap();
            let l = pre.prefill(&text[..77], 77).unwrap();
            assert_eq!(l.dims(), [1, 256]);
            let l = l.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let e = compare(&l, &want[76 * 256..77 * 256]);
            assert!(e.within(2e-6), "{e:?} ({ctx}, prefill)");
            let e = fed.feed(&[1, 2], 3).unwrap_err().to_string();
            assert!(e.contains("2 tokens given for 1 sequences of 3"), "{e}");
            let e = dec.step(&[300]).unwrap_err().to_string();
            assert!(e.contains("outside the vocabulary of 256"), "{e}");
            let e = dec.step(&[1]).unwrap_err().to_string();
            assert!(e.contains("the sequences are full"), "{e}");
        }
        if !mode.nosa() {
            let e = Decoder::new(
                &rt,
                model.clone(),
                &cfg.model,
                &GenerateOptions::new(Attention::Nosa, 10),
            )
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains("eviction head"), "{e}");
            let e = Decoder::new(
                &rt,
                model.clone(),
                &cfg.model,
                &GenerateOptions::new(Attention::Full, 1000),
            )
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains("max_seq 256"), "{e}");
        }
    }
}

#[test]
fn the_sampler_is_greedy_cold_reproducible_and_keeps_to_top_p() {
    let Some(rt) = runtime() else { return };
    let mut rng = Rng::new(11);
    let (b, v) = (3, 50);
    let logits = rng.normal_vec(b * v, 3.0);
    let t = || Tensor::<2>::from_data(TensorData::new(logits.clone(), [b, v]), &rt.device);
    let argmax: Vec<u32> = logits
        .chunks(v)
        .map(|r| (0..v).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap() as u32)
        .collect();
    assert_eq!(
        Sampler::new(0.0, 1.0, 1).unwrap().sample(t()).unwrap(),
        argmax
    );
    // A tiny top-p keeps only the most likely token.
    assert_eq!(
        Sampler::new(1.0, 1e-6, 1).unwrap().sample(t()).unwrap(),
        argmax
    );
    let draw = |seed| {
        let mut s = Sampler::new(1.0, 0.9, seed).unwrap();
        (0..40)
            .flat_map(|_| s.sample(t()).unwrap())
            .collect::<Vec<u32>>()
    };
    let a = draw(5);
    assert_eq!(a, draw(5));
    assert_ne!(a, draw(6));
    // Every draw lies in its row's top-0.9 set (the head of the sorted softmax).
    for (i, &tok) in a.iter().enumerate() {
        let r = &logits[(i % b) * v..(i % b + 1) * v];
        let m = r.iter().cloned().fold(f32::MIN, f32::max);
        let mut p: Vec<(f64, usize)> = r
            .iter()
            .enumerate()
            .map(|(j, &x)| (((x - m) as f64).exp(), j))
            .collect();
        let z: f64 = p.iter().map(|x| x.0).sum();
        p.sort_by(|x, y| y.0.total_cmp(&x.0));
        let mut mass = 0.0;
        let mut set = vec![];
        for (q, j) in p {
            if mass >= 0.9 {
                break;
            }
            set.push(j as u32);
            mass += q / z;
        }
        assert!(
            set.contains(&tok),
            "row {}: {tok} outside the top-p set {set:?}",
            i % b
        );
    }
    for (t, p) in [(-1.0, 0.9), (f64::NAN, 0.9), (1.0, 0.0), (1.0, 1.5)] {
        assert!(Sampler::new(t, p, 1).is_err());
    }
}

/// A batch of prompts of different lengths: each sequence's logits at its generation steps, and
/// so its greedy continuation, equal the prompt's decoded alone, with the caches on the GPU and
/// offloaded (NOSA, the fewest slots); bad requests are errors that say what is wrong.
#[test]
fn ragged_prompts_generate_what_each_prompt_gets_alone() {
    let Some(rt) = runtime() else { return };
    let dir = std::env::temp_dir().join(format!("sa-gen-ragged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let quiet = Invocation {
        quiet: true,
        ..Invocation::default()
    };
    train(&tiny(Mode::Nosa), &corpus(), &rt.device, &dir, &quiet).unwrap();
    let (model, cfg) = load(&dir, &rt.device).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // Lengths within a block, across one and across two (blocks of 16).
    let texts = [
        "To be",
        "All that glitters is not",
        "whether tis nobler in the mind to suffer the",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| t.bytes().map(u32::from).collect())
        .collect();
    let views: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let (new, vocab) = (20, 256);
    let capacity = 44 + new;
    // Greedy, keeping every step's logits `[batch][vocab]` (the tiny model's continuations are
    // alike whatever the prompt; its logits are not).
    fn greedy(
        steps: &mut Vec<Vec<f32>>,
    ) -> impl FnMut(Tensor<2>) -> sparse_attn::Result<Vec<u32>> + '_ {
        move |l| {
            let l = l.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let picks = l.chunks(256).map(common::argmax).collect();
            steps.push(l);
            Ok(picks)
        }
    }
    for (att, slots) in [
        (Attention::Full, None),
        (Attention::Nosa, None),
        (Attention::Nosa, Some(cfg.model.topk)),
    ] {
        let ctx = format!("{} attention, slots {slots:?}", att.name());
        let opts = |batch| GenerateOptions {
            offload_slots: slots,
            batch,
            ..GenerateOptions::new(att, capacity)
        };
        let mut dec = Decoder::new(&rt, model.clone(), &cfg.model, &opts(3)).unwrap();
        let mut steps = vec![];
        let got = dec.generate_by(&views, new, greedy(&mut steps)).unwrap();
        assert_eq!(dec.position(), 44 + new - 1, "{ctx}");
        // The batch's steps start after the shortest prompt (5 tokens).
        assert_eq!(steps.len(), 44 + new - 5, "{ctx}");
        for (b, (p, g)) in views.iter().zip(&got).enumerate() {
            let mut alone = Decoder::new(&rt, model.clone(), &cfg.model, &opts(1)).unwrap();
            let mut mine = vec![];
            let want = alone.generate_by(&[p], new, greedy(&mut mine)).unwrap();
            assert_eq!(g, &want[0], "{ctx}: prompt of {}", p.len());
            // Sequence b's generation steps in the batch: from its prompt's end, `new` of them.
            let batched: Vec<f32> = steps[p.len() - 5..p.len() - 5 + new]
                .iter()
                .flat_map(|s| s[b * vocab..(b + 1) * vocab].to_vec())
                .collect();
            let e = compare(&batched, &mine.concat());
            assert!(e.within(2e-6), "{e:?} ({ctx}: prompt of {})", p.len());
        }
        // Bad requests.
        let mut dec = Decoder::new(&rt, model.clone(), &cfg.model, &opts(3)).unwrap();
        let mut greedy0 = Sampler::new(0.0, 1.0, 1).unwrap();
        let e = dec.generate(&views[..2], new, &mut greedy0).unwrap_err();
        assert!(
            e.to_string().contains("2 prompts given for a batch of 3"),
            "{e}"
        );
        let e = dec.generate(&[&[], views[1], views[2]], new, &mut greedy0);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("at least one token"), "{e}");
        let e = dec
            .generate(&views, 0, &mut greedy0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_new is 0"), "{e}");
        let e = dec.generate(&views, new + 2, &mut greedy0);
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains(&format!("need {} positions", capacity + 1)),
            "{e}"
        );
        assert_eq!(dec.position(), 0, "a refused request feeds nothing ({ctx})");
        let e = dec.generate_by(&views, 1, |_| Ok(vec![0])).unwrap_err();
        assert!(
            e.to_string().contains("1 tokens picked for a batch of 3"),
            "{e}"
        );
    }
}
