//! A pretrained model's tokenizer from its GGUF metadata (feature `llm`): Hugging Face's
//! `tokenizers` BPE built from `tokenizer.ggml.tokens` and `.merges`, the pre-tokenizer that
//! `tokenizer.ggml.pre` names, byte-level decoding, the control tokens as special tokens, and
//! the chat template's ChatML form (the one SmolLM2 and many small models use).
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE) with the pre-types `smollm`,
//! `gpt2` and `default` (digits: SmolLM2 splits every digit, GPT-2 keeps runs); other types are
//! an error that names them.

use tokenizers::AddedToken;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::error::{Error, Result, invalid};
use crate::gguf::{Gguf, Value};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;

/// A tokenizer and the special tokens generation needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning of sequence, if the file names one, and whether prompts start with it.
    pub bos: Option<u32>,
    pub add_bos: bool,
    /// Generation stops at this token.
    pub eos: Option<u32>,
    chat: Option<ChatMl>,
}

/// The ChatML chat format (`<|im_start|>role\ncontent<|im_end|>\n`), with the default system
/// message the template inserts when the conversation has none.
#[derive(Clone, Debug, PartialEq)]
struct ChatMl {
    default_system: Option<String>,
}

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    match g.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    Error::InvalidInput(format!("the GGUF entry `{key}` holds a non-string"))
                })
            })
            .collect(),
        Some(_) => invalid!("the GGUF entry `{key}` is not an array"),
        None => invalid!("the GGUF file has no `{key}` (it carries no tokenizer)"),
    }
}

fn token_id(g: &Gguf, key: &str, vocab: usize) -> Result<Option<u32>> {
    match g.get(key).map(|v| v.as_u64()) {
        None => Ok(None),
        Some(Some(id)) if (id as usize) < vocab => Ok(Some(id as u32)),
        Some(x) => invalid!("`{key}` = {x:?} is not a token of the {vocab}-token vocabulary"),
    }
}

impl Tokenizer {
    /// The tokenizer that `g`'s metadata describes.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            invalid!(
                "the GGUF tokenizer is `{model}`; this loader builds byte-level BPE (`gpt2`) \
                 tokenizers only"
            );
        }
        // SmolLM2 (llama.cpp's `smollm`): each digit alone, then GPT-2's byte-level pattern.
        let individual_digits = match g.str("tokenizer.ggml.pre").unwrap_or("default") {
            "smollm" => true,
            "gpt2" | "default" => false,
            other => invalid!(
                "the GGUF tokenizer's pre-tokenizer `{other}` is not supported (smollm, gpt2 \
                 and default are)"
            ),
        };
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let merges = strings(g, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            invalid!(
                "the GGUF tokenizer has {} tokens but {} token types",
                tokens.len(),
                types.len()
            );
        }
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            if vocab.insert(t.clone(), i as u32).is_some() {
                invalid!("the GGUF vocabulary holds `{t}` twice");
            }
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        Error::InvalidInput(format!("GGUF merge `{m}` is not two tokens"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::InvalidInput(format!("the GGUF tokenizer: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(individual_digits).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control tokens are special (skippable when decoding); user-defined ones are not.
        let added = |kind: u64| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, ty)| **ty == kind)
                .map(|(t, _)| AddedToken::from(t.clone(), kind == TYPE_CONTROL))
                .collect()
        };
        inner.add_special_tokens(&added(TYPE_CONTROL));
        inner.add_tokens(&added(TYPE_USER_DEFINED));
        let n = tokens.len();
        let chat = match g.get("tokenizer.chat_template").and_then(Value::as_str) {
            Some(t) if t.contains("<|im_start|>") => Some(ChatMl {
                default_system: default_system(t),
            }),
            _ => None,
        };
        Ok(Self {
            inner,
            bos: token_id(g, "tokenizer.ggml.bos_token_id", n)?,
            add_bos: matches!(
                g.get("tokenizer.ggml.add_bos_token"),
                Some(Value::Bool(true))
            ),
            eos: token_id(g, "tokenizer.ggml.eos_token_id", n)?,
            chat,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (special tokens written in it, e.g. `<|im_start|>`, are theirs;
    /// BOS first where the file asks for it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::InvalidInput(format!("tokenizing: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(b)) = (self.add_bos, self.bos) {
            ids.push(b);
        }
        ids.extend(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids` (special tokens kept unless `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::InvalidInput(format!("detokenizing: {e}")))
    }

    /// Streaming decoding: text is released once its bytes form whole characters.
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream(self.inner.decode_stream(skip_special))
    }

    /// Whether the file's chat template is ChatML (what [`Self::chat_prompt`] writes).
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// A one-turn conversation in the model's chat format, ready for the assistant's answer:
    /// the system message (`system`, else the template's default), the user's message, the
    /// assistant's header. An error when the file has no ChatML template.
    pub fn chat_prompt(&self, user: &str, system: Option<&str>) -> Result<String> {
        let Some(chat) = &self.chat else {
            invalid!(
                "this model's GGUF file has no ChatML chat template; give the prompt as raw text"
            )
        };
        let mut s = String::new();
        if let Some(sys) = system.or(chat.default_system.as_deref()) {
            s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        s.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        Ok(s)
    }
}

/// Streaming detokenizer (see [`Tokenizer::stream`]).
pub struct TextStream<'a>(
    tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
);

impl TextStream<'_> {
    /// The text that token `id` completes (empty while a character is still partial).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.0
            .step(id)
            .map(Option::unwrap_or_default)
            .map_err(|e| Error::InvalidInput(format!("detokenizing token {id}: {e}")))
    }
}

/// The system message a ChatML template inserts when the conversation starts without one: the
/// literal between `<|im_start|>system\n` and `<|im_end|>`, if the template has one.
fn default_system(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let len = template[start..].find("<|im_end|>")?;
    let msg = &template[start..start + len];
    // A template variable (`{{ ... }}`) or quote there is not a literal message.
    (!msg.contains('{') && !msg.contains('\'') && !msg.is_empty()).then(|| msg.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_system_message_is_read_from_the_template() {
        let t = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}";
        assert_eq!(super::default_system(t).as_deref(), Some("You are helpful"));
        let t = "{{'<|im_start|>system\n' + message['content'] + '<|im_end|>'}}";
        assert_eq!(super::default_system(t), None);
    }
}
