//! Rust mirrors of the WGSL uniform structs. [`uniform!`] declares the Rust struct and records
//! its fields (name, byte offset, type) and which WGSL struct it mirrors; a test parses every
//! WGSL struct with naga and holds the two to the same fields, order, offsets and size, so a
//! field added on one side only fails CI instead of shifting every parameter after it.

/// A uniform block shared with a shader (read by the layout test below).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) trait Uniform: bytemuck::Pod {
    /// The shader file that declares the WGSL struct, and its name there.
    const WGSL: (&'static str, &'static str);
    /// (name, byte offset, Rust type) of every field, in order.
    const FIELDS: &'static [(&'static str, usize, &'static str)];
}

/// `uniform!("file.wgsl", WgslName, pub(crate) struct Params { a: u32, b: f32, _pad: [u32; 2] })`
macro_rules! uniform {
    ($file:literal, $wgsl:ident, $(#[$m:meta])* $vis:vis struct $name:ident {
        $($(#[$fm:meta])* $fvis:vis $field:ident : $ty:ty),* $(,)?
    }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fm])* $fvis $field: $ty),*
        }

        impl $crate::gpu::uniform::Uniform for $name {
            const WGSL: (&'static str, &'static str) = ($file, stringify!($wgsl));
            const FIELDS: &'static [(&'static str, usize, &'static str)] = &[
                $((stringify!($field), std::mem::offset_of!($name, $field), stringify!($ty))),*
            ];
        }
    };
}
pub(crate) use uniform;

#[cfg(test)]
mod tests {
    use super::Uniform;
    use wgpu::naga;

    /// Non-padding fields (name, offset, scalar type) and the total size of the WGSL struct.
    fn wgsl_layout(file: &str, name: &str) -> (Vec<(String, u32, String)>, u32) {
        let src = crate::gpu::pipeline::source(file).unwrap();
        let start = src
            .find(&format!("struct {name} {{"))
            .unwrap_or_else(|| panic!("{file} declares no struct {name}"));
        let end = start + src[start..].find('}').unwrap() + 1;
        let module = naga::front::wgsl::parse_str(&src[start..end])
            .unwrap_or_else(|e| panic!("{file}: {name}: {e}"));
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))
            .unwrap();
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{name} is not a struct")
        };
        let fields = members
            .iter()
            .filter(|m| !m.name.as_deref().unwrap_or("_").starts_with('_'))
            .map(|m| {
                let kind = match &module.types[m.ty].inner {
                    naga::TypeInner::Scalar(s) if s.kind == naga::ScalarKind::Uint => "u32",
                    naga::TypeInner::Scalar(s) if s.kind == naga::ScalarKind::Float => "f32",
                    other => panic!("{name}.{:?}: unexpected type {other:?}", m.name),
                };
                (m.name.clone().unwrap(), m.offset, kind.to_string())
            })
            .collect();
        (fields, *span)
    }

    fn check<T: Uniform>() {
        let (file, name) = T::WGSL;
        let (wgsl, span) = wgsl_layout(file, name);
        let rust: Vec<(String, u32, String)> = T::FIELDS
            .iter()
            .filter(|f| !f.0.starts_with('_'))
            .map(|&(n, o, t)| (n.to_string(), o as u32, t.to_string()))
            .collect();
        assert_eq!(
            rust, wgsl,
            "{file}: the Rust mirror of {name} disagrees with the WGSL"
        );
        assert_eq!(
            std::mem::size_of::<T>() as u32,
            span,
            "{file}: {name} has {span} bytes in WGSL"
        );
    }

    #[test]
    fn every_uniform_struct_matches_its_wgsl() {
        check::<crate::ops::launch::Params>();
        check::<crate::ops::select::Params>();
        check::<crate::ops::metrics::Params>();
        check::<crate::ops::align::Params>();
        check::<crate::gpu::tensor::FillParams>();
        check::<crate::decode::attention::DecodeParams>();
        check::<crate::decode::cache::CacheParams>();
        check::<crate::decode::offload::OffloadParams>();
    }

    /// The check itself fails on a mismatch: a struct whose fields are out of order.
    #[test]
    #[should_panic(expected = "disagrees with the WGSL")]
    fn a_reordered_field_is_caught() {
        super::uniform!(
            "attn_params.wgsl",
            Params,
            struct Swapped {
                seq_k: u32,
                seq_q: u32,
                q_pos0: u32,
                causal: u32,
                group: u32,
                q_off: u32,
                k_off: u32,
                r_off: u32,
                scale_log2: f32,
                scale: f32,
                grid_x: u32,
                rows: u32,
                nsel: u32,
                i_off: u32,
                b_off: u32,
                _pad: u32,
            }
        );
        check::<Swapped>();
    }
}
