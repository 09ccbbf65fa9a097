//! How many bytes of tensor storage a device holds now and at its peak. CUDA's caching allocator
//! counts every block it hands out (tensors, GEMM workspaces, kernel scratch); on the CPU the
//! tensors' storages are counted here as they are created and dropped (scratch vectors inside an
//! op are not). The training memory planner reads these around a probe step.

use super::Device;
use crate::Result;
use std::sync::atomic::{AtomicUsize, Ordering};

static CPU_IN_USE: AtomicUsize = AtomicUsize::new(0);
static CPU_PEAK: AtomicUsize = AtomicUsize::new(0);

/// Bytes in use on a device, now and at the highest point since the last [`reset_peak`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    pub in_use: usize,
    pub peak: usize,
}

pub(crate) fn cpu_alloc(bytes: usize) {
    let now = CPU_IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    CPU_PEAK.fetch_max(now, Ordering::Relaxed);
}

pub(crate) fn cpu_free(bytes: usize) {
    CPU_IN_USE.fetch_sub(bytes, Ordering::Relaxed);
}

/// The device's counters (CPU: process-wide tensor storage).
pub fn memory_use(device: Device) -> Result<MemoryUse> {
    match device {
        Device::Cpu => Ok(MemoryUse {
            in_use: CPU_IN_USE.load(Ordering::Relaxed),
            peak: CPU_PEAK.load(Ordering::Relaxed),
        }),
        Device::Cuda(i) => {
            let s = crate::backend::cuda::device(i)?.mem_stats();
            Ok(MemoryUse {
                in_use: s.in_use,
                peak: s.peak,
            })
        }
    }
}

/// Start a new peak at the current use.
pub fn reset_peak(device: Device) -> Result<()> {
    match device {
        Device::Cpu => {
            CPU_PEAK.store(CPU_IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Device::Cuda(i) => crate::backend::cuda::device(i)?.reset_peak(),
    }
    Ok(())
}
