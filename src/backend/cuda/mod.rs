//! The CUDA side: kernel sources (`kernels/*.cu`, embedded at build time) compiled by NVRTC at
//! first use. The device runtime (context, stream, allocator, cuBLAS) arrives with the CUDA
//! storage; until then this module provides the compile machinery and `kstyle kernels --check`.

pub mod kernels;
pub mod nvrtc;
