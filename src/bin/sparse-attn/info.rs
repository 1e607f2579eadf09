//! `info`: adapters, features, limits, and which kernel variants this device runs.

use std::process::ExitCode;

use sparse_attn::Error;
use sparse_attn::gpu::{self, DType, Gpu, GpuOptions, Storage};
use sparse_attn::ops::attention::{Variant, variant_supported};

use crate::report::{Table, print_json};

const SHOWN_FEATURES: [(wgpu::Features, &str); 5] = [
    (wgpu::Features::SHADER_F16, "shader-f16"),
    (wgpu::Features::SUBGROUP, "subgroups"),
    (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
    (
        wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        "timestamp-query-inside-encoders",
    ),
    (
        wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
        "cooperative-matrix (experimental)",
    ),
];

pub fn info(opts: &GpuOptions, json: bool) -> Result<ExitCode, Error> {
    let adapters = gpu::list_adapters();
    let gpu = Gpu::new(opts)?;
    let l = gpu.limits();
    let mut feats: Vec<(&str, bool)> = SHOWN_FEATURES
        .iter()
        .map(|(f, n)| (*n, gpu.features().contains(*f)))
        .collect();
    // Requested only by what offloads (GpuOptions::host_memory): the adapter's answer.
    feats.push((
        "host-memory tensors (offloaded KV cache)",
        gpu.wgpu_adapter()
            .features()
            .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
    ));
    let variants: Vec<(String, Result<(), Error>)> = Variant::ALL
        .iter()
        .chain(&[Variant::Coop])
        .flat_map(|&v| {
            [64usize, 128].map(|d| {
                (
                    format!("{} (head_dim {d})", v.name()),
                    if v == Variant::Coop {
                        sparse_attn::ops::coop::supported(&gpu, d)
                    } else {
                        variant_supported(&gpu, v, d)
                    },
                )
            })
        })
        .collect();
    let limits = [
        (
            "max_storage_buffer_binding_size",
            l.max_storage_buffer_binding_size,
        ),
        ("max_buffer_size", l.max_buffer_size),
        (
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size as u64,
        ),
        (
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup as u64,
        ),
        (
            "max_compute_workgroups_per_dimension",
            l.max_compute_workgroups_per_dimension as u64,
        ),
        (
            "min_storage_buffer_offset_alignment",
            l.min_storage_buffer_offset_alignment as u64,
        ),
        ("min_subgroup_size", gpu.adapter_subgroup_sizes().0 as u64),
        ("max_subgroup_size", gpu.adapter_subgroup_sizes().1 as u64),
    ];
    if json {
        let j = serde_json::json!({
            "adapter": gpu.adapter().name,
            "backend": format!("{:?}", gpu.adapter().backend),
            "device_type": format!("{:?}", gpu.adapter().device_type),
            "driver": format!("{} {}", gpu.adapter().driver, gpu.adapter().driver_info),
            "all_adapters": adapters.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "features": feats.iter().filter(|f| f.1).map(|f| f.0).collect::<Vec<_>>(),
            "limits": limits.iter().map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "variants": variants.iter().map(|(n, r)| (n.clone(), serde_json::json!(match r { Ok(()) => "enabled".to_string(), Err(e) => e.to_string() }))).collect::<serde_json::Map<_, _>>(),
        });
        print_json(&j);
        return Ok(ExitCode::SUCCESS);
    }
    println!("adapter:  {}", gpu.adapter());
    println!("adapters seen (best first):");
    for a in &adapters {
        println!("  - {a}");
    }
    let mut t = Table::new(&["feature", "|", "present"]);
    for (n, on) in &feats {
        t.row(vec![n.to_string(), if *on { "yes" } else { "no" }.into()]);
    }
    t.print();
    let mut t = Table::new(&["limit", "|", "value"]);
    for (n, v) in &limits {
        t.row(vec![n.to_string(), v.to_string()]);
    }
    t.print();
    println!("kernel variants:");
    for (n, r) in &variants {
        match r {
            Ok(()) => println!("  {n}: enabled"),
            Err(e) => println!("  {n}: off: {e}"),
        }
    }
    match Storage::for_dtype(&gpu, DType::F16) {
        Ok(st) => println!(
            "f16 tensors: {} (coop, where enabled, runs f16 attention forward and backward on \
             tensor cores)",
            st.name()
        ),
        Err(e) => println!("f16 tensors: off: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}
