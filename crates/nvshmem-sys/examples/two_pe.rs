//! Two (or more) PEs, one process per GPU: unique id through a shared file, init, symmetric heap,
//! NVLink peer addresses read back, barriers on the host and on a stream, teams and, given the
//! ring cubin, a kernel that puts to the next PE through `nvshmemx_cumodule_init`'s device state.
//!
//! ```text
//! cargo build --release -p nvshmem-sys --example two_pe
//! NV=.cuda/nvidia/nvshmem NVCC=.cuda/nvidia/cu13/bin/nvcc; mkdir -p target/nvshmem-ring
//! $NVCC -gencode=arch=compute_90a,code=sm_90a -std=c++17 -rdc=true -I$NV/include \
//!     -c crates/nvshmem-sys/examples/ring.cu -o target/nvshmem-ring/ring.o
//! $NVCC -gencode=arch=compute_90a,code=sm_90a -dlink -cubin target/nvshmem-ring/ring.o \
//!     -L$NV/lib -lnvshmem_device -o target/nvshmem-ring/ring.cubin
//! export LD_LIBRARY_PATH=$PWD/$NV/lib:$LD_LIBRARY_PATH NVSHMEM_DISABLE_NVLS=1
//! export NVSHMEM_RING_CUBIN=target/nvshmem-ring/ring.cubin   # optional: the kernel check
//! rm -f /tmp/nvshmem.uid; pids=()
//! for r in 0 1; do RANK=$r WORLD_SIZE=2 target/release/examples/two_pe /tmp/nvshmem.uid & pids+=($!); done
//! for p in "${pids[@]}"; do wait $p || echo FAILED; done
//! ```
//!
//! Copying only `libnvshmem_host.so.3` is not enough: without the `nvshmem_transport_*.so.3`
//! plugins beside it, init exits with `nvshmem detect topo failed`, even on one node.
//!
//! `LOCAL_RANK` (default `RANK`) picks the GPU. Rank 0 writes the unique id to the file (via a
//! rename, so a reader never sees half of it); the others wait for it. Every line printed starts
//! with the rank; the last one is `rank R: ok`. `tests/load.rs` runs the same on 2 GPUs
//! (`cargo test --release -p nvshmem-sys -- --ignored`).

use std::error::Error;
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cudarc::driver::{result, sys as cu, CudaContext};
use nvshmem_sys::{Nvshmem, UniqueId, UNIQUE_ID_BYTES};

type Res<T> = Result<T, Box<dyn Error>>;

fn env_usize(name: &str) -> Res<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v.parse().map_err(|e| format!("{name}={v}: {e}"))?)),
        Err(_) => Ok(None),
    }
}

/// Rank 0 publishes the id; the others poll for it (60 s).
fn exchange_id(nvshmem: &Nvshmem, rank: usize, path: &Path) -> Res<UniqueId> {
    if rank == 0 {
        let id = nvshmem.unique_id()?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, id)?;
        std::fs::rename(&tmp, path)?;
        return Ok(id);
    }
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            return Ok(bytes
                .try_into()
                .map_err(|b: Vec<u8>| format!("{}: {} bytes, want {UNIQUE_ID_BYTES}", path.display(), b.len()))?);
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("no unique id in {} after 60 s: is rank 0 running?", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() -> Res<()> {
    let rank = env_usize("RANK")?.ok_or("set RANK")?;
    let world = env_usize("WORLD_SIZE")?.ok_or("set WORLD_SIZE")?;
    let local_rank = env_usize("LOCAL_RANK")?.unwrap_or(rank);
    let uid_path = PathBuf::from(std::env::args().nth(1).ok_or("usage: two_pe UNIQUE_ID_FILE")?);

    // CudaContext::new makes the device's primary context current on this thread, as init needs.
    let ctx = CudaContext::new(local_rank)?;
    let nvshmem = Nvshmem::load()?;
    println!(
        "rank {rank}: {} from {} on GPU {local_rank}",
        nvshmem.name(),
        nvshmem.path().display()
    );
    let id = exchange_id(&nvshmem, rank, &uid_path)?;
    let session = nvshmem.init(&id, rank, world)?;
    if rank == 0 {
        std::fs::remove_file(&uid_path)?; // everyone has read it: init is collective
    }
    assert_eq!((session.my_pe(), session.n_pes()), (rank, world));

    // [N] u32 per PE, value pe * 1_000_000 + i: each PE reads every peer's through nvshmem_ptr.
    const N: usize = 1 << 16;
    let buffer = session.malloc(N * 4)?;
    let mine: Vec<u32> = (0..N as u32).map(|i| rank as u32 * 1_000_000 + i).collect();
    // SAFETY: the buffer holds N u32 on this context's device; the copy is synchronous.
    unsafe { result::memcpy_htod_sync(buffer.device_ptr(), &mine) }?;
    session.barrier_all();
    for pe in 0..world {
        match session.ptr(&buffer, pe) {
            Some(addr) => {
                let mut got = vec![0u32; N];
                // SAFETY: `addr` maps PE `pe`'s N-u32 buffer into this context (nvshmem_ptr);
                // the peer wrote it before the barrier and frees it only after the next one.
                unsafe { result::memcpy_dtoh_sync(&mut got, addr) }?;
                let want = (0..N as u32).map(|i| pe as u32 * 1_000_000 + i);
                let wrong = got.iter().zip(want).filter(|(g, w)| **g != *w).count();
                println!("rank {rank}: PE {pe} at {addr:#x}: {wrong} of {N} wrong");
                if wrong > 0 {
                    return Err(format!("PE {pe}'s buffer read through nvshmem_ptr: {wrong} wrong").into());
                }
            }
            None => println!("rank {rank}: PE {pe} is not P2P-reachable (nvshmem_ptr is NULL)"),
        }
    }
    session.barrier_all();

    let stream = ctx.new_stream()?;
    // SAFETY: a live stream of the current context.
    unsafe { session.barrier_all_on_stream(stream.cu_stream().cast()) };
    stream.synchronize()?;

    let node = session.node_team();
    println!("rank {rank}: node team: PE {} of {}", node.my_pe(), node.n_pes());
    let world_team = session.world_team();
    let evens = session.team_split_strided(&world_team, 0, 2, world.div_ceil(2))?;
    match (&evens, rank % 2) {
        (Some(team), 0) => {
            assert_eq!((team.my_pe(), team.n_pes()), (rank / 2, world.div_ceil(2)));
            println!("rank {rank}: even team: PE {} of {}", team.my_pe(), team.n_pes());
        }
        (None, 1) => println!("rank {rank}: not in the even team, as expected"),
        (team, _) => return Err(format!("even team membership wrong: {team:?}").into()),
    }

    if let Some(cubin) = std::env::var_os("NVSHMEM_RING_CUBIN") {
        ring_put(&session, &stream, &buffer, Path::new(&cubin))?;
    } else {
        println!("rank {rank}: NVSHMEM_RING_CUBIN not set: module registration not checked");
    }

    // Collective teardown, in the same order on every PE.
    drop(evens);
    drop(buffer);
    drop(session);
    println!("rank {rank}: ok");
    Ok(())
}

/// Loads the ring cubin, registers it, and checks that the previous PE's put arrived.
fn ring_put(
    session: &nvshmem_sys::Session,
    stream: &cudarc::driver::CudaStream,
    buffer: &nvshmem_sys::SymmetricBuffer,
    cubin: &Path,
) -> Res<()> {
    let (rank, world) = (session.my_pe(), session.n_pes());
    let image = std::fs::read(cubin).map_err(|e| format!("{}: {e}", cubin.display()))?;
    // SAFETY: `image` is a cubin built by the command in this file's header; the driver copies it.
    let module = unsafe { result::module::load_data(image.as_ptr().cast()) }?;
    // SAFETY: the module is live; ring_put is its kernel.
    let func = unsafe { result::module::get_function(module, CString::new("ring_put")?) }?;
    // SAFETY: a live module of the current context, linked against libnvshmem_device 3.4.5.
    unsafe { session.register_module(module.cast()) }?;
    // SAFETY: the buffer holds at least one u32 on this device; the copy is synchronous.
    unsafe { result::memcpy_htod_sync(buffer.device_ptr(), &[u32::MAX]) }?;
    session.barrier_all(); // every slot reset before any put lands
    let mut slot = buffer.device_ptr();
    let mut params = [&mut slot as *mut u64 as *mut c_void];
    // SAFETY: ring_put(int *slot) takes one device pointer, given as a pointer to it.
    unsafe { result::launch_kernel(func, (1, 1, 1), (1, 1, 1), 0, stream.cu_stream(), &mut params) }?;
    // SAFETY: a live stream of the current context.
    unsafe { session.barrier_all_on_stream(stream.cu_stream().cast()) };
    stream.synchronize()?;
    let mut got = [0u32];
    // SAFETY: reads the first u32 of this PE's buffer; the stream that wrote it is synchronised.
    unsafe { result::memcpy_dtoh_sync(&mut got, buffer.device_ptr()) }?;
    let want = ((rank + world - 1) % world) as u32;
    println!("rank {rank}: ring_put: slot = {} (want {want})", got[0]);
    // SAFETY: registered above; its kernel finished (stream synchronised).
    unsafe { session.unregister_module(module.cast()) }?;
    // SAFETY: no kernel of the module is running or will run.
    unsafe { cu::cuModuleUnload(module) }.result()?;
    if got[0] != want {
        return Err(format!("ring_put: slot {} but PE {want} put its number", got[0]).into());
    }
    Ok(())
}
