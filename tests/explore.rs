//! The browser demo's computation (`explore`), natively, against the f64 references: the same
//! numbers the page shows must follow from the definitions.

use crate::common;

use sparse_attn::explore::{ExploreConfig, explore, inputs};
use sparse_attn::reference::{self, Rng};
use sparse_attn::{AttnOptions, Error};

#[test]
fn explore_matches_the_references() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    let cases = [
        r#"{"seq": 300, "heads": 4, "kv_heads": 2, "head_dim": 32, "block": 16, "topk": 5,
            "n_init": 1, "n_local": 1, "head": 3, "needles": 3, "locality": 1.5}"#,
        r#"{"seq": 130, "heads": 2, "kv_heads": 1, "head_dim": 64, "block": 32, "topk": 2,
            "n_init": 0, "n_local": 0, "scoring": "moba", "inputs": "random"}"#,
    ];
    for (i, json) in cases.iter().enumerate() {
        let mut cfg = ExploreConfig::from_json(json).unwrap();
        cfg.seed = seed.wrapping_add(i as u64);
        let r = pollster::block_on(explore(&gpu, &cfg, true)).unwrap();
        let shape = cfg.shape();
        let (q, k, v) = inputs(&cfg);
        let sel = reference::select::select(&shape, &cfg.select_options(), &q, &k).unwrap();
        let m = reference::metrics::metrics(
            &shape,
            &cfg.select_options().sparse(),
            &q,
            &k,
            &sel.indices,
            cfg.topk,
        )
        .unwrap();
        let full =
            reference::attention::forward(&shape, &AttnOptions::causal(true), &q, &k, &v).unwrap();
        let sparse_opts = cfg.select_options().sparse();
        let sp = reference::sparse::forward(
            &shape,
            &sparse_opts,
            &q,
            &k,
            &v,
            &sel.indices,
            cfg.topk,
            None,
        )
        .unwrap();
        let ctx = format!("case {i}: {cfg:?}");
        // Selections may differ only on near-ties (tested in tests/select.rs); these random
        // inputs have none at this size, so the selection itself must agree.
        let (sq, nb, g) = (cfg.seq, r.blocks, shape.group());
        let kv = cfg.head / g;
        assert_eq!(
            r.selection,
            sel.indices[kv * sq * cfg.topk..(kv + 1) * sq * cfg.topk],
            "{ctx}"
        );
        let want_err = common::rel_l2(&sp.o, &full.o);
        assert!(
            (r.output_error - want_err).abs() <= 1e-3 * want_err.max(0.01),
            "output error {} vs {want_err} ({ctx})",
            r.output_error
        );
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        assert!((r.mean_sparsity - mean(&m.sparsity)).abs() < 1e-4, "{ctx}");
        assert!((r.mean_entropy - mean(&m.entropy)).abs() < 1e-3, "{ctx}");
        let h = cfg.head;
        for (got, want) in r
            .block_mass
            .iter()
            .zip(&m.block_mass[h * sq * nb..(h + 1) * sq * nb])
        {
            assert!((*got as f64 - want).abs() < 1e-4, "block mass ({ctx})");
        }
        for (got, want) in r.sparsity.iter().zip(&m.sparsity[h * sq..(h + 1) * sq]) {
            assert!((*got as f64 - want).abs() < 1e-4, "sparsity strip ({ctx})");
        }
        assert!(r.kept_blocks > 0.0 && r.kept_blocks <= 1.0);
        if gpu.has_timestamps() {
            for t in [r.full_ms, r.select_ms, r.sparse_ms] {
                assert!(t.is_some_and(|t| t > 0.0), "{ctx}: {t:?}");
            }
        }
        let j = r.to_json();
        assert_eq!(j["selection"].as_array().unwrap().len(), sq * cfg.topk);
        assert_eq!(j["block_mass"].as_array().unwrap().len(), sq * nb);
    }
}

#[test]
fn explore_config_errors_are_clear() {
    let err = |json: &str| ExploreConfig::from_json(json).unwrap_err().to_string();
    assert!(err("[1]").contains("JSON object"));
    assert!(err(r#"{"seq": -3}"#).contains("`seq` must be"));
    assert!(err(r#"{"scoring": "dense"}"#).contains("scoring must be"));
    assert!(err(r#"{"colour": 1}"#).contains("unknown field `colour`"));
    assert!(err(r#"{"locality": "high"}"#).contains("`locality` must be a number"));
    // Values of the right type that the demo cannot take: refused by the parser itself.
    let bad = |json: &str| ExploreConfig::from_json(json).unwrap_err();
    assert!(matches!(bad(r#"{"seq": 0}"#), Error::InvalidInput(_)));
    assert!(bad(r#"{"head": 4}"#).to_string().contains("out of range"));
    assert!(
        bad(r#"{"needles": 100}"#)
            .to_string()
            .contains("must lie in")
    );
    assert!(bad(r#"{"topk": 40}"#).to_string().contains("larger than"));
    assert!(
        bad(r#"{"heads": 3, "kv_heads": 2}"#)
            .to_string()
            .contains("multiple")
    );
}

/// The device self-check the browser page also runs: every kernel family against the references.
#[test]
fn selfcheck_passes_on_this_device() {
    let Some(gpu) = common::gpu() else { return };
    let seed = Rng::fresh_seed();
    let checks = pollster::block_on(sparse_attn::selfcheck::selfcheck(&gpu, seed)).unwrap();
    assert!(checks.len() >= 15);
    for c in &checks {
        assert!(
            c.ok && c.error.is_finite(),
            "{} ({c:?}), seed {seed}",
            c.name
        );
    }
    let j = sparse_attn::selfcheck::to_json(&checks);
    assert_eq!(j["ok"], true);
}
