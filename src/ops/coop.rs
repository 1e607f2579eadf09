//! Cooperative-matrix (tensor-core) attention kernels: `shaders/attention_coop.wgsl`.
//!
//! Owns what the device must offer, the tile constants and the pipeline; `FullAttention` uses it
//! for `Variant::Coop`. The kernel stages f16 tiles in workgroup memory and multiplies 16x16x16
//! f16 matrices into f32 accumulators, one 16-row slice of the query tile per subgroup.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Pipeline, PipelineKey, Storage};

/// Lanes per subgroup the kernel's softmax lane mapping assumes (two lanes per row of 16).
const SUBGROUP: u32 = 32;

/// Tile of the forward kernel: `nsg` subgroups of 16 query rows, `bk` keys staged per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CoopTiles {
    pub nsg: u32,
    pub bk: u32,
}

/// Developer knob for tuning on a new device: `SPARSE_ATTN_COOP=nsg,bk` (e.g. `4,64`).
pub const COOP_ENV: &str = "SPARSE_ATTN_COOP";

impl CoopTiles {
    fn default_for(_d: u32) -> CoopTiles {
        let t = CoopTiles { nsg: 4, bk: 32 };
        let Some(spec) = std::env::var(COOP_ENV).ok() else {
            return t;
        };
        let n: Vec<u32> = spec
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect();
        match n[..] {
            [nsg, bk] if [1, 2, 4, 8].contains(&nsg) && [16, 32, 64, 128].contains(&bk) => {
                CoopTiles { nsg, bk }
            }
            _ => {
                log::warn!("ignoring {COOP_ENV}={spec} (want nsg in 1,2,4,8 and bk in 16..128)");
                t
            }
        }
    }

    pub(crate) fn rows(&self) -> u32 {
        16 * self.nsg
    }

    fn shared_bytes(&self, d: u32) -> u32 {
        let stage = self.rows().max(2 * self.bk) * (d + 8) * 2;
        // kv staging, S scratch (f32) and P (f16) per subgroup, the lane-pair exchange.
        stage + self.nsg * 16 * self.bk * (4 + 2) + 4 * SUBGROUP * self.nsg
    }

    fn constants(&self, d: u32) -> Vec<(&'static str, u32)> {
        vec![
            ("D", d),
            ("BQ", self.rows()),
            ("BK", self.bk),
            ("NSG", self.nsg),
            ("NT", SUBGROUP * self.nsg),
            ("DP", d + 8),
        ]
    }
}

/// Does the device run the cooperative-matrix kernels at head dim `d`? The error says what is
/// missing.
pub fn supported(gpu: &Gpu, d: usize) -> Result<()> {
    let f = gpu.features();
    let need = [
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            "EXPERIMENTAL_COOPERATIVE_MATRIX",
        ),
    ];
    for (feature, name) in need {
        if !f.contains(feature) {
            return Err(Error::Unsupported(format!(
                "the cooperative-matrix kernels need {name}, which this device does not offer"
            )));
        }
    }
    let f16 = wgpu::CooperativeScalarType::F16;
    let f32 = wgpu::CooperativeScalarType::F32;
    let has_16x16x16 = gpu
        .wgpu_adapter()
        .cooperative_matrix_properties()
        .iter()
        .any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16) && p.ab_type == f16 && p.cr_type == f32
        });
    if !has_16x16x16 {
        return Err(Error::Unsupported(
            "the cooperative-matrix kernels need 16x16x16 f16 x f16 -> f32 matrices; this \
             device does not list them"
                .into(),
        ));
    }
    let (lo, hi) = gpu.adapter_subgroup_sizes();
    if (lo, hi) != (SUBGROUP, SUBGROUP) {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix kernels need subgroups of exactly {SUBGROUP} lanes; this \
             device has {lo}..{hi}"
        )));
    }
    if !d.is_multiple_of(16) || !(16..=256).contains(&d) {
        return Err(Error::InvalidInput(format!(
            "head_dim = {d}: the cooperative-matrix kernels take multiples of 16 up to 256"
        )));
    }
    let t = CoopTiles::default_for(d as u32);
    let l = gpu.limits();
    if t.shared_bytes(d as u32) > l.max_compute_workgroup_storage_size
        || l.max_compute_invocations_per_workgroup < SUBGROUP * t.nsg
    {
        return Err(Error::Unsupported(format!(
            "the cooperative-matrix forward at head_dim {d} needs {} bytes of workgroup memory \
             and {} invocations; this device allows {} and {}",
            t.shared_bytes(d as u32),
            SUBGROUP * t.nsg,
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup
        )));
    }
    Ok(())
}

/// The forward pipeline for head dim `d` and its tile (call [`supported`] first).
pub(crate) fn forward_pipeline(gpu: &Gpu, d: u32) -> Result<(Arc<Pipeline>, CoopTiles)> {
    let t = CoopTiles::default_for(d);
    let p = gpu.pipeline(&forward_key(d, t))?;
    Ok((p, t))
}

fn forward_key(d: u32, t: CoopTiles) -> PipelineKey {
    PipelineKey {
        file: "attention_coop.wgsl",
        entry: "fwd",
        constants: t.constants(d),
        checked: false,
        storage: Storage::F16,
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use wgpu::naga;

    /// The kernel must get through naga (parse, validate, SPIR-V) on any machine, so CI catches
    /// shader errors even where no device runs it.
    #[test]
    fn coop_shader_compiles_to_spirv() {
        for d in [64, 128, 256] {
            let t = CoopTiles::default_for(d);
            let src = crate::gpu::preprocess(&forward_key(d, t)).unwrap();
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("d={d}: {}", e.emit_to_string(&src)));
            let info = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("d={d}: {}", e.emit_to_string(&src)));
            let opts = naga::back::spv::Options {
                lang_version: (1, 6),
                ..Default::default()
            };
            naga::back::spv::write_vec(&module, &info, &opts, None)
                .unwrap_or_else(|e| panic!("d={d}: {e:?}"));
            assert!(t.shared_bytes(d) <= 48 * 1024, "d={d}");
        }
    }
}
