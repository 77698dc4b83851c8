//! How a job's ranks start, and how their results come back to the process that prints.
//!
//! - A launcher started this process (srun, mpirun, `RANK`/`WORLD_SIZE`, or `--rank` and
//!   `--world-size`): it is one rank; the rendezvous and the TCP mesh come up before any work.
//! - Nothing did, and the layout has several ranks: this process starts one child process per
//!   rank (`--ranks processes`, the default), relays their output (rank 0's stdout is the job's;
//!   the other ranks' lines go to stderr as "[rank N] ...") and ends the job when one fails.
//! - `--ranks threads`: every rank is a thread of this process (`run_threads`).
//!
//! A failing rank aborts the job: its peers stop at their next communicator call and exit with
//! status 3 ("stopped because another rank failed"); the failing rank exits with status 1 and a
//! message naming its rank and host.
//!
//! Test hooks (hidden): `YALIS_TEST_DIE_AT_STEP=RANK:N` makes that rank abort the process at
//! its N-th world collective (each generation step ends with one), `YALIS_TEST_HANG_AT_STEP`
//! makes it sleep there forever. Both act only where ranks are processes.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use yalis_comm::hostname;
use yalis_comm::{Bootstrap, Explicit, HostComm, Launcher, RankComms, TcpMesh};
use yalis_core::{ParallelPlan, RankPlan};
use yalis_engine::ranks::{run_rank, run_threads};

use crate::common::{ModelArgs, Runtime};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RanksMode {
    /// One process per rank (started by this one when no launcher did).
    Processes,
    /// Every rank a thread of this process.
    Threads,
}

/// The exit status of a rank that stopped because another rank failed.
pub const EXIT_STOPPED: i32 = 3;

/// How long a rank that another rank's failure left busy (computing or hung) lives on.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// After one child fails, how long the others get to exit by themselves before they are killed.
const CHILD_GRACE: Duration = Duration::from_secs(2);

/// This process as one rank of a launched job, for [`exit_with`] and [`finish`].
struct Current {
    mesh: Arc<TcpMesh>,
    rank: usize,
    /// Rank among this node's processes: the GPU it takes.
    local_rank: usize,
    host: String,
}

static CURRENT: OnceLock<Current> = OnceLock::new();

pub struct Launch {
    mode: Mode,
    timeout: Duration,
}

enum Mode {
    /// Every rank runs here (threads), or in child processes when `spawn` and a layout has
    /// more than one rank.
    Local { spawn: bool },
    /// This process is rank `boot.rank`; a child that yalis started runs only layout `only`.
    Rank {
        boot: Bootstrap,
        mesh: Arc<TcpMesh>,
        only: Option<(usize, usize)>,
    },
}

/// The results of the ranks this process ran: all of them (threads), its own (a rank
/// process), or none (the ranks were child processes, which reported themselves).
pub struct RankResults<R>(Vec<(usize, R)>);

impl<R> RankResults<R> {
    pub fn get(&self, rank: usize) -> Option<&R> {
        self.0.iter().find(|(r, _)| *r == rank).map(|(_, v)| v)
    }

    pub fn take(&mut self, rank: usize) -> Option<R> {
        let i = self.0.iter().position(|(r, _)| *r == rank)?;
        Some(self.0.swap_remove(i).1)
    }
}

/// The number of processes a launcher (srun, mpirun, RANK/WORLD_SIZE, --world-size) started
/// for this job, when one did and it is more than one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn launched_world(args: &ModelArgs) -> Option<usize> {
    let explicit = explicit(args);
    Bootstrap::detect_from(&explicit, |k| std::env::var(k).ok())
        .ok()
        .flatten()
        .map(|b| b.world_size)
        .filter(|&w| w > 1)
}

fn explicit(args: &ModelArgs) -> Explicit {
    Explicit {
        rank: args.rank,
        world_size: args.world_size,
        local_rank: args.local_rank,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    }
}

impl Launch {
    /// Finds out how this job's ranks run. Under a launcher, every layout in `layouts` must have
    /// as many ranks as the launcher started (checked before anything else); then the
    /// rendezvous runs and the mesh comes up.
    pub fn new(args: &ModelArgs, layouts: &[(usize, usize)]) -> Result<Launch> {
        let timeout = args.timeout();
        let explicit = explicit(args);
        let local = Launch {
            mode: Mode::Local {
                spawn: args.ranks == RanksMode::Processes,
            },
            timeout,
        };
        let boot = match Bootstrap::detect(&explicit)? {
            None => return Ok(local),
            // `srun -n 1 yalis --tp 4`: one process, which starts its ranks itself.
            Some(b) if b.world_size == 1 && b.launcher != Launcher::Spawned => return Ok(local),
            Some(b) => b,
        };
        let at = format!("rank {} on {}", boot.rank, hostname());
        let started = format!("{} started {} processes", boot.launcher.describe(), boot.world_size);
        if args.ranks == RanksMode::Threads {
            bail!(
                "{at}: --ranks threads runs every rank as a thread of one process, but {started}; drop --ranks threads"
            );
        }
        let only = match (boot.launcher, std::env::var("YALIS_SPAWN_LAYOUT")) {
            (Launcher::Spawned, Ok(v)) => {
                let parsed = v
                    .split_once('x')
                    .and_then(|(t, p)| Some((t.parse().ok()?, p.parse().ok()?)));
                Some(parsed.with_context(|| format!("{at}: YALIS_SPAWN_LAYOUT={v:?} is not TPxPP"))?)
            }
            _ => None,
        };
        for &(tp, pp) in layouts {
            if only.is_some_and(|o| o != (tp, pp)) {
                continue;
            }
            if tp * pp != boot.world_size {
                bail!(
                    "{at}: TP {tp} x PP {pp} = {} ranks, but {started}; start {} (srun -n, mpirun -np, WORLD_SIZE), or choose --tp and --pp whose product is {}",
                    tp * pp,
                    tp * pp,
                    boot.world_size
                );
            }
        }
        if let Some((tp, pp)) = only.filter(|o| !layouts.contains(o)) {
            bail!("{at}: started for TP {tp} x PP {pp}, which this command does not run");
        }
        let rv = yalis_comm::rendezvous(&boot, timeout, Vec::new)?;
        let mesh = TcpMesh::connect(rv, timeout)?;
        mesh.exit_on_abort(ABORT_GRACE);
        if boot.launcher == Launcher::Spawned {
            watch_parent(mesh.clone(), at.clone());
        }
        let _ = CURRENT.set(Current {
            mesh: mesh.clone(),
            rank: boot.rank,
            local_rank: boot.local_rank,
            host: hostname(),
        });
        tracing::info!(rank = boot.rank, world = boot.world_size, launcher = ?boot.launcher, "joined the job");
        Ok(Launch {
            mode: Mode::Rank { boot, mesh, only },
            timeout,
        })
    }

    /// Whether this process runs layout `tp x pp` (a child that yalis started runs only its own).
    pub fn runs(&self, tp: usize, pp: usize) -> bool {
        match &self.mode {
            Mode::Rank { only: Some(o), .. } => *o == (tp, pp),
            _ => true,
        }
    }

    /// Whether this process reports for a layout of `world` ranks: it runs rank 0 of it.
    pub fn prints(&self, world: usize) -> bool {
        match &self.mode {
            Mode::Local { spawn } => world == 1 || !spawn,
            Mode::Rank { boot, .. } => boot.rank == 0,
        }
    }

    /// Fills in where each rank of `plan` runs (process and host) and, for ranks as processes
    /// on the CPU, that they all-reduce over TCP; for the banner and the records.
    pub fn locate(&self, rt: &mut Runtime, plan: &ParallelPlan) {
        match &self.mode {
            Mode::Rank { mesh, .. } => {
                rt.places = mesh
                    .peers()
                    .iter()
                    .map(|p| (format!("pid {}", p.pid), p.host.clone()))
                    .collect();
                if rt.device == "cpu" {
                    rt.allreduce = "host (TCP)";
                }
            }
            Mode::Local { .. } => {
                rt.places = (0..plan.world_size())
                    .map(|r| (format!("thread {r}"), hostname()))
                    .collect()
            }
        }
    }

    /// Runs `f` for every rank of `plan` that this process holds, or starts the ranks as child
    /// processes and waits for them. The first rank to fail ends the job; its error names the
    /// rank and host.
    pub fn run<R: Send>(
        &self,
        plan: &ParallelPlan,
        f: impl Fn(&RankPlan, RankComms) -> yalis_engine::Result<R> + Sync,
    ) -> Result<RankResults<R>> {
        match &self.mode {
            Mode::Local { spawn } if !spawn || plan.world_size() == 1 => {
                let all = run_threads(plan, self.timeout, f)?;
                Ok(RankResults(all.into_iter().enumerate().collect()))
            }
            Mode::Local { .. } => {
                supervise(plan)?;
                Ok(RankResults(Vec::new()))
            }
            Mode::Rank { boot, mesh, .. } => {
                let rank = boot.rank;
                if plan.world_size() != boot.world_size {
                    bail!("TP x PP = {} ranks in a job of {}", plan.world_size(), boot.world_size);
                }
                let comms = with_test_faults(mesh.rank_comms(plan.tp, plan.pp)?, rank);
                let host = hostname();
                let r = run_rank(rank, &host, |m| mesh.abort(m), || f(&plan.ranks[rank], comms));
                r.map(|v| RankResults(vec![(rank, v)])).map_err(|(_, e)| e.into())
            }
        }
    }
}

/// A child that yalis started ends the job when the process that started it is gone (killed),
/// rather than running on with nobody reading its output.
fn watch_parent(mesh: Arc<TcpMesh>, at: String) {
    use std::os::unix::process::parent_id;
    let parent = parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        if parent_id() != parent {
            let msg = format!("{at}: the yalis process that started the ranks (pid {parent}) is gone");
            mesh.abort(&msg);
            eprintln!("yalis: error: {msg}");
            mesh.close();
            std::process::exit(1);
        }
    });
}

/// This process's rank among its node's processes, when a launcher (or yalis) started it as
/// one rank; None when the ranks run as threads here.
pub fn local_rank() -> Option<usize> {
    CURRENT.get().map(|c| c.local_rank)
}

/// After a command succeeded: a rank says goodbye to its peers and waits for theirs, so no
/// rank leaves while another still needs it.
pub fn finish() -> Result<()> {
    if let Some(c) = CURRENT.get() {
        c.mesh.finish()?;
        c.mesh.close();
    }
    Ok(())
}

/// Prints the error and exits: status 1, or [`EXIT_STOPPED`] for a rank stopped by another
/// rank's failure. A rank's error names it and its host and ends the job for every peer.
pub fn exit_with(e: anyhow::Error) -> ! {
    let msg = format!("{e:#}");
    let Some(c) = CURRENT.get() else {
        eprintln!("yalis: error: {msg}");
        std::process::exit(1);
    };
    let stopped = matches!(c.mesh.aborted(), Some((_, false)));
    let prefix = format!("rank {} on {}", c.rank, c.host);
    let msg = if msg.starts_with(&prefix) {
        msg
    } else {
        format!("{prefix}: {msg}")
    };
    if !stopped {
        c.mesh.abort(&msg);
    }
    eprintln!("yalis: error: {msg}");
    c.mesh.close();
    std::process::exit(if stopped { EXIT_STOPPED } else { 1 })
}

// ---- child processes -------------------------------------------------------------------------

/// Starts one child per rank of `plan` (this executable, same arguments, torchrun-style
/// variables), relays their output, and waits. When one fails, the others get
/// [`CHILD_GRACE`] to stop by themselves and are killed after it.
fn supervise(plan: &ParallelPlan) -> Result<()> {
    let world = plan.world_size();
    // Free now; rank 0 binds it a moment later.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the ranks' rendezvous")?
        .port();
    let exe = std::env::current_exe().context("finding this executable to start the ranks")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let last_error: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(vec![None; world]));
    let mut children: Vec<Child> = Vec::with_capacity(world);
    let mut relays = Vec::new();
    for r in 0..world {
        let spawned = Command::new(&exe)
            .args(&args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("YALIS_SPAWNED", "1")
            .env("YALIS_SPAWN_LAYOUT", format!("{}x{}", plan.tp, plan.pp))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                for c in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("starting rank {r} of {world} ({}): {e}", exe.display());
            }
        };
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        relays.push(relay(r, out, r == 0, last_error.clone()));
        relays.push(relay(r, err, false, last_error.clone()));
        children.push(child);
    }

    // (status, killed by us), and the order in which the ranks ended.
    let mut ended: Vec<Option<(ExitStatus, bool)>> = vec![None; world];
    let mut order = Vec::with_capacity(world);
    let mut first_failure: Option<Instant> = None;
    loop {
        for (r, c) in children.iter_mut().enumerate() {
            if ended[r].is_none() {
                if let Some(s) = c.try_wait().context("waiting for the ranks")? {
                    ended[r] = Some((s, false));
                    order.push(r);
                    if !s.success() {
                        first_failure.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        if ended.iter().all(Option::is_some) {
            break;
        }
        if first_failure.is_some_and(|t| t.elapsed() >= CHILD_GRACE) {
            for (r, c) in children.iter_mut().enumerate() {
                if ended[r].is_none() {
                    let _ = c.kill();
                    ended[r] = Some((c.wait().context("waiting for the ranks")?, true));
                    order.push(r);
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for h in relays {
        let _ = h.join();
    }
    let ended: Vec<(ExitStatus, bool)> = ended.into_iter().map(|e| e.expect("every rank ended")).collect();
    let failed = |r: &&usize| !ended[**r].0.success() && !ended[**r].1;
    // The rank that failed first by itself; a rank stopped by another's failure only if none did.
    let Some(&culprit) = order
        .iter()
        .filter(failed)
        .find(|r| ended[**r].0.code() != Some(EXIT_STOPPED))
        .or_else(|| order.iter().find(failed))
        .or_else(|| order.iter().find(|r| !ended[**r].0.success()))
    else {
        return Ok(());
    };
    let killed: Vec<usize> = (0..world).filter(|&r| ended[r].1).collect();
    let status = describe_status(&ended[culprit].0);
    let detail = last_error.lock().unwrap_or_else(|e| e.into_inner())[culprit]
        .take()
        .map_or(String::new(), |m| format!(": {m}"));
    let tail = if killed.is_empty() {
        String::new()
    } else {
        format!(
            " (ranks {killed:?} were still running after {} s and were killed)",
            CHILD_GRACE.as_secs()
        )
    };
    bail!(
        "rank {culprit} of {world} (pid {}, on {}) {status}{detail}{tail}",
        children[culprit].id(),
        hostname()
    )
}

/// Copies a child's output line by line: rank 0's stdout to stdout, everything else to stderr
/// ("[rank N] " in front for ranks above 0), remembering its last "yalis: error:" line.
fn relay(
    rank: usize,
    from: impl Read + Send + 'static,
    to_stdout: bool,
    last_error: Arc<Mutex<Vec<Option<String>>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut from = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match from.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(m) = text.trim_end().strip_prefix("yalis: error: ") {
                last_error.lock().unwrap_or_else(|e| e.into_inner())[rank] = Some(m.to_string());
            }
            let _ = if to_stdout {
                let mut o = std::io::stdout().lock();
                o.write_all(&line).and_then(|_| o.flush())
            } else if rank == 0 {
                std::io::stderr().lock().write_all(&line)
            } else {
                let mut e = std::io::stderr().lock();
                e.write_all(format!("[rank {rank}] ").as_bytes())
                    .and_then(|_| e.write_all(&line))
            };
        }
    })
}

fn describe_status(s: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = s.code() {
        return format!("exited with status {code}");
    }
    let sig = s.signal().unwrap_or(0);
    let name = match sig {
        1 => " (SIGHUP)",
        2 => " (SIGINT)",
        4 => " (SIGILL)",
        6 => " (SIGABRT)",
        7 => " (SIGBUS)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        15 => " (SIGTERM)",
        _ => "",
    };
    format!("was killed by signal {sig}{name}")
}

// ---- test hooks ------------------------------------------------------------------------------

/// Wraps the world communicator of the rank named by `YALIS_TEST_DIE_AT_STEP` or
/// `YALIS_TEST_HANG_AT_STEP` ("RANK:N") so that it dies or hangs at its N-th collective.
fn with_test_faults(mut comms: RankComms, rank: usize) -> RankComms {
    for (var, hang) in [("YALIS_TEST_DIE_AT_STEP", false), ("YALIS_TEST_HANG_AT_STEP", true)] {
        let Ok(v) = std::env::var(var) else { continue };
        let Some((r, n)) = v
            .split_once(':')
            .and_then(|(r, n)| Some((r.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
        else {
            continue;
        };
        if r == rank {
            comms.world = Box::new(Fault {
                inner: comms.world,
                at: n,
                hang,
                calls: AtomicUsize::new(0),
            });
        }
    }
    comms
}

struct Fault {
    inner: Box<dyn HostComm>,
    at: usize,
    hang: bool,
    calls: AtomicUsize,
}

impl HostComm for Fault {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather_bytes(&self, input: &[u8]) -> yalis_comm::Result<Vec<Vec<u8>>> {
        if self.calls.fetch_add(1, Ordering::Relaxed) == self.at {
            if self.hang {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            std::process::abort();
        }
        self.inner.all_gather_bytes(input)
    }
    fn send_bytes(&self, data: &[u8], dst: usize) -> yalis_comm::Result<()> {
        self.inner.send_bytes(data, dst)
    }
    fn recv_bytes(&self, src: usize) -> yalis_comm::Result<Vec<u8>> {
        self.inner.recv_bytes(src)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}
