//! The kernels of kernels/*.cu, compiled by build.rs to sm_90a cubins and embedded in the binary
//! (`CUBINS`, `NVCC_VERSION`, `KERNEL_ARCH`). Empty without the `kernels` feature.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The cubin of `kernels/<stem>.cu`, for `cuModuleLoadData` (cudarc: `Ptx::from_binary`).
pub fn cubin(stem: &str) -> Option<&'static [u8]> {
    CUBINS.iter().find(|(s, _)| *s == stem).map(|(_, bytes)| *bytes)
}
