//! The machine's state: CPU (total and per core), memory, the gateway's own process, the
//! model server's process, and NVIDIA GPUs.
//!
//! [`SystemMonitor`] samples with `sysinfo` and, with the `nvml` feature (on by default),
//! NVML. Where NVML is absent (no NVIDIA driver) the report says "no GPU found": never
//! an error.
//!
//! [`free_memory`] is the cheap question asked before a model starts: how much RAM and
//! GPU memory is free right now.

mod gpu;

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use sysinfo::{MemoryRefreshKind, Pid, ProcessesToUpdate, System};

pub use gpu::{GpuDevice, GpuMemory, GpuReport};

/// The operating system would not say how the machine is doing.
#[derive(Debug, thiserror::Error)]
#[error("cannot read system information: {0}")]
pub struct SystemError(#[source] crate::BoxError);

/// CPU usage needs two samples; reports closer together than this reuse the last one.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// One snapshot of the machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemReport {
    /// CPU usage.
    pub cpu: CpuReport,
    /// Memory of the whole machine.
    pub memory: MemoryReport,
    /// The gateway's own process.
    pub gateway: ProcessReport,
    /// The first model server's process, when llmgate runs one.
    pub model_server: Option<ProcessReport>,
    /// Every model server's process, in the order their ids were given.
    pub model_servers: Vec<ProcessReport>,
    /// GPUs.
    pub gpu: GpuReport,
}

/// CPU usage in percent (0–100 per core, and averaged over all cores).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuReport {
    /// Average over all cores.
    pub usage_percent: f32,
    /// Each core.
    pub per_core_percent: Vec<f32>,
    /// Number of logical cores.
    pub cores: usize,
}

/// Memory in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    /// In use.
    pub used_bytes: u64,
    /// Installed.
    pub total_bytes: u64,
}

/// One process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessReport {
    /// Its id.
    pub pid: u32,
    /// Resident memory in bytes.
    pub memory_bytes: u64,
    /// CPU usage in percent of one core (above 100 when it uses several).
    pub cpu_percent: f32,
}

/// Memory free right now, for deciding whether a model fits before starting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FreeMemory {
    /// RAM that can be had without swapping (the kernel's `MemAvailable` on Linux:
    /// free memory plus caches it can drop). 0, with `ram_total_bytes` 0, when the
    /// operating system would not say.
    pub ram_available_bytes: u64,
    /// RAM installed.
    pub ram_total_bytes: u64,
    /// Each NVIDIA GPU; empty without one, without its driver, or without the `nvml`
    /// feature.
    pub gpus: Vec<GpuMemory>,
}

/// How much RAM and GPU memory is free now.
///
/// Cheap enough to call before each model start: it refreshes the memory figures only
/// (no process or CPU scan), and loads sysinfo's state and NVML once per process. A
/// container's memory limit is not applied: the figures are the machine's.
pub fn free_memory() -> FreeMemory {
    static SYSTEM: OnceLock<Option<Mutex<System>>> = OnceLock::new();
    static GPUS: OnceLock<gpu::Gpus> = OnceLock::new();
    let system = SYSTEM.get_or_init(|| {
        System::new()
            .map_err(|e| tracing::debug!(error = %e, "memory figures not available"))
            .ok()
            .map(Mutex::new)
    });
    let (ram_available_bytes, ram_total_bytes) = system.as_ref().map_or((0, 0), |system| {
        let mut system = system.lock().unwrap_or_else(PoisonError::into_inner);
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        (system.available_memory(), system.total_memory())
    });
    FreeMemory {
        ram_available_bytes,
        ram_total_bytes,
        gpus: GPUS.get_or_init(gpu::Gpus::load).memory(),
    }
}

/// Samples the machine. Cheap to share; sampling takes a lock for a few milliseconds.
#[derive(Debug)]
pub struct SystemMonitor {
    state: Mutex<State>,
    gpus: gpu::Gpus,
}

#[derive(Debug)]
struct State {
    system: System,
    sampled: Option<Instant>,
}

impl SystemMonitor {
    /// A monitor; NVML (if compiled in) is loaded once, here.
    pub fn new() -> Result<Self, SystemError> {
        let system = System::new().map_err(|e| SystemError(e.into()))?;
        Ok(Self {
            state: Mutex::new(State {
                system,
                sampled: None,
            }),
            gpus: gpu::Gpus::load(),
        })
    }

    /// A report; `model_server` is the model server's process id, if any.
    pub fn report(&self, model_server: Option<u32>) -> SystemReport {
        self.report_all(model_server.as_slice())
    }

    /// A report with each of the `model_servers` (process ids) in it.
    pub fn report_all(&self, model_servers: &[u32]) -> SystemReport {
        let gateway_pid = std::process::id();
        let mut state = self.state.lock().unwrap();
        let pids: Vec<Pid> = std::iter::once(gateway_pid)
            .chain(model_servers.iter().copied())
            .map(Pid::from_u32)
            .collect();
        let stale = state
            .sampled
            .is_none_or(|t| t.elapsed() >= MIN_SAMPLE_INTERVAL);
        if stale {
            let first = state.sampled.is_none();
            state.system.refresh_cpu_usage();
            state.system.refresh_memory();
            state
                .system
                .refresh_processes(ProcessesToUpdate::Some(&pids), true);
            if first {
                // The first CPU sample has nothing to compare with: take a second one.
                std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
                state.system.refresh_cpu_usage();
                state
                    .system
                    .refresh_processes(ProcessesToUpdate::Some(&pids), true);
            }
            state.sampled = Some(Instant::now());
        }
        let system = &state.system;
        let process = |pid: u32| {
            system.process(Pid::from_u32(pid)).map(|p| ProcessReport {
                pid,
                memory_bytes: p.memory(),
                cpu_percent: p.cpu_usage(),
            })
        };
        let per_core_percent: Vec<f32> = system.cpus().iter().map(|c| c.usage()).collect();
        SystemReport {
            cpu: CpuReport {
                usage_percent: system.global_cpu_usage(),
                cores: per_core_percent.len(),
                per_core_percent,
            },
            memory: MemoryReport {
                used_bytes: system.used_memory(),
                total_bytes: system.total_memory(),
            },
            gateway: process(gateway_pid).unwrap_or(ProcessReport {
                pid: gateway_pid,
                memory_bytes: 0,
                cpu_percent: 0.0,
            }),
            model_server: model_servers.first().copied().and_then(process),
            model_servers: model_servers.iter().copied().filter_map(process).collect(),
            gpu: self.gpus.report(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_cpu_memory_and_this_process() {
        let monitor = SystemMonitor::new().unwrap();
        let report = monitor.report(None);
        assert!(report.cpu.cores >= 1);
        assert_eq!(report.cpu.per_core_percent.len(), report.cpu.cores);
        assert!((0.0..=100.0).contains(&report.cpu.usage_percent));
        assert!(
            report.memory.total_bytes > 0 && report.memory.used_bytes <= report.memory.total_bytes
        );
        assert_eq!(report.gateway.pid, std::process::id());
        assert!(
            report.gateway.memory_bytes > 1024 * 1024,
            "a running test uses some memory"
        );
        assert!(report.model_server.is_none());
    }

    #[test]
    fn reports_another_process_by_pid() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let monitor = SystemMonitor::new().unwrap();
        let report = monitor.report(Some(child.id()));
        let server = report.model_server.expect("the child is found");
        assert_eq!(server.pid, child.id());
        assert!(server.memory_bytes > 0);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Whether this machine has an NVIDIA driver that NVML can load.
    fn has_nvidia_driver() -> bool {
        #[cfg(feature = "nvml")]
        return nvml_wrapper::Nvml::init().is_ok();
        #[cfg(not(feature = "nvml"))]
        false
    }

    #[test]
    fn free_memory_is_what_the_machine_has_free() {
        let monitor = SystemMonitor::new().unwrap();
        let report = monitor.report(None);
        let free = free_memory();
        assert_eq!(free.ram_total_bytes, report.memory.total_bytes);
        assert!(free.ram_available_bytes > 0, "{free:?}");
        assert!(free.ram_available_bytes <= free.ram_total_bytes, "{free:?}");

        // What the kernel says is available, read at the same moment. (Holding memory
        // and watching the figure drop is not reliable on a VM: the host may merge or
        // reclaim pages, and other processes move it by hundreds of MiB.)
        #[cfg(target_os = "linux")]
        {
            let kernel = || -> u64 {
                let text = std::fs::read_to_string("/proc/meminfo").unwrap();
                let line = text
                    .lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .unwrap();
                line.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    * 1024
            };
            let pairs: Vec<(u64, u64)> = (0..5)
                .map(|_| (kernel(), free_memory().ram_available_bytes))
                .collect();
            assert!(
                pairs
                    .iter()
                    .any(|&(kernel, ours)| kernel.abs_diff(ours) < 64 << 20),
                "MemAvailable and free_memory(), read together: {pairs:?}"
            );
        }

        assert_eq!(
            free.gpus.len(),
            report.gpu.devices.len(),
            "the same GPUs as the system report"
        );
        for (gpu, device) in free.gpus.iter().zip(&report.gpu.devices) {
            assert_eq!((gpu.index, &gpu.name), (device.index, &device.name));
            assert!(gpu.free_bytes <= gpu.total_bytes && gpu.total_bytes >= 1 << 30);
        }
    }

    #[test]
    fn free_memory_is_cheap_enough_for_each_model_start() {
        free_memory();
        let started = Instant::now();
        for _ in 0..100 {
            free_memory();
        }
        let each = started.elapsed() / 100;
        assert!(each < Duration::from_millis(20), "{each:?} per call");
    }

    #[test]
    fn without_an_nvidia_driver_the_report_says_no_gpu_found() {
        // The development machine and CI have no NVIDIA driver.
        if has_nvidia_driver() {
            return; // a GPU machine: the test below covers it
        }
        let report = SystemMonitor::new().unwrap().report(None);
        assert!(report.gpu.devices.is_empty());
        assert!(free_memory().gpus.is_empty());
        assert_eq!(report.gpu.message, "no GPU found");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["gpu"]["message"], "no GPU found");
    }

    /// Needs an NVIDIA GPU and its driver; skipped, saying so, where there is none.
    #[test]
    fn an_nvidia_gpu_is_reported_with_its_memory_temperature_and_power() {
        if !has_nvidia_driver() {
            eprintln!("skipped: needs an NVIDIA GPU and its driver (NVML did not load)");
            return;
        }
        let report = SystemMonitor::new().unwrap().report(None);
        println!("{}", serde_json::to_string_pretty(&report.gpu).unwrap());
        assert!(!report.gpu.devices.is_empty(), "{}", report.gpu.message);
        assert!(report.gpu.message.ends_with("GPU") || report.gpu.message.ends_with("GPUs"));
        for gpu in &report.gpu.devices {
            assert!(gpu.name.contains("NVIDIA"), "{}", gpu.name);
            let total = gpu.memory_total_bytes.expect("total memory");
            assert!(total >= 1 << 30, "{total} bytes");
            assert!(gpu.memory_used_bytes.expect("memory in use") <= total);
            assert!(gpu.utilization_percent.expect("utilisation") <= 100);
            let celsius = gpu.temperature_celsius.expect("temperature");
            assert!((1..=120).contains(&celsius), "{celsius} °C");
            let watts = gpu.power_watts.expect("power draw");
            assert!(watts > 0.0 && watts < 2000.0, "{watts} W");
        }
    }
}
