//! GPU inventory and telemetry: real GPUs through NVML, or simulated GPUs for load tests, behind one type.
//!
//! Every NVML call runs on tokio's blocking pool: the driver can take milliseconds per query (more on a busy
//! GPU), and the async threads carry heartbeats and the allocation consumer. Simulated GPUs are always
//! labelled as such: `GpuInfo.simulated = true`, the name "simulated GPU", a `SIM-` uuid.

use std::collections::HashMap;
use std::sync::Arc;

use events::WorkerId;
use events::workers::{GpuInfo, GpuTelemetry};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

const MIB: u64 = 1024 * 1024;

/// Memory of one simulated GPU (an 80 GiB card).
pub const SIMULATED_MEMORY_MIB: u64 = 81_920;

/// Name every simulated GPU reports.
pub const SIMULATED_NAME: &str = "simulated GPU";

/// Why GPUs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No driver or library: the operator either installs one or asks for simulated GPUs.
    #[error("no NVIDIA GPU/driver found: {source}; run with --simulate-gpus N for simulated GPUs")]
    NoGpu {
        #[source]
        source: NvmlError,
    },
    /// The driver answered but lists no device.
    #[error("NVML reports no GPU on this machine; run with --simulate-gpus N for simulated GPUs")]
    NoDevices,
    /// A query that worked at start failed later (GPU fell off the bus, driver reloaded).
    #[error("NVML {what} failed: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: NvmlError,
    },
    /// The blocking task that ran the query panicked or was cancelled.
    #[error("NVML query task failed: {0}")]
    Join(String),
}

/// How many running attempts use each GPU index; what simulated telemetry is made from.
pub type GpuLoad = HashMap<u32, u32>;

/// Where the agent's GPUs come from. Cheap to clone.
#[derive(Debug, Clone)]
pub enum GpuSource {
    Nvml(NvmlGpus),
    Simulated(SimulatedGpus),
}

impl GpuSource {
    /// Opens NVML (off the async threads). Without a driver this is [`GpuError::NoGpu`], whose message tells
    /// the operator about `--simulate-gpus`.
    pub async fn nvml() -> Result<GpuSource, GpuError> {
        let nvml = tokio::task::spawn_blocking(Nvml::init)
            .await
            .map_err(|e| GpuError::Join(e.to_string()))?
            .map_err(|source| GpuError::NoGpu { source })?;
        let gpus = NvmlGpus {
            nvml: Arc::new(nvml),
        };
        if gpus
            .run(|n| query("device count", n.device_count()))
            .await?
            == 0
        {
            return Err(GpuError::NoDevices);
        }
        Ok(GpuSource::Nvml(gpus))
    }

    /// `count` simulated GPUs for `worker`, with uuids `SIM-<worker>-<i>`.
    pub fn simulated(worker: &WorkerId, count: u32) -> GpuSource {
        GpuSource::Simulated(SimulatedGpus {
            worker: worker.to_string(),
            count,
        })
    }

    pub fn is_simulated(&self) -> bool {
        matches!(self, GpuSource::Simulated(_))
    }

    /// The GPUs as registered.
    pub async fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        match self {
            GpuSource::Nvml(n) => n.inventory().await,
            GpuSource::Simulated(s) => Ok(s.inventory()),
        }
    }

    /// Telemetry of every GPU. `load` (running attempts per GPU) shapes simulated telemetry; `tick` varies
    /// it a little from one heartbeat to the next. Real GPUs ignore both.
    pub async fn telemetry(
        &self,
        load: &GpuLoad,
        tick: u64,
    ) -> Result<Vec<GpuTelemetry>, GpuError> {
        match self {
            GpuSource::Nvml(n) => n.telemetry().await,
            GpuSource::Simulated(s) => Ok(s.telemetry(load, tick)),
        }
    }

    /// GPU memory in MiB used on `gpu_indices` by process `root` and its descendants, summed over the GPUs.
    /// `None` for simulated GPUs or when NVML cannot tell.
    pub async fn process_memory_mib(&self, gpu_indices: &[u32], root: u32) -> Option<u64> {
        match self {
            GpuSource::Nvml(n) => n.process_memory_mib(gpu_indices.to_vec(), root).await,
            GpuSource::Simulated(_) => None,
        }
    }
}

/// Real GPUs read through NVML.
#[derive(Clone)]
pub struct NvmlGpus {
    nvml: Arc<Nvml>,
}

impl std::fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpus").finish_non_exhaustive()
    }
}

fn query<T>(what: &'static str, r: Result<T, NvmlError>) -> Result<T, GpuError> {
    r.map_err(|source| GpuError::Query { what, source })
}

impl NvmlGpus {
    /// Runs `f` on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Nvml) -> Result<T, GpuError> + Send + 'static,
    ) -> Result<T, GpuError> {
        let nvml = self.nvml.clone();
        tokio::task::spawn_blocking(move || f(&nvml))
            .await
            .map_err(|e| GpuError::Join(e.to_string()))?
    }

    async fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        self.run(|nvml| {
            let count = query("device count", nvml.device_count())?;
            (0..count)
                .map(|index| {
                    let d = query("device by index", nvml.device_by_index(index))?;
                    Ok(GpuInfo {
                        index,
                        uuid: query("uuid", d.uuid())?,
                        name: query("name", d.name())?,
                        memory_total_mib: query("memory info", d.memory_info())?.total / MIB,
                        simulated: false,
                    })
                })
                .collect()
        })
        .await
    }

    async fn telemetry(&self) -> Result<Vec<GpuTelemetry>, GpuError> {
        self.run(|nvml| {
            let count = query("device count", nvml.device_count())?;
            (0..count)
                .map(|index| {
                    let d = query("device by index", nvml.device_by_index(index))?;
                    let memory = query("memory info", d.memory_info())?;
                    let utilization = query("utilization", d.utilization_rates())?;
                    let temperature = query("temperature", d.temperature(TemperatureSensor::Gpu))?;
                    let power = query("power usage", d.power_usage())?;
                    let processes = query("running processes", d.running_compute_processes())?;
                    Ok(GpuTelemetry {
                        index,
                        memory_used_mib: memory.used / MIB,
                        memory_total_mib: memory.total / MIB,
                        utilization_pct: utilization.gpu.min(100) as u8,
                        temperature_c: i16::try_from(temperature).unwrap_or(i16::MAX),
                        power_mw: power,
                        process_count: u32::try_from(processes.len()).unwrap_or(u32::MAX),
                    })
                })
                .collect()
        })
        .await
    }

    async fn process_memory_mib(&self, gpu_indices: Vec<u32>, root: u32) -> Option<u64> {
        let sampled = self
            .run(move |nvml| {
                let mut bytes = 0u64;
                for index in gpu_indices {
                    let d = query("device by index", nvml.device_by_index(index))?;
                    for p in query("running processes", d.running_compute_processes())? {
                        if let UsedGpuMemory::Used(used) = p.used_gpu_memory
                            && descends_from(p.pid, root)
                        {
                            bytes = bytes.saturating_add(used);
                        }
                    }
                }
                Ok(bytes / MIB)
            })
            .await;
        match sampled {
            Ok(mib) => Some(mib),
            Err(e) => {
                tracing::debug!(error = %e, "cannot sample a task's GPU memory");
                None
            }
        }
    }
}

/// Whether `pid` is `root` or one of its descendants, following parent pids through `/proc` (a task's GPU
/// work usually runs in a child of the command the agent started, e.g. `sh -c 'python …'`).
fn descends_from(pid: u32, root: u32) -> bool {
    let mut current = pid;
    // Bounded: a parent chain is short, and a racing exit must not loop us.
    for _ in 0..64 {
        if current == root {
            return true;
        }
        match parent_pid(current) {
            Some(parent) if parent > 1 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

/// The parent pid from `/proc/<pid>/stat` (field 4, after the parenthesised command name).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Simulated GPUs: fixed inventory, telemetry derived from how many attempts run on each GPU.
#[derive(Debug, Clone)]
pub struct SimulatedGpus {
    worker: String,
    count: u32,
}

impl SimulatedGpus {
    fn inventory(&self) -> Vec<GpuInfo> {
        (0..self.count)
            .map(|index| GpuInfo {
                index,
                uuid: format!("SIM-{}-{index}", self.worker),
                name: SIMULATED_NAME.to_owned(),
                memory_total_mib: SIMULATED_MEMORY_MIB,
                simulated: true,
            })
            .collect()
    }

    fn telemetry(&self, load: &GpuLoad, tick: u64) -> Vec<GpuTelemetry> {
        (0..self.count)
            .map(|index| {
                let tasks = load.get(&index).copied().unwrap_or(0);
                // A few points of deterministic jitter so dashboards show a live signal, not a flat line.
                let jitter = (tick.wrapping_mul(31).wrapping_add(u64::from(index) * 17) % 5) as u32;
                let utilization = if tasks == 0 {
                    jitter.min(2)
                } else {
                    (80 + 10 * (tasks - 1) + jitter).min(100)
                };
                let memory_used = (512 + 16_384 * u64::from(tasks)).min(SIMULATED_MEMORY_MIB);
                GpuTelemetry {
                    index,
                    memory_used_mib: memory_used,
                    memory_total_mib: SIMULATED_MEMORY_MIB,
                    utilization_pct: utilization as u8,
                    temperature_c: 34 + (utilization * 2 / 5) as i16,
                    power_mw: 60_000 + utilization * 5_500,
                    process_count: tasks,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn simulated_gpus_are_labelled_and_reflect_load() {
        let worker = WorkerId::new("w-7").unwrap();
        let gpus = GpuSource::simulated(&worker, 2);
        assert!(gpus.is_simulated());
        let inventory = gpus.inventory().await.unwrap();
        assert_eq!(inventory.len(), 2);
        for (i, g) in inventory.iter().enumerate() {
            assert!(g.simulated);
            assert_eq!(g.name, SIMULATED_NAME);
            assert_eq!(g.uuid, format!("SIM-w-7-{i}"));
            assert_eq!(g.memory_total_mib, 81_920);
        }
        let idle = gpus.telemetry(&GpuLoad::new(), 1).await.unwrap();
        assert!(
            idle.iter()
                .all(|t| t.process_count == 0 && t.utilization_pct <= 2)
        );
        let busy = gpus.telemetry(&GpuLoad::from([(1, 1)]), 1).await.unwrap();
        assert_eq!(busy[0].process_count, 0);
        assert_eq!(busy[1].process_count, 1);
        assert!(busy[1].utilization_pct >= 80);
        assert!(busy[1].memory_used_mib > busy[0].memory_used_mib);
        assert!(busy[1].power_mw > busy[0].power_mw);
        assert_eq!(
            gpus.process_memory_mib(&[0], std::process::id()).await,
            None
        );
    }

    /// Without a driver (CI, this machine) NVML gives the typed error that names `--simulate-gpus`; with one,
    /// the inventory is real.
    #[tokio::test]
    async fn nvml_without_a_gpu_is_a_clear_error() {
        match GpuSource::nvml().await {
            Err(e) => {
                assert!(
                    matches!(e, GpuError::NoGpu { .. } | GpuError::NoDevices),
                    "{e:?}"
                );
                let message = e.to_string();
                assert!(message.contains("--simulate-gpus N"), "{message}");
                if matches!(e, GpuError::NoGpu { .. }) {
                    assert!(
                        message.starts_with("no NVIDIA GPU/driver found: "),
                        "{message}"
                    );
                }
            }
            Ok(gpus) => {
                assert!(!gpus.is_simulated());
                let inventory = gpus.inventory().await.unwrap();
                assert!(!inventory.is_empty());
                assert!(
                    inventory
                        .iter()
                        .all(|g| !g.simulated && g.memory_total_mib > 0)
                );
                let telemetry = gpus.telemetry(&GpuLoad::new(), 0).await.unwrap();
                assert_eq!(telemetry.len(), inventory.len());
                assert!(
                    gpus.process_memory_mib(&[0], std::process::id())
                        .await
                        .is_some()
                );
            }
        }
    }

    #[test]
    fn a_process_descends_from_itself_and_its_ancestors() {
        let me = std::process::id();
        assert!(descends_from(me, me));
        let parent = parent_pid(me).unwrap();
        assert!(descends_from(me, parent));
        assert!(!descends_from(parent, me));
    }
}
