//! Bootstrap through MPI (the `mpi` feature), for jobs that any MPI's mpirun (or an srun with
//! PMI) started: rank and world size from `MPI_COMM_WORLD`, the local rank from an
//! `MPI_COMM_TYPE_SHARED` split, and rank 0's rendezvous address (`host:port`, its listener
//! already bound) sent to every rank with `MPI_Bcast`. The TCP rendezvous and mesh then run as
//! always; MPI carries nothing else.
//!
//! MPI is initialised on the first [`detect`] and stays so until the process exits. At exit it
//! is finalised when this process is alone in `MPI_COMM_WORLD`, or when the mesh finished
//! cleanly (every rank said goodbye, so every rank reaches `MPI_Finalize`, which synchronises
//! them in some MPIs). A rank that fails exits without it, so that mpirun sees the failure and
//! ends the job instead of waiting in `MPI_Finalize` for ranks that never come.
//!
//! Not used (environment variables decide instead) for `--rank`/`--world-size`, for processes
//! that yalis started itself, and where `YALIS_MPI=0`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use mpi::environment::{Threading, Universe};
use mpi::traits::*;

use crate::bootstrap::{bind_master, hostname, Bootstrap, Explicit, Launcher};
use crate::{CommError, Result};

/// Kept alive until exit; dropping it finalises MPI.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);
/// The world has more than one process: finalise only after a clean finish.
static SHARED_WORLD: AtomicBool = AtomicBool::new(false);
/// The mesh finished cleanly.
static CLEAN: AtomicBool = AtomicBool::new(false);

extern "C" {
    fn atexit(f: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn finalize_at_exit() {
    if SHARED_WORLD.load(Ordering::SeqCst) && !CLEAN.load(Ordering::SeqCst) {
        return;
    }
    if let Ok(mut u) = UNIVERSE.try_lock() {
        drop(u.take());
    }
}

/// Every rank said goodbye: finalising at exit will not wait on a dead rank.
pub(crate) fn finished_cleanly() {
    CLEAN.store(true, Ordering::SeqCst);
}

/// This process's place in an MPI job of more than one process; `None` where MPI is not
/// used or reports a world of one (then the environment decides).
pub(crate) fn detect(explicit: &Explicit) -> Result<Option<Bootstrap>> {
    static DONE: OnceLock<std::result::Result<Option<Bootstrap>, String>> = OnceLock::new();
    let skip = explicit.rank.is_some()
        || explicit.world_size.is_some()
        || std::env::var("YALIS_SPAWNED").is_ok_and(|v| v.trim() == "1")
        || std::env::var("YALIS_MPI").is_ok_and(|v| v.trim() == "0");
    if skip {
        return Ok(None);
    }
    DONE.get_or_init(|| from_mpi(explicit))
        .clone()
        .map_err(CommError::Bootstrap)
}

fn from_mpi(explicit: &Explicit) -> std::result::Result<Option<Bootstrap>, String> {
    let host = hostname();
    let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
        return Err(format!(
            "{host}: MPI was initialised before yalis bootstrapped through it"
        ));
    };
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(universe);
    // SAFETY: registers a plain function; it runs once, at exit.
    if unsafe { atexit(finalize_at_exit) } != 0 {
        eprintln!("yalis: warning: cannot register MPI_Finalize at exit");
    }
    if size == 1 {
        return Ok(None);
    }
    SHARED_WORLD.store(true, Ordering::SeqCst);

    // Ranks on this node, in world rank order; the lowest world rank on a node names it.
    let node = world.split_shared(world.rank());
    let local_rank = node.rank() as usize;
    let one_node = node.size() as usize == size;
    let mut leader = world.rank();
    node.process_at_rank(0).broadcast_into(&mut leader);
    let mut leaders = vec![0 as mpi::Rank; size];
    world.all_gather_into(&leader, &mut leaders[..]);
    leaders.sort_unstable();
    leaders.dedup();
    let node_id = leaders.binary_search(&leader).ok();

    // Rank 0 binds its listener first and says where it is (or why it could not).
    let mut msg: Vec<u8> = if rank == 0 {
        match listen(explicit, one_node) {
            Ok((addr, port, listener)) => {
                crate::bootstrap::prebind(listener);
                format!("ok {addr} {port}").into_bytes()
            }
            Err(e) => format!("err {e}").into_bytes(),
        }
    } else {
        Vec::new()
    };
    let mut len = msg.len() as u64;
    world.process_at_rank(0).broadcast_into(&mut len);
    msg.resize(len as usize, 0);
    world.process_at_rank(0).broadcast_into(&mut msg[..]);
    let msg = String::from_utf8_lossy(&msg).into_owned();
    let at = format!("rank {rank} on {host} (MPI)");
    let (master_addr, master_port) = match msg.split_once(' ') {
        Some(("ok", rest)) => {
            let (a, p) = rest.rsplit_once(' ').unwrap_or((rest, ""));
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("{at}: rank 0 sent a bad rendezvous address {rest:?}"))?;
            (a.to_string(), port)
        }
        Some(("err", e)) if rank == 0 => return Err(e.to_string()),
        Some(("err", e)) => return Err(format!("{at}: rank 0 could not open the rendezvous: {e}")),
        _ => return Err(format!("{at}: rank 0 sent {msg:?} instead of its rendezvous address")),
    };
    Ok(Some(Bootstrap {
        rank,
        world_size: size,
        local_rank,
        node_id,
        master_addr,
        master_port,
        launcher: Launcher::Mpi,
    }))
}

/// Rank 0's listener and the address the others reach it at: `--master-addr`/`MASTER_ADDR`
/// and `--master-port`/`MASTER_PORT` where given; else 127.0.0.1 when the job is on this node,
/// or this host's name (its address on the default route if the name is a loopback one), with
/// a free port.
fn listen(explicit: &Explicit, one_node: bool) -> std::result::Result<(String, u16, TcpListener), String> {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let given = explicit.master_addr.clone().or_else(|| var("MASTER_ADDR"));
    let port = match (explicit.master_port, var("MASTER_PORT")) {
        (Some(p), _) => p,
        (None, Some(p)) => p
            .parse::<u16>()
            .map_err(|_| format!("rank 0 on {}: MASTER_PORT={p:?} is not a port number", hostname()))?,
        (None, None) => 0,
    };
    let (addr, bind_to) = match given {
        Some(a) => (a, None),
        None if one_node => ("127.0.0.1".to_string(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST))),
        None => (reachable_name(), Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
    };
    let b = Bootstrap {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        node_id: None,
        master_addr: addr.clone(),
        master_port: port,
        launcher: Launcher::Mpi,
    };
    let listener = match bind_to {
        Some(ip) => TcpListener::bind(SocketAddr::new(ip, port))
            .map_err(|e| format!("rank 0 on {}: cannot listen on {ip}:{port}: {e}", hostname()))?,
        None => bind_master(&b, &hostname()).map_err(|e| e.to_string())?,
    };
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    Ok((addr, port, listener))
}

/// This host's name if it resolves to an address other ranks can reach, else the address of
/// the interface on the default route (no packet is sent), else the name anyway.
fn reachable_name() -> String {
    let host = hostname();
    let resolves_outward = (host.as_str(), 0)
        .to_socket_addrs()
        .is_ok_and(|mut a| a.any(|a| !a.ip().is_loopback() && !a.ip().is_unspecified()));
    if resolves_outward {
        return host;
    }
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| {
            s.connect((Ipv4Addr::new(192, 0, 2, 1), 9))?;
            s.local_addr()
        })
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map_or(host, |ip| ip.to_string())
}
