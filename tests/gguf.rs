//! GGUF reading (`sparse_attn::gguf`): quantised blocks decode to the values GGML defines, a
//! file written here reads back as written, broken files (every truncation, a flipped byte, an
//! unknown tensor type, another architecture) give errors that name the problem and never a
//! panic, and the real SmolLM2 file (scripts/fetch-model.sh) reads as MODELS.md describes, its
//! tensors dequantised to the values of an independent reader (the `gguf` Python package).

use sparse_attn::gguf::{GgmlType, Gguf, LlamaParams, QK, Value, Writer, dequantize, quantize};
use sparse_attn::reference::Rng;

fn f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

/// Blocks built byte by byte decode to d·q (+ m), low nibbles first.
#[test]
fn quantised_blocks_decode_as_ggml_defines() {
    // Q4_1: d = 0.5, m = -1; byte j holds element j (low nibble) and j + 16 (high).
    let mut b = vec![];
    b.extend(f16(0.5));
    b.extend(f16(-1.0));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let x = dequantize(GgmlType::Q4_1, &b, QK).unwrap();
    for j in 0..16 {
        assert_eq!(x[j], 0.5 * j as f32 - 1.0);
        assert_eq!(x[j + 16], 0.5 * (15 - j) as f32 - 1.0);
    }
    // Q4_0: d = 0.25, x = d·(q − 8).
    let mut b = f16(0.25).to_vec();
    b.extend((0..16u8).map(|j| j | (3 << 4)));
    let x = dequantize(GgmlType::Q4_0, &b, QK).unwrap();
    assert_eq!(x[0], -2.0);
    assert_eq!(x[15], 0.25 * 7.0);
    assert!(x[16..].iter().all(|&v| v == 0.25 * -5.0));
    // Q8_0: d = 2^-4, x = d·q for signed bytes.
    let mut b = f16(0.0625).to_vec();
    b.extend((0..32).map(|j| (j as i8 - 16) as u8));
    let x = dequantize(GgmlType::Q8_0, &b, QK).unwrap();
    assert_eq!(x[0], -1.0);
    assert_eq!(x[31], 0.9375);
    // F16 widens exactly; a byte count that does not match the values is an error.
    let x = dequantize(GgmlType::F16, &[f16(1.5), f16(-0.125)].concat(), 2).unwrap();
    assert_eq!(x, [1.5, -0.125]);
    let e = dequantize(GgmlType::Q8_0, &b[..20], QK)
        .unwrap_err()
        .to_string();
    assert!(e.contains("take 34 bytes; 20 were given"), "{e}");
    let e = dequantize(GgmlType::Q4_1, &[], 33).unwrap_err().to_string();
    assert!(
        e.contains("not a whole number of its 32-value blocks"),
        "{e}"
    );
}

/// Quantising then dequantising stays within half a quantisation step of each block (a step
/// where Q4_0 clips).
#[test]
fn quantisation_round_trips_within_half_a_step() {
    let mut rng = Rng::new(Rng::fresh_seed());
    let x = rng.normal_vec(64 * QK, 2.0);
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
    ] {
        let y = dequantize(ty, &quantize(ty, &x).unwrap(), x.len()).unwrap();
        for (b, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
            let max = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let range = xb.iter().fold(f32::MIN, |a, &v| a.max(v))
                - xb.iter().fold(f32::MAX, |a, &v| a.min(v));
            // Half a step, plus the f16 rounding of the scale (and Q4_1's min) over 15 steps.
            let step = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => max * 1e-3,
                GgmlType::Q8_0 => max / 127.0,
                GgmlType::Q4_0 => max / 8.0,
                GgmlType::Q4_1 => range / 15.0,
            };
            // Q4_0 spans d·[−8, 7] with d from the largest magnitude: values on the other side
            // beyond 7/8 of it clip, by up to a step.
            let half = if ty == GgmlType::Q4_0 { 1.0 } else { 0.5 };
            let bound = half * step + 2e-3 * max;
            for (a, b2) in xb.iter().zip(yb) {
                assert!(
                    (a - b2).abs() <= bound,
                    "{ty:?} block {b}: {a} -> {b2} (bound {bound})"
                );
            }
        }
    }
}

fn tiny_llama() -> Writer {
    let mut rng = Rng::new(7);
    let tokens: Vec<Value> = ["<s>", "a", "b", "ab"]
        .iter()
        .map(|s| Value::String(s.to_string()))
        .collect();
    Writer::new()
        .meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(2))
        .meta("llama.embedding_length", Value::U32(64))
        .meta("llama.feed_forward_length", Value::U32(96))
        .meta("llama.attention.head_count", Value::U32(4))
        .meta("llama.attention.head_count_kv", Value::U32(2))
        .meta("llama.context_length", Value::U64(256))
        .meta("llama.rope.freq_base", Value::F32(100000.0))
        .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .meta("tokenizer.ggml.tokens", Value::Array(tokens))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .meta("general.score", Value::F64(-0.5))
        .meta("general.small", Value::I8(-3))
        .meta(
            "general.ids",
            Value::Array(vec![Value::I32(-1), Value::I32(7)]),
        )
        .tensor(
            "token_embd.weight",
            &[64, 4],
            GgmlType::Q8_0,
            &rng.normal_vec(256, 1.0),
        )
        .unwrap()
        .tensor(
            "blk.0.attn_q.weight",
            &[64, 64],
            GgmlType::Q4_1,
            &rng.normal_vec(4096, 0.1),
        )
        .unwrap()
        .tensor(
            "blk.0.attn_k.weight",
            &[64, 32],
            GgmlType::Q4_0,
            &rng.normal_vec(2048, 0.1),
        )
        .unwrap()
        .tensor(
            "blk.0.attn_norm.weight",
            &[64],
            GgmlType::F32,
            &rng.normal_vec(64, 1.0),
        )
        .unwrap()
        .tensor(
            "blk.0.ffn_norm.weight",
            &[64],
            GgmlType::F16,
            &rng.normal_vec(64, 1.0),
        )
        .unwrap()
}

/// A file written here reads back: metadata of every type, tensors of every type at aligned
/// offsets, the hyperparameters of a Llama model.
#[test]
fn written_files_read_back() {
    let w = tiny_llama();
    let bytes = w.to_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.metadata.len(), 14);
    assert_eq!(g.get("general.small"), Some(&Value::I8(-3)));
    assert_eq!(
        g.get("tokenizer.ggml.add_bos_token"),
        Some(&Value::Bool(false))
    );
    assert_eq!(
        g.get("general.ids"),
        Some(&Value::Array(vec![Value::I32(-1), Value::I32(7)]))
    );
    assert_eq!(g.tensors.len(), 5);
    for t in &g.tensors {
        assert_eq!(t.offset % 32, 0, "{}", t.name);
    }
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        (q.dims.as_slice(), q.ty, q.bytes),
        (&[64u64, 64][..], GgmlType::Q4_1, 128 * 20)
    );
    let mut rng = Rng::new(7);
    let embd = rng.normal_vec(256, 1.0);
    let got = g.read_f32(&bytes, "token_embd.weight").unwrap();
    let want = dequantize(
        GgmlType::Q8_0,
        &quantize(GgmlType::Q8_0, &embd).unwrap(),
        256,
    )
    .unwrap();
    assert_eq!(got, want);
    let p = LlamaParams::from_gguf(&g).unwrap();
    assert_eq!(
        p,
        LlamaParams {
            layers: 2,
            d_model: 64,
            d_ff: 96,
            heads_q: 4,
            heads_kv: 2,
            head_dim: 16,
            context: 256,
            rope_base: 100000.0,
            rms_eps: 1e-5f32 as f64,
            vocab: 4,
        }
    );
    let e = g.read_f32(&bytes, "output.weight").unwrap_err().to_string();
    assert!(e.contains("no tensor `output.weight`"), "{e}");
}

/// Every truncation of a file, and random byte flips, give an error or a parse, never a panic;
/// the errors name what is wrong.
#[test]
fn broken_files_give_errors_that_name_the_problem() {
    let bytes = tiny_llama().to_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let data_end = bytes.len();
    for n in 0..data_end {
        let e = Gguf::parse(&bytes[..n]).unwrap_err().to_string();
        assert!(
            e.contains("truncated") || e.contains("not a GGUF file"),
            "cut at {n}: {e}"
        );
    }
    let mut rng = Rng::new(Rng::fresh_seed());
    for _ in 0..3000 {
        let mut b = bytes.clone();
        let at = (rng.next_u64() % g.data_offset) as usize;
        b[at] ^= 1 << (rng.next_u64() % 8);
        if let Ok(g2) = Gguf::parse(&b) {
            // Whatever parsed reads inside the file.
            for t in &g2.tensors {
                assert!(g2.data(&b, t).is_ok());
            }
        }
    }
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(
        Gguf::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("not a GGUF file")
    );
    let mut b = bytes.clone();
    b[4] = 1;
    assert!(
        Gguf::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("version 1 is not supported")
    );
    // A tensor type this reader does not decode (Q4_K, id 12) is named.
    let g = Gguf::parse(&bytes).unwrap();
    let t = &g.tensors[1];
    let name_at = bytes
        .windows(t.name.len())
        .position(|w| w == t.name.as_bytes())
        .unwrap();
    let ty_at = name_at + t.name.len() + 4 + 8 * t.dims.len();
    let mut b = bytes.clone();
    b[ty_at..ty_at + 4].copy_from_slice(&12u32.to_le_bytes());
    let e = Gguf::parse(&b).unwrap_err().to_string();
    assert!(
        e.contains("tensor `blk.0.attn_q.weight`") && e.contains("12 (Q4_K) is not supported"),
        "{e}"
    );
    // Another architecture, and missing hyperparameters.
    let other = Writer::new()
        .meta("general.architecture", Value::String("gpt2".into()))
        .to_bytes();
    let e = LlamaParams::from_gguf(&Gguf::parse(&other).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("architecture is `gpt2`"), "{e}");
    let bare = Writer::new()
        .meta("general.architecture", Value::String("llama".into()))
        .to_bytes();
    let e = LlamaParams::from_gguf(&Gguf::parse(&bare).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no integer `llama."), "{e}");
}

/// The SmolLM2 file of MODELS.md (scripts/fetch-model.sh puts it in models/; SPARSE_ATTN_GGUF
/// names another place): its table, its hyperparameters, and tensors of each type against the
/// values the `gguf` Python package (0.17, `gguf.dequantize`) gives for them, recorded here.
#[test]
// The recorded values are exact f32s, printed in full by Python.
#[allow(clippy::excessive_precision)]
fn smollm2_reads_as_an_independent_reader_does() {
    let path = std::env::var("SPARSE_ATTN_GGUF")
        .unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("SKIPPED: no {path} (scripts/fetch-model.sh fetches it)");
        return;
    };
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!((g.version, g.metadata.len(), g.tensors.len()), (3, 33, 272));
    let count = |ty| g.tensors.iter().filter(|t| t.ty == ty).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::Q8_0),
            count(GgmlType::F32)
        ),
        (210, 1, 61)
    );
    let p = LlamaParams::from_gguf(&g).unwrap();
    assert_eq!(
        (
            p.layers, p.d_model, p.d_ff, p.heads_q, p.heads_kv, p.head_dim, p.context, p.vocab
        ),
        (30, 576, 1536, 9, 3, 64, 8192, 49152)
    );
    assert_eq!((p.rope_base, p.rms_eps), (100000.0, 1e-5f32 as f64));
    assert_eq!(g.str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.str("tokenizer.ggml.pre").unwrap(), "smollm");
    // (name, dims, sum, sum of |x|, first three, last two, element 12345 mod len)
    type Want = (&'static str, [u64; 2], f64, f64, [f32; 3], [f32; 2], f32);
    let want: [Want; 4] = [
        (
            "token_embd.weight",
            [576, 49152],
            -15353.04449415207,
            2802153.619805813,
            [
                -0.10654449462890625,
                0.032978057861328125,
                0.048198699951171875,
            ],
            [-0.11989402770996094, -0.0417022705078125],
            0.031005859375,
        ),
        (
            "blk.0.attn_q.weight",
            [576, 576],
            59.22322082519531,
            63395.39872741699,
            [-0.0963134765625, 0.1573486328125, -0.0963134765625],
            [-0.14984130859375, -0.255859375],
            0.12109375,
        ),
        (
            "blk.29.ffn_down.weight",
            [1536, 576],
            49.83570861816406,
            126250.91435241699,
            [-0.2733154296875, 0.186279296875, 0.186279296875],
            [-0.08984375, 0.056640625],
            -0.04498291015625,
        ),
        (
            "output_norm.weight",
            [576, 1],
            1038.33203125,
            1045.09765625,
            [1.7578125, 1.8203125, 1.78125],
            [1.921875, 1.984375],
            1.8046875,
        ),
    ];
    for (name, dims, sum, abs, first, last, mid) in want {
        let t = g.tensor(name).unwrap();
        assert_eq!(t.dims.iter().product::<u64>(), dims[0] * dims[1], "{name}");
        let x = g.read_f32(&bytes, name).unwrap();
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        let a: f64 = x.iter().map(|&v| v.abs() as f64).sum();
        assert!((s - sum).abs() <= 1e-9 * abs, "{name}: sum {s} vs {sum}");
        assert!(
            (a - abs).abs() <= 1e-9 * abs,
            "{name}: sum |x| {a} vs {abs}"
        );
        assert_eq!(&x[..3], &first, "{name}");
        assert_eq!(&x[x.len() - 2..], &last, "{name}");
        assert_eq!(x[12345 % x.len()], mid, "{name}");
    }
}
