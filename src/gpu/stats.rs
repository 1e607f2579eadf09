//! What the Vulkan driver made of our kernels: registers per invocation, spills, instruction
//! counts, as far as the driver reports them (`VK_KHR_pipeline_executable_properties`; NVIDIA's
//! 580 driver: register count, binary size, stack, local and shared memory). No timing shows
//! these, and on a GPU they decide how many subgroups an SM keeps in flight.
//!
//! wgpu creates its pipelines without the statistics flag, so this module compiles each kernel
//! again on a Vulkan device of its own on the same GPU: the same WGSL (`module_code`, as the
//! pipeline cache built it) through naga to SPIR-V with the options wgpu uses for our modules
//! (no runtime checks for the unchecked kernels, no loop bounding, no workgroup-memory zeroing),
//! then `vkCreateComputePipelines` with `CAPTURE_STATISTICS`. A developer tool (`bench ...
//! --pipeline-stats`); native Vulkan only.

use std::ffi::{CStr, CString};

use ash::vk;
use wgpu::naga;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::pipeline::{PipelineKey, module_code};

/// An executable the driver made (one for a compute pipeline): its name and statistics.
pub type Executable = (String, Vec<(String, String)>);

/// One kernel as the driver compiled it.
#[derive(Clone, Debug)]
pub struct KernelStats {
    /// `file:entry`.
    pub label: String,
    /// The constants that specialise it, `NAME=value` joined by spaces.
    pub constants: String,
    /// Per executable the driver made (one for a compute pipeline): its name and statistics.
    pub executables: Vec<Executable>,
}

fn vk_err(what: &str) -> impl Fn(vk::Result) -> Error + '_ {
    move |e| Error::Unsupported(format!("pipeline statistics: {what} failed: {e}"))
}

/// The driver's statistics for every pipeline `gpu` has built so far, sorted by label.
pub fn kernel_stats(gpu: &Gpu) -> Result<Vec<KernelStats>> {
    if gpu.adapter().backend != wgpu::Backend::Vulkan {
        return Err(Error::Unsupported(format!(
            "pipeline statistics need the Vulkan backend; this device runs {:?}",
            gpu.adapter().backend
        )));
    }
    let mut keys: Vec<(PipelineKey, bool)> = gpu
        .pipelines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    keys.sort_by(|a, b| {
        (a.0.file, a.0.entry, &a.0.constants).cmp(&(b.0.file, b.0.entry, &b.0.constants))
    });
    let vk = VkStats::new(&gpu.adapter().name)?;
    let mut out = Vec::new();
    for (key, pooled) in &keys {
        let code = module_code(key, *pooled)?;
        let label = key.label();
        let words = spirv(&code, key.checked, Some(key.entry), &label)?;
        let executables = vk.compile(&words, key.entry, &label)?;
        let constants = key
            .constants
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        out.push(KernelStats {
            label,
            constants,
            executables,
        });
    }
    Ok(out)
}

/// SPIR-V of a kernel module, as wgpu writes it for ours (runtime checks only where
/// `checked`): one entry point, or every one with `entry` None. The shader tests compile
/// through here too, so they see the options the driver gets.
pub(crate) fn spirv(
    code: &str,
    checked: bool,
    entry: Option<&str>,
    label: &str,
) -> Result<Vec<u32>> {
    let bad = |e: String| Error::Gpu(format!("{label}: {e}"));
    let module = naga::front::wgsl::parse_str(code).map_err(|e| bad(e.emit_to_string(code)))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| bad(e.emit_to_string(code)))?;
    let policy = match checked {
        true => naga::proc::BoundsCheckPolicy::Restrict,
        false => naga::proc::BoundsCheckPolicy::Unchecked,
    };
    // SPIR-V 1.6 is what wgpu writes for a Vulkan 1.3 device (every driver with cooperative
    // matrices is one).
    let opts = naga::back::spv::Options {
        lang_version: (1, 6),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: policy,
            buffer: policy,
            image_load: policy,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: naga::back::spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: checked,
        emit_int_div_checks: checked,
        ..Default::default()
    };
    let pipeline = entry.map(|e| naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: e.to_string(),
    });
    naga::back::spv::write_vec(&module, &info, &opts, pipeline.as_ref())
        .map_err(|e| bad(format!("{e:?}")))
}

/// A Vulkan device on the GPU named like ours, with every feature it has and the statistics
/// extension.
struct VkStats {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    exec: ash::khr::pipeline_executable_properties::Device,
}

impl VkStats {
    fn new(adapter_name: &str) -> Result<Self> {
        // SAFETY: loading the system's Vulkan loader, as wgpu does.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| {
            Error::Unsupported(format!("pipeline statistics: no Vulkan loader: {e}"))
        })?;
        let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_3);
        let instance = unsafe {
            entry.create_instance(
                &vk::InstanceCreateInfo::default().application_info(&app),
                None,
            )
        }
        .map_err(vk_err("vkCreateInstance"))?;
        match Self::open(&instance, adapter_name) {
            Ok((device, exec)) => Ok(Self {
                _entry: entry,
                instance,
                device,
                exec,
            }),
            Err(e) => {
                unsafe { instance.destroy_instance(None) };
                Err(e)
            }
        }
    }

    fn open(
        instance: &ash::Instance,
        adapter_name: &str,
    ) -> Result<(
        ash::Device,
        ash::khr::pipeline_executable_properties::Device,
    )> {
        let phys = unsafe { instance.enumerate_physical_devices() }
            .map_err(vk_err("vkEnumeratePhysicalDevices"))?;
        let pd = phys
            .into_iter()
            .find(|&pd| {
                let p = unsafe { instance.get_physical_device_properties(pd) };
                p.device_name_as_c_str()
                    .is_ok_and(|n| n.to_string_lossy() == adapter_name)
            })
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "pipeline statistics: no Vulkan device named {adapter_name:?}"
                ))
            })?;
        let exts = unsafe { instance.enumerate_device_extension_properties(pd) }
            .map_err(vk_err("vkEnumerateDeviceExtensionProperties"))?;
        let has = |name: &CStr| {
            exts.iter()
                .any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == name))
        };
        let stats_ext = ash::khr::pipeline_executable_properties::NAME;
        if !has(stats_ext) {
            return Err(Error::Unsupported(format!(
                "pipeline statistics: {adapter_name} does not offer {}",
                stats_ext.to_string_lossy()
            )));
        }
        let coop_ext = ash::khr::cooperative_matrix::NAME;
        // wgpu turns robustness2 on where the driver has it; it can change the code.
        let robust_ext = ash::ext::robustness2::NAME;
        let mut names = vec![stats_ext.as_ptr()];
        for ext in [coop_ext, robust_ext] {
            if has(ext) {
                names.push(ext.as_ptr());
            }
        }
        // Every feature the device has (the kernels' SPIR-V asks for f16, 16-bit storage,
        // subgroups, the memory model, cooperative matrices), queried into the chain that then
        // creates the device.
        let mut v11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut stats = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
        let mut coop = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let mut robust = vk::PhysicalDeviceRobustness2FeaturesEXT::default();
        let mut features = vk::PhysicalDeviceFeatures2::default()
            .push_next(&mut v11)
            .push_next(&mut v12)
            .push_next(&mut v13)
            .push_next(&mut stats);
        if has(coop_ext) {
            features = features.push_next(&mut coop);
        }
        if has(robust_ext) {
            features = features.push_next(&mut robust);
        }
        unsafe { instance.get_physical_device_features2(pd, &mut features) };
        let family = unsafe { instance.get_physical_device_queue_family_properties(pd) }
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| Error::Unsupported("pipeline statistics: no compute queue".into()))?;
        let priorities = [1.0];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family as u32)
            .queue_priorities(&priorities)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&names)
            .push_next(&mut features);
        let device =
            unsafe { instance.create_device(pd, &info, None) }.map_err(vk_err("vkCreateDevice"))?;
        let exec = ash::khr::pipeline_executable_properties::Device::new(instance, &device);
        Ok((device, exec))
    }

    /// Compile `words` (entry point `entry`) with statistics; per executable its name and
    /// statistics.
    fn compile(&self, words: &[u32], entry: &str, label: &str) -> Result<Vec<Executable>> {
        let d = &self.device;
        let module = unsafe {
            d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(words), None)
        }
        .map_err(vk_err("vkCreateShaderModule"))?;
        // Our kernels bind buffers in set 0 only; the layout takes their kinds from the module.
        let result = (|| {
            let layout_bindings = bindings(words);
            let set = unsafe {
                d.create_descriptor_set_layout(
                    &vk::DescriptorSetLayoutCreateInfo::default().bindings(&layout_bindings),
                    None,
                )
            }
            .map_err(vk_err("vkCreateDescriptorSetLayout"))?;
            let sets = [set];
            let layout = unsafe {
                d.create_pipeline_layout(
                    &vk::PipelineLayoutCreateInfo::default().set_layouts(&sets),
                    None,
                )
            };
            let layout = match layout {
                Ok(l) => l,
                Err(e) => {
                    unsafe { d.destroy_descriptor_set_layout(set, None) };
                    return Err(vk_err("vkCreatePipelineLayout")(e));
                }
            };
            let name = CString::new(entry).map_err(|e| Error::Gpu(e.to_string()))?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(&name);
            let info = [vk::ComputePipelineCreateInfo::default()
                .flags(
                    vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR
                        | vk::PipelineCreateFlags::CAPTURE_INTERNAL_REPRESENTATIONS_KHR,
                )
                .stage(stage)
                .layout(layout)];
            let made =
                unsafe { d.create_compute_pipelines(vk::PipelineCache::null(), &info, None) };
            let out = match made {
                Ok(p) => {
                    let r = self.read(p[0]);
                    unsafe { d.destroy_pipeline(p[0], None) };
                    r
                }
                Err((_, e)) => Err(Error::Gpu(format!(
                    "pipeline statistics: the driver did not compile {label}: {e}"
                ))),
            };
            unsafe {
                d.destroy_pipeline_layout(layout, None);
                d.destroy_descriptor_set_layout(set, None);
            }
            out
        })();
        unsafe { d.destroy_shader_module(module, None) };
        result
    }

    fn read(&self, pipeline: vk::Pipeline) -> Result<Vec<Executable>> {
        let execs = unsafe {
            self.exec.get_pipeline_executable_properties(
                &vk::PipelineInfoKHR::default().pipeline(pipeline),
            )
        }
        .map_err(vk_err("vkGetPipelineExecutablePropertiesKHR"))?;
        let mut out = Vec::new();
        for (i, e) in execs.iter().enumerate() {
            let info = vk::PipelineExecutableInfoKHR::default()
                .pipeline(pipeline)
                .executable_index(i as u32);
            let stats = unsafe { self.exec.get_pipeline_executable_statistics(&info) }
                .map_err(vk_err("vkGetPipelineExecutableStatisticsKHR"))?;
            let stats = stats
                .iter()
                .map(|s| {
                    let name = s.name_as_c_str().map(|n| n.to_string_lossy().into_owned());
                    // SAFETY: the format says which member of the union the driver wrote.
                    let value = unsafe {
                        match s.format {
                            vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                                (s.value.b32 != 0).to_string()
                            }
                            vk::PipelineExecutableStatisticFormatKHR::INT64 => {
                                s.value.i64.to_string()
                            }
                            vk::PipelineExecutableStatisticFormatKHR::UINT64 => {
                                s.value.u64.to_string()
                            }
                            vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => {
                                format!("{:.3}", s.value.f64)
                            }
                            _ => "?".to_string(),
                        }
                    };
                    (name.unwrap_or_else(|_| "?".into()), value)
                })
                .collect();
            // Which internal representations (IR, assembly) the driver would give, and their
            // sizes: named as pseudo-statistics, so a later tool knows whether dumping pays.
            let mut stats: Vec<(String, String)> = stats;
            if let Ok(reps) = unsafe {
                self.exec
                    .get_pipeline_executable_internal_representations(&info)
            } {
                for r in &reps {
                    let n = r.name_as_c_str().map(|n| n.to_string_lossy().into_owned());
                    stats.push((
                        format!("ir:{}", n.unwrap_or_default()),
                        format!("{} bytes", r.data_size),
                    ));
                }
            }
            let name = e
                .name_as_c_str()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((name, stats));
        }
        Ok(out)
    }
}

impl Drop for VkStats {
    fn drop(&mut self) {
        unsafe {
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

/// The buffer bindings of set 0 in a SPIR-V module: uniform where the variable is in the
/// Uniform storage class, storage buffers otherwise.
fn bindings(words: &[u32]) -> Vec<vk::DescriptorSetLayoutBinding<'static>> {
    use std::collections::BTreeMap;
    const OP_DECORATE: u32 = 71;
    const OP_VARIABLE: u32 = 59;
    const DECORATION_BINDING: u32 = 33;
    const STORAGE_UNIFORM: u32 = 2;
    const STORAGE_BUFFER: u32 = 12;
    let mut binding: BTreeMap<u32, u32> = BTreeMap::new();
    let mut class: BTreeMap<u32, u32> = BTreeMap::new();
    let mut i = 5;
    while i < words.len() {
        let (count, op) = ((words[i] >> 16) as usize, words[i] & 0xffff);
        if count == 0 {
            break;
        }
        let w = &words[i..(i + count).min(words.len())];
        match op {
            OP_DECORATE if w.len() >= 4 && w[2] == DECORATION_BINDING => {
                binding.insert(w[1], w[3]);
            }
            OP_VARIABLE if w.len() >= 4 => {
                class.insert(w[2], w[3]);
            }
            _ => {}
        }
        i += count;
    }
    let mut out: Vec<_> = binding
        .iter()
        .filter_map(|(id, &b)| {
            let ty = match *class.get(id)? {
                STORAGE_UNIFORM => vk::DescriptorType::UNIFORM_BUFFER,
                STORAGE_BUFFER => vk::DescriptorType::STORAGE_BUFFER,
                _ => return None,
            };
            Some(
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(ty)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE),
            )
        })
        .collect();
    out.sort_by_key(|b| b.binding);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Storage;
    use crate::ops::attention::Variant;
    use crate::ops::tiles::{Kind, Tiles};

    /// The layout reflected from a kernel's SPIR-V: its uniform parameters and storage
    /// tensors at their bindings, the optional bias binding only where the key declares it.
    #[test]
    fn bindings_come_from_the_module() {
        for (bias, n) in [(false, 6), (true, 7)] {
            let t = Tiles::of(Kind::Fwd, Variant::Portable, 64);
            let mut constants = t.constants(Kind::Fwd, 64);
            constants.push(("HAS_BIAS", bias as u32));
            let key = PipelineKey {
                file: "attention_fwd.wgsl",
                entry: "main",
                constants,
                checked: false,
                storage: Storage::F32,
            };
            let code = module_code(&key, false).unwrap();
            let words = spirv(&code, false, Some("main"), "fwd").unwrap();
            let b = bindings(&words);
            let got: Vec<(u32, vk::DescriptorType)> =
                b.iter().map(|b| (b.binding, b.descriptor_type)).collect();
            let mut want = vec![(0, vk::DescriptorType::UNIFORM_BUFFER)];
            want.extend((1..n).map(|i| (i, vk::DescriptorType::STORAGE_BUFFER)));
            assert_eq!(got, want, "bias {bias}");
        }
    }
}
