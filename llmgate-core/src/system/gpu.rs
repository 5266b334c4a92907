//! NVIDIA GPUs through NVML (feature `nvml`).

use serde::Serialize;

/// What is known about GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReport {
    /// One entry per GPU.
    pub devices: Vec<GpuDevice>,
    /// A sentence for people: "no GPU found", "1 GPU", or why GPUs cannot be read.
    pub message: String,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuDevice {
    /// Index as NVML numbers them.
    pub index: u32,
    /// Model name.
    pub name: String,
    /// Utilisation in percent.
    pub utilization_percent: Option<u32>,
    /// Memory in use, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Memory installed, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Temperature in °C.
    pub temperature_celsius: Option<u32>,
    /// Power draw in watts.
    pub power_watts: Option<f64>,
}

/// One GPU's memory, for deciding whether a model fits on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuMemory {
    /// Index as NVML numbers them (as `CUDA_VISIBLE_DEVICES` does by default).
    pub index: u32,
    /// Model name.
    pub name: String,
    /// Memory not in use, bytes.
    pub free_bytes: u64,
    /// Memory installed, bytes.
    pub total_bytes: u64,
}

pub(super) struct Gpus {
    #[cfg(feature = "nvml")]
    nvml: Option<nvml_wrapper::Nvml>,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpus").finish_non_exhaustive()
    }
}

const NONE: &str = "no GPU found";

impl Gpus {
    pub(super) fn load() -> Self {
        #[cfg(feature = "nvml")]
        {
            // Fails without an NVIDIA driver: that simply means no GPU.
            let nvml = nvml_wrapper::Nvml::init()
                .map_err(|e| tracing::debug!(error = %e, "NVML not available"))
                .ok();
            Self { nvml }
        }
        #[cfg(not(feature = "nvml"))]
        Self {}
    }

    pub(super) fn report(&self) -> GpuReport {
        #[cfg(feature = "nvml")]
        if let Some(nvml) = &self.nvml {
            return nvml_report(nvml);
        }
        GpuReport {
            devices: Vec::new(),
            message: NONE.to_owned(),
        }
    }

    /// Each GPU's free and total memory; a GPU whose memory cannot be read is left out
    /// (nothing can be placed on it knowingly).
    pub(super) fn memory(&self) -> Vec<GpuMemory> {
        #[cfg(feature = "nvml")]
        if let Some(nvml) = &self.nvml {
            return nvml_memory(nvml);
        }
        Vec::new()
    }
}

#[cfg(feature = "nvml")]
fn nvml_memory(nvml: &nvml_wrapper::Nvml) -> Vec<GpuMemory> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok()?;
            Some(GpuMemory {
                index,
                name: device.name().unwrap_or_else(|_| "unknown GPU".to_owned()),
                free_bytes: memory.free,
                total_bytes: memory.total,
            })
        })
        .collect()
}

#[cfg(feature = "nvml")]
fn nvml_report(nvml: &nvml_wrapper::Nvml) -> GpuReport {
    use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(err) => {
            return GpuReport {
                devices: Vec::new(),
                message: format!("GPUs cannot be read: {err}"),
            }
        }
    };
    let devices: Vec<GpuDevice> = (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok();
            Some(GpuDevice {
                index,
                name: device.name().unwrap_or_else(|_| "unknown GPU".to_owned()),
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            })
        })
        .collect();
    let message = match devices.len() {
        0 => NONE.to_owned(),
        1 => "1 GPU".to_owned(),
        n => format!("{n} GPUs"),
    };
    GpuReport { devices, message }
}
