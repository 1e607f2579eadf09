//! The tokenizer built from GGUF metadata (feature `llm`): round trips on Unicode, code and
//! whitespace, special tokens, streaming, SmolLM2's digit rule, the ChatML prompt, errors for
//! tokenizers it cannot build; and the real SmolLM2 file's encodings against those recorded
//! from Hugging Face transformers on the GPU machine (bench/smollm2/reference.json).
#![cfg(feature = "llm")]

use crate::common;

use sparse_attn::gguf::{Gguf, Value, Writer, byte_chars, random_llama};
use sparse_attn::tokenizer::Tokenizer;

const TEXTS: [&str; 8] = [
    "Hello, world! The capital of France is Paris.",
    "Ünïcödé: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🙂👍🏽 and \u{200d} joiners",
    "fn main() {\n\tlet x: Vec<u32> = (0..10).collect();\n    println!(\"{x:?}\");\n}\n",
    "   leading, trailing and   inner   spaces   ",
    "\n\n\r\n\t \t\n",
    "numbers 1234567890 and 3.14159e-10, -42, 0x1F",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a",
];

fn tiny() -> (Vec<u8>, Tokenizer) {
    let p = common::tiny_llama(400, 128);
    let bytes = random_llama(&p, 3).unwrap();
    let t = Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    (bytes, t)
}

#[test]
fn text_round_trips_and_streams() {
    let (_, t) = tiny();
    assert_eq!(t.vocab_size(), 400);
    for text in TEXTS {
        let ids = t.encode(text).unwrap();
        assert!(!ids.is_empty());
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
        // Streaming gives the same text, never half a character.
        let mut s = t.stream(false);
        let streamed: String = ids.iter().map(|&i| s.step(i).unwrap()).collect();
        assert_eq!(streamed, text);
    }
}

#[test]
fn special_tokens_merges_and_digits() {
    let (_, t) = tiny();
    // Control tokens written in the text are single tokens; skipped on request.
    let ids = t.encode("<|im_start|>user<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(t.decode(&ids, true).unwrap(), "user");
    assert_eq!((t.bos, t.eos, t.add_bos), (Some(1), Some(2), false));
    // Merges apply: " a" is the merged token "Ġa".
    let ids = t.encode(" a").unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    // SmolLM2's pre-tokenizer: each digit is its own token.
    assert_eq!(t.encode("2024").unwrap().len(), 4);
}

#[test]
fn chat_prompt_is_chatml_with_the_default_system_message() {
    let (_, t) = tiny();
    assert!(t.has_chat_template());
    assert_eq!(
        t.chat_prompt("Hi?", None).unwrap(),
        "<|im_start|>system\nYou are a test model.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        t.chat_prompt("Hi?", Some("Be brief.")).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

/// A file whose metadata is edited: `edit` replaces (or with None removes) one key.
fn edited(key: &str, v: Option<Value>) -> Result<Tokenizer, String> {
    let (bytes, _) = tiny();
    let g = Gguf::parse(&bytes).unwrap();
    let mut w = Writer::new();
    for (k, val) in &g.metadata {
        if k == key {
            continue;
        }
        w = w.meta(k, val.clone());
    }
    if let Some(v) = v {
        w = w.meta(key, v);
    }
    let g = Gguf::parse(&w.to_bytes()).unwrap();
    Tokenizer::from_gguf(&g).map_err(|e| e.to_string())
}

#[test]
fn tokenizers_it_cannot_build_are_errors_that_say_why() {
    let s = |x: &str| Some(Value::String(x.into()));
    let cases: [(&str, Option<Value>, &str); 6] = [
        ("tokenizer.ggml.model", s("llama"), "`llama`"),
        ("tokenizer.ggml.pre", s("qwen2"), "`qwen2`"),
        ("tokenizer.ggml.tokens", None, "no `tokenizer.ggml.tokens`"),
        (
            "tokenizer.ggml.merges",
            Some(Value::Array(vec![Value::String("ab".into())])),
            "merge `ab`",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Some(Value::U32(9999)),
            "9999",
        ),
        (
            "tokenizer.ggml.token_type",
            Some(Value::Array(vec![Value::I32(1)])),
            "1 token types",
        ),
    ];
    for (key, v, want) in cases {
        match edited(key, v) {
            Ok(_) => panic!("{key}: built a tokenizer"),
            Err(e) => assert!(e.contains(want), "{key}: {e}"),
        }
    }
    // Every byte has its own printable stand-in.
    let chars = byte_chars();
    let set: std::collections::HashSet<char> = chars.iter().copied().collect();
    assert_eq!(set.len(), 256);
    assert_eq!((chars[b'a' as usize], chars[b' ' as usize]), ('a', 'Ġ'));
}

/// The SmolLM2 file: round trips, and the ids Hugging Face's tokenizer gives for the same
/// texts (recorded by bench/smollm2/reference.py with transformers on the GPU machine).
#[test]
fn smollm2_encodes_as_transformers_does() {
    let path = std::env::var("SPARSE_ATTN_GGUF")
        .unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("SKIPPED: no {path} (scripts/fetch-model.sh fetches it)");
        return;
    };
    let t = Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!((t.bos, t.eos), (Some(1), Some(2)));
    for text in TEXTS {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }
    let reference = std::fs::read_to_string("bench/smollm2/reference.json").unwrap();
    let r: serde_json::Value = serde_json::from_str(&reference).unwrap();
    let cases = r["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= TEXTS.len());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(t.encode(text).unwrap(), want, "{text:?}");
    }
}
