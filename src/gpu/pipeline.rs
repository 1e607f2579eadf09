//! Shader sources, the tiny preprocessor, and the pipeline cache.
//!
//! A kernel is one WGSL file under `shaders/`. It is specialised by integer constants that the
//! loader prepends as `const NAME: u32 = V;` (WGSL allows module-scope declarations in any order),
//! and it may pull shared snippets with `//#include "file.wgsl"`. The key
//! (kernel, entry point, constants, checks) names the compiled code exactly, so it is also the
//! cache key: each distinct pipeline is built once per `Gpu`.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Every shader file, embedded at compile time so the library runs anywhere (also in wasm).
const SOURCES: &[(&str, &str)] = &[
    (
        "attention_fwd.wgsl",
        include_str!("../../shaders/attention_fwd.wgsl"),
    ),
    (
        "attention_bwd.wgsl",
        include_str!("../../shaders/attention_bwd.wgsl"),
    ),
    ("common.wgsl", include_str!("../../shaders/common.wgsl")),
    ("bitonic.wgsl", include_str!("../../shaders/bitonic.wgsl")),
    ("key_bias.wgsl", include_str!("../../shaders/key_bias.wgsl")),
    ("rowdot.wgsl", include_str!("../../shaders/rowdot.wgsl")),
    (
        "attn_params.wgsl",
        include_str!("../../shaders/attn_params.wgsl"),
    ),
    (
        "attention_coop.wgsl",
        include_str!("../../shaders/attention_coop.wgsl"),
    ),
    (
        "coop_tile.wgsl",
        include_str!("../../shaders/coop_tile.wgsl"),
    ),
    (
        "attention_coop_bwd.wgsl",
        include_str!("../../shaders/attention_coop_bwd.wgsl"),
    ),
    ("coop_kv.wgsl", include_str!("../../shaders/coop_kv.wgsl")),
    (
        "coop_lanes.wgsl",
        include_str!("../../shaders/coop_lanes.wgsl"),
    ),
    (
        "token_line.wgsl",
        include_str!("../../shaders/token_line.wgsl"),
    ),
    (
        "sparse_coop_list.wgsl",
        include_str!("../../shaders/sparse_coop_list.wgsl"),
    ),
    (
        "sparse_coop_bwd.wgsl",
        include_str!("../../shaders/sparse_coop_bwd.wgsl"),
    ),
    (
        "sparse_fwd.wgsl",
        include_str!("../../shaders/sparse_fwd.wgsl"),
    ),
    (
        "sparse_bwd.wgsl",
        include_str!("../../shaders/sparse_bwd.wgsl"),
    ),
    (
        "sparse_coop.wgsl",
        include_str!("../../shaders/sparse_coop.wgsl"),
    ),
    (
        "block_select.wgsl",
        include_str!("../../shaders/block_select.wgsl"),
    ),
    (
        "select_common.wgsl",
        include_str!("../../shaders/select_common.wgsl"),
    ),
    (
        "block_topk_sg.wgsl",
        include_str!("../../shaders/block_topk_sg.wgsl"),
    ),
    (
        "block_scores_coop.wgsl",
        include_str!("../../shaders/block_scores_coop.wgsl"),
    ),
    ("fill.wgsl", include_str!("../../shaders/fill.wgsl")),
    ("decode.wgsl", include_str!("../../shaders/decode.wgsl")),
    ("kv_cache.wgsl", include_str!("../../shaders/kv_cache.wgsl")),
    ("offload.wgsl", include_str!("../../shaders/offload.wgsl")),
    ("align.wgsl", include_str!("../../shaders/align.wgsl")),
    ("metrics.wgsl", include_str!("../../shaders/metrics.wgsl")),
    ("llama.wgsl", include_str!("../../shaders/llama.wgsl")),
];

/// Developer knob: `SPARSE_ATTN_SHADERS=DIR` reads the shader files from DIR instead of the
/// copies built in (native only), so WGSL variants can be timed on a remote GPU with one
/// binary. A file missing from DIR is an error, not a silent fall back to the built-in copy.
#[cfg(not(target_arch = "wasm32"))]
pub const SHADERS_ENV: &str = "SPARSE_ATTN_SHADERS";

pub(crate) fn source(name: &str) -> Result<&'static str> {
    let built_in = SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::Gpu(format!("no shader named {name}")))?;
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(dir) = std::env::var_os(SHADERS_ENV) {
        return overridden(std::path::Path::new(&dir), name);
    }
    Ok(built_in)
}

/// The file `name` from the override directory, read once per process (the pipeline keys do not
/// name the source, so it must not change under a running `Gpu`).
#[cfg(not(target_arch = "wasm32"))]
fn overridden(dir: &std::path::Path, name: &str) -> Result<&'static str> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static READ: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let mut read = READ
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(s) = read.get(name) {
        return Ok(s);
    }
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::Gpu(format!(
            "{SHADERS_ENV}: cannot read {}: {e}",
            path.display()
        ))
    })?;
    log::warn!("{SHADERS_ENV}: {name} from {}", path.display());
    // Leaked once per file and process: pipelines borrow their source for the process's life.
    let text: &'static str = Box::leak(text.into_boxed_str());
    read.insert(name.to_string(), text);
    Ok(text)
}

/// How a kernel stores the vec4 tensors it declares as `array<ST>` (q, k, v, o and their
/// gradients): the loader prepends `ST` and the converters `unpack_st` (to `vec4<f32>`) and
/// `pack_st` (from it). Arithmetic stays f32 in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Storage {
    #[default]
    F32,
    /// Native `vec4<f16>` (needs SHADER_F16).
    F16,
    /// f16 pairs packed in `u32` words, converted with `unpack2x16float` / `pack2x16float`:
    /// f16 tensors on adapters without SHADER_F16 (browsers without `shader-f16`).
    F16Packed,
}

impl Storage {
    /// The tensor dtype this storage reads and writes.
    pub fn dtype(self) -> crate::gpu::DType {
        match self {
            Storage::F32 => crate::gpu::DType::F32,
            Storage::F16 | Storage::F16Packed => crate::gpu::DType::F16,
        }
    }

    /// The storage for tensors of `dtype` on `gpu`: native f16 where the device has it.
    pub fn for_dtype(gpu: &Gpu, dtype: crate::gpu::DType) -> Result<Storage> {
        match dtype {
            crate::gpu::DType::F32 => Ok(Storage::F32),
            crate::gpu::DType::F16 if gpu.features().contains(wgpu::Features::SHADER_F16) => {
                Ok(Storage::F16)
            }
            crate::gpu::DType::F16 => Ok(Storage::F16Packed),
            crate::gpu::DType::U32 => Err(Error::InvalidInput(
                "attention tensors must be F32 or F16, not U32".into(),
            )),
        }
    }

    /// Can `gpu` compile this storage?
    pub fn check(self, gpu: &Gpu) -> Result<()> {
        if self == Storage::F16 && !gpu.features().contains(wgpu::Features::SHADER_F16) {
            return Err(Error::Unsupported(
                "native f16 storage needs the SHADER_F16 feature, which this device lacks \
                 (Storage::F16Packed runs anywhere)"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
            Storage::F16Packed => "f16-packed",
        }
    }

    /// `SW`: a 16-byte load of the same data (SWV vec4 of it) for kernels that read a row
    /// per thread, where 8-byte loads of f16 data cost twice the load instructions;
    /// `unpack_sw(x, h)` is its vec4 `h`.
    fn wide_prelude(self) -> &'static str {
        match self {
            Storage::F32 => {
                "alias SW = vec4<f32>;\n\
                 const SWV: u32 = 1u;\n\
                 fn unpack_sw(x: SW, h: u32) -> vec4<f32> { return x; }\n"
            }
            Storage::F16 | Storage::F16Packed => {
                "alias SW = vec4<u32>;\n\
                 const SWV: u32 = 2u;\n\
                 fn unpack_sw(x: SW, h: u32) -> vec4<f32> {\n\
                 let w = select(x.xy, x.zw, h == 1u);\n\
                 return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));\n}\n"
            }
        }
    }

    fn prelude(self) -> &'static str {
        match self {
            Storage::F32 => {
                "alias ST = vec4<f32>;\n\
                 fn unpack_st(x: ST) -> vec4<f32> { return x; }\n\
                 fn pack_st(x: vec4<f32>) -> ST { return x; }\n"
            }
            Storage::F16 => {
                "alias ST = vec4<f16>;\n\
                 fn unpack_st(x: ST) -> vec4<f32> { return vec4<f32>(x); }\n\
                 fn pack_st(x: vec4<f32>) -> ST { return ST(x); }\n"
            }
            Storage::F16Packed => {
                "alias ST = vec2<u32>;\n\
                 fn unpack_st(x: ST) -> vec4<f32> {\n\
                 return vec4<f32>(unpack2x16float(x.x), unpack2x16float(x.y));\n}\n\
                 fn pack_st(x: vec4<f32>) -> ST {\n\
                 return ST(pack2x16float(x.xy), pack2x16float(x.zw));\n}\n"
            }
        }
    }
}

/// Identifies one compiled pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub file: &'static str,
    pub entry: &'static str,
    /// Integer constants prepended to the source, in a fixed order.
    pub constants: Vec<(&'static str, u32)>,
    /// Compile with naga's runtime bounds checks (off for hot kernels whose launchers validate
    /// every index range on the host).
    pub checked: bool,
    /// Storage of the vec4 tensors (see [`Storage`]).
    pub storage: Storage,
}

impl PipelineKey {
    /// `file:entry`, as profiles and pipeline statistics name the kernel.
    pub fn label(&self) -> String {
        format!("{}:{}", self.file, self.entry)
    }
}

/// A cached compute pipeline and its bind layout (group 0).
#[derive(Debug)]
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// `file:entry`, as profiles name it.
    pub label: String,
}

/// Expand `//#include "x.wgsl"` lines and prepend the constants. `//#if NAME` .. `//#else` ..
/// `//#endif` keep the lines of the branch that holds (NAME a constant of the key, true when
/// nonzero): how a kernel declares an optional binding only where it is used, so that a launch
/// binds no stand-ins and stays within WebGPU's 8 storage buffers per stage where it can.
pub fn preprocess(key: &PipelineKey) -> Result<String> {
    let mut out = String::new();
    // Directives (`enable`, `diagnostic`) must come before any declaration.
    for line in source(key.file)?.lines() {
        if is_directive(line) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if key.storage == Storage::F16 && !out.contains("enable f16;") {
        out.push_str("enable f16;\n");
    }
    out.push_str(key.storage.prelude());
    out.push_str(key.storage.wide_prelude());
    for (name, value) in &key.constants {
        out.push_str(&format!("const {name}: u32 = {value}u;\n"));
    }
    expand(&key.constants, key.file, &mut out, 0, &source)?;
    Ok(out)
}

/// A global directive of the kernel file, hoisted above everything else by `preprocess`.
fn is_directive(line: &str) -> bool {
    line.starts_with("enable ") || line.starts_with("diagnostic(")
}

/// Append `file` with its includes expanded (recursively; directives were hoisted) and its
/// conditional blocks resolved.
fn expand(
    constants: &[(&'static str, u32)],
    file: &str,
    out: &mut String,
    depth: usize,
    source: &dyn Fn(&str) -> Result<&'static str>,
) -> Result<()> {
    if depth > 4 {
        return Err(Error::Gpu(format!("includes nested too deeply at {file}")));
    }
    // One entry per open `//#if`: (this branch is kept, the enclosing ones are kept).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(b, outer)| b && outer);
    for (n, line) in unroll(file, source(file)?, constants)?.iter().enumerate() {
        let line = line.as_str();
        if is_directive(line) {
            continue;
        }
        let t = line.trim();
        if let Some(name) = t.strip_prefix("//#if ") {
            let name = name.trim();
            let on = match constants.iter().find(|(c, _)| *c == name) {
                Some(&(_, v)) => v != 0,
                None => {
                    return Err(Error::Gpu(format!(
                        "{file}:{}: `//#if {name}` names no constant of this pipeline",
                        n + 1
                    )));
                }
            };
            let outer = active(&stack);
            stack.push((on, outer));
            continue;
        }
        if t == "//#else" || t == "//#endif" {
            let Some(top) = stack.last_mut() else {
                return Err(Error::Gpu(format!(
                    "{file}:{}: `{t}` without `//#if`",
                    n + 1
                )));
            };
            if t == "//#else" {
                top.0 = !top.0;
            } else {
                stack.pop();
            }
            continue;
        }
        if !active(&stack) {
            continue;
        }
        match t.strip_prefix("//#include ") {
            Some(inc) => expand(
                constants,
                inc.trim().trim_matches('"'),
                out,
                depth + 1,
                source,
            )?,
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !stack.is_empty() {
        return Err(Error::Gpu(format!("{file}: `//#if` without `//#endif`")));
    }
    Ok(())
}

/// `//#for I in 0..N` .. `//#endfor` (N a number or a constant of the pipeline; not nested):
/// the lines between once per value of I, `{I}` replaced by it (`3u`). How a kernel indexes an
/// array of cooperative matrices by constants only: the H200's driver kept such an array in
/// registers only where no index was a loop's counter (accumulating O through one: 34.1 against
/// 18.1 ms for the same products into a single matrix, docs/BENCHMARKS.md). Error lines count
/// the file's lines after unrolling.
fn unroll(file: &str, text: &str, constants: &[(&'static str, u32)]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut block: Option<(String, u32, Vec<&str>)> = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        let err = |what: &str| Error::Gpu(format!("{file}:{}: {what}", n + 1));
        if let Some(spec) = t.strip_prefix("//#for ") {
            if block.is_some() {
                return Err(err("nested `//#for`"));
            }
            let (var, range) = spec
                .split_once(" in 0..")
                .ok_or_else(|| err("want `//#for I in 0..N`"))?;
            let range = range.trim();
            let count = match range.parse::<u32>() {
                Ok(c) => c,
                Err(_) => constants
                    .iter()
                    .find(|(c, _)| *c == range)
                    .map(|&(_, v)| v)
                    .ok_or_else(|| err(&format!("`{range}` is no constant of this pipeline")))?,
            };
            block = Some((format!("{{{}}}", var.trim()), count, Vec::new()));
            continue;
        }
        if t == "//#endfor" {
            let (var, count, lines) = block
                .take()
                .ok_or_else(|| err("`//#endfor` without `//#for`"))?;
            for i in 0..count {
                out.extend(lines.iter().map(|l| l.replace(&var, &format!("{i}u"))));
            }
            continue;
        }
        match &mut block {
            Some((_, _, lines)) => lines.push(line),
            None => out.push(line.to_string()),
        }
    }
    if block.is_some() {
        return Err(Error::Gpu(format!("{file}: `//#for` without `//#endfor`")));
    }
    Ok(out)
}

/// The WGSL a pipeline is built from: `preprocess`, with every storage binding `read_write`
/// where the buffers are pooled. `Gpu::pipeline` compiles it; `gpu::stats` compiles it again.
pub(crate) fn module_code(key: &PipelineKey, pooled: bool) -> Result<String> {
    let code = preprocess(key)?;
    Ok(match pooled {
        true => all_read_write(&code),
        false => code,
    })
}

/// Declare every storage binding `read_write` (see [`Gpu::set_pooled_buffers`]).
fn all_read_write(code: &str) -> String {
    code.replace("var<storage, read>", "var<storage, read_write>")
}

impl Gpu {
    /// The pipeline for `key`, compiled on first use and cached for the life of the `Gpu`.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<Pipeline>> {
        let pooled = self.pooled_buffers();
        let cache_key = (key.clone(), pooled);
        if let Some(p) = self
            .pipelines
            .lock()
            .expect("pipeline cache")
            .get(&cache_key)
        {
            return Ok(p.clone());
        }
        let code = module_code(key, pooled)?;
        let label = key.label();
        let built = self.scoped(&format!("compiling {label}"), || {
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(code.into()),
            };
            let module = if key.checked {
                self.device.create_shader_module(desc)
            } else {
                // SAFETY: the launchers of unchecked kernels validate all shapes and offsets on
                // the host (see ops/), and the tests cover the awkward sizes.
                unsafe {
                    self.device
                        .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
                }
            };
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: None,
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &[],
                        // Kernels initialise the workgroup memory they read.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
            let layout = pipeline.get_bind_group_layout(0);
            Pipeline {
                pipeline,
                layout,
                label: label.clone(),
            }
        })?;
        let built = Arc::new(built);
        self.pipelines
            .lock()
            .expect("pipeline cache")
            .insert(cache_key, built.clone());
        Ok(built)
    }

    /// Number of distinct pipelines compiled so far (tests check the cache with it).
    pub fn pipelines_built(&self) -> usize {
        self.pipelines.lock().expect("pipeline cache").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shader-directory knob reads a file from the directory (once per process) and names
    /// the path of one it cannot read, never falling back to the built-in copy.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn shader_directory_override() {
        let dir = std::env::temp_dir().join(format!("sparse-attn-shaders-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("override_probe.wgsl"), "// variant\n").unwrap();
        assert_eq!(
            overridden(&dir, "override_probe.wgsl").unwrap(),
            "// variant\n"
        );
        // Read once: a later change on disk does not reach a running process.
        std::fs::write(dir.join("override_probe.wgsl"), "// changed\n").unwrap();
        assert_eq!(
            overridden(&dir, "override_probe.wgsl").unwrap(),
            "// variant\n"
        );
        let e = overridden(&dir, "override_missing.wgsl")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("override_missing.wgsl") && e.contains(SHADERS_ENV),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `//#if` keeps the branch that holds, nests, reaches into includes, and refuses unknown
    /// constants and unbalanced directives with the file and line.
    #[test]
    fn conditional_blocks_and_their_errors() {
        let files: &[(&str, &'static str)] = &[
            (
                "main.wgsl",
                "a\n//#if A\nb\n//#if B\nc\n//#else\nd\n//#endif\n//#else\ne\n//#endif\n//#include \"inc.wgsl\"\n",
            ),
            ("inc.wgsl", "//#if B\nf\n//#endif\ng\n"),
            ("unknown.wgsl", "//#if C\nx\n//#endif\n"),
            ("open.wgsl", "//#if A\nx\n"),
            ("stray.wgsl", "x\n//#endif\n"),
        ];
        let src = |f: &str| -> Result<&'static str> {
            files
                .iter()
                .find(|(n, _)| *n == f)
                .map(|(_, s)| *s)
                .ok_or_else(|| Error::Gpu(format!("no shader named {f}")))
        };
        let run = |file: &str, a: u32, b: u32| {
            let mut out = String::new();
            expand(&[("A", a), ("B", b)], file, &mut out, 0, &src).map(|_| out)
        };
        assert_eq!(run("main.wgsl", 1, 1).unwrap(), "a\nb\nc\nf\ng\n");
        assert_eq!(run("main.wgsl", 1, 0).unwrap(), "a\nb\nd\ng\n");
        assert_eq!(run("main.wgsl", 0, 1).unwrap(), "a\ne\nf\ng\n");
        let e = run("unknown.wgsl", 1, 1).unwrap_err().to_string();
        assert!(
            e.contains("unknown.wgsl:1") && e.contains("names no constant"),
            "{e}"
        );
        let e = run("open.wgsl", 1, 1).unwrap_err().to_string();
        assert!(e.contains("without `//#endif`"), "{e}");
        let e = run("stray.wgsl", 1, 1).unwrap_err().to_string();
        assert!(
            e.contains("stray.wgsl:2") && e.contains("without `//#if`"),
            "{e}"
        );
    }

    /// `//#for` repeats its lines with the index as a constant, by a number or a constant of
    /// the pipeline (zero times included), keeps `//#if` working inside, and names misuse.
    #[test]
    fn unrolled_blocks_and_their_errors() {
        let c = [("N", 3), ("Z", 0), ("A", 1)];
        let lines = |text: &str| unroll("f.wgsl", text, &c).map(|v| v.join("|"));
        assert_eq!(
            lines("a\n//#for I in 0..N\nx[{I}] = {I};\n//#endfor\nb").unwrap(),
            "a|x[0u] = 0u;|x[1u] = 1u;|x[2u] = 2u;|b"
        );
        assert_eq!(
            lines("//#for J in 0..2\n{J}{J}\n//#endfor").unwrap(),
            "0u0u|1u1u"
        );
        assert_eq!(lines("a\n//#for I in 0..Z\nx\n//#endfor").unwrap(), "a");
        let src = |_: &str| -> Result<&'static str> {
            Ok("//#for I in 0..N\n//#if A\ny{I}\n//#endif\n//#endfor\n")
        };
        let mut out = String::new();
        expand(&c, "g.wgsl", &mut out, 0, &src).unwrap();
        assert_eq!(out, "y0u\ny1u\ny2u\n");
        for (text, what) in [
            ("//#for I in 0..Q\n//#endfor", "no constant"),
            ("//#for I in 1..N\n//#endfor", "want `//#for I in 0..N`"),
            ("//#for I in 0..N\n//#for J in 0..N\n", "nested"),
            ("//#for I in 0..N\nx", "without `//#endfor`"),
            ("x\n//#endfor", "f.wgsl:2"),
        ] {
            let e = lines(text).unwrap_err().to_string();
            assert!(e.contains(what), "{text:?}: {e}");
        }
    }
}
