//! The device: adapter choice, optional features, real limits, error capture.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::pipeline::{Pipeline, PipelineKey};

/// Environment variable that picks an adapter (same syntax as `--adapter`).
pub const ADAPTER_ENV: &str = "SPARSE_ATTN_ADAPTER";

/// Optional adapter features we ask for when present. Kernels check `Gpu::features()` and pick a
/// variant; nothing requires them.
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::SUBGROUP_BARRIER)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);

/// How to open the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter filter: a backend (`vulkan`, `metal`, `dx12`, `gl`), a device type (`discrete`,
    /// `integrated`, `cpu`, `virtual`) or a case-insensitive substring of the adapter name.
    /// Several terms may be joined with `,` (all must match). `None` reads `SPARSE_ATTN_ADAPTER`.
    pub adapter: Option<String>,
    /// Lower the storage-binding limit below the adapter's (tests use this to exercise the
    /// launchers' splitting on small tensors; users may use it to mimic a smaller device).
    pub max_storage_binding: Option<u64>,
    /// Do not request optional features (portable code paths only).
    pub portable_only: bool,
    /// Request every feature the adapter offers (what Burn's wgpu runtime asks for: its kernels
    /// use e.g. 64-bit integers and float atomics where the adapter has them). `train::Runtime`
    /// sets this; our own kernels need only [`OPTIONAL_FEATURES`].
    pub all_features: bool,
    /// Request WebGPU's default limits instead of the adapter's (what a browser grants without
    /// asking): native runs then see exactly the browser's budget (16 KiB workgroup storage,
    /// 256 invocations, 128 MiB storage bindings).
    pub webgpu_default_limits: bool,
    /// Request `MAPPABLE_PRIMARY_BUFFERS` where the adapter has it (native): storage buffers in
    /// host memory that kernels read and write in place ([`Gpu::empty_host`]), NOSA's offloaded
    /// KV cache. wgpu warns about it on discrete GPUs; only the buffers made by `empty_host`
    /// live in host memory.
    pub host_memory: bool,
}

/// What was found about one adapter, for `info` and for choosing.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub driver_info: String,
    /// Subgroup sizes the adapter may use (min, max).
    pub subgroup_sizes: (u32, u32),
}

impl AdapterSummary {
    fn of(info: &wgpu::AdapterInfo) -> Self {
        Self {
            name: info.name.clone(),
            backend: info.backend,
            device_type: info.device_type,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        }
    }
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({:?}, {:?}",
            self.name, self.backend, self.device_type
        )?;
        if !self.driver.is_empty() {
            write!(f, ", {} {}", self.driver, self.driver_info)?;
        }
        write!(f, ")")
    }
}

/// The GPU runtime: one device and queue, its features and limits, and the pipeline cache.
pub struct Gpu {
    /// Kept so the device can be shared (Burn registers instance, adapter, device and queue).
    instance: wgpu::Instance,
    raw_adapter: wgpu::Adapter,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    adapter: AdapterSummary,
    features: wgpu::Features,
    limits: wgpu::Limits,
    /// Cached pipelines, by key and by whether inputs are declared writable (pooled buffers).
    pub(crate) pipelines: Mutex<HashMap<(PipelineKey, bool), Arc<Pipeline>>>,
    pooled: std::sync::atomic::AtomicBool,
    /// Set while `Gpu::profile` records: every dispatch then writes its own timestamps.
    pub(crate) profiler: Mutex<Option<crate::gpu::timer::Profiler>>,
    /// Uniform buffers by content: a launch's parameters depend only on the op's shape and
    /// chunk, so repeated calls (a training step, a benchmark) bind buffers made once.
    uniforms: Mutex<HashMap<Vec<u8>, wgpu::Buffer>>,
    /// The first uncaptured GPU error since the last [`Gpu::check_errors`].
    uncaptured: Arc<Mutex<Option<String>>>,
}

/// Distinct parameter blocks kept; past it the cache starts over (a sweep over many shapes
/// must not grow it without bound).
const UNIFORMS_KEPT: usize = 4096;

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.adapter)
            .finish()
    }
}

#[cfg(not(target_arch = "wasm32"))]
const NO_ADAPTER_HINT: &str = "On Linux without a GPU driver, install Mesa's software Vulkan \
     device (lavapipe): `sudo apt-get install mesa-vulkan-drivers libvulkan1`. \
     Set SPARSE_ATTN_ADAPTER (or --adapter) to choose among several adapters.";

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u32 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::BrowserWebGpu => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

/// Does one adapter pass a filter such as `vulkan`, `cpu`, `h100` or `vulkan,llvmpipe`?
pub fn adapter_matches(a: &AdapterSummary, filter: &str) -> bool {
    filter
        .split(',')
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .all(|term| {
            let backend = format!("{:?}", a.backend).to_ascii_lowercase();
            let dtype = match a.device_type {
                wgpu::DeviceType::DiscreteGpu => "discrete",
                wgpu::DeviceType::IntegratedGpu => "integrated",
                wgpu::DeviceType::VirtualGpu => "virtual",
                wgpu::DeviceType::Cpu => "cpu",
                wgpu::DeviceType::Other => "other",
            };
            backend == term
                || (term == "gles" && backend == "gl")
                || dtype == term
                || a.name.to_ascii_lowercase().contains(&term)
        })
}

/// Order adapters best first: discrete > integrated > virtual > CPU, native APIs before GL.
pub fn rank_adapters(list: &mut [AdapterSummary]) {
    list.sort_by_key(|a| (type_rank(a.device_type), backend_rank(a.backend)));
}

/// An instance over `backends`, unless WGPU_BACKEND names others (wgpu's own variable wins).
fn new_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = backends;
    }
    wgpu::Instance::new(desc)
}

#[cfg(not(target_arch = "wasm32"))]
fn wants_gl(filter: Option<&str>) -> bool {
    filter.is_some_and(|f| {
        f.split(',')
            .any(|t| matches!(t.trim().to_ascii_lowercase().as_str(), "gl" | "gles"))
    })
}

/// Adapters of the native APIs first; GL only when asked for or when nothing native exists
/// (starting the GL backend probes EGL/Wayland, which prints noise on headless machines).
#[cfg(not(target_arch = "wasm32"))]
async fn enumerate(filter: Option<&str>) -> (wgpu::Instance, Vec<wgpu::Adapter>) {
    if !wants_gl(filter) {
        let instance = new_instance(wgpu::Backends::PRIMARY);
        let native = instance.enumerate_adapters(wgpu::Backends::all()).await;
        if !native.is_empty() {
            return (instance, native);
        }
    }
    let instance = new_instance(wgpu::Backends::all());
    let all = instance.enumerate_adapters(wgpu::Backends::all()).await;
    (instance, all)
}

/// Every adapter this machine offers, best first (native only; the browser offers one).
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters() -> Vec<AdapterSummary> {
    let mut list: Vec<AdapterSummary> = pollster::block_on(enumerate(None))
        .1
        .iter()
        .map(|a| AdapterSummary::of(&a.get_info()))
        .collect();
    rank_adapters(&mut list);
    list
}

impl Gpu {
    /// Open the best adapter (or the one `options.adapter` / `SPARSE_ATTN_ADAPTER` names).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(options: &GpuOptions) -> Result<Self> {
        pollster::block_on(Self::new_async(options))
    }

    pub async fn new_async(options: &GpuOptions) -> Result<Self> {
        let filter = options
            .adapter
            .clone()
            .or_else(|| std::env::var(ADAPTER_ENV).ok())
            .filter(|s| !s.trim().is_empty());
        let (instance, adapter) = Self::pick_adapter(filter.as_deref()).await?;
        Self::from_adapter(instance, adapter, options).await
    }

    #[cfg(not(target_arch = "wasm32"))]
    async fn pick_adapter(filter: Option<&str>) -> Result<(wgpu::Instance, wgpu::Adapter)> {
        let (instance, adapters) = enumerate(filter).await;
        let mut all: Vec<(AdapterSummary, wgpu::Adapter)> = adapters
            .into_iter()
            .map(|a| (AdapterSummary::of(&a.get_info()), a))
            .collect();
        all.sort_by_key(|(s, _)| (type_rank(s.device_type), backend_rank(s.backend)));
        let seen: Vec<String> = all.iter().map(|(s, _)| s.to_string()).collect();
        // `#N` picks the N-th (from 0) of the adapters the other terms match: how one of
        // several identical GPUs is chosen.
        let nth = filter
            .into_iter()
            .flat_map(|f| f.split(','))
            .find_map(|t| t.trim().strip_prefix('#'))
            .map(|n| {
                n.parse::<usize>().map_err(|_| {
                    Error::InvalidInput(format!("adapter term `#{n}` is not an index"))
                })
            })
            .transpose()?
            .unwrap_or(0);
        let rest: Option<String> = filter.map(|f| {
            f.split(',')
                .filter(|t| !t.trim().starts_with('#'))
                .collect::<Vec<_>>()
                .join(",")
        });
        let chosen = all
            .into_iter()
            .filter(|(s, _)| rest.as_deref().is_none_or(|f| adapter_matches(s, f)))
            .nth(nth);
        match chosen {
            Some((_, a)) => Ok((instance, a)),
            None => Err(Error::NoAdapter {
                filter: match filter {
                    Some(f) if !seen.is_empty() => {
                        format!(" matching `{f}` (available: {})", seen.join("; "))
                    }
                    Some(f) => format!(" matching `{f}`"),
                    None => String::new(),
                },
                hint: NO_ADAPTER_HINT.to_string(),
            }),
        }
    }

    #[cfg(target_arch = "wasm32")]
    async fn pick_adapter(_filter: Option<&str>) -> Result<(wgpu::Instance, wgpu::Adapter)> {
        let instance = new_instance(wgpu::Backends::BROWSER_WEBGPU);
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter {
                filter: String::new(),
                hint: format!("The browser offers no WebGPU adapter ({e})."),
            })?;
        Ok((instance, adapter))
    }

    async fn from_adapter(
        instance: wgpu::Instance,
        adapter: wgpu::Adapter,
        options: &GpuOptions,
    ) -> Result<Self> {
        let info = adapter.get_info();
        let mappable = match options.host_memory {
            true => adapter.features() & wgpu::Features::MAPPABLE_PRIMARY_BUFFERS,
            false => wgpu::Features::empty(),
        };
        let features = if options.portable_only {
            wgpu::Features::empty()
        } else if options.all_features {
            adapter.features() - wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
        } else {
            adapter.features() & OPTIONAL_FEATURES
        } | mappable;
        let mut limits = if options.webgpu_default_limits {
            wgpu::Limits::default()
        } else {
            adapter.limits()
        };
        if let Some(cap) = options.max_storage_binding {
            let cap = u32::try_from(cap).unwrap_or(u32::MAX).max(4096);
            limits.max_storage_buffer_binding_size =
                limits.max_storage_buffer_binding_size.min(cap as u64);
        }
        let experimental = if options.all_features
            || features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        {
            // SAFETY: wgpu's experimental features are opt-in; we only use cooperative matrices
            // in kernels that are tested against the reference on the device that runs them.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        // Burn's SPIR-V kernels need Vulkan extensions (buffer device addresses, the Vulkan
        // memory model, cooperative matrices) that `request_device` does not enable: CubeCL's
        // helper makes a device with them (every adapter feature, the adapter's limits), which
        // our WGSL pipelines use unchanged.
        #[cfg(feature = "burn-vulkan")]
        let vulkan = match options.all_features && info.backend == wgpu::Backend::Vulkan {
            true => cubecl::wgpu::vulkan::try_request_vulkan_device(&adapter)
                .await
                .map_err(|e| Error::RequestDevice(format!("{e:?}")))?,
            false => None,
        };
        #[cfg(not(feature = "burn-vulkan"))]
        let vulkan: Option<(wgpu::Device, wgpu::Queue)> = None;
        let (features, limits) = match &vulkan {
            Some((d, _)) => {
                let mut l = d.limits();
                // Our launchers index bindings in u32 elements: keep them within 4 GiB.
                l.max_storage_buffer_binding_size = l
                    .max_storage_buffer_binding_size
                    .min(limits.max_storage_buffer_binding_size)
                    .min(u32::MAX as u64);
                (d.features(), l)
            }
            None => (features, limits),
        };
        let (device, queue) = match vulkan {
            Some(dq) => dq,
            None => adapter
                .request_device(&wgpu::DeviceDescriptor {
                    label: Some("sparse-attn"),
                    required_features: features,
                    required_limits: limits.clone(),
                    experimental_features: experimental,
                    memory_hints: wgpu::MemoryHints::Performance,
                    trace: wgpu::Trace::Off,
                })
                .await
                .map_err(|e| Error::RequestDevice(e.to_string()))?,
        };
        // Errors are captured with error scopes where we can return them. Anything else (e.g. a
        // buffer the driver could not allocate mid-run) is kept and returned by the next `wait`
        // or readback, so the run fails with the cause instead of computing on invalid objects
        // (wgpu's default handler panics; a log line alone let runs continue).
        let uncaptured: Arc<Mutex<Option<String>>> = Arc::default();
        let first = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut f = first.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                log::error!("GPU error: {e}");
                *f = Some(e.to_string());
            } else {
                log::debug!("GPU error after the first: {e}");
            }
        }));
        Ok(Self {
            instance,
            raw_adapter: adapter,
            device,
            queue,
            adapter: AdapterSummary::of(&info),
            features,
            limits,
            pipelines: Mutex::new(HashMap::new()),
            pooled: std::sync::atomic::AtomicBool::new(false),
            profiler: Mutex::new(None),
            uniforms: Mutex::new(HashMap::new()),
            uncaptured,
        })
    }

    /// A uniform buffer holding `bytes`, made once per distinct content. Uniform buffers are
    /// never written after creation, so sharing one between dispatches is safe.
    pub(crate) fn uniform(&self, bytes: &[u8]) -> wgpu::Buffer {
        let mut map = self.uniforms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(bytes) {
            return b.clone();
        }
        if map.len() >= UNIFORMS_KEPT {
            map.clear();
        }
        let b = wgpu::util::DeviceExt::create_buffer_init(
            &self.device,
            &wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            },
        );
        map.insert(bytes.to_vec(), b.clone());
        b
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }
    pub fn features(&self) -> wgpu::Features {
        self.features
    }
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    /// A fresh [`Encoder`](crate::gpu::Encoder) to record our ops into.
    pub fn encoder(&self) -> crate::gpu::Encoder {
        crate::gpu::Encoder::new(&self.device)
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
    pub fn instance(&self) -> &wgpu::Instance {
        &self.instance
    }
    pub fn wgpu_adapter(&self) -> &wgpu::Adapter {
        &self.raw_adapter
    }
    /// Tensors may be ranges of one shared buffer (an allocator's pool, such as Burn's): wgpu
    /// forbids binding one buffer both read-only and writable in a dispatch, so from now on
    /// every kernel declares all its storage bindings `read_write` (pipelines are cached per
    /// setting). `train::Runtime` turns this on for the device it shares with Burn.
    pub fn set_pooled_buffers(&self, on: bool) {
        self.pooled.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn pooled_buffers(&self) -> bool {
        self.pooled.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Largest byte range one storage binding may cover on this device.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Wait for all submitted work; GPU errors surface here as `Error::Gpu`.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        self.check_errors()
    }

    /// The first GPU error that no error scope captured since the last check (e.g. out of
    /// memory in a buffer made mid-run): the work submitted since is not to be trusted.
    pub fn check_errors(&self) -> Result<()> {
        let mut f = self.uncaptured.lock().unwrap_or_else(|e| e.into_inner());
        match f.take() {
            Some(e) => Err(Error::Gpu(format!("a GPU command failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Run `f` inside a validation + out-of-memory error scope and return what it captured.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        match v.or(o) {
            Some(e) => Err(Error::Gpu(format!("{what}: {e}"))),
            None => Ok(out),
        }
    }

    /// In the browser errors arrive asynchronously through the uncaptured-error handler.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn scoped<T>(&self, _what: &str, f: impl FnOnce() -> T) -> Result<T> {
        Ok(f())
    }
}

impl Gpu {
    /// (min, max) subgroup size the adapter reports (0 when unknown).
    pub fn adapter_subgroup_sizes(&self) -> (u32, u32) {
        self.adapter.subgroup_sizes
    }
}
