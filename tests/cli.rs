//! The CLI as a user runs it.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sparse-attn"))
        .args(args)
        .output()
        .expect("run sparse-attn");
    // A crash (a signal: a segfault at exit, an abort) is never an answer, even to bad input.
    assert!(
        out.status.code().is_some(),
        "sparse-attn {args:?} was killed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn no_gpu_ok() -> bool {
    std::env::var("SPARSE_ATTN_ALLOW_NO_GPU").as_deref() == Ok("1")
}

#[test]
fn info_lists_adapter_features_limits_and_variants() {
    let (ok, out, err) = run(&["info"]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "info failed: {err}");
    for needle in [
        "adapter:",
        "present",
        "shader-f16",
        "max_storage_buffer_binding_size",
        "kernel variants:",
        "f32-portable (head_dim 128)",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
    let (ok, out, _) = run(&["info", "--json"]);
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(&out).expect("info --json is JSON");
    assert!(j["adapter"].is_string() && j["limits"]["max_buffer_size"].is_u64());
}

#[test]
fn demo_checks_against_the_reference_and_passes() {
    let (ok, out, err) = run(&["demo", "--seq", "96", "--heads", "4", "--kv-heads", "2"]);
    if no_gpu_ok() && out.contains("CPU-only") {
        return;
    }
    assert!(ok, "demo failed:\n{out}\n{err}");
    for needle in [
        "device:",
        "relative L2",
        "full backward dK",
        "sparse forward O",
        "kernel variants:",
        "full: forward",
        "TFLOP/s",
        "block-sparse (SSA selection",
        "demo: PASS",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sparse-attn"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run sparse-attn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_without_a_gpu_explains_and_runs_the_cpu_reference() {
    // No adapter at all (wgpu asked for a backend this machine lacks): the CPU reference runs,
    // at the shape asked for.
    let (ok, out, err) = run_env(
        &["demo", "--seq", "96", "--heads", "4", "--kv-heads", "2"],
        &[("WGPU_BACKEND", "metal")],
    );
    assert!(ok, "demo must not fail without a GPU:\n{out}\n{err}");
    assert!(out.contains("no GPU adapter found"), "{out}");
    assert!(out.contains("mesa-vulkan-drivers"), "{out}");
    assert!(out.contains("CPU reference forward"), "{out}");
    assert!(out.contains("4 query heads / 2 kv heads, seq 96"), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    // A filter that matches none of the adapters there are is an error, not a CPU demo.
    if !no_gpu_ok() {
        let (ok, out, err) = run(&["--adapter", "no-such-adapter-xyz", "demo"]);
        assert!(!ok, "{out}");
        assert!(err.contains("matching `no-such-adapter-xyz`"), "{err}");
    }
}

/// Bad numbers and output paths are refused before any work, and leave no file behind.
#[test]
fn bad_numbers_and_paths_fail_before_the_work() {
    let dir = temp_dir("hostile");
    // map: only PNG, checked first; no empty file left.
    let jpg = dir.join("x.jpg");
    let (ok, _, err) = run(&["map", "--seq", "64", "--out", jpg.to_str().unwrap()]);
    assert!(!ok && err.contains(".png") && !jpg.exists(), "{err}");
    let deep = dir.join("no/such/x.png");
    let (ok, _, err) = run(&["map", "--seq", "64", "--out", deep.to_str().unwrap()]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    // map: non-finite activations are named, not drawn.
    let mut q = sparse_attn::npy::NpyArray {
        shape: vec![40, 32],
        data: vec![0.5; 40 * 32],
    };
    q.data[77] = f32::NAN;
    q.data[78] = f32::INFINITY;
    let k = sparse_attn::npy::NpyArray {
        shape: vec![40, 32],
        data: vec![0.5; 40 * 32],
    };
    let (qp, kp) = (dir.join("q.npy"), dir.join("k.npy"));
    std::fs::write(&qp, sparse_attn::npy::to_bytes(&q)).unwrap();
    std::fs::write(&kp, sparse_attn::npy::to_bytes(&k)).unwrap();
    let png = dir.join("m.png");
    // map over the q.npy and k.npy written just before.
    let map_files = || {
        let (q, k, out) = (
            qp.to_str().unwrap(),
            kp.to_str().unwrap(),
            png.to_str().unwrap(),
        );
        run(&["map", "--q", q, "--k", k, "--topk", "2", "--out", out])
    };
    let (ok, _, err) = map_files();
    assert!(
        !ok && err.contains("2 values that are NaN or infinite"),
        "{err}"
    );
    assert!(!png.exists());
    // Finite activations whose attention overflows f32 (|q·k| near 1e30 and beyond).
    let huge = sparse_attn::npy::NpyArray {
        shape: vec![40, 32],
        data: vec![1e30; 40 * 32],
    };
    std::fs::write(&qp, sparse_attn::npy::to_bytes(&huge)).unwrap();
    std::fs::write(&kp, sparse_attn::npy::to_bytes(&huge)).unwrap();
    let (ok, _, err) = map_files();
    if !no_gpu_ok() {
        assert!(!ok && err.contains("overflows f32"), "{err}");
        assert!(!png.exists());
    }
    // Random inputs too large to make on the host: refused before any allocation.
    let (ok, _, err) = run(&[
        "map",
        "--seq",
        "1000000",
        "--heads",
        "4096",
        "--kv-heads",
        "1",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("too large to make on the host"),
        "{err}"
    );
    let (ok, _, err) = run(&["explore", "--config", r#"{"heads": 100000, "kv_heads": 1}"#]);
    assert!(!ok && err.contains("outside the demo's range"), "{err}");
    // bench: non-finite or zero times, and an output folder that cannot exist.
    for t in ["nan", "inf", "0", "-1"] {
        let flag = format!("--target-seconds={t}");
        let (ok, _, err) = run(&["bench", "full", &flag]);
        assert!(!ok && err.contains("finite number > 0"), "{t}: {err}");
    }
    let jsonl = dir.join("no/such/r.jsonl");
    let (ok, _, err) = run(&["bench", "sparse", "--json-out", jsonl.to_str().unwrap()]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    // Shapes whose sizes overflow are refused before anything is allocated.
    let (ok, _, err) = run(&[
        "demo",
        "--seq",
        "18446744073709551615",
        "--heads",
        "65536",
        "--kv-heads",
        "1",
    ]);
    assert!(
        !ok && err.contains("more bytes than this machine can address"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Large but representable: a clear error from the device's limits, no abort.
    if !no_gpu_ok() {
        let (ok, _, err) = run(&[
            "demo",
            "--seq",
            "10000000",
            "--heads",
            "64",
            "--kv-heads",
            "1",
        ]);
        assert!(!ok && err.starts_with("error: "), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench decode`: the four ways of decoding on a tiny synthetic model, the offloaded ones by
/// both host -> GPU paths (same selection, so the same hit rate and copies), one JSON object;
/// bad flags fail before the work.
#[test]
fn bench_decode_runs_every_mode_and_path() {
    let base = [
        "bench",
        "decode",
        "--batch",
        "2",
        "--context",
        "100",
        "--layers",
        "2",
        "--heads-q",
        "4",
        "--heads-kv",
        "2",
        "--head-dim",
        "32",
        "--block",
        "16",
        "--k",
        "4",
        "--n-local",
        "1",
        "--k-query",
        "1",
        "--warmup",
        "1",
        "--json",
    ];
    let mut by_path = vec![];
    for path in ["in-place", "staged"] {
        let mut args = base.to_vec();
        args.extend(["--steps", "6", "--offload-path", path]);
        let (ok, out, err) = run(&args);
        if !ok && no_gpu_ok() {
            return;
        }
        assert!(ok, "bench decode failed: {err}");
        let j: serde_json::Value =
            serde_json::from_str(out.trim()).expect("bench decode --json is one JSON object");
        let runs = j["runs"].as_array().unwrap().clone();
        assert_eq!(runs.len(), 4, "{out}");
        for r in &runs {
            assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
            let offloaded = r["mode"].as_str().unwrap().contains("offloaded");
            assert_eq!(r["offload_path"].as_str(), offloaded.then_some(path), "{r}");
            assert_eq!(r["hit_rate"].is_f64(), offloaded, "{r}");
        }
        by_path.push(runs);
    }
    for (a, b) in by_path[0].iter().zip(&by_path[1]) {
        assert_eq!(a["hit_rate"], b["hit_rate"], "{a} / {b}");
        assert_eq!(
            a["copied_bytes_per_step"], b["copied_bytes_per_step"],
            "{a} / {b}"
        );
    }
    for (extra, says) in [
        (&["--modes", "sparse", "--steps", "6"][..], "unknown mode"),
        (
            &["--offload-path", "dma", "--steps", "6"][..],
            "unknown offload path",
        ),
        (&["--steps", "0"][..], "at least 1"),
        (
            &["--host-share", "0", "--steps", "6"][..],
            "a share above 0",
        ),
        (
            &["--host-share", "NaN", "--steps", "6"][..],
            "a share above 0",
        ),
        (
            &["--host-share", "1.5", "--steps", "6"][..],
            "a share above 0",
        ),
        (
            &["--query-noise", "NaN", "--steps", "6"][..],
            "--query-noise",
        ),
        (
            &["--bandwidth-gbs=-5", "--steps", "6"][..],
            "--bandwidth-gbs",
        ),
    ] {
        let mut args = base.to_vec();
        args.extend(extra);
        let (ok, _, err) = run(&args);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A configuration refused for its host memory is a row that says why, in the table (it
    // used to panic there) as in the JSON, and the others still run. (The available memory is
    // read from /proc/meminfo: Linux.)
    if !cfg!(target_os = "linux") {
        return;
    }
    let tiny_share = [
        "--modes",
        "full,offload-nosa",
        "--steps",
        "2",
        "--host-share",
        "1e-12",
    ];
    let mut args: Vec<&str> = base.iter().copied().filter(|a| *a != "--json").collect();
    args.extend(tiny_share);
    let (ok, out, err) = run(&args);
    assert!(ok && !err.contains("panicked"), "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("(d) NOSA"))
        .unwrap_or_default();
    assert!(
        row.contains("skipped:") && row.contains("--host-share"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("(a) full") && !l.contains("skipped")),
        "{out}"
    );
    let mut args = base.to_vec();
    args.extend(tiny_share);
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let runs = j["runs"].as_array().unwrap();
    assert!(
        runs[1]["skipped"].as_str().unwrap().contains("host memory"),
        "{out}"
    );
}

/// `gguf FILE` describes a model file (one the test writes), and names what is wrong with a
/// file that is not one.
#[test]
fn gguf_describes_a_model_file() {
    use sparse_attn::gguf::{GgmlType, Value, Writer};
    let dir = temp_dir("gguf");
    let file = dir.join("tiny.gguf");
    let w = Writer::new()
        .meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(1))
        .meta("llama.embedding_length", Value::U32(32))
        .meta("llama.feed_forward_length", Value::U32(64))
        .meta("llama.attention.head_count", Value::U32(2))
        .meta("llama.context_length", Value::U32(128))
        .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .meta("llama.vocab_size", Value::U32(8))
        .tensor("token_embd.weight", &[32, 8], GgmlType::Q8_0, &[0.5; 256])
        .unwrap();
    std::fs::write(&file, w.to_bytes()).unwrap();
    let (ok, out, err) = run(&["gguf", file.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(j["tensors"], 1);
    assert_eq!(j["types"]["Q8_0"]["values"], 256);
    assert_eq!(j["llama"]["heads_kv"], 2);
    assert_eq!(j["llama"]["head_dim"], 16);
    std::fs::write(&file, b"GGUF\x03\x00\x00\x00").unwrap();
    let (ok, _, err) = run(&["gguf", file.to_str().unwrap()]);
    assert!(
        !ok && err.contains("truncated") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `gguf --random` writes a model that `gguf` reads back and `explore --gguf` (the page's model
/// mode) runs: the view's numbers, both next-token previews, the tokens as pieces; bad views,
/// layers and files are errors that name the problem.
#[test]
fn a_random_gguf_runs_in_explore_model_mode() {
    let dir = temp_dir("explore-gguf");
    let file = dir.join("random.gguf");
    let f = file.to_str().unwrap();
    let (ok, out, err) = run(&["gguf", "--random", f, "--layers", "3", "--seed", "9"]);
    assert!(ok && out.contains("wrote"), "{err}");
    let (ok, out, err) = run(&["gguf", f, "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["llama"]["layers"], 3);
    let text =
        "the model reads this text about a keeper and a lamp, then some more of it to fill blocks";
    let view = r#"{"layer":2,"head":3,"block":16,"topk":3,"n_init":1,"n_local":1}"#;
    let (ok, out, err) = run(&["explore", "--gguf", f, "--text", text, "--config", view]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(j["layer"], 2);
    assert_eq!(j["head"], 3);
    assert_eq!(j["model"]["heads"], 4);
    let seq = j["seq"].as_u64().unwrap() as usize;
    assert_eq!(j["pieces"].as_array().unwrap().len(), seq);
    assert!(seq > 3 * 16, "{seq} tokens");
    let kept = j["mean_sparsity"].as_f64().unwrap();
    assert!(kept > 0.0 && kept < 1.0, "{kept}");
    for top in ["top_full", "top_sparse"] {
        let t = j[top].as_array().unwrap();
        let p: Vec<f64> = t.iter().map(|x| x["p"].as_f64().unwrap()).collect();
        assert_eq!(t.len(), 5, "{top}");
        assert!(p.windows(2).all(|w| w[0] >= w[1]) && p.iter().sum::<f64>() <= 1.0 + 1e-9);
    }
    for (args, want) in [
        (
            vec!["--config", r#"{"layer":3}"#],
            "layer 3 is out of range (the model has 3)",
        ),
        (vec!["--config", r#"{"topk":99}"#], "k = 99 is larger than"),
        (
            vec!["--config", r#"{"levels":1}"#],
            "unknown field `levels`",
        ),
        (
            vec!["--config", r#"{"scoring":"best"}"#],
            "scoring must be ssa, moba or infllm-v2",
        ),
    ] {
        let mut a = vec!["explore", "--gguf", f, "--text", text];
        a.extend(args);
        let (ok, _, err) = run(&a);
        assert!(
            !ok && err.contains(want) && !err.contains("panicked"),
            "{want}: {err}"
        );
    }
    let (ok, _, err) = run(&["explore", "--gguf", f]);
    assert!(!ok && err.contains("--text"), "{err}");
    let missing = dir.join("missing.gguf");
    let (ok, _, err) = run(&[
        "explore",
        "--gguf",
        missing.to_str().unwrap(),
        "--text",
        "a",
    ]);
    assert!(!ok && err.contains("cannot read"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_full_prints_json_and_rejects_bad_flags() {
    let (ok, out, err) = run(&[
        "bench",
        "full",
        "--seq",
        "80",
        "--batch",
        "1",
        "--heads",
        "2",
        "--head-dim",
        "32",
        "--mask",
        "both",
        "--target-seconds",
        "0.01",
        "--json",
    ]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "bench failed: {err}");
    let j: serde_json::Value =
        serde_json::from_str(out.trim()).expect("bench --json is one JSON object");
    let rows = j["results"].as_array().unwrap();
    assert!(rows.len() >= 2, "{out}");
    for r in rows {
        assert!(r["fwd_tflops"].as_f64().unwrap() > 0.0 && r["bwd_ms"].as_f64().unwrap() > 0.0);
    }
    // --json-out appends one record per run (the table still on stdout).
    let dir = temp_dir("json-out");
    let records = dir.join("sub/records.jsonl");
    for _ in 0..2 {
        let (ok, out, err) = run(&[
            "bench",
            "full",
            "--seq",
            "32",
            "--batch",
            "1",
            "--heads",
            "1",
            "--head-dim",
            "16",
            "--variant",
            "portable",
            "--no-backward",
            "--target-seconds",
            "0.01",
            "--json-out",
            records.to_str().unwrap(),
        ]);
        assert!(ok && out.contains("fwd ms"), "{err}");
    }
    let text = std::fs::read_to_string(&records).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    for l in text.lines() {
        let j: serde_json::Value = serde_json::from_str(l).expect("one JSON record per line");
        assert!(j["results"].is_array());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, _, err) = run(&["bench", "full", "--head-dim", "24"]);
    assert!(
        !ok && err.contains("head_dim = 24 is not supported"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bench_sparse_prints_json() {
    let (ok, out, err) = run(&[
        "bench",
        "sparse",
        "--seq",
        "96",
        "--batch",
        "1",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "32",
        "--block",
        "16",
        "--topk",
        "2",
        "--target-seconds",
        "0.01",
        "--json",
    ]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "bench sparse failed: {err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let r = &j["results"][0];
    assert_eq!(r["block"], 16);
    for key in [
        "select_ms",
        "sparse_fwd_ms",
        "dense_fwd_ms",
        "speedup_fwd_incl_select",
    ] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {out}");
    }
    let (ok, _, err) = run(&["bench", "sparse", "--block", "24"]);
    assert!(!ok && err.contains("block size 24"), "{err}");
}

/// f16 storage through the benchmark flags: storage prefixes, --dtype, and clear errors.
#[test]
fn bench_takes_f16_storage() {
    let shape = [
        "--seq",
        "64",
        "--batch",
        "1",
        "--heads",
        "2",
        "--head-dim",
        "32",
        "--target-seconds",
        "0.01",
        "--json",
    ];
    let mut args = vec![
        "bench",
        "full",
        "--variant",
        "f16:portable,f16p:portable,portable",
    ];
    args.extend(shape);
    let (ok, out, err) = run(&args);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "bench full failed: {err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let storages: Vec<&str> = j["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["storage"].as_str().unwrap())
        .collect();
    // Native f16 where the device has SHADER_F16 (lavapipe does), packed, f32.
    assert_eq!(storages[1..], ["f16-packed", "f32"], "{out}");
    assert!(storages[0].starts_with("f16"), "{out}");

    let mut args = vec![
        "bench",
        "sparse",
        "--dtype",
        "f16",
        "--kv-heads",
        "1",
        "--topk",
        "2",
    ];
    args.extend(shape);
    let (ok, out, err) = run(&args);
    assert!(ok, "bench sparse --dtype f16 failed: {err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(j["results"][0]["dtype"], "F16", "{out}");
    // `auto` runs the row kernels for this group of 2 heads (the tensor-core forward is
    // opt-in; the tiled one takes groups past 4).
    assert_eq!(j["results"][0]["forward"], "rows", "{out}");

    let (ok, _, err) = run(&["bench", "full", "--variant", "f64:xl"]);
    assert!(!ok && err.contains("unknown storage prefix `f64`"), "{err}");
    let (ok, _, err) = run(&["bench", "sparse", "--dtype", "bf16"]);
    assert!(!ok && err.contains("unknown dtype `bf16`"), "{err}");
    let (ok, _, err) = run(&["bench", "sparse", "--forward", "fast"]);
    assert!(!ok && err.contains("unknown sparse kernel `fast`"), "{err}");
    let (ok, _, err) = run(&["bench", "sparse", "--topk-kernel", "heap"]);
    assert!(!ok && err.contains("unknown top-k kernel `heap`"), "{err}");
    // The tensor-core sparse forward in f32 says what it needs instead of running something else.
    let (ok, _, err) = run(&[
        "bench",
        "sparse",
        "--forward",
        "coop",
        "--seq",
        "64",
        "--topk",
        "2",
        "--batch",
        "1",
    ]);
    assert!(!ok && err.contains("f16"), "{err}");
    let (ok, _, err) = run(&[
        "bench",
        "sparse",
        "--backward",
        "coop",
        "--seq",
        "64",
        "--topk",
        "2",
        "--batch",
        "1",
    ]);
    assert!(!ok && err.contains("f16"), "{err}");
    // The tensor-core variant takes native f16 only.
    for v in ["coop", "coop-fwd"] {
        let (ok, _, err) = run(&["bench", "full", "--variant", v, "--seq", "64"]);
        assert!(!ok && !err.contains("panicked"), "{err}");
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sparse-attn-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn map_writes_a_png_from_random_inputs_and_from_npy_files() {
    let dir = temp_dir("map");
    let out = dir.join("map.png");
    let out_s = out.to_str().unwrap();
    let (ok, stdout, err) = run(&[
        "map",
        "--seq",
        "80",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "32",
        "--block",
        "16",
        "--topk",
        "2",
        "--out",
        out_s,
    ]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "map failed: {err}");
    assert!(stdout.contains("token-level map") && stdout.contains("mean kept attention mass"));
    // Decoded whole, as the image crate did: a broken data stream fails here too.
    let mut png = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()))
        .read_info()
        .expect("a PNG");
    let mut pixels = vec![0; png.output_buffer_size().unwrap()];
    let info = png.next_frame(&mut pixels).expect("PNG pixels");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert!(
        info.width > 600 && info.height > 600,
        "{}x{}",
        info.width,
        info.height
    );

    // The same from .npy files ([heads, seq, d] and [seq, d] layouts).
    let mut rng = sparse_attn::reference::Rng::new(5);
    let q = sparse_attn::npy::NpyArray {
        shape: vec![2, 70, 32],
        data: rng.normal_vec(2 * 70 * 32, 1.0),
    };
    let k = sparse_attn::npy::NpyArray {
        shape: vec![70, 32],
        data: rng.normal_vec(70 * 32, 1.0),
    };
    let (qp, kp) = (dir.join("q.npy"), dir.join("k.npy"));
    std::fs::write(&qp, sparse_attn::npy::to_bytes(&q)).unwrap();
    std::fs::write(&kp, sparse_attn::npy::to_bytes(&k)).unwrap();
    let map_from = |q: &str, k: &str| {
        run(&[
            "map", "--q", q, "--k", k, "--head", "1", "--block", "32", "--topk", "2", "--out",
            out_s,
        ])
    };
    let (ok, stdout, err) = map_from(qp.to_str().unwrap(), kp.to_str().unwrap());
    assert!(ok, "map from .npy failed: {err}");
    assert!(stdout.contains("wrote"), "{stdout}");

    // The same arrays from one .safetensors file, tensors named after the colon.
    let st = dir.join("acts.safetensors");
    std::fs::write(
        &st,
        sparse_attn::safetensors::to_bytes(&[("q", &q), ("k", &k)]),
    )
    .unwrap();
    let spec = |name: &str| format!("{}:{name}", st.to_str().unwrap());
    let (ok, stdout, err) = map_from(&spec("q"), &spec("k"));
    assert!(ok, "map from .safetensors failed: {err}");
    assert!(stdout.contains("wrote"), "{stdout}");
    let (ok, _, err) = run(&["map", "--q", &spec("q"), "--k", &spec("v"), "--out", out_s]);
    assert!(
        !ok && err.contains("no tensor `v`") && !err.contains("panicked"),
        "{err}"
    );

    // A file that is not .npy, and a head that does not exist: clear errors, no panic.
    std::fs::write(&kp, b"not numpy").unwrap();
    let (ok, _, err) = run(&[
        "map",
        "--q",
        qp.to_str().unwrap(),
        "--k",
        kp.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("not a .npy file") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = run(&["map", "--seq", "64", "--head", "9", "--out", out_s]);
    assert!(!ok && err.contains("out of range"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "train")]
#[test]
fn train_and_eval_explain_bad_input_and_combine_reports() {
    let dir = temp_dir("train-cli");
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    // Missing corpus: says how to get it (no GPU needed to get there).
    let (ok, _, err) = run(&[
        "train",
        "--mode",
        "ssa",
        "--out",
        out_s,
        "--data",
        "/nonexistent",
    ]);
    assert!(!ok);
    assert!(err.contains("fetch-corpus"), "{err}");
    // Budget larger than the context.
    let (ok, _, err) = run(&[
        "train", "--mode", "sparse", "--out", out_s, "--seq", "128", "--topk", "16",
    ]);
    assert!(!ok);
    assert!(err.contains("exceeds the context"), "{err}");
    let (ok, _, err) = run(&["train", "--mode", "dense", "--out", out_s]);
    assert!(!ok && err.contains("unknown mode"), "{err}");
    // Non-finite or meaningless numbers, before any corpus or GPU work.
    for (flag, v, says) in [
        ("--clip", "nan", "clip"),
        ("--clip", "0", "clip must be > 0"),
        ("--lr", "inf", "finite lr"),
        ("--alpha=-1", "", "alpha"),
        ("--weight-decay", "NaN", "weight_decay"),
        ("--eval-windows", "0", "eval_windows"),
        ("--time-limit", "NaN", "--time-limit"),
        ("--time-limit=-5", "", "--time-limit"),
        (
            "--precision",
            "bf8",
            "unknown precision `bf8` (known: f32, f16)",
        ),
    ] {
        let mut args = vec!["train", "--mode", "ssa", "--out", out_s, flag];
        if !v.is_empty() {
            args.push(v);
        }
        let (ok, _, err) = run(&args);
        assert!(!ok && err.contains(says), "{flag} {v}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // --resume needs a checkpoint; a corpus entry that is not a plain file is refused (a FIFO
    // would block the read forever).
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(corpus.join("a.txt"), "some text ".repeat(500)).unwrap();
    let fifo = corpus.join("b.txt");
    let made = Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let (ok, _, err) = run(&[
            "train",
            "--mode",
            "full",
            "--out",
            out_s,
            "--data",
            corpus.to_str().unwrap(),
        ]);
        assert!(!ok && err.contains("not a plain file"), "{err}");
        std::fs::remove_file(&fifo).unwrap();
    }
    std::fs::write(corpus.join("b.txt"), "other text ".repeat(500)).unwrap();
    // Tensors past the device's binding limit: refused before the model is built, naming the flag.
    for (flag, v) in [("--d-ff", "4000000000"), ("--max-seq", "4000000000")] {
        let (ok, _, err) = run(&[
            "train",
            "--mode",
            "full",
            "--out",
            out_s,
            "--data",
            corpus.to_str().unwrap(),
            flag,
            v,
        ]);
        assert!(
            !ok && err.contains(&format!("lower {flag}")),
            "{flag}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let fresh = dir.join("fresh");
    let (ok, _, err) = run(&[
        "train",
        "--mode",
        "full",
        "--out",
        fresh.to_str().unwrap(),
        "--resume",
        "--data",
        corpus.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("holds no checkpoint"), "{err}");
    assert!(
        !fresh.exists(),
        "a refused --resume must not create the folder"
    );
    // eval: zero counts, an overflowing length, an output that cannot be written.
    for (flag, v) in [
        ("--lengths", "0"),
        ("--batch", "0"),
        ("--metric-windows", "0"),
        ("--windows", "0"),
        ("--budgets", "1,0"),
    ] {
        let (ok, _, err) = run(&[
            "eval",
            "--ckpt",
            out_s,
            "--out",
            dir.join("e.json").to_str().unwrap(),
            flag,
            v,
        ]);
        assert!(!ok && err.contains("at least 1"), "{flag} {v}: {err}");
    }
    let bad_out = dir.join("no/such/e.json");
    let (ok, _, err) = run(&["eval", "--ckpt", out_s, "--out", bad_out.to_str().unwrap()]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    // Combining reports needs no GPU: the committed first results give the table and plots.
    let root = env!("CARGO_MANIFEST_DIR");
    let reports: Vec<String> = ["full", "sparse", "ssa"]
        .iter()
        .map(|m| format!("{root}/bench/results/train-2026-11-23/eval-{m}.json"))
        .collect();
    let combined = dir.join("all.json");
    let plots = dir.join("plots");
    let mut args = vec!["eval", "--reports"];
    args.extend(reports.iter().map(|s| s.as_str()));
    args.extend([
        "--out",
        combined.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    let (ok, table, err) = run(&args);
    assert!(ok, "{err}");
    for mode in ["| full |", "| sparse |", "| ssa |"] {
        assert!(table.contains(mode), "{table}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&combined).unwrap()).unwrap();
    assert_eq!(j["reports"].as_array().unwrap().len(), 3);
    assert!(plots.join("extrapolation.png").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Kill a training run at random points (SIGKILL, as a crash or an OOM killer would): the
/// folder always holds one complete, verified checkpoint whose step never goes back, and a
/// later --resume continues from it. SIGTERM stops at a step boundary with a checkpoint.
#[cfg(feature = "train")]
#[test]
fn training_survives_kills_and_stops_cleanly_on_sigterm() {
    use sparse_attn::train::checkpoint;
    if no_gpu_ok() {
        return;
    }
    let dir = temp_dir("kill");
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for (i, f) in ["a.txt", "b.txt", "c.txt"].iter().enumerate() {
        let text: String = (0..3000)
            .map(|j| format!("{} ", (i * 7 + j) % 97))
            .collect();
        std::fs::write(corpus.join(f), text).unwrap();
    }
    let out = dir.join("run");
    let args = |resume: bool| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--mode",
            "full",
            "--out",
            out.to_str().unwrap(),
            "--data",
            corpus.to_str().unwrap(),
            "--valid-every",
            "3",
            "--steps",
            "100000",
            "--seq",
            "64",
            "--batch",
            "2",
            "--d-model",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--block",
            "16",
            "--topk",
            "2",
            "--ckpt-every",
            "1",
            "--eval-every",
            "0",
            "--warmup",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let spawn = |resume: bool| {
        Command::new(env!("CARGO_BIN_EXE_sparse-attn"))
            .args(args(resume))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start training")
    };
    let seed = sparse_attn::reference::Rng::fresh_seed();
    eprintln!("kill timings seed {seed}");
    let mut rng = sparse_attn::reference::Rng::new(seed);
    let step_now = || {
        checkpoint::find(&out)
            .unwrap()
            .map(|(_, s)| s["step"].as_u64().unwrap())
    };
    // Until a run has committed a checkpoint past `after` (bounded: a minute). Polled while
    // the run commits one a step, a read may meet a set being replaced under it (its files no
    // longer match the record it read first: an error that says so, not a mix): read again.
    let wait_past = |after: Option<u64>| {
        let t0 = std::time::Instant::now();
        let live = || {
            checkpoint::find(&out)
                .ok()
                .flatten()
                .map(|(_, s)| s["step"].as_u64().unwrap())
        };
        while live() <= after {
            assert!(t0.elapsed().as_secs() < 60, "no checkpoint after a minute");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let mut last = None;
    for round in 0..6 {
        let mut child = spawn(last.is_some());
        // Kill while it trains and saves (a save every step): some kills land inside a save.
        wait_past(last);
        let extra_ms = (rng.uniform() * 800.0) as u64;
        std::thread::sleep(std::time::Duration::from_millis(extra_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let step = match checkpoint::find(&out) {
            Ok(Some((_, state))) => state["step"].as_u64().unwrap(),
            Ok(None) => panic!("round {round}: the checkpoint vanished"),
            Err(e) => panic!("round {round} (killed {extra_ms} ms after a save): {e}"),
        };
        assert!(
            Some(step) >= last,
            "round {round}: step went back {last:?} -> {step}"
        );
        eprintln!("round {round}: killed {extra_ms} ms after a save; checkpoint at step {step}");
        last = Some(step);
    }
    // SIGTERM: a checkpoint at the next step boundary, exit 0.
    let child = spawn(true);
    wait_past(last);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let done = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(
        done.status.success(),
        "SIGTERM must end the run cleanly: {err}"
    );
    assert!(err.contains("interrupted"), "{err}");
    assert!(step_now() > last);
    // No stray sets or temporary files are left beside the committed one.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ckpt"], "{names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `generate` on a freshly trained tiny NOSA checkpoint: the prompt then the generated text on
/// stdout, the summary (tokens/s, hit rate, KV memory) on stderr; greedy decoding gives the same
/// text with the cache on the GPU and offloaded; bad flags are errors that name the problem.
#[cfg(feature = "train")]
#[test]
fn generate_streams_text_from_a_checkpoint() {
    let dir = temp_dir("generate-cli");
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(corpus.join("a.txt"), "to be or not to be, ".repeat(200)).unwrap();
    std::fs::write(corpus.join("b.txt"), "that is the question. ".repeat(200)).unwrap();
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    let (ok, _, err) = run(&[
        "train",
        "--mode",
        "nosa",
        "--out",
        out_s,
        "--data",
        corpus.to_str().unwrap(),
        "--valid-every",
        "2",
        "--steps",
        "3",
        "--batch",
        "2",
        "--seq",
        "64",
        "--d-model",
        "64",
        "--layers",
        "1",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--block",
        "16",
        "--topk",
        "4",
        "--n-local",
        "0",
        "--k-query",
        "1",
        "--eval-every",
        "0",
        "--warmup",
        "1",
    ]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "{err}");
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--ckpt",
            out_s,
            "--prompt",
            "to be",
            "--tokens",
            "40",
            "--temperature",
            "0",
        ];
        args.extend(extra);
        run(&args)
    };
    let (ok, on_gpu, err) = generate(&["--attention", "nosa"]);
    assert!(ok, "{err}");
    assert!(
        on_gpu.starts_with("to be") && on_gpu.trim_end().len() >= 45,
        "{on_gpu:?}"
    );
    assert!(
        err.contains("tokens/s") && err.contains("on the GPU"),
        "{err}"
    );
    // The query-only selection of a NOSA model, with a budget larger than the sequence.
    let (ok, _, err) = generate(&["--attention", "sparse", "--budget", "8"]);
    assert!(ok, "{err}");
    let (ok, offloaded, err) = generate(&["--attention", "nosa", "--offload"]);
    assert!(ok, "{err}");
    assert_eq!(
        offloaded, on_gpu,
        "offloading must not change greedy decoding"
    );
    assert!(
        err.contains("hit rate 0.") && err.contains("in host memory"),
        "{err}"
    );
    // The staged path (the host writes the missing blocks; no host-memory tensors).
    let (ok, staged, err) = generate(&[
        "--attention",
        "nosa",
        "--offload",
        "--offload-path",
        "staged",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        staged, on_gpu,
        "staged copies must not change greedy decoding"
    );
    assert!(err.contains("staged copies"), "{err}");
    // Several prompts: one batch, each continued as it would be alone (prompts of different
    // lengths), on the GPU and offloaded.
    for offload in [&[][..], &["--offload"][..]] {
        let mut extra = vec!["--attention", "nosa", "--prompt", "that is the"];
        extra.extend(offload);
        let (ok, batch, err) = generate(&extra);
        assert!(ok, "{err}");
        let blocks: Vec<&str> = batch.split("== ").skip(1).collect();
        assert_eq!(blocks.len(), 2, "{batch:?}");
        assert_eq!(
            blocks[0].strip_prefix("1 of 2 ==\n"),
            Some(on_gpu.as_str()),
            "{offload:?}: the first prompt's text in a batch is its text alone"
        );
        assert!(blocks[1].starts_with("2 of 2 ==\nthat is the"), "{batch:?}");
        assert!(
            err.contains("2 sequences") && err.contains("tokens/s"),
            "{err}"
        );
    }
    for (extra, says) in [
        (&["--attention", "dense"][..], "unknown attention"),
        (&["--top-p", "0"][..], "top-p must be in (0, 1]"),
        (
            &["--gpu-kv-mb", "5"][..],
            "--gpu-kv-mb sets the GPU budget of --offload",
        ),
        (
            &["--offload", "--gpu-kv-mb", "0.001"][..],
            "is below the least this offloaded cache takes",
        ),
        (
            &["--offload", "--attention", "full"][..],
            "not full attention",
        ),
        (&["--budget", "0"][..], "topk"),
        (
            &["--offload", "--offload-path", "zero"][..],
            "unknown offload path",
        ),
        (
            &["--offload-path", "staged"][..],
            "--offload-path chooses the path of --offload",
        ),
        (&["--prompt", ""][..], "a prompt is empty"),
    ] {
        let (ok, _, err) = generate(extra);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = run(&[
        "generate", "--ckpt", out_s, "--prompt", "x", "--tokens", "0",
    ]);
    assert!(!ok && err.contains("generate at least one token"), "{err}");
    let (ok, _, err) = run(&["generate", "--ckpt", "/nonexistent", "--prompt", "x"]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    // `bench generate` on the checkpoint past its training length (seq 64, max_seq 256): the
    // four ways of NOSA's comparison and NOSA on the GPU; copies and hit rates for the
    // offloaded ones only, over the timed steps (a step copies at most its k blocks).
    let data = corpus.to_str().unwrap();
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "generate",
            "--ckpt",
            out_s,
            "--data",
            data,
            "--valid-every",
            "2",
            "--context",
            "100",
            "--batch",
            "2",
            "--steps",
            "3",
        ];
        args.extend(extra);
        run(&args)
    };
    let (ok, json, err) = bench(&["--json", "--modes", "full,sparse,offload,nosa,offload-nosa"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let modes: Vec<&str> = runs.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["full", "sparse", "offload", "nosa", "offload-nosa"]);
    // One layer, 2 kv heads, 2 sequences, k = 4 blocks of 16 tokens of f32 k, v and bias.
    let most = (2 * 2 * 4 * (16 * 16 * 4 * 2 + 16 * 4)) as f64;
    for r in runs {
        let offload = r["mode"].as_str().unwrap().starts_with("offload");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["hit_rate"].is_number(), offload, "{r}");
        if offload {
            let copied = r["copied_bytes_per_step"].as_f64().unwrap();
            assert!(copied > 0.0 && copied <= most, "{r}");
        } else {
            assert!(r["copied_bytes_per_step"].is_null(), "{r}");
        }
    }
    for (extra, says) in [
        (&["--block", "16"][..], "--block is for --gguf models"),
        (&["--context", "300"][..], "exceeds the model's 256 tokens"),
        (&["--modes", "nosa,dense"][..], "unknown mode `dense`"),
    ] {
        let (ok, _, err) = bench(extra);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `generate --gguf` on a tiny random Llama written here: the chat answer (or the raw
/// continuation) streams on stdout and the summary on stderr; greedy text is the same with the
/// cache on the GPU and offloaded; bad combinations are errors that say why.
#[cfg(feature = "train")]
#[test]
fn generate_runs_a_gguf_model() {
    let dir = temp_dir("generate-gguf");
    let p = crate::common::tiny_llama(320, 512);
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, sparse_attn::gguf::random_llama(&p, 11).unwrap()).unwrap();
    let f = file.to_str().unwrap();
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--gguf",
            f,
            "--prompt",
            "Hello there",
            "--tokens",
            "12",
            "--temperature",
            "0",
            "--block",
            "16",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, on_gpu, err) = generate(&["--attention", "sparse", "--budget", "4"]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "{err}");
    assert!(
        !on_gpu.is_empty() && !on_gpu.contains("<|im_start|>"),
        "{on_gpu:?}"
    );
    assert!(err.contains("12 generated"), "{err}");
    let (ok, offloaded, err) = generate(&["--attention", "sparse", "--budget", "4", "--offload"]);
    assert!(ok, "{err}");
    assert_eq!(offloaded, on_gpu);
    assert!(err.contains("MB in host memory"), "{err}");
    let (ok, raw, err) = generate(&["--raw"]);
    assert!(ok && raw.starts_with("Hello there"), "{raw:?} {err}");
    // A batch of two chats: the first one's answer is its answer alone.
    let two = [
        "--attention",
        "sparse",
        "--budget",
        "4",
        "--prompt",
        "How are you today?",
    ];
    let (ok, batch, err) = generate(&two);
    assert!(ok, "{err}");
    let first = batch.split("== 2 of 2 ==\n").next().unwrap();
    assert_eq!(
        first.strip_prefix("== 1 of 2 ==\n"),
        Some(on_gpu.as_str()),
        "{batch:?}"
    );
    assert!(err.contains("2 sequences"), "{err}");
    for (extra, says) in [
        (&["--ckpt", "x"][..], "cannot be used with"),
        (&["--budget", "0"][..], "topk"),
    ] {
        let (ok, _, err) = generate(extra);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = run(&["generate", "--gguf", "/nonexistent.gguf", "--prompt", "x"]);
    assert!(!ok && err.contains("/nonexistent.gguf"), "{err}");
    let (ok, _, err) = run(&["generate", "--ckpt", "x", "--prompt", "x", "--raw"]);
    assert!(!ok && err.contains("--raw"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[cfg(feature = "train")]
#[test]
fn perplexity_sweeps_a_gguf_model() {
    let dir = temp_dir("perplexity");
    let file = dir.join("tiny.gguf");
    let p = crate::common::tiny_llama(320, 512);
    std::fs::write(&file, sparse_attn::gguf::random_llama(&p, 12).unwrap()).unwrap();
    // Two files: the first is held out (--valid-every 2).
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    let text = "Now is the winter of our discontent made glorious summer. ".repeat(5);
    std::fs::write(data.join("a.txt"), &text).unwrap();
    std::fs::write(data.join("b.txt"), &text).unwrap();
    let (f, d) = (file.to_str().unwrap(), data.to_str().unwrap());
    let out = dir.join("ppl.json");
    let plots = dir.join("plots");
    let sweep = |extra: &[&str]| {
        let mut args = vec![
            "perplexity",
            "--gguf",
            f,
            "--data",
            d,
            "--valid-every",
            "2",
            "--context",
            "128",
            "--budget",
            "64",
            "--block",
            "16",
            "--windows",
            "2",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, table, err) = sweep(&[
        "--out",
        out.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "{err}");
    for name in ["full", "ssa", "moba", "infllm-v2", "nosa"] {
        assert!(table.contains(name), "{name}: {table}");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{v}");
    assert!(rows.iter().all(|r| r["ppl"].as_f64().unwrap().is_finite()));
    assert!(plots.join("perplexity-128.png").exists());
    for (extra, says) in [
        (&["--selection", "dense"][..], "unknown selection `dense`"),
        (
            &["--budget", "40"][..],
            "budget 40 is not a multiple of the block",
        ),
        (&["--context", "4096"][..], "context 4096 is outside"),
        (&["--context", "400"][..], "fewer than one window of 401"),
    ] {
        let (ok, _, err) = sweep(extra);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `bench generate` on a tiny random Llama written here: every mode runs for every batch and
/// context, the offloaded rows report a hit rate and a GPU cache below the full one's, and bad
/// flags are errors that say why.
#[cfg(feature = "train")]
#[test]
fn bench_generate_runs_every_mode_on_a_gguf_model() {
    let dir = temp_dir("bench-generate");
    let file = dir.join("tiny.gguf");
    let p = crate::common::tiny_llama(320, 512);
    std::fs::write(&file, sparse_attn::gguf::random_llama(&p, 13).unwrap()).unwrap();
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    let text = "Shall I compare thee to a summer's day? Thou art more lovely. ".repeat(8);
    std::fs::write(data.join("a.txt"), &text).unwrap();
    std::fs::write(data.join("b.txt"), &text).unwrap();
    let (f, d) = (file.to_str().unwrap(), data.to_str().unwrap());
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "generate",
            "--gguf",
            f,
            "--data",
            d,
            "--valid-every",
            "2",
            "--context",
            "200",
            "--block",
            "16",
            "--budget",
            "4",
            "--steps",
            "3",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, out, err) = bench(&["--json", "--batch", "1,2"]);
    if !ok && no_gpu_ok() {
        return;
    }
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6, "{v}");
    for r in runs {
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let offload = r["mode"] == "offload";
        assert_eq!(r["hit_rate"].is_number(), offload, "{r}");
        assert_eq!(r["host_kv_bytes"].as_u64().unwrap() > 0, offload, "{r}");
    }
    let gpu = |mode: &str, batch: u64| {
        runs.iter()
            .find(|r| r["mode"] == mode && r["batch"] == batch)
            .unwrap()["gpu_kv_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(gpu("offload", 2) < gpu("full", 2));
    // --gpu-kv-mb bounds the offloaded cache's whole GPU part; a larger budget buys slots.
    let mut used = vec![];
    for mb in ["0.15", "0.25"] {
        let (ok, out, err) = bench(&[
            "--json",
            "--modes",
            "offload",
            "--batch",
            "2",
            "--gpu-kv-mb",
            mb,
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let b = v["runs"][0]["gpu_kv_bytes"].as_u64().unwrap();
        assert!(
            b as f64 <= mb.parse::<f64>().unwrap() * 1e6,
            "{b} bytes for {mb} MB"
        );
        used.push(b);
    }
    assert!(used[0] < used[1], "{used:?}");
    for (extra, says) in [
        (&["--modes", "dense"][..], "unknown mode `dense`"),
        (
            &["--gpu-kv-mb", "0.001"][..],
            "is below the least this offloaded cache takes",
        ),
        (&["--context", "600"][..], "exceeds the model's 512 tokens"),
        (&["--batch", "50"][..], "held-out tokens"),
        (
            &["--modes", "offload-nosa"][..],
            "need a model trained with NOSA's eviction head",
        ),
    ] {
        let (ok, _, err) = bench(&[extra, &["--batch", "1"]].concat());
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
