//! The CUDA kernels are embedded with `include_str!`; this makes cargo rebuild when any file in
//! kernels/ changes (including new headers) and records the NVRTC-facing source list.

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    let mut names: Vec<String> = std::fs::read_dir("kernels")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for n in &names {
        println!("cargo:rerun-if-changed=kernels/{n}");
    }
}
