//! What one dispatch costs on this machine, host and GPU, the three ways a step can record it:
//! a fresh bind group and compute pass per dispatch (how every op recorded before bind groups
//! were kept), a kept bind group with a pass per dispatch, and kept bind groups in one pass.
//! Each dispatch binds a uniform and 6 storage buffers and runs one tiny workgroup, like a
//! decoding step's small kernels. `cargo run --release --example dispatch_cost [N]`.

use std::time::Instant;

use sparse_attn::gpu::{Gpu, GpuOptions};

const SHADER: &str = r"
struct P { x: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read> c: array<u32>;
@group(0) @binding(4) var<storage, read> d: array<u32>;
@group(0) @binding(5) var<storage, read_write> e: array<u32>;
@group(0) @binding(6) var<storage, read_write> f: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) i: u32) {
    if i == 0u { e[0] = a[0] + b[0] + c[0] + d[0] + p.x; f[0] = e[0]; }
}";

fn main() -> sparse_attn::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(320);
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!("{} dispatches per submission on {}", n, gpu.adapter());
    let dev = gpu.device();
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });
    let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let layout = pipe.get_bind_group_layout(0);
    let uni = wgpu::util::DeviceExt::create_buffer_init(
        dev,
        &wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &[1u8; 16],
            usage: wgpu::BufferUsages::UNIFORM,
        },
    );
    // Distinct buffers per dispatch group, as distinct layers' tensors are.
    let bufs: Vec<wgpu::Buffer> = (0..6 * 32)
        .map(|_| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 1 << 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        })
        .collect();
    let group = |i: usize| {
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uni.as_entire_binding(),
        }];
        for j in 0..6 {
            entries.push(wgpu::BindGroupEntry {
                binding: j as u32 + 1,
                resource: bufs[(i % 32) * 6 + j].as_entire_binding(),
            });
        }
        dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        })
    };
    let kept: Vec<wgpu::BindGroup> = (0..32).map(group).collect();
    // (record seconds, record + submit + wait seconds) of one submission of n dispatches.
    let run = |way: u8| -> sparse_attn::Result<(f64, f64)> {
        let t = Instant::now();
        let mut enc = dev.create_command_encoder(&Default::default());
        match way {
            0 | 1 => {
                for i in 0..n {
                    let fresh;
                    let bg = match way {
                        0 => {
                            fresh = group(i);
                            &fresh
                        }
                        _ => &kept[i % 32],
                    };
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipe);
                    pass.set_bind_group(0, bg, &[]);
                    pass.dispatch_workgroups(1, 1, 1);
                }
            }
            _ => {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipe);
                for i in 0..n {
                    pass.set_bind_group(0, &kept[i % 32], &[]);
                    pass.dispatch_workgroups(1, 1, 1);
                }
            }
        }
        let cmd = enc.finish();
        let rec = t.elapsed().as_secs_f64();
        gpu.queue().submit([cmd]);
        gpu.wait()?;
        Ok((rec, t.elapsed().as_secs_f64()))
    };
    let names = [
        "fresh bind group, pass per dispatch",
        "kept bind group, pass per dispatch",
        "kept bind groups, one pass",
    ];
    for (way, name) in names.iter().enumerate() {
        run(way as u8)?;
        let reps = 10;
        let (mut rec, mut all) = (0.0, 0.0);
        for _ in 0..reps {
            let (r, a) = run(way as u8)?;
            rec += r;
            all += a;
        }
        let per = |s: f64| s / (reps * n) as f64 * 1e6;
        println!(
            "{name:40} record {:6.2} us/dispatch, record + submit + wait {:6.2} us/dispatch",
            per(rec),
            per(all)
        );
    }
    Ok(())
}
