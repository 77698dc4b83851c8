//! Who this process is in a job (rank, world size, local rank, node) and the TCP rendezvous that
//! tells every rank where the others are.
//!
//! Sources, first match wins: explicit values (the CLI), a yalis-spawned child (`YALIS_SPAWNED=1`
//! with torchrun-style variables), MPI itself (only with the `mpi` feature, see `crate::mpi`),
//! Slurm (`srun`), Open MPI (`mpirun`), torchrun-style variables (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! Rendezvous: rank 0 listens on the master address; every other rank connects (retrying until
//! the timeout), says who it is (rank, host, pid, the address of its own listener for the data
//! connections) and gets back the whole table and a job blob that rank 0 supplies (room for the
//! NCCL and NVSHMEM unique ids). The connection between rank 0 and each rank stays open and
//! becomes their data connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{CommError, Result};

/// What started this process as a rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// `--rank` and `--world-size` on the command line.
    Cli,
    /// A child process that `yalis` started itself.
    Spawned,
    Slurm,
    OpenMpi,
    /// MPI_COMM_WORLD, with rank 0's address sent by MPI_Bcast (the `mpi` feature).
    Mpi,
    /// torchrun-style `RANK` / `WORLD_SIZE` variables.
    Env,
}

impl Launcher {
    pub fn describe(&self) -> &'static str {
        match self {
            Launcher::Cli => "--rank/--world-size",
            Launcher::Spawned => "yalis (its own child processes)",
            Launcher::Slurm => "Slurm (srun)",
            Launcher::OpenMpi => "Open MPI (mpirun)",
            Launcher::Mpi => "MPI (mpirun)",
            Launcher::Env => "RANK/WORLD_SIZE",
        }
    }
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node (the GPU it takes).
    pub local_rank: usize,
    /// Index of this node in the job, where the launcher says (Slurm's `SLURM_NODEID`).
    pub node_id: Option<usize>,
    /// Where rank 0 listens for the rendezvous.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

/// Values given on the command line; each overrides the environment.
#[derive(Clone, Debug, Default)]
pub struct Explicit {
    pub rank: Option<usize>,
    pub world_size: Option<usize>,
    pub local_rank: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

const SET_MASTER: &str = "set MASTER_ADDR and MASTER_PORT (rank 0's host and a free port), or run under srun/mpirun";

fn bad(msg: String) -> CommError {
    CommError::Bootstrap(msg)
}

impl Bootstrap {
    /// From this process's environment and `explicit`; `None` when nothing says this process is
    /// one rank of a job.
    ///
    /// With the `mpi` feature, MPI is asked first (after the CLI and yalis' own children).
    pub fn detect(explicit: &Explicit) -> Result<Option<Bootstrap>> {
        #[cfg(feature = "mpi")]
        if let Some(b) = crate::mpi::detect(explicit)? {
            return Ok(Some(b));
        }
        Self::detect_from(explicit, |k| std::env::var(k).ok())
    }

    /// As [`Bootstrap::detect`], reading variables through `env`.
    pub fn detect_from(explicit: &Explicit, env: impl Fn(&str) -> Option<String>) -> Result<Option<Bootstrap>> {
        let var = |k: &str| env(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let num = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| bad(format!("{k}={v:?} is not a non-negative integer")))
                })
                .transpose()
        };
        let need = |k: &str, launcher: &str| -> Result<usize> {
            num(k)?.ok_or_else(|| bad(format!("{launcher}: {k} is not set")))
        };
        let host = hostname();
        // (launcher, rank, world, local rank, node, derived master address and port)
        type Found = (
            Launcher,
            usize,
            usize,
            usize,
            Option<usize>,
            Option<String>,
            Option<u16>,
        );
        let found: Found = if explicit.rank.is_some() || explicit.world_size.is_some() {
            let (Some(rank), Some(world)) = (explicit.rank, explicit.world_size) else {
                return Err(bad("--rank and --world-size go together".into()));
            };
            let local = match explicit.local_rank {
                Some(l) => l,
                None => num("LOCAL_RANK")?.unwrap_or(rank),
            };
            (Launcher::Cli, rank, world, local, None, None, None)
        } else if var("YALIS_SPAWNED").as_deref() == Some("1") {
            let who = "a process started by yalis";
            let rank = need("RANK", who)?;
            (
                Launcher::Spawned,
                rank,
                need("WORLD_SIZE", who)?,
                num("LOCAL_RANK")?.unwrap_or(rank),
                None,
                None,
                None,
            )
        } else if var("SLURM_PROCID").is_some() && (var("SLURM_STEP_ID").is_some() || var("SLURM_STEPID").is_some()) {
            // Only an srun step: the batch script itself has SLURM_PROCID=0 and the allocation's
            // SLURM_NTASKS, and is one process, not a rank.
            let rank = need("SLURM_PROCID", "Slurm")?;
            let world = match num("SLURM_STEP_NUM_TASKS")? {
                Some(n) => n,
                None => need("SLURM_NTASKS", "Slurm")?,
            };
            let nodes = ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                .iter()
                .find_map(|k| var(k).map(|v| (k, v)));
            let master = match nodes {
                Some((k, list)) => Some(
                    expand_hostlist(&list)
                        .map_err(|e| bad(format!("{k}={list:?}: {e}")))?
                        .remove(0),
                ),
                None => None,
            };
            let port = match var("SLURM_JOB_ID").or_else(|| var("SLURM_JOBID")) {
                Some(job) => {
                    let step = var("SLURM_STEP_ID").or_else(|| var("SLURM_STEPID"));
                    Some(slurm_port(&job, step.as_deref().unwrap_or("0")))
                }
                None => None,
            };
            (
                Launcher::Slurm,
                rank,
                world,
                num("SLURM_LOCALID")?.unwrap_or(0),
                num("SLURM_NODEID")?,
                master,
                port,
            )
        } else if var("OMPI_COMM_WORLD_RANK").is_some() {
            let rank = need("OMPI_COMM_WORLD_RANK", "Open MPI")?;
            let world = need("OMPI_COMM_WORLD_SIZE", "Open MPI")?;
            let local = num("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0);
            // All ranks on this node: rank 0 is here too, and the job id gives a shared port.
            let one_node = num("OMPI_COMM_WORLD_LOCAL_SIZE")? == Some(world);
            let job = ["PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid"]
                .iter()
                .find_map(|k| var(k));
            let (addr, port) = match (one_node, job) {
                (true, Some(job)) => (Some("127.0.0.1".to_string()), Some(slurm_port(&job, "mpi"))),
                _ => (None, None),
            };
            (Launcher::OpenMpi, rank, world, local, None, addr, port)
        } else if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            let rank = need("RANK", "RANK/WORLD_SIZE")?;
            let world = need("WORLD_SIZE", "RANK/WORLD_SIZE")?;
            (
                Launcher::Env,
                rank,
                world,
                num("LOCAL_RANK")?.unwrap_or(rank),
                num("GROUP_RANK")?,
                None,
                None,
            )
        } else {
            return Ok(None);
        };
        let (launcher, rank, world_size, local_rank, node_id, derived_addr, derived_port) = found;
        let at = format!("rank {rank} on {host} ({})", launcher.describe());
        if world_size == 0 || rank >= world_size {
            return Err(bad(format!(
                "{at}: rank {rank} is not below the world size {world_size}"
            )));
        }
        let master_addr = explicit
            .master_addr
            .clone()
            .or_else(|| var("MASTER_ADDR"))
            .or(derived_addr);
        let master_port = match explicit.master_port {
            Some(p) => Some(p),
            None => match var("MASTER_PORT") {
                Some(p) => Some(
                    p.parse::<u16>()
                        .map_err(|_| bad(format!("{at}: MASTER_PORT={p:?} is not a port number")))?,
                ),
                None => derived_port,
            },
        };
        let (master_addr, master_port) = match (master_addr, master_port) {
            (Some(a), Some(p)) => (a, p),
            _ if world_size == 1 => ("127.0.0.1".to_string(), 0),
            (a, _) => {
                let missing = if a.is_none() { "MASTER_ADDR" } else { "MASTER_PORT" };
                return Err(bad(format!(
                    "{at}: no rendezvous address ({missing} is not set); {SET_MASTER}"
                )));
            }
        };
        Ok(Some(Bootstrap {
            rank,
            world_size,
            local_rank,
            node_id,
            master_addr,
            master_port,
            launcher,
        }))
    }
}

/// The port a Slurm job's ranks meet on: one of 20000..50000, from the job and step ids, so
/// that concurrent steps and jobs sharing a node pick different ports.
pub fn slurm_port(job: &str, step: &str) -> u16 {
    // FNV-1a over "job.step".
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.bytes().chain(*b".").chain(step.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    20000 + (h % 30000) as u16
}

/// Expands a Slurm host list: `nid[001-003,007],login1` -> nid001 nid002 nid003 nid007 login1.
/// Ranges keep the zero padding of their first number; several bracket groups in one name
/// expand as a product.
pub fn expand_hostlist(list: &str) -> std::result::Result<Vec<String>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced brackets".into());
        }
    }
    if depth != 0 {
        return Err("unbalanced brackets".into());
    }
    items.push(&list[start..]);
    let mut hosts = Vec::new();
    for item in items.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
        expand_one(item, &mut hosts)?;
    }
    if hosts.is_empty() {
        return Err("no hosts".into());
    }
    Ok(hosts)
}

fn expand_one(name: &str, out: &mut Vec<String>) -> std::result::Result<(), String> {
    let Some(open) = name.find('[') else {
        out.push(name.to_string());
        return Ok(());
    };
    let close = open + name[open..].find(']').ok_or("unbalanced brackets")?;
    let (prefix, body, rest) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
    let mut tails = Vec::new();
    expand_one(rest, &mut tails)?;
    for part in body.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("{part:?} is not a number or a range"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if b < a || b - a > 100_000 {
            return Err(format!("bad range {part:?}"));
        }
        let width = lo.trim().len();
        for n in a..=b {
            for t in &tails {
                out.push(format!("{prefix}{n:0width$}{t}"));
            }
        }
    }
    Ok(())
}

/// This machine's name, for messages.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// One rank as the rendezvous saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub rank: usize,
    pub host: String,
    pub pid: u32,
    /// Where it accepts data connections from higher ranks (unused for rank 0, whose
    /// rendezvous connections carry the data).
    pub addr: SocketAddr,
}

impl Peer {
    /// "rank 3 on nid001 (pid 1234)".
    pub fn describe(&self) -> String {
        format!("rank {} on {} (pid {})", self.rank, self.host, self.pid)
    }
}

/// The rendezvous' outcome: every rank's place, rank 0's blob, and the open connections.
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// Indexed by rank.
    pub peers: Vec<Peer>,
    /// What rank 0 handed out.
    pub blob: Vec<u8>,
    /// Rank 0's random id of this job; data connections present it.
    pub job_key: u64,
    /// Open connections indexed by peer rank: on rank 0 one to every rank, elsewhere one to rank 0.
    pub(crate) links: Vec<Option<TcpStream>>,
    /// This rank's listener for data connections (not on rank 0).
    pub(crate) listener: Option<TcpListener>,
}

impl Rendezvous {
    /// The node index of every rank: hosts numbered in order of their lowest rank.
    pub fn node_ids(&self) -> Vec<usize> {
        let mut hosts: Vec<&str> = Vec::new();
        self.peers
            .iter()
            .map(|p| match hosts.iter().position(|h| *h == p.host) {
                Some(i) => i,
                None => {
                    hosts.push(&p.host);
                    hosts.len() - 1
                }
            })
            .collect()
    }
}

// ---- wire format -----------------------------------------------------------------------------

/// Every rendezvous message starts with this.
const MAGIC: u32 = 0x594c_5331; // "YLS1"
const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REJECT: u8 = 3;
/// The first message on a data connection between two non-zero ranks.
pub(crate) const DATA_HELLO: u8 = 4;

/// Little-endian message builder.
#[derive(Default)]
pub(crate) struct Wire(pub Vec<u8>);

impl Wire {
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    pub fn bytes(self, v: &[u8]) -> Self {
        let mut s = self.u64(v.len() as u64);
        s.0.extend(v);
        s
    }
    pub fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
    pub fn addr(self, a: &SocketAddr) -> Self {
        self.str(&a.to_string())
    }
}

/// Reads what [`Wire`] wrote; `None` past the end.
pub(crate) struct Unwire<'a>(pub &'a [u8]);

impl Unwire<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    pub fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n).map(<[u8]>::to_vec)
    }
    pub fn str(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
    pub fn addr(&mut self) -> Option<SocketAddr> {
        self.str()?.parse().ok()
    }
}

/// Rendezvous messages are small; a peer claiming more is not a yalis rank.
const MAX_MESSAGE: u64 = 256 << 20;

/// Writes `[magic][kind][len][payload]`.
pub(crate) fn send_msg(s: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut m = Wire::default().u32(MAGIC).u8(kind).u64(payload.len() as u64).0;
    m.extend(payload);
    s.write_all(&m)
}

/// Reads one message within `deadline`; errors say what went wrong in words.
pub(crate) fn recv_msg(s: &mut TcpStream, deadline: Instant) -> std::result::Result<(u8, Vec<u8>), String> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    let mut head = [0u8; 13];
    read_exact(s, &mut head)?;
    let mut u = Unwire(&head);
    let (magic, kind, len) = (u.u32().unwrap(), u.u8().unwrap(), u.u64().unwrap());
    if magic != MAGIC {
        return Err("the peer does not speak the yalis rendezvous protocol".into());
    }
    if len > MAX_MESSAGE {
        return Err(format!("a {len}-byte rendezvous message"));
    }
    let mut body = vec![0u8; len as usize];
    read_exact(s, &mut body)?;
    Ok((kind, body))
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> std::result::Result<(), String> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timed out".to_string(),
        ErrorKind::UnexpectedEof => "the connection closed".to_string(),
        _ => e.to_string(),
    })
}

// ---- the rendezvous --------------------------------------------------------------------------

/// Meets the other ranks: rank 0 listens on the master address and hands out the table and
/// `blob()`; the others connect, retrying with backoff until `timeout`.
pub fn rendezvous(b: &Bootstrap, timeout: Duration, blob: impl FnOnce() -> Vec<u8>) -> Result<Rendezvous> {
    let host = hostname();
    let deadline = Instant::now() + timeout;
    if b.world_size == 1 {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        return Ok(Rendezvous {
            rank: 0,
            world_size: 1,
            peers: vec![Peer {
                rank: 0,
                host,
                pid: std::process::id(),
                addr,
            }],
            blob: blob(),
            job_key: job_key(),
            links: vec![None],
            listener: None,
        });
    }
    if b.rank == 0 {
        serve(b, &host, deadline, timeout, blob)
    } else {
        join(b, &host, deadline, timeout)
    }
}

fn job_key() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A listener that rank 0 bound before the rendezvous (to send its port through MPI).
static PREBOUND: Mutex<Option<TcpListener>> = Mutex::new(None);

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn prebind(l: TcpListener) {
    *PREBOUND.lock().unwrap_or_else(|e| e.into_inner()) = Some(l);
}

pub(crate) fn bind_master(b: &Bootstrap, host: &str) -> Result<TcpListener> {
    {
        let mut pre = PREBOUND.lock().unwrap_or_else(|e| e.into_inner());
        if pre
            .as_ref()
            .is_some_and(|l| l.local_addr().is_ok_and(|a| a.port() == b.master_port))
        {
            return Ok(pre.take().expect("checked"));
        }
    }
    let at = format!("rank 0 on {host}");
    let target = format!("{}:{}", b.master_addr, b.master_port);
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| bad(format!("{at}: cannot resolve MASTER_ADDR {target}: {e}; {SET_MASTER}")))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpListener::bind(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    // The name may resolve to an address of another interface (or a NAT); listen on all.
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), b.master_port);
    TcpListener::bind(any).map_err(|e| {
        let hint = if e.kind() == ErrorKind::AddrInUse {
            "the port is taken (another job on this node?); set MASTER_PORT to a free port"
        } else {
            "is rank 0 running on MASTER_ADDR's host?"
        };
        bad(format!(
            "{at}: cannot listen on {target} ({}; then 0.0.0.0: {e}); {hint}",
            last.map_or("no address".into(), |e| e.to_string())
        ))
    })
}

/// Rank 0: accepts every other rank, checks what each says, then sends everyone the table.
fn serve(
    b: &Bootstrap,
    host: &str,
    deadline: Instant,
    timeout: Duration,
    blob: impl FnOnce() -> Vec<u8>,
) -> Result<Rendezvous> {
    let world = b.world_size;
    let listener = bind_master(b, host)?;
    let local = listener
        .local_addr()
        .map_err(|e| bad(format!("rank 0 on {host}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| bad(format!("rank 0 on {host}: {e}")))?;
    let mut peers: Vec<Option<Peer>> = vec![None; world];
    let mut links: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    peers[0] = Some(Peer {
        rank: 0,
        host: host.to_string(),
        pid: std::process::id(),
        addr: local,
    });
    // A fatal problem: every rank connected so far hears it, and so does the caller.
    let fail = |links: &mut Vec<Option<TcpStream>>, msg: String| -> CommError {
        for s in links.iter_mut().flatten() {
            let _ = send_msg(s, REJECT, msg.as_bytes());
        }
        bad(msg)
    };
    let mut arrived = 1;
    while arrived < world {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| peers[r].is_none()).collect();
                    let msg = format!(
                        "rank 0 on {host}: {arrived} of {world} ranks reached the rendezvous on {}:{} (listening on {local}) within {} s; missing ranks {}. Check that every rank was started, with the same MASTER_ADDR and MASTER_PORT, and that it can reach this host",
                        b.master_addr,
                        b.master_port,
                        timeout.as_secs(),
                        list(&missing)
                    );
                    return Err(fail(&mut links, msg));
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(fail(&mut links, format!("rank 0 on {host}: accept failed: {e}"))),
        };
        let _ = stream.set_nonblocking(false);
        // A connection that says nothing useful in a few seconds is not one of ours.
        let quick = deadline.min(Instant::now() + Duration::from_secs(10));
        let Ok((HELLO, body)) = recv_msg(&mut stream, quick) else {
            continue;
        };
        let mut u = Unwire(&body);
        let (Some(rank), Some(their_world), Some(phost), Some(pid), Some(addr)) =
            (u.u64(), u.u64(), u.str(), u.u32(), u.addr())
        else {
            continue;
        };
        let (rank, their_world) = (rank as usize, their_world as usize);
        let who = format!("rank {rank} on {phost} (pid {pid})");
        if their_world != world {
            let _ = send_msg(&mut stream, REJECT, b"");
            let msg = format!("rank 0 on {host}: {who} says the world size is {their_world}, rank 0 has {world}; every rank must be started with the same world size");
            return Err(fail(&mut links, msg));
        }
        if rank == 0 || rank >= world || peers[rank].is_some() {
            let first = peers
                .get(rank)
                .and_then(|p| p.as_ref())
                .map_or(String::new(), |p| format!(" (first: {})", p.describe()));
            let msg = format!("rank 0 on {host}: {who} joined as rank {rank}, which is taken{first}; two processes have the same rank");
            let _ = send_msg(&mut stream, REJECT, msg.as_bytes());
            return Err(fail(&mut links, msg));
        }
        peers[rank] = Some(Peer {
            rank,
            host: phost,
            pid,
            addr,
        });
        links[rank] = Some(stream);
        arrived += 1;
    }
    let peers: Vec<Peer> = peers.into_iter().map(|p| p.expect("every rank arrived")).collect();
    let job_key = job_key();
    let blob = blob();
    let mut w = Wire::default().u64(job_key).bytes(&blob).u64(world as u64);
    for p in &peers {
        w = w.str(&p.host).u32(p.pid).addr(&p.addr);
    }
    for (r, s) in links.iter_mut().enumerate() {
        if let Some(s) = s {
            let _ = s.set_write_timeout(Some(timeout));
            send_msg(s, WELCOME, &w.0).map_err(|e| {
                bad(format!(
                    "rank 0 on {host}: sending the table to {}: {e}",
                    peers[r].describe()
                ))
            })?;
        }
    }
    Ok(Rendezvous {
        rank: 0,
        world_size: world,
        peers,
        blob,
        job_key,
        links,
        listener: None,
    })
}

/// Ranks above 0: connect to rank 0 (with backoff), say who we are, wait for the table.
fn join(b: &Bootstrap, host: &str, deadline: Instant, timeout: Duration) -> Result<Rendezvous> {
    let at = format!("rank {} on {host}", b.rank);
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| bad(format!("{at}: cannot listen for data connections: {e}")))?;
    let port = listener.local_addr().map_err(|e| bad(format!("{at}: {e}")))?.port();
    let target = format!("{}:{}", b.master_addr, b.master_port);
    let mut backoff = Duration::from_millis(20);
    let mut stream = loop {
        let attempt = target
            .to_socket_addrs()
            .and_then(|mut a| a.next().ok_or_else(|| ErrorKind::NotFound.into()))
            .and_then(|a| {
                let left = deadline.saturating_duration_since(Instant::now());
                TcpStream::connect_timeout(&a, left.clamp(Duration::from_millis(10), Duration::from_secs(5)))
            });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(bad(format!(
                    "{at}: could not reach rank 0 at {target} within {} s (last error: {e}); is rank 0 running, and do all ranks have the same MASTER_ADDR and MASTER_PORT? ({SET_MASTER})",
                    timeout.as_secs()
                )))
            }
            Err(_) => {
                std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    };
    // Peers reach this rank's listener on the interface that reaches rank 0.
    let ip = stream.local_addr().map_err(|e| bad(format!("{at}: {e}")))?.ip();
    let me = Wire::default()
        .u64(b.rank as u64)
        .u64(b.world_size as u64)
        .str(host)
        .u32(std::process::id())
        .addr(&SocketAddr::new(ip, port));
    let _ = stream.set_write_timeout(Some(timeout));
    send_msg(&mut stream, HELLO, &me.0).map_err(|e| bad(format!("{at}: sending to rank 0 at {target}: {e}")))?;
    let (kind, body) = recv_msg(&mut stream, deadline).map_err(|e| {
        bad(format!(
            "{at}: waiting for rank 0 at {target} to hand out the table of ranks: {e} (rank 0 waits until all {} ranks arrive, for --comm-timeout)",
            b.world_size
        ))
    })?;
    match kind {
        WELCOME => {}
        REJECT if body.is_empty() => {
            return Err(bad(format!(
                "{at}: rank 0 at {target} refused this rank: it expects another world size than {}",
                b.world_size
            )))
        }
        REJECT => {
            return Err(bad(format!(
                "{at}: rank 0 at {target} ended the rendezvous: {}",
                String::from_utf8_lossy(&body)
            )))
        }
        k => return Err(bad(format!("{at}: unexpected message {k} from rank 0 at {target}"))),
    }
    let mut u = Unwire(&body);
    let table = (|| {
        let (key, blob, n) = (u.u64()?, u.bytes()?, u.u64()? as usize);
        let mut peers = Vec::with_capacity(n.min(1 << 16));
        for rank in 0..n {
            peers.push(Peer {
                rank,
                host: u.str()?,
                pid: u.u32()?,
                addr: u.addr()?,
            });
        }
        Some((key, blob, peers))
    })();
    let Some((job_key, blob, peers)) = table.filter(|t| t.2.len() == b.world_size) else {
        return Err(bad(format!("{at}: rank 0 at {target} sent a malformed table")));
    };
    let mut links: Vec<Option<TcpStream>> = (0..b.world_size).map(|_| None).collect();
    links[0] = Some(stream);
    Ok(Rendezvous {
        rank: b.rank,
        world_size: b.world_size,
        peers,
        blob,
        job_key,
        links,
        listener: Some(listener),
    })
}

/// "[1, 2, 5]", shortened past 16 entries.
pub(crate) fn list(v: &[usize]) -> String {
    if v.len() <= 16 {
        format!("{v:?}")
    } else {
        format!("{:?} and {} more", &v[..16], v.len() - 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect(explicit: &Explicit, vars: &[(&str, &str)]) -> Result<Option<Bootstrap>> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Bootstrap::detect_from(explicit, |k| m.get(k).cloned())
    }

    #[test]
    fn hostlists_expand() {
        let e = |s| expand_hostlist(s).unwrap();
        assert_eq!(e("nid001"), ["nid001"]);
        assert_eq!(
            e("nid[001-003,007],login1"),
            ["nid001", "nid002", "nid003", "nid007", "login1"]
        );
        assert_eq!(e("gpu[8-10]"), ["gpu8", "gpu9", "gpu10"]);
        assert_eq!(e("r[1-2]n[01-02]"), ["r1n01", "r1n02", "r2n01", "r2n02"]);
        assert_eq!(e("a,b[3],c"), ["a", "b3", "c"]);
        for bad in ["nid[001-", "nid]1[", "nid[a-b]", "nid[5-3]", "", "x[[1]]"] {
            assert!(expand_hostlist(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nothing_set_is_no_launcher() {
        assert_eq!(detect(&Explicit::default(), &[]).unwrap(), None);
        // The batch script of an allocation is not an srun step.
        let batch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "42")];
        assert_eq!(detect(&Explicit::default(), &batch).unwrap(), None);
    }

    #[test]
    fn slurm_step() {
        let vars = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_JOB_NODELIST", "nid[004-005]"),
        ];
        let b = detect(&Explicit::default(), &vars).unwrap().unwrap();
        assert_eq!(
            (b.rank, b.world_size, b.local_rank, b.node_id, b.launcher),
            (5, 8, 1, Some(1), Launcher::Slurm)
        );
        assert_eq!(b.master_addr, "nid004");
        assert_eq!(b.master_port, slurm_port("123456", "0"));
        assert!((20000..50000).contains(&b.master_port));
        assert_ne!(slurm_port("123456", "1"), b.master_port);
        // MASTER_* and the CLI override what Slurm implies; the step's node list wins.
        let mut more = vars.to_vec();
        more.extend([("MASTER_PORT", "29500"), ("SLURM_STEP_NODELIST", "nid005")]);
        let b = detect(&Explicit::default(), &more).unwrap().unwrap();
        assert_eq!((b.master_addr.as_str(), b.master_port), ("nid005", 29500));
        let cli = Explicit {
            master_addr: Some("10.0.0.1".into()),
            ..Default::default()
        };
        assert_eq!(detect(&cli, &more).unwrap().unwrap().master_addr, "10.0.0.1");
    }

    #[test]
    fn open_mpi_and_env() {
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("PMIX_NAMESPACE", "prterun-host-1234@1"),
        ];
        let b = detect(&Explicit::default(), &ompi).unwrap().unwrap();
        assert_eq!(
            (b.rank, b.world_size, b.local_rank, b.launcher),
            (2, 4, 2, Launcher::OpenMpi)
        );
        assert_eq!(b.master_addr, "127.0.0.1");
        // Across nodes nothing says where rank 0 is.
        let err = detect(&Explicit::default(), &ompi[..4 - 1]).unwrap_err().to_string();
        assert!(err.contains("rank 2 on") && err.contains("MASTER_ADDR"), "{err}");
        assert!(err.contains("srun/mpirun"), "{err}");

        let env = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1234"),
        ];
        let b = detect(&Explicit::default(), &env).unwrap().unwrap();
        assert_eq!(
            (b.rank, b.world_size, b.local_rank, b.launcher),
            (1, 2, 1, Launcher::Env)
        );
        assert_eq!((b.master_addr.as_str(), b.master_port), ("h", 1234));
        // A yalis child reads RANK even where Slurm variables were inherited.
        let mut child = env.to_vec();
        child.extend([("YALIS_SPAWNED", "1"), ("SLURM_PROCID", "0"), ("SLURM_STEP_ID", "0")]);
        let b = detect(&Explicit::default(), &child).unwrap().unwrap();
        assert_eq!((b.rank, b.launcher), (1, Launcher::Spawned));
    }

    #[test]
    fn bad_values_are_named() {
        let d = Explicit::default();
        let err = |vars: &[(&str, &str)]| detect(&d, vars).unwrap_err().to_string();
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("not below the world size 2"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not set"));
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]);
        assert!(e.contains("MASTER_PORT is not set"), "{e}");
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "99999"),
        ]);
        assert!(e.contains("MASTER_PORT=\"99999\""), "{e}");
        let half = Explicit {
            rank: Some(0),
            ..Default::default()
        };
        assert!(detect(&half, &[]).unwrap_err().to_string().contains("--world-size"));
        // One rank needs no rendezvous address.
        let one = detect(&d, &[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap().unwrap();
        assert_eq!(one.world_size, 1);
    }

    fn boot(rank: usize, world: usize, port: u16) -> Bootstrap {
        Bootstrap {
            rank,
            world_size: world,
            local_rank: rank,
            node_id: None,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Cli,
        }
    }

    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn ranks_meet_and_get_the_table_and_blob() {
        let port = free_port();
        let world = 4;
        let out: Vec<Rendezvous> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .rev() // the others start first and must retry until rank 0 listens
                .map(|r| {
                    s.spawn(move || {
                        if r == 0 {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        rendezvous(&boot(r, world, port), Duration::from_secs(20), || b"nccl-id".to_vec()).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).rev().collect()
        });
        for (r, rv) in out.iter().enumerate() {
            assert_eq!((rv.rank, rv.world_size), (r, world));
            assert_eq!(rv.blob, b"nccl-id");
            assert_eq!(rv.job_key, out[0].job_key);
            assert_eq!(rv.peers, out[0].peers);
            assert_eq!(rv.node_ids(), vec![0; world]);
        }
        assert!(out[0].peers.iter().all(|p| p.pid == std::process::id()));
    }

    #[test]
    fn a_missing_rank_is_named_after_the_timeout() {
        let port = free_port();
        let t = Duration::from_millis(600);
        let (e0, e1) = std::thread::scope(|s| {
            let a = s.spawn(|| rendezvous(&boot(0, 3, port), t, Vec::new).err().unwrap());
            let b = s.spawn(|| rendezvous(&boot(1, 3, port), t * 3, Vec::new).err().unwrap());
            (a.join().unwrap().to_string(), b.join().unwrap().to_string())
        });
        assert!(e0.contains("2 of 3 ranks") && e0.contains("missing ranks [2]"), "{e0}");
        assert!(e1.contains("rank 1 on") && e1.contains("missing ranks [2]"), "{e1}");
        // Nobody listening: the connecting rank says where it looked and what to set.
        let e = rendezvous(&boot(1, 2, free_port()), t, Vec::new)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("could not reach rank 0 at 127.0.0.1:") && e.contains("MASTER_ADDR"),
            "{e}"
        );
    }

    #[test]
    fn rank_0_takes_a_listener_bound_before_the_rendezvous() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        prebind(l);
        // Asked for another port: not this one, which stays for the right one.
        let other = bind_master(&boot(0, 2, free_port()), "h").unwrap();
        assert_ne!(other.local_addr().unwrap(), addr);
        assert_eq!(
            bind_master(&boot(0, 2, addr.port()), "h")
                .unwrap()
                .local_addr()
                .unwrap(),
            addr
        );
    }

    #[test]
    fn a_world_size_mismatch_fails_everyone() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let (e0, e1) = std::thread::scope(|s| {
            let a = s.spawn(|| rendezvous(&boot(0, 2, port), t, Vec::new).err().unwrap());
            let b = s.spawn(|| rendezvous(&boot(1, 3, port), t, Vec::new).err().unwrap());
            (a.join().unwrap().to_string(), b.join().unwrap().to_string())
        });
        assert!(e0.contains("world size is 3, rank 0 has 2"), "{e0}");
        assert!(e1.contains("refused") || e1.contains("world size"), "{e1}");
    }
}
