//! Loading the host library: the error when it is missing (any machine), the pinned library
//! when `scripts/setup-cuda.sh` installed it (no GPU needed), and two PEs on two GPUs (ignored).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nvshmem_sys::{Nvshmem, PINNED_VERSION};

const CHILD: &str = "NVSHMEM_SYS_TEST_CHILD";

/// The loader reads LD_LIBRARY_PATH once, at process start: the missing-library case runs in a
/// child process (this test binary, filtered to `child_loads_with_nothing_to_find`).
#[test]
fn missing_library_is_an_error_naming_the_file() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_loads_with_nothing_to_find",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", empty.path())
        .env("NVSHMEM_HOME", empty.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if stdout.contains("CHILD-SKIP") {
        eprintln!(
            "not checked: {}",
            stdout.lines().find(|l| l.contains("CHILD-SKIP")).unwrap()
        );
    } else {
        assert!(stdout.contains("CHILD-OK"), "the child did not run:\n{stdout}");
    }
}

/// The child half of `missing_library_is_an_error_naming_the_file`; does nothing on its own.
#[test]
fn child_loads_with_nothing_to_find() {
    let Some(empty) = std::env::var_os("NVSHMEM_HOME").filter(|_| std::env::var_os(CHILD).is_some()) else {
        return;
    };
    match Nvshmem::load() {
        Ok(nvshmem) => println!("CHILD-SKIP: the loader's cache has {}", nvshmem.path().display()),
        Err(e) => {
            let msg = e.to_string();
            let in_home = Path::new(&empty).join("lib").join("libnvshmem_host.so.3");
            for part in [
                "cannot load libnvshmem_host.so.3",
                "LD_LIBRARY_PATH",
                &in_home.display().to_string(),
            ] {
                assert!(msg.contains(part), "{part:?} not in: {msg}");
            }
            println!("CHILD-OK: {msg}");
        }
    }
}

/// `$NVSHMEM_HOME`, else the project-local install of scripts/setup-cuda.sh.
fn pinned_install() -> Option<PathBuf> {
    let root = std::env::var_os("NVSHMEM_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cuda/nvidia/nvshmem"));
    let lib = root.join("lib/libnvshmem_host.so.3");
    lib.exists().then_some(lib)
}

/// Needs no GPU: version, name and a unique id come from the host library alone.
#[test]
fn pinned_library_loads_without_a_gpu() {
    let Some(lib) = pinned_install() else {
        eprintln!("not checked: no libnvshmem_host.so.3 in $NVSHMEM_HOME or .cuda (scripts/setup-cuda.sh)");
        return;
    };
    let nvshmem = Nvshmem::load_from(&lib).unwrap();
    assert_eq!(nvshmem.version(), PINNED_VERSION);
    assert_eq!(nvshmem.name(), "NVSHMEM v3.4.5");
    assert_eq!(nvshmem.openshmem_version(), (1, 3));
    let id = nvshmem.unique_id().unwrap();
    // NVSHMEMX_UNIQUEID_INITIALIZER's version tag, (1 << 16) + 128, then rank 0's address.
    assert_eq!(i32::from_ne_bytes(id[..4].try_into().unwrap()), (1 << 16) + 128);
    assert_ne!(id[4..], [0; 124]);
}

/// A file that is not NVSHMEM: an error naming the symbol, not a crash.
#[test]
fn a_library_without_nvshmem_symbols_is_refused() {
    let e = Nvshmem::load_from("libc.so.6").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("libc.so.6") && msg.contains("nvshmemx_vendor_get_version_info"),
        "{msg}"
    );
}

fn wait_all(mut children: Vec<Child>, limit: Duration) -> Vec<bool> {
    let start = Instant::now();
    let mut ok = vec![None; children.len()];
    while ok.iter().any(Option::is_none) {
        for (child, ok) in children.iter_mut().zip(ok.iter_mut()) {
            if ok.is_none() {
                *ok = child.try_wait().unwrap().map(|s| s.success());
            }
        }
        if start.elapsed() > limit {
            for (child, ok) in children.iter_mut().zip(ok.iter_mut()) {
                if ok.is_none() {
                    let _ = child.kill();
                    *ok = Some(false);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ok.into_iter().map(Option::unwrap).collect()
}

/// examples/two_pe.rs as two processes, one per GPU (it says how to add the kernel check).
#[test]
#[ignore = "needs 2 GPUs and libnvshmem_host.so.3"]
fn two_pes_on_two_gpus() {
    // target/<profile>/deps/load-<hash> -> target/<profile>/examples/two_pe (cargo test builds it).
    let exe = std::env::current_exe().unwrap();
    let example = exe.parent().unwrap().parent().unwrap().join("examples/two_pe");
    assert!(
        example.exists(),
        "{} not built: cargo build --release -p nvshmem-sys --example two_pe",
        example.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let uid = dir.path().join("nvshmem.uid");
    let children = (0..2)
        .map(|rank| {
            Command::new(&example)
                .arg(&uid)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("NVSHMEM_DISABLE_NVLS", "1")
                .spawn()
                .unwrap()
        })
        .collect();
    assert_eq!(
        wait_all(children, Duration::from_secs(180)),
        [true, true],
        "a PE failed (its output is above)"
    );
}
