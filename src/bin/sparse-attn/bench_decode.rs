//! `bench decode`: decoding throughput of a synthetic model's attention (its KV caches, the
//! selection and the attention of every layer; no projections or MLP) for a batch x context
//! grid, four ways: (a) full attention, whole cache on the GPU; (b) InfLLM-V2 selection, whole
//! cache on the GPU; (c) offloaded cache with InfLLM-V2 selection; (d) offloaded cache with
//! NOSA selection. Each step appends one token per sequence to every layer, selects, copies
//! what is missing (c, d) and attends; the host waits for every step, as a sampler would.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use sparse_attn::Error;
use sparse_attn::decode::{DecodeLayer, LayerConfig, OffloadConfig, OffloadPath, OffloadStats};
use sparse_attn::gpu::{DType, Gpu, GpuOptions, Tensor};
use sparse_attn::problem::{CacheShape, SelectOptions};
use sparse_attn::reference::Rng;

use crate::args::parse_dtype;
use crate::report::{Output, Table, emit_record};

#[derive(Args)]
pub struct DecodeArgs {
    /// Sequences decoded together.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4, 16])]
    pub batch: Vec<usize>,
    /// Tokens already in each sequence's cache.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4096, 16384])]
    pub context: Vec<usize>,
    /// Attention layers of the synthetic model (each with its own cache).
    #[arg(long, default_value_t = 32)]
    pub layers: usize,
    #[arg(long, default_value_t = 32)]
    pub heads_q: usize,
    #[arg(long, default_value_t = 8)]
    pub heads_kv: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Storage of q and the caches: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Ways to decode, comma-separated: full, infllm, offload-infllm, offload-nosa.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["full".to_string(), "infllm".to_string(), "offload-infllm".to_string(), "offload-nosa".to_string()])]
    pub modes: Vec<String>,
    /// Selection: blocks of this many tokens, k blocks per step (NOSA.md: 64 and 64), of which
    /// 1 initial, n_local before the current one, and (NOSA) k_query by the query, the rest by
    /// the eviction score.
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    #[arg(long, default_value_t = 15)]
    pub n_local: usize,
    #[arg(long, default_value_t = 16)]
    pub k_query: usize,
    /// GPU slots per (sequence, kv head) of the offloaded caches (default: k, the least).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Timed steps, after warm-up steps.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Queries are a fixed direction per (sequence, head) plus noise of this scale: how much
    /// the query-aware choice moves from step to step (synthetic: trained models set this).
    #[arg(long, default_value_t = 1.0, value_parser = crate::report::non_negative_f64)]
    pub query_noise: f64,
    /// Keys per workgroup of the decoding kernel (1 to its limit, 256 on most devices;
    /// default: the library's choice, about a thousand workgroups per step).
    #[arg(long)]
    pub split_keys: Option<usize>,
    /// How the offloaded caches' blocks reach the GPU: in-place (kernels read host memory),
    /// staged (the host writes missing blocks each step, as in the browser) or auto.
    #[arg(long, default_value = "auto", value_parser = crate::report::offload_path)]
    pub offload_path: sparse_attn::decode::OffloadPath,
    /// The device's memory bandwidth in GB/s (e.g. 4800 for an H200): full attention's step is
    /// then reported against the time to read its k and v at that speed.
    #[arg(long, value_parser = crate::report::positive_f64)]
    pub bandwidth_gbs: Option<f64>,
    /// After the timed steps, time one more step kernel by kernel (GPU timestamps around each
    /// dispatch) and print where its GPU time goes.
    #[arg(long)]
    pub stages: bool,
    /// Submit a step's work every this many layers, so that the GPU runs the first layers
    /// while the host records the rest (0: the whole step in one submission).
    #[arg(long, default_value_t = 4)]
    pub submit_layers: usize,
    /// Refuse a configuration whose host caches would take more than this share of the
    /// machine's available memory.
    #[arg(long, default_value_t = 0.8, value_parser = crate::report::share)]
    pub host_share: f64,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Full,
    InfLlm,
    OffloadInfLlm,
    OffloadNosa,
}

impl Mode {
    fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "full" => Mode::Full,
            "infllm" => Mode::InfLlm,
            "offload-infllm" => Mode::OffloadInfLlm,
            "offload-nosa" => Mode::OffloadNosa,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "unknown mode `{s}` (known: full, infllm, offload-infllm, offload-nosa)"
                )));
            }
        })
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Full => "(a) full, GPU",
            Mode::InfLlm => "(b) InfLLM-V2, GPU",
            Mode::OffloadInfLlm => "(c) InfLLM-V2, offloaded",
            Mode::OffloadNosa => "(d) NOSA, offloaded",
        }
    }
}

/// Available host memory (MemAvailable), where the system says.
fn host_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device-to-device copy bandwidth (read + write), GB/s: the ceiling a decode that reads its
/// cache once can approach, measured in the same run.
fn copy_bandwidth(gpu: &Gpu) -> Result<f64, Error> {
    let n = (256usize << 20).min(gpu.max_binding() as usize / 4);
    let a = gpu.empty(&[n], DType::F32)?;
    let b = gpu.empty(&[n], DType::F32)?;
    let run = |reps: usize| -> Result<f64, Error> {
        let t = Instant::now();
        let mut enc = gpu.encoder();
        for _ in 0..reps {
            enc.raw()
                .copy_buffer_to_buffer(a.buffer(), 0, b.buffer(), 0, (n * 4) as u64);
        }
        gpu.queue().submit([enc.finish()]);
        gpu.wait()?;
        Ok(t.elapsed().as_secs_f64())
    };
    run(2)?;
    let secs = run(20)?;
    Ok(20.0 * 2.0 * (n * 4) as f64 / secs / 1e9)
}

struct Run {
    mode: Mode,
    batch: usize,
    context: usize,
    tokens_per_s: f64,
    step_ms: f64,
    gpu_kv_bytes: u64,
    host_kv_bytes: u64,
    copied_per_step: f64,
    hit_rate: Option<f64>,
    /// The offloaded caches' host -> GPU path.
    path: Option<OffloadPath>,
    /// Bytes of k and v that full attention reads per step.
    kv_read_per_step: f64,
    /// With --stages: (kernel, GPU seconds in one step, dispatches).
    stages: Vec<(String, f64, u32)>,
    /// With --stages: seconds from the profiled step's first dispatch's start to its last
    /// one's end (the kernels' sum plus the GPU's idle time between them).
    span: f64,
    /// Host milliseconds per timed step spent recording it (encode_step of every layer).
    record_ms: f64,
}

fn select_options(a: &DecodeArgs, nosa: bool) -> Result<SelectOptions, Error> {
    Ok(if nosa {
        SelectOptions::nosa_budget(a.block, a.k, 1, a.n_local, a.k_query)?
    } else {
        SelectOptions {
            block: a.block,
            k: a.k,
            n_init: 1,
            n_local: a.n_local,
            scoring: sparse_attn::Scoring::InfLlmV2,
            causal: true,
            scale: None,
            evict: 0,
        }
    })
}

#[allow(clippy::too_many_lines)]
fn run_one(
    gpu: &Gpu,
    a: &DecodeArgs,
    mode: Mode,
    batch: usize,
    context: usize,
) -> Result<Run, Error> {
    let dtype = parse_dtype(&a.dtype)?;
    let (hq, hkv, d) = (a.heads_q, a.heads_kv, a.head_dim);
    let total = a.warmup + a.steps;
    let cap = (context + total + 1).next_multiple_of(a.block);
    let shape = CacheShape {
        batch,
        heads_kv: hkv,
        capacity: cap,
        head_dim: d,
    };
    let nosa = mode == Mode::OffloadNosa;
    let bias = nosa;
    let select = select_options(a, nosa)?;
    let step = shape.step(hq, 1);
    let mut host_bytes =
        (a.layers * batch * hkv * cap * (2 * d * dtype.size() + 4 * bias as usize)) as u64;
    let path = a.offload_path;
    if path == OffloadPath::Staged || (path == OffloadPath::Auto && !gpu.has_host_memory()) {
        // Staged: a step's missing blocks also pass through host staging memory, at worst
        // every selected block of every layer (H200, 16 x 32k: the 69 GB store passed the
        // check and the process ran out of memory).
        let slot = OffloadConfig::slot_bytes(dtype, a.block, d, bias);
        host_bytes += (a.layers * batch * hkv * a.slots.unwrap_or(select.k)) as u64 * slot;
    }
    if matches!(mode, Mode::OffloadInfLlm | Mode::OffloadNosa)
        && let Some(avail) = host_available()
        && host_bytes as f64 > a.host_share * avail as f64
    {
        return Err(Error::Unsupported(format!(
            "the host caches would take {:.1} GB; {:.1} GB of host memory is available \
             (--host-share {})",
            host_bytes as f64 / 1e9,
            avail as f64 / 1e9,
            a.host_share
        )));
    }
    let offloaded = matches!(mode, Mode::OffloadInfLlm | Mode::OffloadNosa);
    let layer = LayerConfig {
        bias,
        select: (mode != Mode::Full).then_some(select),
        offload_slots: offloaded.then(|| a.slots.unwrap_or(select.k)),
        offload_path: path,
        split_keys: a.split_keys,
        ..LayerConfig::new(shape, hq, dtype)
    };
    let mut layers = (0..a.layers)
        .map(|_| DecodeLayer::new(gpu, &layer))
        .collect::<Result<Vec<_>, _>>()?;
    // The prompt: the same random rows for every layer (the kernels do not care), appended in
    // chunks so that the source stays small.
    let chunk = context.min(4096);
    let kp = gpu.random_uniform_as(&[batch, hkv, chunk, d], 1, 1.0, dtype)?;
    let vp = gpu.random_uniform_as(&[batch, hkv, chunk, d], 2, 1.0, dtype)?;
    let ep = gpu.random_uniform_as(&[batch, hkv, chunk], 3, 2.0, DType::F32)?;
    let mut done = 0;
    while done < context {
        let n = chunk.min(context - done);
        let counts = vec![n as u32; batch];
        for l in layers.iter_mut() {
            let mut enc = gpu.encoder();
            l.append(gpu, &mut enc, &kp, &vp, bias.then_some(&ep), Some(&counts))?;
            gpu.queue().submit([enc.finish()]);
        }
        gpu.wait()?;
        done += n;
    }
    // Step inputs: new rows from a small pool; queries = fixed direction + noise.
    let pool = 8;
    let kn: Vec<Tensor> = (0..pool)
        .map(|i| gpu.random_uniform_as(&[batch, hkv, 1, d], 10 + i as u32, 1.0, dtype))
        .collect::<Result<_, _>>()?;
    let en: Vec<Tensor> = (0..pool)
        .map(|i| gpu.random_uniform_as(&[batch, hkv, 1], 30 + i as u32, 2.0, DType::F32))
        .collect::<Result<_, _>>()?;
    let mut rng = Rng::new(5);
    let base = rng.normal_vec(batch * hq * d, 1.0);
    let qs: Vec<Tensor> = (0..pool)
        .map(|_| {
            let noise = rng.normal_vec(batch * hq * d, a.query_noise);
            let q: Vec<f32> = base.iter().zip(&noise).map(|(b, n)| b + n).collect();
            gpu.upload_as(&step.q_dims(), &q, dtype)
        })
        .collect::<Result<_, _>>()?;
    let out = gpu.empty(&step.q_dims(), dtype)?;
    let mut t0 = Instant::now();
    let mut stages = vec![];
    let mut span = 0.0;
    // The counters of the timed steps (read before the profiled one).
    let mut stats = OffloadStats::default();
    let mut secs = 0.0;
    let mut record = 0.0;
    for s in 0..total + a.stages as usize {
        if s == total {
            // One more step, profiled: every dispatch between timestamps.
            gpu.profile_begin()?;
        }
        if s == a.warmup {
            gpu.wait()?;
            for l in &layers {
                l.reset_stats(gpu)?;
            }
            t0 = Instant::now();
        }
        let (k1, e1, q) = (&kn[s % pool], &en[s % pool], &qs[s % pool]);
        let mut t_rec = Instant::now();
        let mut rec = 0.0;
        let mut enc = gpu.encoder();
        let n = layers.len();
        for (i, l) in layers.iter_mut().enumerate() {
            l.encode_step(gpu, &mut enc, q, k1, k1, bias.then_some(e1), &out)?;
            if a.submit_layers > 0 && (i + 1) % a.submit_layers == 0 && i + 1 < n {
                let cmd = enc.split(gpu.device());
                rec += t_rec.elapsed().as_secs_f64();
                gpu.queue().submit([cmd]);
                t_rec = Instant::now();
            }
        }
        let cmd = enc.finish();
        rec += t_rec.elapsed().as_secs_f64();
        if (a.warmup..total).contains(&s) {
            record += rec;
        }
        gpu.queue().submit([cmd]);
        gpu.wait()?;
        if s == total - 1 {
            secs = t0.elapsed().as_secs_f64();
            for l in &layers {
                if let Some(st) = l.offload_stats(gpu)? {
                    stats += st;
                }
            }
        }
        if s == total {
            let events = gpu.profile_end_events()?;
            span = events.iter().map(|e| e.end).fold(0.0, f64::max);
            for e in events {
                match stages
                    .iter_mut()
                    .find(|x: &&mut (String, f64, u32)| x.0 == e.kernel)
                {
                    Some(x) => {
                        x.1 += e.end - e.start;
                        x.2 += 1;
                    }
                    None => stages.push((e.kernel, e.end - e.start, 1)),
                }
            }
        }
    }
    let (mut gpu_bytes, mut host) = (0u64, 0u64);
    for l in &layers {
        let (g, h) = l.kv_bytes();
        gpu_bytes += g;
        host += h;
    }
    let block_bytes = OffloadConfig::slot_bytes(dtype, a.block, d, bias);
    Ok(Run {
        mode,
        batch,
        context,
        tokens_per_s: (batch * a.steps) as f64 / secs,
        step_ms: secs / a.steps as f64 * 1e3,
        gpu_kv_bytes: gpu_bytes,
        host_kv_bytes: host,
        copied_per_step: stats.copied_bytes(block_bytes, a.block) as f64 / a.steps as f64,
        hit_rate: offloaded.then(|| stats.hit_rate()),
        path: layers.first().and_then(DecodeLayer::offload_path),
        stages,
        span,
        record_ms: record / a.steps as f64 * 1e3,
        kv_read_per_step: (a.layers
            * batch
            * hkv
            * (context + a.warmup + a.steps / 2)
            * d
            * 2
            * dtype.size()) as f64,
    })
}

pub fn bench_decode_cmd(opts: &GpuOptions, a: &DecodeArgs) -> Result<ExitCode, Error> {
    a.out.prepare()?;
    let modes: Vec<Mode> = a
        .modes
        .iter()
        .map(|m| Mode::parse(m))
        .collect::<Result<_, _>>()?;
    if a.steps == 0 || a.layers == 0 {
        return Err(Error::InvalidInput(
            "--steps and --layers must be at least 1".into(),
        ));
    }
    // Validate the selection before any allocation.
    select_options(a, true)?;
    let path = a.offload_path;
    let gpu = Gpu::new(&GpuOptions {
        // Host-memory tensors for the in-place path (the staged one needs none).
        host_memory: path != OffloadPath::Staged,
        ..opts.clone()
    })?;
    let bw = copy_bandwidth(&gpu)?;
    eprintln!(
        "device-to-device copy bandwidth (read + write, copy commands; below the memory's on some \
         drivers): {bw:.0} GB/s"
    );
    let mut table = Table::new(&[
        "mode",
        "batch",
        "context",
        "|",
        "tokens/s",
        "step ms",
        "|",
        "GPU KV MB",
        "host KV MB",
        "copied MB/step",
        "hit rate",
        "|",
        "KV read GB/s",
        "x bw time",
    ]);
    let mut records = vec![];
    for &batch in &a.batch {
        for &context in &a.context {
            for &mode in &modes {
                match run_one(&gpu, a, mode, batch, context) {
                    Ok(r) => {
                        eprintln!(
                            "{} batch {} context {}: {:.1} tokens/s ({:.3} ms a step, {:.3} of it recording), GPU KV {:.1} MB, copied {:.2} MB/step, hit rate {:?}",
                            r.mode.name(),
                            r.batch,
                            r.context,
                            r.tokens_per_s,
                            r.step_ms,
                            r.record_ms,
                            r.gpu_kv_bytes as f64 / 1e6,
                            r.copied_per_step / 1e6,
                            r.hit_rate
                        );
                        if let Some(p) = r.path {
                            eprintln!("  offload path: {}", p.name());
                        }
                        if !r.stages.is_empty() {
                            let total: f64 = r.stages.iter().map(|x| x.1).sum();
                            eprintln!(
                                "  GPU time of one step by kernel ({:.3} ms in all):",
                                total * 1e3
                            );
                            for (k, t, n) in &r.stages {
                                eprintln!("    {k:<30} {:>9.3} ms  {n:>5} dispatches", t * 1e3);
                            }
                            eprintln!(
                                "  first dispatch's start to last one's end: {:.3} ms (idle \
                                 between dispatches {:.3} ms; each profiled dispatch has a pass \
                                 of its own)",
                                r.span * 1e3,
                                (r.span - total) * 1e3
                            );
                        }
                        // Full attention reads its whole cache: achieved GB/s, and the step's
                        // time over the time to read the cache at the device's bandwidth.
                        let gbs = r.kv_read_per_step / (r.step_ms / 1e3) / 1e9;
                        table.row(vec![
                            r.mode.name().into(),
                            r.batch.to_string(),
                            r.context.to_string(),
                            format!("{:.1}", r.tokens_per_s),
                            format!("{:.3}", r.step_ms),
                            format!("{:.1}", r.gpu_kv_bytes as f64 / 1e6),
                            format!("{:.1}", r.host_kv_bytes as f64 / 1e6),
                            format!("{:.2}", r.copied_per_step / 1e6),
                            r.hit_rate.map_or("-".into(), |h| format!("{h:.3}")),
                            if r.mode == Mode::Full {
                                format!("{gbs:.0}")
                            } else {
                                "-".into()
                            },
                            match (r.mode, a.bandwidth_gbs) {
                                (Mode::Full, Some(b)) => format!(
                                    "{:.2}",
                                    r.step_ms / 1e3 / (r.kv_read_per_step / (b * 1e9))
                                ),
                                _ => "-".into(),
                            },
                        ]);
                        records.push(serde_json::json!({
                            "mode": r.mode.name(), "batch": r.batch, "context": r.context,
                            "offload_path": r.path.map(OffloadPath::name),
                            "tokens_per_s": r.tokens_per_s, "step_ms": r.step_ms, "record_ms": r.record_ms,
                            "submit_layers": a.submit_layers,
                            "gpu_kv_bytes": r.gpu_kv_bytes, "host_kv_bytes": r.host_kv_bytes,
                            "copied_bytes_per_step": r.copied_per_step, "hit_rate": r.hit_rate,
                            "kv_read_bytes_per_step": r.kv_read_per_step,
                        }));
                    }
                    Err(e) => {
                        eprintln!(
                            "{} batch {batch} context {context}: skipped: {e}",
                            mode.name()
                        );
                        table.row(vec![
                            mode.name().into(),
                            batch.to_string(),
                            context.to_string(),
                            format!("skipped: {e}"),
                        ]);
                        records.push(serde_json::json!({
                            "mode": mode.name(), "batch": batch, "context": context,
                            "skipped": e.to_string(),
                        }));
                    }
                }
                // Let the caches of one run go before the next allocates.
                gpu.wait()?;
            }
        }
    }
    if a.out.json {
        return emit_json(&gpu, a, bw, records);
    }
    table.print();
    println!(
        "{} layers x {} kv heads x head_dim {} ({}), one token per sequence per step, the host \
         waiting for each step; attention only (no projections or MLP). Selection: blocks of \
         {}, k = {}; queries = fixed direction + noise {} (synthetic: locality depends on \
         trained weights). 'x bw time': full attention's step over the time to read its k and \
         v at --bandwidth-gbs.",
        a.layers, a.heads_kv, a.head_dim, a.dtype, a.block, a.k, a.query_noise
    );
    emit_json(&gpu, a, bw, records)
}

/// The runs as one JSON record: printed with --json, appended to --json-out.
fn emit_json(
    gpu: &Gpu,
    a: &DecodeArgs,
    bw: f64,
    records: Vec<serde_json::Value>,
) -> Result<ExitCode, Error> {
    let record = serde_json::json!({
        "bench": "decode", "layers": a.layers, "heads_q": a.heads_q, "heads_kv": a.heads_kv,
        "head_dim": a.head_dim, "dtype": a.dtype, "block": a.block, "k": a.k,
        "copy_bandwidth_gbs": bw, "runs": records,
    });
    emit_record(gpu, record, &a.out)?;
    Ok(ExitCode::SUCCESS)
}
