//! GGUF, llama.cpp's model file (v2 and v3; the format of the SmolLM2 file in
//! `../shared/MODELS.md`): reading the header, the metadata and the tensor table from the bytes
//! of a file, dequantising tensors (F32, F16, Q8_0, Q4_0, Q4_1) to f32, and writing files (the
//! tests and the browser test make their own tiny models with it).
//!
//! Layout (little-endian): magic `GGUF`, version u32, tensor count u64, metadata count u64;
//! metadata entries (string key, u32 type, value); tensor infos (string name, u32 dims, u64 per
//! dim innermost first, u32 GGML type, u64 offset into the data); then, at the next multiple of
//! `general.alignment` (default 32), the data. Strings are a u64 length and UTF-8 bytes.
//! Quantised blocks of 32 values: Q8_0 = f16 scale d + 32 i8 (x = d·q); Q4_0 = f16 d + 16 bytes
//! of nibbles (x = d·(q − 8)); Q4_1 = f16 d, f16 min m + 16 bytes (x = d·q + m); in both 4-bit
//! types the low nibbles are elements 0..16 of the block and the high nibbles 16..32.

use std::collections::BTreeMap;

use crate::error::{Error, Result, invalid};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Values per quantised block (Q8_0, Q4_0, Q4_1).
pub const QK: usize = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The tensor types of GGML that this reader dequantises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    /// The type of GGML id `id`, or an error that names it.
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            _ => {
                // The others of ggml.h, named so that the error says what the file holds.
                let name = match id {
                    6 => "Q5_0",
                    7 => "Q5_1",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    12 => "Q4_K",
                    13 => "Q5_K",
                    14 => "Q6_K",
                    15 => "Q8_K",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    30 => "BF16",
                    _ => "unknown",
                };
                invalid!(
                    "GGML tensor type {id} ({name}) is not supported (F32, F16, Q4_0, Q4_1 and \
                     Q8_0 are)"
                )
            }
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 => (1, 2),
            Self::Q4_0 => (QK, 2 + QK / 2),
            Self::Q4_1 => (QK, 4 + QK / 2),
            Self::Q8_0 => (QK, 2 + QK),
        }
    }

    /// Bytes of `n` values, or an error when `n` is not a whole number of blocks.
    pub fn bytes(self, n: u64) -> Result<u64> {
        let (per, size) = self.block();
        if !n.is_multiple_of(per as u64) {
            invalid!(
                "{n} values of type {} are not a whole number of its {per}-value blocks",
                self.name()
            );
        }
        (n / per as u64)
            .checked_mul(size as u64)
            .ok_or_else(|| Error::InvalidInput(format!("{n} values overflow a byte count")))
    }
}

/// One tensor of the table: name, dims innermost first (GGUF's order: a weight of `[576,
/// 1536]` is 1536 rows of 576), type, and where its data lies in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Bytes from the start of the file.
    pub offset: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn len(&self) -> u64 {
        self.dims.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed GGUF file (header, metadata, tensor table); the data stays in the caller's bytes.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts.
    pub data_offset: u64,
}

/// A little-endian cursor that names what it was reading when the bytes run out.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.at..e];
                self.at = e;
                Ok(s)
            }
            None => invalid!(
                "the GGUF file is truncated: it ends at byte {} inside {what} ({n} bytes from byte \
                 {})",
                self.b.len(),
                self.at
            ),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::InvalidInput(format!("{what} in the GGUF file is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        let what = format!("the value of `{key}`");
        let w = what.as_str();
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(w)?[0]),
            1 => Value::I8(self.arr::<1>(w)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(w)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(w)?)),
            4 => Value::U32(self.u32(w)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(w)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(w)?)),
            7 => match self.arr::<1>(w)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => invalid!("`{key}` holds the byte {b}, not a GGUF bool"),
            },
            8 => Value::String(self.string(w)?),
            9 => {
                if depth > 0 {
                    invalid!("`{key}` nests arrays, which GGUF files do not");
                }
                let ety = self.u32(w)?;
                let n = self.u64(w)?;
                // Every element takes at least a byte: a count past the file is truncation.
                if n > (self.b.len() - self.at) as u64 {
                    invalid!(
                        "the GGUF file is truncated: `{key}` claims {n} elements and {} bytes \
                         are left",
                        self.b.len() - self.at
                    );
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(w)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(w)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(w)?)),
            t => invalid!("`{key}` has metadata type {t}, which GGUF does not define"),
        })
    }
}

impl Gguf {
    /// Parse the header, metadata and tensor table of a GGUF file's bytes, and check that every
    /// tensor's data lies inside them.
    pub fn parse(bytes: &[u8]) -> Result<Gguf> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(4, "the magic").ok() != Some(&MAGIC[..]) {
            invalid!("not a GGUF file (it does not start with the bytes `GGUF`)");
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            invalid!("GGUF version {version} is not supported (2 and 3 are)");
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_meta = r.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_meta {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("the type of `{key}`"))?;
            let v = r.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut infos = vec![];
        for i in 0..n_tensors {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let nd = r.u32(&format!("the dims of `{name}`"))?;
            if nd == 0 || nd > 4 {
                invalid!("tensor `{name}` has {nd} dims (GGUF tensors have 1 to 4)");
            }
            let mut dims = vec![];
            for _ in 0..nd {
                dims.push(r.u64(&format!("the dims of `{name}`"))?);
            }
            let ty = r.u32(&format!("the type of `{name}`"))?;
            let ty = GgmlType::from_id(ty).map_err(|e| match e {
                Error::InvalidInput(m) => Error::InvalidInput(format!("tensor `{name}`: {m}")),
                e => e,
            })?;
            let offset = r.u64(&format!("the offset of `{name}`"))?;
            infos.push((name, dims, ty, offset));
        }
        let align = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => invalid!("general.alignment is {v:?}, not a power of two"),
            },
        };
        let data_offset = (r.at as u64).next_multiple_of(align);
        let mut tensors = vec![];
        for (name, dims, ty, offset) in infos {
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "tensor `{name}` has dims {dims:?}: too many values"
                    ))
                })?;
            let nbytes = ty
                .bytes(n)
                .map_err(|e| Error::InvalidInput(format!("tensor `{name}`: {e}")))?;
            if !offset.is_multiple_of(align) {
                invalid!(
                    "tensor `{name}` starts at data offset {offset}, not a multiple of {align}"
                );
            }
            let start = data_offset.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(nbytes));
            match end {
                Some(e) if e <= bytes.len() as u64 => {}
                _ => invalid!(
                    "the GGUF file is truncated: tensor `{name}` ({} bytes at data offset \
                     {offset}) ends past the file's {} bytes",
                    nbytes,
                    bytes.len()
                ),
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset: data_offset + offset,
                bytes: nbytes,
            });
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            data_offset,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string entry, or an error that names the missing key.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::InvalidInput(format!("the GGUF file has no string `{key}`")))
    }

    /// An unsigned integer entry, or an error that names the missing key.
    pub fn uint(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::InvalidInput(format!("the GGUF file has no integer `{key}`")))
    }

    /// A number entry, or an error that names the missing key.
    pub fn float(&self, key: &str) -> Result<f64> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::InvalidInput(format!("the GGUF file has no number `{key}`")))
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::InvalidInput(format!("the GGUF file has no tensor `{name}`")))
    }

    /// The raw bytes of tensor `t` inside the file's `bytes` (checked when parsed).
    pub fn data<'a>(&self, bytes: &'a [u8], t: &TensorInfo) -> Result<&'a [u8]> {
        bytes
            .get(t.offset as usize..(t.offset + t.bytes) as usize)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "tensor `{}` lies past these bytes (another file's table?)",
                    t.name
                ))
            })
    }

    /// Tensor `name` dequantised to f32, innermost dim fastest.
    pub fn read_f32(&self, bytes: &[u8], name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        dequantize(t.ty, self.data(bytes, t)?, t.len() as usize)
    }

    /// [`Self::read_f32`] of a tensor that must have GGUF dims `dims` (innermost first: a
    /// weight of `[d_in, d_out]` is d_out rows of d_in); the error names the tensor.
    pub fn read_shaped(&self, bytes: &[u8], name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        if !t.dims.iter().map(|&d| d as usize).eq(dims.iter().copied()) {
            invalid!(
                "tensor `{name}` has dims {:?}; this model's shape needs {dims:?}",
                t.dims
            );
        }
        self.read_f32(bytes, name)
    }
}

/// Hyperparameters of a Llama-family model from its GGUF metadata (`llama.*` keys).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaParams {
    pub layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub context: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub vocab: usize,
}

impl LlamaParams {
    /// A small Llama for [`random_llama`] files (tests, the selfcheck, `gguf --random`): 2
    /// layers, d_model 64, 4 query and 2 kv heads of 16, d_ff 96, RoPE base 10000.
    pub fn tiny(vocab: usize, context: usize) -> Self {
        Self {
            layers: 2,
            d_model: 64,
            d_ff: 96,
            heads_q: 4,
            heads_kv: 2,
            head_dim: 16,
            context,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            vocab,
        }
    }

    /// The model's hyperparameters; an error for another architecture or missing keys.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.str("general.architecture")?;
        if arch != "llama" {
            invalid!("the GGUF model's architecture is `{arch}`; this loader takes `llama`");
        }
        let u = |k: &str| -> Result<usize> { Ok(g.uint(&format!("llama.{k}"))? as usize) };
        let (d_model, heads_q) = (u("embedding_length")?, u("attention.head_count")?);
        let heads_kv = match g.get("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => heads_q,
        };
        if heads_q == 0 || heads_kv == 0 || !d_model.is_multiple_of(heads_q) {
            invalid!("{heads_q} query heads do not divide d_model {d_model}");
        }
        if !heads_q.is_multiple_of(heads_kv) {
            invalid!("{heads_q} query heads are not a multiple of {heads_kv} kv heads");
        }
        let vocab = match g.get("llama.vocab_size") {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => match g.get("tokenizer.ggml.tokens") {
                Some(Value::Array(t)) => t.len(),
                _ => invalid!("the GGUF file gives no vocabulary size"),
            },
        };
        if let Some(n) = g.get("llama.rope.dimension_count").and_then(|v| v.as_u64())
            && n as usize != d_model / heads_q
        {
            invalid!(
                "the model rotates {n} of its {} head dims (partial RoPE is not supported)",
                d_model / heads_q
            );
        }
        Ok(Self {
            layers: u("block_count")?,
            d_model,
            d_ff: u("feed_forward_length")?,
            heads_q,
            heads_kv,
            head_dim: d_model / heads_q,
            context: u("context_length")?,
            rope_base: g.float("llama.rope.freq_base").unwrap_or(10000.0),
            rms_eps: g.float("llama.attention.layer_norm_rms_epsilon")?,
            vocab,
        })
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `n` values of type `ty` from `data` (exactly their bytes) as f32.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let want = ty.bytes(n as u64)?;
    if data.len() as u64 != want {
        invalid!(
            "{n} values of type {} take {want} bytes; {} were given",
            ty.name(),
            data.len()
        );
    }
    let (_, bs) = ty.block();
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
        ),
        GgmlType::F16 => out.extend((0..n).map(|i| f16_at(data, 2 * i))),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(bs) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            for b in data.chunks_exact(bs) {
                let d = f16_at(b, 0);
                let (m, qs) = match ty {
                    GgmlType::Q4_1 => (f16_at(b, 2), &b[4..]),
                    _ => (-8.0 * d, &b[2..]),
                };
                out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
    }
    Ok(out)
}

/// `x` quantised to type `ty` as GGML's reference quantisers do (round to nearest; Q4_0's
/// scale from the value of largest magnitude, d = max / −8; Q4_1's from the block's min and
/// max; Q8_0's d = max|x| / 127). `x.len()` must be a whole number of blocks.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    ty.bytes(x.len() as u64)?;
    let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    let mut out = vec![];
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|&v| out.extend(h(v))),
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in x.chunks_exact(QK) {
                let max = b
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for b in x.chunks_exact(QK) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                out.extend(h(min));
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
            }
        }
    }
    Ok(out)
}

/// A GGUF v3 file built in memory: metadata, then tensors (quantised when added), the data
/// aligned to GGUF's default 32 bytes (so `general.alignment` is not to be set).
#[derive(Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(mut self, key: &str, v: Value) -> Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// A tensor of `dims` (innermost first) from f32 values, quantised to `ty`.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, x: &[f32]) -> Result<Self> {
        if dims.iter().product::<u64>() != x.len() as u64 {
            invalid!(
                "tensor `{name}`: dims {dims:?} do not hold {} values",
                x.len()
            );
        }
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, quantize(ty, x)?));
        Ok(self)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        fn string(o: &mut Vec<u8>, s: &str) {
            o.extend((s.len() as u64).to_le_bytes());
            o.extend(s.as_bytes());
        }
        fn value(o: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => o.push(*x),
                Value::I8(x) => o.push(*x as u8),
                Value::U16(x) => o.extend(x.to_le_bytes()),
                Value::I16(x) => o.extend(x.to_le_bytes()),
                Value::U32(x) => o.extend(x.to_le_bytes()),
                Value::I32(x) => o.extend(x.to_le_bytes()),
                Value::U64(x) => o.extend(x.to_le_bytes()),
                Value::I64(x) => o.extend(x.to_le_bytes()),
                Value::F32(x) => o.extend(x.to_le_bytes()),
                Value::F64(x) => o.extend(x.to_le_bytes()),
                Value::Bool(x) => o.push(*x as u8),
                Value::String(s) => string(o, s),
                Value::Array(a) => {
                    o.extend(a.first().map_or(4, Value::type_id).to_le_bytes());
                    o.extend((a.len() as u64).to_le_bytes());
                    a.iter().for_each(|x| value(o, x));
                }
            }
        }
        let mut o = MAGIC.to_vec();
        o.extend(3u32.to_le_bytes());
        o.extend((self.tensors.len() as u64).to_le_bytes());
        o.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            string(&mut o, k);
            o.extend(v.type_id().to_le_bytes());
            value(&mut o, v);
        }
        let mut at = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            string(&mut o, name);
            o.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| o.extend(d.to_le_bytes()));
            o.extend(ty.id().to_le_bytes());
            o.extend(at.to_le_bytes());
            at = (at + data.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        for (_, _, _, data) in &self.tensors {
            o.resize(
                (o.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT) as usize,
                0,
            );
            o.extend(data);
        }
        o
    }
}

/// GPT-2's byte-level alphabet: the printable character that stands for each byte in a
/// byte-level BPE vocabulary (printable Latin-1 bytes stand for themselves, the others for
/// U+0100 upwards in byte order).
pub fn byte_chars() -> [char; 256] {
    let keep = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut out = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        out[b as usize] = if keep(b) {
            char::from_u32(b).unwrap_or('?')
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('?')
        };
    }
    out
}

/// A Llama model with random weights as a GGUF file, sized by `p` (`p.vocab` at least 262):
/// SmolLM2's layout and tensor types (Q8_0 embedding, Q4_1 projections, F32 norms, tied
/// output head), a byte-level BPE tokenizer (the ChatML control tokens, the 256 byte tokens,
/// merges of common pairs up to the vocabulary size) and a ChatML chat template. For tests and
/// demos that need a real file without downloading one.
pub fn random_llama(p: &LlamaParams, seed: u64) -> Result<Vec<u8>> {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let bytes = byte_chars();
    if p.vocab < specials.len() + 256 {
        invalid!(
            "a random Llama needs a vocabulary of at least {} tokens",
            specials.len() + 256
        );
    }
    for (n, v) in [("d_model", p.d_model), ("d_ff", p.d_ff)] {
        if v == 0 || !v.is_multiple_of(QK) {
            invalid!("{n} = {v}: quantised rows hold whole blocks of {QK}");
        }
    }
    if p.heads_q * p.head_dim != p.d_model
        || p.heads_kv == 0
        || !p.heads_q.is_multiple_of(p.heads_kv)
    {
        invalid!(
            "heads {} x head_dim {} must make d_model {} with heads_kv dividing heads",
            p.heads_q,
            p.head_dim,
            p.d_model
        );
    }
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    tokens.extend(bytes.iter().map(|c| c.to_string()));
    // Merges: pairs of lowercase letters and a space with a letter, in a fixed order.
    let mut merges = vec![];
    let space = bytes[b' ' as usize];
    let pairs = (b'a'..=b'z').flat_map(|a| {
        [(space, a as char)]
            .into_iter()
            .chain((b'a'..=b'z').map(move |b| (a as char, b as char)))
    });
    for (a, b) in pairs.take(p.vocab - tokens.len()) {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    let mut types = vec![Value::I32(3); specials.len()];
    types.resize(tokens.len(), Value::I32(1));
    let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let u = |x: usize| Value::U32(x as u32);
    let strs = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut w = Writer::new()
        .meta("general.architecture", Value::String("llama".into()))
        .meta("general.name", Value::String("random-llama".into()))
        .meta("llama.block_count", u(p.layers))
        .meta("llama.context_length", u(p.context))
        .meta("llama.embedding_length", u(p.d_model))
        .meta("llama.feed_forward_length", u(p.d_ff))
        .meta("llama.attention.head_count", u(p.heads_q))
        .meta("llama.attention.head_count_kv", u(p.heads_kv))
        .meta("llama.rope.freq_base", Value::F32(p.rope_base as f32))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(p.rms_eps as f32),
        )
        .meta("llama.vocab_size", u(tokens.len()))
        .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("smollm".into()))
        .meta("tokenizer.ggml.tokens", strs(tokens.clone()))
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta("tokenizer.ggml.merges", strs(merges))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(2))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .meta("tokenizer.chat_template", Value::String(template.into()));
    let mut rng = crate::reference::Rng::new(seed);
    let (d, kv, ff, n) = (
        p.d_model as u64,
        (p.heads_kv * p.head_dim) as u64,
        p.d_ff as u64,
        tokens.len() as u64,
    );
    // Weights at the scale of a trained model's: unit-variance activations stay so.
    let sd = |fan_in: u64| 1.0 / (fan_in as f64).sqrt();
    w = w.tensor(
        "token_embd.weight",
        &[d, n],
        GgmlType::Q8_0,
        &rng.normal_vec((d * n) as usize, 1.0),
    )?;
    for l in 0..p.layers {
        let name = |t: &str| format!("blk.{l}.{t}.weight");
        let norm: Vec<f32> = (0..d).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect();
        w = w
            .tensor(&name("attn_norm"), &[d], GgmlType::F32, &norm)?
            .tensor(
                &name("attn_q"),
                &[d, d],
                GgmlType::Q4_1,
                &rng.normal_vec((d * d) as usize, sd(d)),
            )?
            .tensor(
                &name("attn_k"),
                &[d, kv],
                GgmlType::Q4_1,
                &rng.normal_vec((d * kv) as usize, sd(d)),
            )?
            .tensor(
                &name("attn_v"),
                &[d, kv],
                GgmlType::Q4_1,
                &rng.normal_vec((d * kv) as usize, sd(d)),
            )?
            .tensor(
                &name("attn_output"),
                &[d, d],
                GgmlType::Q4_1,
                &rng.normal_vec((d * d) as usize, sd(d)),
            )?
            .tensor(&name("ffn_norm"), &[d], GgmlType::F32, &norm)?
            .tensor(
                &name("ffn_gate"),
                &[d, ff],
                GgmlType::Q4_1,
                &rng.normal_vec((d * ff) as usize, sd(d)),
            )?
            .tensor(
                &name("ffn_up"),
                &[d, ff],
                GgmlType::Q4_1,
                &rng.normal_vec((d * ff) as usize, sd(d)),
            )?
            .tensor(
                &name("ffn_down"),
                &[ff, d],
                GgmlType::Q4_1,
                &rng.normal_vec((d * ff) as usize, sd(ff)),
            )?;
    }
    let norm: Vec<f32> = (0..d).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect();
    w = w.tensor("output_norm.weight", &[d], GgmlType::F32, &norm)?;
    Ok(w.to_bytes())
}
