//! Compiles kernels/*.cu to sm_90a cubins with nvcc and writes OUT_DIR/kernels.rs, which embeds them
//! (`CUBINS`, `NVCC_VERSION`, `KERNEL_ARCH`). Only with the `kernels` feature (the binary's `cuda`
//! feature turns it on): without it `CUBINS` is empty and no nvcc is needed, so a plain
//! `cargo build --workspace` works on machines without CUDA.
//! NVSHMEM kernels (`nvrar*.cu`) are compiled with `-rdc=true` and device-linked against NVSHMEM's
//! `libnvshmem_device.a` into a self-contained cubin (the host registers it with
//! `nvshmemx_cumodule_init`); NVSHMEM's headers and device library come from `NVSHMEM_HOME`, else
//! the project-local toolchain (`.cuda/nvidia/nvshmem`, scripts/setup-cuda.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::{env, fs, thread};

const ARCH: &str = "sm_90a";
const NVCC_FLAGS: &[&str] = &[
    "-gencode=arch=compute_90a,code=sm_90a",
    "-cubin",
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "-Xptxas=-v",
];
/// Environment that changes which nvcc runs or what it does (nvcc reads the NVCC_* ones itself).
const ENV: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "YALIS_CUDA_DIR",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
    "NVCC_CCBIN",
    "NVSHMEM_HOME",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| manifest.join("../.."));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_KERNELS").is_none() {
        let none = "none (yalis-cuda built without the `kernels` feature)";
        write_rs(&out, &[], none);
        return;
    }
    for var in ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let kernels = workspace.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    watch(&kernels);
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels)
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();

    let nvcc = find_nvcc(&workspace);
    let nvshmem = sources
        .iter()
        .any(|p| uses_nvshmem(p))
        .then(|| find_nvshmem(&workspace));
    println!("cargo:rerun-if-changed={}", nvcc.display());
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string();

    // A pool of available_parallelism threads, each taking the next file.
    let next = AtomicUsize::new(0);
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(sources.len());
    let results: Vec<Result<(), String>> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(src) = sources.get(i) else { break done };
                        done.push(compile(&nvcc, &kernels, nvshmem.as_deref(), src, &out));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("compile thread panicked"))
            .collect()
    });
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if !errors.is_empty() {
        fail(&errors.join("\n"));
    }
    let stems: Vec<String> = sources.iter().map(|p| stem(p)).collect();
    write_rs(&out, &stems, &version);
}

/// nvcc from, in order: `NVCC`, `$CUDA_HOME/bin`, the project-local toolchain of
/// scripts/setup-cuda.sh (`YALIS_CUDA_DIR`, relative to the workspace, default `.cuda`),
/// `/usr/local/cuda/bin`.
fn find_nvcc(workspace: &Path) -> PathBuf {
    let var = |name: &str| env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(nvcc) = var("NVCC") {
        return nvcc;
    }
    let local = workspace.join(var("YALIS_CUDA_DIR").unwrap_or_else(|| ".cuda".into()));
    let candidates: Vec<PathBuf> = [
        var("CUDA_HOME").map(|h| h.join("bin/nvcc")),
        Some(local.join("nvidia/cu13/bin/nvcc")),
        Some("/usr/local/cuda/bin/nvcc".into()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let Some(nvcc) = candidates.iter().find(|p| p.is_file()) {
        return nvcc.clone();
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    fail(&format!(
        "nvcc not found (looked at {}).\n\
         Run scripts/setup-cuda.sh (installs the pinned CUDA 13.0 toolchain into .cuda/, no sudo), \
         or set NVCC=/path/to/nvcc or CUDA_HOME.",
        looked.join(", ")
    ))
}

/// Kernels that call NVSHMEM device functions: `kernels/nvrar*.cu`.
fn uses_nvshmem(src: &Path) -> bool {
    stem(src).starts_with("nvrar")
}

/// NVSHMEM 3.4.5 (headers and `libnvshmem_device.a`): `NVSHMEM_HOME`, else the project-local
/// toolchain's `nvidia/nvshmem`.
fn find_nvshmem(workspace: &Path) -> PathBuf {
    let local = workspace
        .join(
            env::var_os("YALIS_CUDA_DIR")
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| ".cuda".into()),
        )
        .join("nvidia/nvshmem");
    let home = env::var_os("NVSHMEM_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = home.unwrap_or(local);
    let lib = dir.join("lib/libnvshmem_device.a");
    let version = dir.join("include/non_abi/nvshmem_version.h");
    if !lib.is_file() || !version.is_file() {
        fail(&format!(
            "NVSHMEM not found in {} (want include/ and lib/libnvshmem_device.a of NVSHMEM 3.4.5).\n\
             Run scripts/setup-cuda.sh (installs nvidia-nvshmem-cu13==3.4.5 into .cuda/), or set NVSHMEM_HOME.",
            dir.display()
        ));
    }
    let header = fs::read_to_string(&version).unwrap_or_default();
    let part = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#define NVSHMEM_VENDOR_{name}_VERSION ")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let found = format!("{}.{}.{}", part("MAJOR"), part("MINOR"), part("PATCH"));
    if found != "3.4.5" {
        fail(&format!(
            "NVSHMEM in {} is {found}; yalis's device code must match the GPU nodes' host library, 3.4.5. \
             Run scripts/setup-cuda.sh or point NVSHMEM_HOME at NVSHMEM 3.4.5.",
            dir.display()
        ));
    }
    println!("cargo:rerun-if-changed={}", lib.display());
    dir
}

fn run_nvcc(nvcc: &Path, args: &[&std::ffi::OsStr], src: &Path) -> Result<(String, String), String> {
    let run = Command::new(nvcc)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    if !run.status.success() {
        return Err(format!(
            "nvcc failed on {} ({}):\n{stdout}{stderr}",
            src.display(),
            run.status
        ));
    }
    Ok((stdout, stderr))
}

/// `kernels/<stem>.cu` -> `OUT_DIR/<stem>.cubin`; ptxas' report goes to `OUT_DIR/<stem>.ptxas.txt`
/// and a warning is printed for each function that spills. NVSHMEM kernels go through an object
/// (`-rdc=true`) and a device link with `libnvshmem_device.a`.
fn compile(nvcc: &Path, include: &Path, nvshmem: Option<&Path>, src: &Path, out: &Path) -> Result<(), String> {
    let stem = stem(src);
    let cubin = out.join(format!("{stem}.cubin"));
    let (stdout, stderr) = match nvshmem.filter(|_| uses_nvshmem(src)) {
        None => {
            let mut args: Vec<&std::ffi::OsStr> = NVCC_FLAGS.iter().map(|f| f.as_ref()).collect();
            args.extend([
                "-I".as_ref(),
                include.as_os_str(),
                "-o".as_ref(),
                cubin.as_os_str(),
                src.as_os_str(),
            ]);
            run_nvcc(nvcc, &args, src)?
        }
        Some(nv) => {
            let object = out.join(format!("{stem}.o"));
            let nv_include = nv.join("include");
            let nv_lib = nv.join("lib");
            let mut args: Vec<&std::ffi::OsStr> = NVCC_FLAGS
                .iter()
                .filter(|f| **f != "-cubin")
                .map(|f| f.as_ref())
                .collect();
            args.extend([
                "-rdc=true".as_ref(),
                "-c".as_ref(),
                "-I".as_ref(),
                include.as_os_str(),
                "-I".as_ref(),
                nv_include.as_os_str(),
                "-o".as_ref(),
                object.as_os_str(),
                src.as_os_str(),
            ]);
            let compiled = run_nvcc(nvcc, &args, src)?;
            let link: Vec<&std::ffi::OsStr> = vec![
                NVCC_FLAGS[0].as_ref(),
                "-dlink".as_ref(),
                "-cubin".as_ref(),
                object.as_os_str(),
                "-L".as_ref(),
                nv_lib.as_os_str(),
                "-lnvshmem_device".as_ref(),
                "-o".as_ref(),
                cubin.as_os_str(),
            ];
            run_nvcc(nvcc, &link, src)?;
            compiled
        }
    };
    fs::write(out.join(format!("{stem}.ptxas.txt")), format!("{stdout}{stderr}"))
        .map_err(|e| format!("cannot write the ptxas report of {stem}: {e}"))?;
    // "ptxas info : Function properties for NAME" then "N bytes stack frame, N bytes spill stores, N bytes spill loads".
    let mut function = "";
    for line in stderr.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            function = name.trim();
        } else if line.contains("bytes spill stores") && !function.contains("nvshmem") {
            let spills = line.split(',').filter(|p| p.contains("bytes spill"));
            if spills
                .clone()
                .any(|p| p.split_whitespace().next().is_some_and(|n| n != "0"))
            {
                let what: Vec<&str> = spills.map(str::trim).collect();
                println!(
                    "cargo:warning=kernels/{stem}.cu: {function} spills: {}",
                    what.join(", ")
                );
            }
        }
    }
    Ok(())
}

fn write_rs(out: &Path, stems: &[String], nvcc_version: &str) {
    let mut rs = String::from("// Generated by crates/yalis-cuda/build.rs.\n\n");
    rs.push_str("/// (stem of kernels/<stem>.cu, its cubin).\npub const CUBINS: &[(&str, &[u8])] = &[\n");
    for stem in stems {
        let cubin = out.join(format!("{stem}.cubin"));
        rs.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            cubin.display().to_string()
        ));
    }
    rs.push_str("];\n\n/// The `release` line of `nvcc --version` at build time.\n");
    rs.push_str(&format!("pub const NVCC_VERSION: &str = {nvcc_version:?};\n\n"));
    rs.push_str(&format!(
        "/// The GPU architecture the cubins are built for.\npub const KERNEL_ARCH: &str = {ARCH:?};\n"
    ));
    let path = out.join("kernels.rs");
    fs::write(&path, rs).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
}

/// Every file under `dir`, so that a change to any source or header rebuilds.
fn watch(dir: &Path) {
    for path in fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
    {
        if path.is_dir() {
            watch(&path);
        }
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn fail(message: &str) -> ! {
    eprintln!("yalis-cuda build: {message}");
    std::process::exit(1)
}
