//! Per-kernel device time, for finding where a step's time goes on a GPU that has no profiler
//! attached (the device sessions have minutes, and no hardware counters on some runtimes).
//!
//! While a [`Profiler`] is recording, each kernel launch and each cuBLAS / cuBLASLt call is
//! bracketed by two CUDA events on the device's stream; [`Profiler::stop`] folds the pairs into
//! device milliseconds per name. The span between two events on one stream is the device time
//! of the work between them: idle gaps while the host is still launching fall between one pair's
//! end and the next one's start, so the sum over names against the wall time says how much of a
//! step the GPU spent waiting for the host. One caveat there: when the device runs ahead of the
//! host, a start event is stamped as soon as the host records it and the work behind it only
//! when the host has submitted it, so each span then also holds that submission latency (a small
//! cuBLAS call reads as ~17 us on an H200 in a launch-bound step). Recording costs two event
//! records per launch, so it is meant for a dedicated run beside the timed ones, never inside
//! them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys as ds, CudaContext, CudaEvent, CudaStream};

use crate::{Error, Result};

/// Event pairs are folded into the totals once this many wait, so a long run holds few events.
const FOLD_AT: usize = 4096;

/// Device time of one name over a recording.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub ms: f64,
    pub calls: u64,
}

#[derive(Default)]
struct Log {
    pending: Vec<(String, CudaEvent, CudaEvent)>,
    totals: HashMap<String, (f64, u64)>,
}

#[derive(Default)]
pub(crate) struct Profiler {
    on: AtomicBool,
    log: Mutex<Log>,
}

impl Profiler {
    pub(crate) fn recording(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub(crate) fn start(&self) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.pending.clear();
        log.totals.clear();
        self.on.store(true, Ordering::Relaxed);
    }

    /// Runs `work` between two events named `name` when recording, else just runs it.
    pub(crate) fn span<R>(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        name: impl FnOnce() -> String,
        work: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if !self.recording() {
            return work();
        }
        let event = || {
            ctx.new_event(Some(ds::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| Error::cuda("profiler event", e))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(stream)
            .map_err(|e| Error::cuda("profiler event", e))?;
        let out = work()?;
        end.record(stream)
            .map_err(|e| Error::cuda("profiler event", e))?;
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.pending.push((name(), start, end));
        if log.pending.len() >= FOLD_AT {
            fold(&mut log)?;
        }
        Ok(out)
    }

    /// Ends the recording: device milliseconds and calls per name, the largest first.
    pub(crate) fn stop(&self) -> Result<Vec<KernelTime>> {
        self.on.store(false, Ordering::Relaxed);
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        fold(&mut log)?;
        let mut out: Vec<KernelTime> = log
            .totals
            .drain()
            .map(|(name, (ms, calls))| KernelTime { name, ms, calls })
            .collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }
}

/// Waits for the pending pairs (elapsed_ms synchronises on both events) and adds them up.
fn fold(log: &mut Log) -> Result<()> {
    for (name, start, end) in log.pending.drain(..) {
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| Error::cuda("profiler elapsed time", e))?;
        let t = log.totals.entry(name).or_insert((0.0, 0));
        t.0 += ms as f64;
        t.1 += 1;
    }
    Ok(())
}

/// The table `kstyle bench --model --profile` prints: the `top` largest names with their share
/// of the recorded device time, then the rest as one line, then device time against wall time.
pub fn table(times: &[KernelTime], top: usize, wall_ms: f64) -> String {
    let total: f64 = times.iter().map(|t| t.ms).sum();
    let mut s = String::new();
    for t in times.iter().take(top) {
        s.push_str(&format!(
            "  {:>9.3} ms {:>5.1}% {:>6} calls  {}\n",
            t.ms,
            100.0 * t.ms / total.max(f64::MIN_POSITIVE),
            t.calls,
            t.name
        ));
    }
    if times.len() > top {
        let rest = &times[top..];
        let ms: f64 = rest.iter().map(|t| t.ms).sum();
        let calls: u64 = rest.iter().map(|t| t.calls).sum();
        s.push_str(&format!(
            "  {:>9.3} ms {:>5.1}% {:>6} calls  ({} other names)\n",
            ms,
            100.0 * ms / total.max(f64::MIN_POSITIVE),
            calls,
            rest.len()
        ));
    }
    s.push_str(&format!(
        "  {total:.3} ms of device time in {:.3} ms of wall time ({:.1}% busy)\n",
        wall_ms,
        100.0 * total / wall_ms.max(f64::MIN_POSITIVE)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sorts_shares_and_folds_the_rest() {
        let times = vec![
            KernelTime {
                name: "a".into(),
                ms: 6.0,
                calls: 3,
            },
            KernelTime {
                name: "b".into(),
                ms: 3.0,
                calls: 1,
            },
            KernelTime {
                name: "c".into(),
                ms: 1.0,
                calls: 2,
            },
        ];
        let t = table(&times, 2, 20.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[0].contains("60.0%") && lines[0].ends_with(" a"),
            "{t}"
        );
        assert!(
            lines[1].contains("30.0%") && lines[1].ends_with(" b"),
            "{t}"
        );
        assert!(
            lines[2].contains("10.0%") && lines[2].contains("(1 other names)"),
            "{t}"
        );
        assert!(lines[3].contains("50.0% busy"), "{t}");
    }
}
