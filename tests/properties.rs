//! Property tests: random bytes against the file parsers (.npy, .safetensors, explore JSON,
//! checkpoint state), random shapes and options against the validation and the kernels. Every
//! case either works (and then matches the reference) or returns an error; none panics.

use crate::common;

use proptest::collection::vec;
use proptest::prelude::*;
use sparse_attn::explore::ExploreConfig;
use sparse_attn::npy::{self, NpyArray};
use sparse_attn::reference::{self, Rng, compare};
use sparse_attn::{AttnOptions, AttnShape, FullAttention, FullConfig, safetensors};

fn array(shape: Vec<usize>, seed: u64) -> NpyArray {
    let n = shape.iter().product();
    NpyArray {
        shape,
        data: Rng::new(seed).normal_vec(n, 1.0),
    }
}

/// Flip one byte and cut the tail: what a damaged file looks like.
fn damaged(mut bytes: Vec<u8>, at: usize, xor: u8, keep: usize) -> (Vec<u8>, Vec<u8>) {
    let n = bytes.len();
    let cut = bytes[..keep % (n + 1)].to_vec();
    if n > 0 {
        bytes[at % n] ^= xor.max(1);
    }
    (bytes, cut)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Failures are reported with their seed and minimal input; no files written.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn npy_takes_any_bytes(bytes in vec(any::<u8>(), 0..400)) {
        let _ = npy::parse(&bytes);
    }

    #[test]
    fn npy_round_trips_and_damage_is_an_error_or_a_valid_array(
        shape in vec(1usize..6, 0..4), seed: u64, at: usize, xor: u8, keep: usize,
    ) {
        let a = array(shape, seed);
        let bytes = npy::to_bytes(&a);
        prop_assert_eq!(npy::parse(&bytes).unwrap(), a);
        let (flipped, cut) = damaged(bytes, at, xor, keep);
        for b in [flipped, cut] {
            if let Ok(got) = npy::parse(&b) {
                prop_assert_eq!(got.shape.iter().product::<usize>(), got.data.len());
            }
        }
    }

    #[test]
    fn safetensors_takes_any_bytes(bytes in vec(any::<u8>(), 0..400), name in vec(any::<char>(), 0..6)) {
        let name: String = name.into_iter().collect();
        let _ = safetensors::names(&bytes);
        let _ = safetensors::parse(&bytes, None);
        let _ = safetensors::parse(&bytes, Some(&name));
    }

    #[test]
    fn safetensors_round_trips_and_damage_is_an_error_or_a_valid_array(
        qs in vec(1usize..5, 1..4), ks in vec(1usize..5, 1..3), seed: u64,
        at: usize, xor: u8, keep: usize,
    ) {
        let (q, k) = (array(qs, seed), array(ks, seed ^ 1));
        let bytes = safetensors::to_bytes(&[("q", &q), ("k", &k)]);
        prop_assert_eq!(safetensors::parse(&bytes, Some("q")).unwrap(), q);
        prop_assert_eq!(safetensors::parse(&bytes, Some("k")).unwrap(), k);
        let (flipped, cut) = damaged(bytes, at, xor, keep);
        for b in [flipped, cut] {
            for name in [None, Some("q"), Some("k")] {
                if let Ok(got) = safetensors::parse(&b, name) {
                    prop_assert_eq!(got.shape.iter().product::<usize>(), got.data.len());
                }
            }
        }
    }

    #[test]
    fn explore_config_takes_any_text(text in vec(any::<char>(), 0..80)) {
        let text: String = text.into_iter().collect();
        let _ = ExploreConfig::from_json(&text);
    }

    /// Known keys with values of every JSON kind: accepted configs are valid ones.
    #[test]
    fn explore_config_takes_any_values(
        fields in vec((0usize..14, 0usize..7, any::<i64>(), any::<f64>()), 0..8),
    ) {
        const KEYS: [&str; 14] = [
            "seq", "heads", "kv_heads", "head_dim", "block", "topk", "n_init", "n_local",
            "scoring", "seed", "head", "inputs", "needles", "locality",
        ];
        let mut obj = serde_json::Map::new();
        for (k, kind, i, f) in fields {
            let v = match kind {
                0 => serde_json::json!(i),
                1 => serde_json::json!(i.rem_euclid(300)),
                2 => serde_json::json!(f),
                3 => serde_json::json!("ssa"),
                4 => serde_json::json!("random"),
                5 => serde_json::json!(null),
                _ => serde_json::json!([i]),
            };
            obj.insert(KEYS[k].to_string(), v);
        }
        let text = serde_json::Value::Object(obj).to_string();
        if let Ok(cfg) = ExploreConfig::from_json(&text) {
            prop_assert!(cfg.validate().is_ok(), "{} accepted but invalid", text);
        }
    }

    /// Shapes and options: the problem's validation and the reference agree, and a valid
    /// problem's reference has finite outputs.
    #[test]
    fn validation_and_reference_agree(
        b in 0usize..3, hq in 0usize..5, hkv in 0usize..3, sq in 0usize..20, sk in 0usize..20,
        d in prop_oneof![Just(0usize), Just(8), Just(16), Just(24), Just(32), Just(272)],
        causal: bool, scale in prop_oneof![Just(None), Just(Some(f32::NAN)), Just(Some(-1.0f32)), Just(Some(0.3f32))],
    ) {
        let s = AttnShape { batch: b, heads_q: hq, heads_kv: hkv, seq_q: sq, seq_k: sk, head_dim: d };
        let o = AttnOptions { causal, scale };
        let valid = s.validate(&o).is_ok();
        let mut rng = Rng::new(7);
        let q = rng.normal_vec(s.q_len(), 1.0);
        let k = rng.normal_vec(s.kv_len(), 1.0);
        let v = rng.normal_vec(s.kv_len(), 1.0);
        match reference::attention::forward(&s, &o, &q, &k, &v) {
            Ok(f) => {
                prop_assert!(valid);
                prop_assert!(f.o.iter().all(|x| x.is_finite()));
            }
            Err(_) => prop_assert!(!valid),
        }
    }
}

/// Random problems on the GPU: every one the validation accepts runs and matches the
/// reference; every one it refuses is refused by the op too (with an error, no panic).
#[test]
fn random_problems_run_and_match_or_are_refused() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let mut ran = 0;
    for case in 0..60 {
        let pick = |rng: &mut Rng, xs: &[usize]| xs[(rng.next_u64() % xs.len() as u64) as usize];
        let s = AttnShape {
            // Mostly valid values, with a few that are not (0, a head_dim off the grid, heads
            // that do not divide).
            batch: pick(&mut rng, &[1, 1, 1, 2, 2, 0]),
            heads_q: pick(&mut rng, &[1, 2, 4, 4, 2, 3, 0]),
            heads_kv: pick(&mut rng, &[1, 1, 1, 2, 0]),
            seq_q: pick(&mut rng, &[1, 7, 33, 33, 64, 0]),
            seq_k: pick(&mut rng, &[64, 64, 33, 40, 7, 1, 0]),
            head_dim: pick(&mut rng, &[16, 32, 64, 16, 32, 64, 8, 40, 0]),
        };
        let o = AttnOptions::causal(rng.next_u64().is_multiple_of(2));
        let ctx = format!("case {case}, seed {seed}, {s:?}, {o:?}");
        let op = FullAttention::new(&gpu, s, &FullConfig::new(o));
        match (s.validate(&o), op) {
            (Ok(()), Ok(op)) => {
                let q = rng.normal_vec(s.q_len(), 1.0);
                let k = rng.normal_vec(s.kv_len(), 1.0);
                let v = rng.normal_vec(s.kv_len(), 1.0);
                let up = |dims: &[usize], x: &[f32]| gpu.upload(dims, x).unwrap();
                let (tq, tk, tv) = (
                    up(&s.q_dims(), &q),
                    up(&s.kv_dims(), &k),
                    up(&s.kv_dims(), &v),
                );
                let got = op.forward(&gpu, &tq, &tk, &tv).expect(&ctx);
                let want = reference::attention::forward(&s, &o, &q, &k, &v).expect(&ctx);
                let e = compare(&gpu.read(&got.o).unwrap(), &want.o);
                assert!(e.within(1e-4), "{ctx}: {e:?}");
                ran += 1;
            }
            (Err(_), Err(_)) => {}
            (Ok(()), Err(e)) => panic!("{ctx}: valid, but the op refused it: {e}"),
            (Err(e), Ok(_)) => panic!("{ctx}: invalid ({e}), but the op accepted it"),
        }
    }
    eprintln!("seed {seed}: {ran} of 60 random problems were valid and matched the reference");
}

#[cfg(feature = "train")]
mod checkpoint_state {
    use super::*;
    use sparse_attn::train::checkpoint::{ckpt_paths, find, verify};
    use sparse_attn::train::trainer::TrainConfig;

    fn run_dir() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("sparse-attn-prop-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("ckpt")).unwrap();
        d
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 128,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// A state.json of any content (and model/optim files of any content) is found,
        /// refused with an error, or verified; never a panic.
        #[test]
        fn checkpoint_state_takes_any_bytes(
            state in vec(any::<u8>(), 0..300), model in vec(any::<u8>(), 0..40),
        ) {
            let run = run_dir();
            let set = ckpt_paths(&run.join("ckpt"));
            std::fs::write(&set.state, &state).unwrap();
            std::fs::write(&set.model, &model).unwrap();
            std::fs::write(&set.optim, &model).unwrap();
            let _ = verify(&set);
            let _ = find(&run);
            let _ = std::fs::remove_dir_all(&run);
        }

        /// A recorded configuration with fields of any value: parsed into a valid one or refused.
        #[test]
        fn train_config_takes_any_values(
            fields in vec((0usize..12, any::<i64>(), any::<f64>(), 0usize..4), 0..10),
        ) {
            const KEYS: [&str; 12] = [
                "steps", "batch", "seq", "lr", "min_lr", "warmup", "clip", "alpha", "seed",
                "mode", "model", "passkey_rate",
            ];
            let mut obj = serde_json::Map::new();
            for (k, i, f, kind) in fields {
                let v = match kind {
                    0 => serde_json::json!(i),
                    1 => serde_json::json!(f),
                    2 => serde_json::json!("ssa"),
                    _ => serde_json::json!({"d_model": i}),
                };
                obj.insert(KEYS[k].to_string(), v);
            }
            let _ = TrainConfig::from_json(&serde_json::Value::Object(obj));
        }
    }
}
