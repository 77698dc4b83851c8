//! The run-time half of `yalis info`: the CUDA driver, each GPU, and which of the libraries the
//! backend opens at run time can be loaded. Never panics: on a machine without CUDA it says so.

use std::ffi::c_int;
use std::fmt::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::driver::{result, sys};

/// What the backend opens at run time: cuBLAS(Lt), NCCL (cudarc asks for `libnccl.so`) and
/// NVSHMEM's host library.
const LIBS: &[&str] = &[
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libnccl.so",
    "libnccl.so.2",
    "libnvshmem_host.so.3",
];

/// Driver, GPUs and libraries, one fact a line.
pub fn report() -> String {
    let mut out = String::new();
    match catch_unwind(AssertUnwindSafe(driver)) {
        Ok(Ok(s)) => out.push_str(&s),
        Ok(Err(s)) => out.push_str(&s),
        Err(panic) => {
            let why = yalis_engine::ranks::panic_message(&*panic);
            let _ = writeln!(out, "libcuda not found: {why}");
        }
    }
    out.push_str("libraries (dlopen by name, LD_LIBRARY_PATH and the system paths):\n");
    let mut nccl = None;
    for &name in LIBS {
        // SAFETY: loading runs the library's initialisers; these are NVIDIA's own CUDA libraries,
        // which the backend loads anyway. No symbol is used here except ncclGetVersion below.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => {
                let _ = writeln!(out, "  {name:<22} ok  {}", loaded_path(name).unwrap_or_default());
                if name.starts_with("libnccl") && nccl.is_none() {
                    nccl = Some(nccl_version(&lib));
                }
            }
            Err(e) => {
                let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                let _ = writeln!(out, "  {name:<22} not loadable: {why}");
            }
        }
    }
    if let Some(version) = nccl {
        let _ = writeln!(out, "NCCL version: {version}");
    }
    out
}

/// The driver's version and each GPU, or (as the error) why there is none.
fn driver() -> Result<String, String> {
    // SAFETY: only tries to dlopen libcuda under the names cudarc uses.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda not found: the CUDA backend is unavailable on this machine\n".into());
    }
    let mut out = String::new();
    let mut version: c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int and needs no cuInit.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion: {e}\n"))?;
    let _ = writeln!(
        out,
        "CUDA driver: {}.{} (supports CUDA {version})",
        version / 1000,
        version % 1000 / 10
    );
    result::init().map_err(|e| format!("{out}cuInit: {e}\n"))?;
    let count = result::device::get_count().map_err(|e| format!("{out}cuDeviceGetCount: {e}\n"))?;
    let _ = writeln!(out, "GPUs: {count}");
    // Device attributes, not contexts: a context would reserve memory on every GPU, and fails on
    // GPUs in exclusive-process mode that another process holds.
    for ordinal in 0..count {
        let _ = writeln!(
            out,
            "  {ordinal}: {}",
            gpu(ordinal).unwrap_or_else(|e| format!("error: {e}"))
        );
    }
    Ok(out)
}

/// "NVIDIA H100 80GB HBM3  sm_90  79.1 GiB  pci 0000:18:00.0"
fn gpu(ordinal: c_int) -> Result<String, result::DriverError> {
    use sys::CUdevice_attribute as A;
    let dev = result::device::get(ordinal)?;
    // SAFETY: `dev` comes from cuDeviceGet.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) };
    let (major, minor) = (
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let pci = pci_id(dev)?;
    // SAFETY: `dev` comes from cuDeviceGet.
    let bytes = unsafe { result::device::total_mem(dev) }?;
    let name = result::device::get_name(dev)?;
    Ok(format!(
        "{name}  sm_{major}{minor}  {:.1} GiB  pci {pci}",
        bytes as f64 / (1u64 << 30) as f64
    ))
}

/// The PCI address of `dev`, "0000:18:00.0".
fn pci_id(dev: sys::CUdevice) -> Result<String, result::DriverError> {
    use sys::CUdevice_attribute as A;
    // SAFETY: `dev` comes from cuDeviceGet.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) };
    Ok(format!(
        "{:04x}:{:02x}:{:02x}.0",
        attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
        attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
        attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
    ))
}

/// "2.28.9" from `ncclGetVersion` (code 22809 = 2.28.9 since NCCL 2.9).
fn nccl_version(lib: &libloading::Library) -> String {
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: ncclGetVersion has this signature in every NCCL 2.x.
    let Ok(get) = (unsafe { lib.get::<GetVersion>(b"ncclGetVersion\0") }) else {
        return "no ncclGetVersion".into();
    };
    let mut code: c_int = 0;
    // SAFETY: writes one int; needs no GPU.
    match unsafe { get(&mut code) } {
        0 => format!("{}.{}.{} ({code})", code / 10000, code % 10000 / 100, code % 100),
        err => format!("ncclGetVersion returned {err}"),
    }
}

/// Where the loader found `name` (`/proc/self/maps` shows the file after symlinks).
fn loaded_path(name: &str) -> Option<String> {
    let prefix = &name[..name.find(".so")? + 3];
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with(prefix)))
        .map(str::to_string)
}

/// A visible GPU, read from the driver without creating a context.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    /// PCI address, "0000:18:00.0".
    pub pci: String,
}

/// The visible GPUs; empty when libcuda is missing or the driver fails.
pub fn devices() -> Vec<GpuInfo> {
    let list = || -> Result<Vec<GpuInfo>, result::DriverError> {
        // SAFETY: only tries to dlopen libcuda under the names cudarc uses.
        if !unsafe { sys::is_culib_present() } {
            return Ok(Vec::new());
        }
        result::init()?;
        (0..result::device::get_count()?)
            .map(|i| {
                let dev = result::device::get(i)?;
                // SAFETY: `dev` comes from cuDeviceGet.
                let total = unsafe { result::device::total_mem(dev) }? as u64;
                Ok(GpuInfo {
                    ordinal: i as usize,
                    name: result::device::get_name(dev)?,
                    total_bytes: total,
                    pci: pci_id(dev)?,
                })
            })
            .collect()
    };
    catch_unwind(list).ok().and_then(Result::ok).unwrap_or_default()
}
