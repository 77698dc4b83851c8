//! The CUDA backend of yalis. cudarc loads libcuda, cuBLAS and NCCL at run time, so a binary with
//! this crate still starts on machines without CUDA.

pub mod backend;
pub mod info;
pub mod kernels;
pub mod nccl;
pub mod nvrar;

pub use info::{devices, GpuInfo};
