//! Minimal `.npy` reading and writing (version 1/2 headers, little-endian f32, C order), so users
//! can feed real model activations to `sparse-attn map`. NumPy: `np.save("q.npy", q.astype("<f4"))`.

use crate::error::{Error, Result, invalid};

/// An f32 array from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parse `.npy` bytes holding little-endian f32 in C order.
pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        invalid!("not a .npy file (missing the \\x93NUMPY magic)");
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => invalid!(".npy format version {v} is not supported"),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| Error::InvalidInput("truncated .npy header".into()))?;
    let descr = header_field(header, "descr").unwrap_or("");
    if !(descr.starts_with("'<f4'") || descr.starts_with("'float32'")) {
        invalid!(
            ".npy dtype {} is not supported: save little-endian float32 (`a.astype('<f4')`)",
            descr.split(',').next().unwrap_or("?")
        );
    }
    if header_field(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        invalid!(".npy array is in Fortran order; save a C-contiguous array");
    }
    let shape_txt = header_field(header, "shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| Error::InvalidInput(".npy header has no shape".into()))?;
    let shape = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| Error::InvalidInput(format!("bad .npy shape entry `{s}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    if body.len() != n * 4 {
        invalid!(
            ".npy body holds {} bytes; shape {shape:?} of f32 needs {}",
            body.len(),
            n * 4
        );
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(NpyArray { shape, data })
}

/// Read a `.npy` file.
pub fn read(path: &std::path::Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    parse(&bytes).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
}

/// Serialise an f32 array as `.npy` (version 1.0).
pub fn to_bytes(a: &NpyArray) -> Vec<u8> {
    let dims: Vec<String> = a.shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that magic + version + length + header + newline is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for x in &a.data {
        out.extend(x.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let a = NpyArray {
            shape: vec![2, 3, 4],
            data: (0..24).map(|i| i as f32 * 0.5 - 3.0).collect(),
        };
        assert_eq!(parse(&to_bytes(&a)).unwrap(), a);
        let one = NpyArray {
            shape: vec![5],
            data: vec![1.0; 5],
        };
        assert_eq!(parse(&to_bytes(&one)).unwrap(), one);
        assert!(
            parse(b"hello world")
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut f8 = to_bytes(&a);
        let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
        f8[at + 2] = b'8';
        assert!(parse(&f8).unwrap_err().to_string().contains("float32"));
        let mut short = to_bytes(&a);
        short.truncate(short.len() - 4);
        assert!(parse(&short).unwrap_err().to_string().contains("needs 96"));
    }
}
