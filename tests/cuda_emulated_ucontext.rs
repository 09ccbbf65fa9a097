//! The emulator's portable fiber switch (ucontext), which hosts other than x86-64 use: forced
//! here with `-DKS_EMU_UCONTEXT` and checked with the whole parity suite. A test binary of its
//! own, because the flag is read when the first kernel family is compiled in the process.

mod common;

use kstyle::backend::cuda::{self, emu};
use kstyle::verify::cuda_parity;

#[test]
fn parity_holds_with_the_portable_fiber_switch() {
    // The only test in this process: nothing else reads the environment concurrently.
    std::env::set_var(emu::CXXFLAGS_ENV, "-DKS_EMU_UCONTEXT");
    emu::enable();
    let dev = cuda::device(0).expect("the emulated device needs a C++ compiler (g++)");
    assert!(dev.is_emulated());
    assert!(dev.name().contains("-DKS_EMU_UCONTEXT"), "{}", dev.name());
    let rows = cuda_parity::run(0, None, 0x5eed).expect("parity run");
    common::assert_parity(&rows, 300);
}
