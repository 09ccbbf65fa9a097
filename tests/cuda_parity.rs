//! Every CUDA op against the CPU oracle (src/verify/cuda_parity.rs holds the cases; the release
//! binary runs the same ones as `kstyle gpu-parity` on the GPU machine, where there is no Rust).
//! Tests that need a GPU are marked ignored with the reason, so `cargo test` reports them as
//! ignored, never as passed; run with `--ignored` on a machine with a GPU, where a missing
//! device is then a failure.

mod common;

use kstyle::verify::cuda_parity;
use kstyle::{DType, Device, Error, Tensor};

fn skip_reason() -> Option<String> {
    cuda_parity::available(0).err()
}

#[test]
#[ignore = "needs a CUDA GPU (CI has none; tests/cuda_emulated.rs runs this suite on the host emulator, GPU sessions run `kstyle gpu-parity`)"]
fn every_cuda_op_matches_the_cpu_oracle() {
    if let Some(why) = skip_reason() {
        panic!("asked to run the GPU parity test, but there is no usable CUDA device: {why}");
    }
    let rows = cuda_parity::run(0, None, 0x5eed).expect("parity run");
    common::assert_parity(&rows, 1);
}

/// On a machine without a driver, moving a tensor to CUDA is an error naming the device, never a
/// panic (cudarc panics if libcuda is loaded blindly; the backend probes first).
#[test]
fn to_device_cuda_is_clean_without_a_driver() {
    let t = Tensor::ones((2, 3), DType::F32, Device::Cpu).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.to_device(Device::Cuda(0)).map(|g| g.device())
    }));
    let r = r.expect("to_device(Cuda(0)) must not panic");
    match (skip_reason(), r) {
        (None, Ok(d)) => assert_eq!(d, Device::Cuda(0)),
        (Some(_), Err(Error::DeviceUnavailable(dev, why))) => {
            assert_eq!(dev, "cuda:0");
            assert!(!why.is_empty());
            eprintln!("to_device(cuda:0) without a GPU: {why}");
        }
        (avail, other) => panic!(
            "unexpected: device available = {}, result = {other:?}",
            avail.is_none()
        ),
    }
}
