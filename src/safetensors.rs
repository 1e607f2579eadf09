//! Minimal `.safetensors` reading and writing (the format of Hugging Face checkpoints and of
//! `safetensors.numpy.save_file`), so `sparse-attn map` can read q and k from one file:
//! an 8-byte little-endian header length, a JSON header
//! `{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}`, then the data.
//! F32, F16, BF16 and F64 tensors are read (converted to f32); writing produces F32.

use crate::error::{Error, Result, invalid};
use crate::npy::NpyArray;

/// Tensor names in a `.safetensors` file, in the order of their data.
pub fn names(bytes: &[u8]) -> Result<Vec<String>> {
    let (header, _) = split(bytes)?;
    let mut v: Vec<(u64, String)> = header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(k, e)| (offsets(k, e).map(|o| o.0).unwrap_or(0), k.clone()))
        .collect();
    v.sort();
    Ok(v.into_iter().map(|(_, k)| k).collect())
}

fn split(bytes: &[u8]) -> Result<(serde_json::Map<String, serde_json::Value>, &[u8])> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| Error::InvalidInput("not a .safetensors file (too short)".into()))?;
    let header = usize::try_from(n)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "not a .safetensors file (header length {n} exceeds the file)"
            ))
        })?;
    let json: serde_json::Value = serde_json::from_slice(header).map_err(|e| {
        Error::InvalidInput(format!("not a .safetensors file (bad JSON header: {e})"))
    })?;
    let serde_json::Value::Object(map) = json else {
        invalid!("not a .safetensors file (the header is not a JSON object)");
    };
    Ok((map, &bytes[8 + header.len()..]))
}

fn offsets(name: &str, e: &serde_json::Value) -> Result<(u64, u64)> {
    let o = e["data_offsets"]
        .as_array()
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
        .ok_or_else(|| Error::InvalidInput(format!("tensor `{name}` has no valid data_offsets")))?;
    Ok(o)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        // Subnormal: value = man * 2^-24.
        (0, m) => return sign_of(sign) * (m as f32) * 2f32.powi(-24),
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn sign_of(sign: u32) -> f32 {
    if sign != 0 { -1.0 } else { 1.0 }
}

/// The tensor `name` (or the only tensor, when `name` is `None`) as f32.
pub fn parse(bytes: &[u8], name: Option<&str>) -> Result<NpyArray> {
    let (header, data) = split(bytes)?;
    let tensors: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    let name = match name {
        Some(n) => n.to_string(),
        None if tensors.len() == 1 => tensors[0].clone(),
        None => invalid!(
            "the file holds {} tensors ({}); name one as FILE.safetensors:NAME",
            tensors.len(),
            tensors
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let e = header.get(&name).ok_or_else(|| {
        Error::InvalidInput(format!(
            "no tensor `{name}` in the file (it holds: {})",
            tensors
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let dtype = e["dtype"].as_str().unwrap_or("?");
    let shape: Vec<usize> = e["shape"]
        .as_array()
        .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| Error::InvalidInput(format!("tensor `{name}` has no valid shape")))?;
    let (b, end) = offsets(&name, e)?;
    let raw = usize::try_from(b)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(b, e)| data.get(b..e))
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "tensor `{name}`: data_offsets lie outside the file"
            ))
        })?;
    let n: usize = shape.iter().product();
    let width = match dtype {
        "F32" => 4,
        "F16" | "BF16" => 2,
        "F64" => 8,
        other => invalid!(
            "tensor `{name}` has dtype {other}; supported: F32, F16, BF16, F64 (floating point)"
        ),
    };
    if raw.len() != n * width {
        invalid!(
            "tensor `{name}`: shape {shape:?} of {dtype} needs {} bytes, the file gives {}",
            n * width,
            raw.len()
        );
    }
    let data = match dtype {
        "F32" => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        "F16" => raw
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        "BF16" => raw
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        _ => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
    };
    Ok(NpyArray { shape, data })
}

/// Read one tensor from a file (see [`parse`]).
pub fn read(path: &std::path::Path, name: Option<&str>) -> Result<NpyArray> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    parse(&bytes, name).map_err(|e| match e {
        Error::InvalidInput(m) => Error::InvalidInput(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Named f32 tensors as `.safetensors` bytes (F32, in the given order).
pub fn to_bytes(tensors: &[(&str, &NpyArray)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, a) in tensors {
        let n = 4 * a.data.len();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": a.shape, "data_offsets": [at, at + n]}),
        );
        at += n;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    // The format pads the header with spaces to a multiple of 8 bytes.
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, a) in tensors {
        out.extend(a.data.iter().flat_map(|x| x.to_le_bytes()));
    }
    out
}

/// A q/k source on the command line: `x.npy`, or `x.safetensors[:NAME]`.
pub fn load_spec(spec: &str) -> Result<NpyArray> {
    // The file name ends in ".safetensors", followed by nothing or ":NAME"; an earlier
    // ".safetensors" may belong to a folder name.
    const EXT: &str = ".safetensors";
    let split = spec
        .match_indices(EXT)
        .map(|(at, _)| spec.split_at(at + EXT.len()))
        .filter(|(_, rest)| rest.is_empty() || (rest.starts_with(':') && !rest.contains('/')))
        .last();
    if let Some((path, rest)) = split {
        let name = rest.strip_prefix(':').filter(|n| !n.is_empty());
        if !rest.is_empty() && name.is_none() {
            invalid!("`{spec}`: write FILE.safetensors or FILE.safetensors:NAME");
        }
        return read(std::path::Path::new(path), name);
    }
    crate::npy::read(std::path::Path::new(spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_named_like_a_file_is_not_the_file() {
        let dir = std::env::temp_dir().join(format!("acts.safetensors.d-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q = NpyArray {
            shape: vec![2],
            data: vec![1.0, 2.0],
        };
        let file = dir.join("acts.safetensors");
        std::fs::write(&file, to_bytes(&[("q", &q)])).unwrap();
        let spec = format!("{}:q", file.display());
        assert_eq!(load_spec(&spec).unwrap(), q);
        assert_eq!(load_spec(&file.display().to_string()).unwrap(), q);
        let e = load_spec(&format!("{}:", file.display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("FILE.safetensors:NAME"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn round_trip_and_errors() {
        let q = NpyArray {
            shape: vec![2, 3],
            data: vec![1.0, -2.5, 3.0, 0.0, 1e-3, 7.0],
        };
        let k = NpyArray {
            shape: vec![1],
            data: vec![4.0],
        };
        let bytes = to_bytes(&[("q", &q), ("k", &k)]);
        assert_eq!(parse(&bytes, Some("q")).unwrap(), q);
        assert_eq!(parse(&bytes, Some("k")).unwrap(), k);
        assert_eq!(names(&bytes).unwrap(), vec!["q", "k"]);
        let e = parse(&bytes, None).unwrap_err().to_string();
        assert!(e.contains("holds 2 tensors"), "{e}");
        let e = parse(&bytes, Some("v")).unwrap_err().to_string();
        assert!(e.contains("no tensor `v`"), "{e}");
        assert!(parse(&bytes[..20], Some("q")).is_err());
        assert!(parse(b"not a safetensors file", None).is_err());
    }

    #[test]
    fn half_precision_converts_exactly() {
        // 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), 0.0 in f16; 1.0 and -3.0 in bf16.
        let f16: [u16; 5] = [0x3c00, 0xc000, 0x7bff, 0x0001, 0x0000];
        let want = [1.0, -2.0, 65504.0, 2f32.powi(-24), 0.0];
        for (h, w) in f16.iter().zip(want) {
            assert_eq!(f16_to_f32(*h), w);
        }
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        let header = br#"{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0x80, 0x3f, 0x40, 0xc0]);
        assert_eq!(parse(&bytes, None).unwrap().data, vec![1.0, -3.0]);
        let bad = br#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut bytes = (bad.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(bad);
        bytes.extend_from_slice(&[0; 8]);
        assert!(parse(&bytes, None).unwrap_err().to_string().contains("I64"));
    }
}
