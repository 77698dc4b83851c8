//! `yalis info`: what this binary is (version, revision, features, embedded kernels) and what the
//! machine offers it (CUDA driver, GPUs, libraries).

use anyhow::Result;

pub fn run() -> Result<()> {
    println!("yalis {} ({})", env!("CARGO_PKG_VERSION"), env!("YALIS_GIT_REV"));
    println!("host: {}", yalis_comm::hostname());
    let features = crate::common::features();
    println!(
        "features: {}",
        if features.is_empty() {
            "(none)".to_string()
        } else {
            features.join(", ")
        }
    );
    cuda();
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda() {
    use yalis_cuda::kernels::{CUBINS, KERNEL_ARCH, NVCC_VERSION};
    println!("kernel arch: {KERNEL_ARCH}");
    println!("nvcc at build time: {NVCC_VERSION}");
    println!("embedded cubins: {}", CUBINS.len());
    for (stem, cubin) in CUBINS {
        println!("  {stem:<24} {:>9} bytes", cubin.len());
    }
    print!("{}", yalis_cuda::info::report());
}

#[cfg(not(feature = "cuda"))]
fn cuda() {
    println!("built without the cuda feature (cargo build --release --features cuda)");
}
