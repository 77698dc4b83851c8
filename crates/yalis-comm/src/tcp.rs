//! Ranks as processes: a full mesh of TCP connections set up after the rendezvous, and the
//! [`HostComm`] of each group on top of it.
//!
//! Every message is a frame `[kind u8][group u32][seq u64][len u64][payload]`. A reader thread
//! per peer files frames into queues keyed by (group, kind, sender), so collectives and
//! point-to-point traffic never mix, and checks each frame's sequence number against what the
//! caller expects, so ranks whose call sequences diverged fail with a message instead of
//! exchanging the wrong data. Every wait and every write has the timeout; a peer whose
//! connection closes without a goodbye aborts the job on every survivor, naming that peer; an
//! `abort(reason)` reaches every peer as a frame.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bootstrap::{list, recv_msg, send_msg, Peer, Rendezvous, Unwire, Wire, DATA_HELLO};
use crate::{CommError, HostComm, RankComms, Result};

const COLLECTIVE: u8 = 1;
const P2P: u8 = 2;
const ABORT: u8 = 3;
const BYE: u8 = 4;
const HEADER: usize = 21;
/// Larger frames are a corrupt stream, not data.
const MAX_FRAME: u64 = 1 << 40;

/// (group, kind, sender world rank).
type QueueKey = (u32, u8, usize);

#[derive(Default)]
struct State {
    /// (seq, payload) per key, in arrival order.
    queues: HashMap<QueueKey, VecDeque<(u64, Vec<u8>)>>,
    /// The first reason the job ended, and whether this rank gave it.
    aborted: Option<(String, bool)>,
    /// The peer said goodbye (finished cleanly).
    left: Vec<bool>,
    /// The peer's connection has closed.
    closed: Vec<bool>,
    /// This rank is closing; readers ending now are no news.
    closing: bool,
}

struct Shared {
    rank: usize,
    peers: Vec<Peer>,
    /// One connection per peer; `None` for this rank.
    writers: Vec<Option<Mutex<TcpStream>>>,
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
    /// Exit the process this long after another rank ended the job (set by the binary).
    exit_grace: Mutex<Option<Duration>>,
}

/// This process's connections to every other rank of the job.
pub struct TcpMesh {
    shared: Arc<Shared>,
    /// Group ids handed out so far; every rank creates its groups in the same order.
    next_group: AtomicU32,
}

fn setup(rank: usize, host: &str, msg: String) -> CommError {
    CommError::Bootstrap(format!("rank {rank} on {host}: {msg}"))
}

impl TcpMesh {
    /// Connects every pair of ranks: rank 0's links come from the rendezvous; every other rank
    /// connects to the ranks below it and accepts the ranks above it.
    pub fn connect(rv: Rendezvous, timeout: Duration) -> Result<Arc<TcpMesh>> {
        let (rank, world) = (rv.rank, rv.world_size);
        let host = rv.peers[rank].host.clone();
        let deadline = Instant::now() + timeout;
        let mut links = rv.links;
        if rank > 0 {
            let listener = rv.listener.expect("ranks above 0 listen");
            let key = rv.job_key;
            let peers = &rv.peers;
            // Accept from higher ranks while connecting to lower ones.
            let accepted = std::thread::scope(|s| {
                let acceptor = s.spawn(|| -> Result<Vec<(usize, TcpStream)>> {
                    let mut got = Vec::new();
                    let mut seen = vec![false; world];
                    listener
                        .set_nonblocking(true)
                        .map_err(|e| setup(rank, &host, e.to_string()))?;
                    while got.len() < world - 1 - rank {
                        match listener.accept() {
                            Ok((mut s, _)) => {
                                let _ = s.set_nonblocking(false);
                                let quick = deadline.min(Instant::now() + Duration::from_secs(10));
                                let Ok((DATA_HELLO, body)) = recv_msg(&mut s, quick) else {
                                    continue;
                                };
                                let mut u = Unwire(&body);
                                match (u.u64(), u.u64()) {
                                    (Some(k), Some(r)) if k == key && (r as usize) > rank && (r as usize) < world => {
                                        let r = r as usize;
                                        if !std::mem::replace(&mut seen[r], true) {
                                            got.push((r, s));
                                        }
                                    }
                                    _ => continue,
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                if Instant::now() >= deadline {
                                    let missing: Vec<usize> = (rank + 1..world).filter(|&r| !seen[r]).collect();
                                    let names: Vec<String> = missing.iter().map(|&r| peers[r].describe()).collect();
                                    return Err(setup(
                                        rank,
                                        &host,
                                        format!(
                                            "{} did not connect within {} s (missing ranks {})",
                                            names.join(", "),
                                            timeout.as_secs(),
                                            list(&missing)
                                        ),
                                    ));
                                }
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            Err(e) => return Err(setup(rank, &host, format!("accepting data connections: {e}"))),
                        }
                    }
                    Ok(got)
                });
                let mut connected = Vec::new();
                for p in &peers[1..rank] {
                    let mut backoff = Duration::from_millis(10);
                    let mut s = loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match TcpStream::connect_timeout(&p.addr, left.max(Duration::from_millis(10))) {
                            Ok(s) => break s,
                            Err(e) if Instant::now() >= deadline => {
                                return Err(setup(
                                    rank,
                                    &host,
                                    format!("cannot connect to {} at {}: {e}", p.describe(), p.addr),
                                ))
                            }
                            Err(_) => {
                                std::thread::sleep(backoff);
                                backoff = (backoff * 2).min(Duration::from_millis(500));
                            }
                        }
                    };
                    let hello = Wire::default().u64(key).u64(rank as u64);
                    let _ = s.set_write_timeout(Some(timeout));
                    send_msg(&mut s, DATA_HELLO, &hello.0)
                        .map_err(|e| setup(rank, &host, format!("greeting {}: {e}", p.describe())))?;
                    connected.push((p.rank, s));
                }
                let accepted = acceptor.join().expect("the acceptor does not panic")?;
                Ok(connected.into_iter().chain(accepted).collect::<Vec<_>>())
            })?;
            for (r, s) in accepted {
                links[r] = Some(s);
            }
        }
        let mut writers = Vec::with_capacity(world);
        let mut readers = Vec::new();
        for (r, link) in links.into_iter().enumerate() {
            match link {
                None if r == rank => writers.push(None),
                None => return Err(setup(rank, &host, format!("no connection to rank {r}"))),
                Some(s) => {
                    let read = s
                        .try_clone()
                        .and_then(|read| {
                            s.set_nodelay(true)?;
                            s.set_write_timeout(Some(timeout))?;
                            read.set_read_timeout(None)?;
                            Ok(read)
                        })
                        .map_err(|e| setup(rank, &host, format!("connection to rank {r}: {e}")))?;
                    readers.push((r, read));
                    writers.push(Some(Mutex::new(s)));
                }
            }
        }
        let shared = Arc::new(Shared {
            rank,
            peers: rv.peers,
            writers,
            state: Mutex::new(State {
                left: vec![false; world],
                closed: vec![false; world],
                ..Default::default()
            }),
            cv: Condvar::new(),
            timeout,
            exit_grace: Mutex::new(None),
        });
        for (r, read) in readers {
            let sh = shared.clone();
            std::thread::Builder::new()
                .name(format!("yalis-rx{r}"))
                .spawn(move || sh.read_loop(r, read))
                .map_err(|e| setup(rank, &host, format!("starting a reader thread: {e}")))?;
        }
        Ok(Arc::new(TcpMesh {
            shared,
            next_group: AtomicU32::new(0),
        }))
    }

    pub fn rank(&self) -> usize {
        self.shared.rank
    }

    pub fn world_size(&self) -> usize {
        self.shared.peers.len()
    }

    /// Every rank's host, pid and address, by rank.
    pub fn peers(&self) -> &[Peer] {
        &self.shared.peers
    }

    /// The communicators of this rank for a `tp x pp` layout (`rank = pp_stage * tp + tp_rank`,
    /// as `local_job`). Every rank must call this the same number of times, in the same order.
    pub fn rank_comms(self: &Arc<Self>, tp: usize, pp: usize) -> Result<RankComms> {
        let (world, r) = (self.world_size(), self.rank());
        if tp * pp != world || tp == 0 {
            return Err(CommError::Invalid {
                rank: r,
                msg: format!("TP {tp} x PP {pp} does not match the {world} ranks of this job"),
            });
        }
        let base = self.next_group.fetch_add((1 + pp + tp) as u32, Ordering::Relaxed);
        let (stage, t) = (r / tp, r % tp);
        let comm =
            |group: u32, members: Vec<usize>| -> Box<dyn HostComm> { Box::new(TcpComm::new(self, group, members)) };
        Ok(RankComms {
            world: comm(base, (0..world).collect()),
            tp: comm(base + 1 + stage as u32, (stage * tp..(stage + 1) * tp).collect()),
            pp: comm(base + 1 + (pp + t) as u32, (0..pp).map(|s| s * tp + t).collect()),
        })
    }

    /// Ends the job: this rank's and every peer's pending and future calls fail with `reason`.
    pub fn abort(&self, reason: &str) {
        self.shared.abort(reason);
    }

    /// Why the job ended, if it did, and whether this rank said so (`false`: another rank, or a
    /// lost connection).
    pub fn aborted(&self) -> Option<(String, bool)> {
        self.shared.lock().aborted.clone()
    }

    /// Makes a rank that another rank's failure left busy outside the communicator (computing,
    /// or hung) exit with status 3 after `grace`, instead of living on.
    pub fn exit_on_abort(&self, grace: Duration) {
        *self.shared.exit_grace.lock().unwrap_or_else(|e| e.into_inner()) = Some(grace);
    }

    /// Says goodbye to every peer and waits until each has said goodbye too (or closed), so
    /// that no rank exits while another still reads from it. Fails if the job was aborted, or
    /// after the timeout.
    pub fn finish(&self) -> Result<()> {
        let sh = &self.shared;
        for w in sh.writers.iter().flatten() {
            let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.write_all(&header(BYE, 0, 0, 0));
            let _ = s.shutdown(Shutdown::Write);
        }
        let deadline = Instant::now() + sh.timeout;
        let mut st = sh.lock();
        loop {
            if let Some((reason, _)) = &st.aborted {
                return Err(CommError::Aborted {
                    rank: sh.rank,
                    reason: reason.clone(),
                });
            }
            let waiting: Vec<usize> = (0..sh.peers.len())
                .filter(|&p| p != sh.rank && !st.left[p] && !st.closed[p])
                .collect();
            if waiting.is_empty() {
                st.closing = true;
                #[cfg(feature = "mpi")]
                crate::mpi::finished_cleanly();
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: sh.rank,
                    op: "finishing",
                    secs: sh.timeout.as_secs(),
                    detail: format!("still running: {}", sh.names(&waiting)),
                });
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl TcpMesh {
    /// Closes every connection now, without a goodbye: peers still waiting learn that this rank
    /// is gone. If the job was aborted, the reason goes first, so that every survivor reports
    /// the first failure rather than this rank's exit. (Dropping the mesh does the same.)
    pub fn close(&self) {
        let sh = &self.shared;
        let reason = {
            let mut st = sh.lock();
            st.closing = true;
            st.aborted.clone()
        };
        let frame = reason.map(|(r, _)| abort_frame(&r));
        for w in sh.writers.iter().flatten() {
            let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = &frame {
                let _ = s.set_write_timeout(Some(sh.timeout.min(Duration::from_secs(2))));
                let _ = s.write_all(f);
            }
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpMesh {
    fn drop(&mut self) {
        self.close();
    }
}

fn abort_frame(reason: &str) -> Vec<u8> {
    let mut frame = header(ABORT, 0, 0, reason.len());
    frame.extend(reason.as_bytes());
    frame
}

fn header(kind: u8, group: u32, seq: u64, len: usize) -> Vec<u8> {
    Wire::default().u8(kind).u32(group).u64(seq).u64(len as u64).0
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn names(&self, ranks: &[usize]) -> String {
        let names: Vec<String> = ranks.iter().map(|&r| self.peers[r].describe()).collect();
        names.join(", ")
    }

    /// Records the end of the job (the first reason wins) and wakes every waiter.
    fn set_aborted(&self, st: &mut State, reason: String, local: bool) {
        if st.aborted.is_some() {
            return;
        }
        st.aborted = Some((reason.clone(), local));
        self.cv.notify_all();
        let grace = *self.exit_grace.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(grace), false) = (grace, local) {
            let me = self.peers[self.rank].describe();
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                eprintln!(
                    "yalis: error: {me}: the job was aborted: {reason}; this rank was still busy {} s later, exiting",
                    grace.as_secs_f32()
                );
                std::process::exit(3);
            });
        }
    }

    fn abort(&self, reason: &str) {
        {
            let mut st = self.lock();
            if st.aborted.is_some() {
                return;
            }
            self.set_aborted(&mut st, reason.to_string(), true);
        }
        let frame = abort_frame(reason);
        for w in self.writers.iter().flatten() {
            // A writer stuck on a hung peer must not hold up the others.
            if let Ok(mut s) = w.try_lock() {
                let _ = s.set_write_timeout(Some(self.timeout.min(Duration::from_secs(2))));
                let _ = s.write_all(&frame);
            }
        }
    }

    fn read_loop(&self, peer: usize, mut s: TcpStream) {
        let why = loop {
            let mut head = [0u8; HEADER];
            if let Err(e) = s.read_exact(&mut head) {
                break e;
            }
            let mut u = Unwire(&head);
            let (kind, group, seq, len) = (u.u8().unwrap(), u.u32().unwrap(), u.u64().unwrap(), u.u64().unwrap());
            if len > MAX_FRAME || !(COLLECTIVE..=BYE).contains(&kind) {
                let mut st = self.lock();
                let msg = format!(
                    "{} sent a malformed frame (kind {kind}, {len} bytes): not a yalis rank of this job, or a corrupt connection",
                    self.peers[peer].describe()
                );
                self.set_aborted(&mut st, msg, false);
                return;
            }
            let mut payload = vec![0u8; len as usize];
            if let Err(e) = s.read_exact(&mut payload) {
                break e;
            }
            let mut st = self.lock();
            match kind {
                ABORT => {
                    let reason = String::from_utf8_lossy(&payload).into_owned();
                    self.set_aborted(&mut st, reason, false);
                }
                BYE => st.left[peer] = true,
                _ => st
                    .queues
                    .entry((group, kind, peer))
                    .or_default()
                    .push_back((seq, payload)),
            }
            self.cv.notify_all();
        };
        let mut st = self.lock();
        st.closed[peer] = true;
        if !st.left[peer] && !st.closing {
            let how = match why.kind() {
                ErrorKind::UnexpectedEof => "its connection closed without a goodbye".to_string(),
                _ => format!("its connection failed ({why})"),
            };
            let msg = format!(
                "lost {}: {how}; the process died, was killed, or closed its connections",
                self.peers[peer].describe()
            );
            self.set_aborted(&mut st, msg, false);
        }
        self.cv.notify_all();
    }

    /// Writes one frame to `peer`; a failed or stalled write ends the job.
    fn send(&self, peer: usize, kind: u8, group: u32, seq: u64, payload: &[u8]) -> Result<()> {
        if let Some((reason, _)) = &self.lock().aborted {
            return Err(CommError::Aborted {
                rank: self.rank,
                reason: reason.clone(),
            });
        }
        let w = self.writers[peer].as_ref().expect("no frames to self");
        let res = {
            let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
            let mut frame = header(kind, group, seq, payload.len());
            if payload.len() <= 64 << 10 {
                frame.extend(payload);
                s.write_all(&frame)
            } else {
                s.write_all(&frame).and_then(|_| s.write_all(payload))
            }
        };
        let Err(e) = res else {
            return Ok(());
        };
        let who = self.peers[peer].describe();
        let err = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CommError::Timeout {
                rank: self.rank,
                op: "a send",
                secs: self.timeout.as_secs(),
                detail: format!("{who} has not read its data"),
            },
            _ => {
                // The peer's reader may be about to learn why (an abort frame before the close):
                // give it a moment to reach the end of that connection.
                let until = Instant::now() + self.timeout.min(Duration::from_secs(1));
                let mut st = self.lock();
                while st.aborted.is_none() && !st.closed[peer] && Instant::now() < until {
                    st = self
                        .cv
                        .wait_timeout(st, until.saturating_duration_since(Instant::now()))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                let reason = match &st.aborted {
                    Some((r, _)) => r.clone(),
                    None => format!("lost {who}: sending failed ({e})"),
                };
                return Err(self.fail_aborted(st, reason));
            }
        };
        self.abort(&err.to_string());
        Err(err)
    }

    fn fail_aborted(&self, mut st: MutexGuard<'_, State>, reason: String) -> CommError {
        self.set_aborted(&mut st, reason.clone(), false);
        CommError::Aborted {
            rank: self.rank,
            reason,
        }
    }

    /// The next frame of `kind` in `group` from `peer`, which must carry `seq`.
    fn recv(&self, peer: usize, kind: u8, group: u32, seq: u64, op: &'static str) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        let mut st = self.lock();
        loop {
            if let Some((reason, _)) = &st.aborted {
                return Err(CommError::Aborted {
                    rank: self.rank,
                    reason: reason.clone(),
                });
            }
            if let Some((got, data)) = st.queues.get_mut(&(group, kind, peer)).and_then(|q| q.pop_front()) {
                if got != seq {
                    let msg = format!(
                        "{op}: {} sent message #{got} where this rank expects #{seq}: the ranks' call sequences diverged",
                        self.peers[peer].describe()
                    );
                    drop(st);
                    self.abort(&format!("rank {}: {msg}", self.rank));
                    return Err(CommError::Invalid { rank: self.rank, msg });
                }
                return Ok(data);
            }
            if st.left[peer] || st.closed[peer] {
                let msg = format!(
                    "{op}: {} finished and left the job while this rank waits for it: the ranks' call sequences diverged",
                    self.peers[peer].describe()
                );
                return Err(CommError::Invalid { rank: self.rank, msg });
            }
            let now = Instant::now();
            if now >= deadline {
                let err = CommError::Timeout {
                    rank: self.rank,
                    op,
                    secs: self.timeout.as_secs(),
                    detail: format!("waiting for {}", self.peers[peer].describe()),
                };
                drop(st);
                self.abort(&err.to_string());
                return Err(err);
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Appends `payload` to this rank's own queue (a send to itself).
    fn loopback(&self, kind: u8, group: u32, seq: u64, payload: &[u8]) {
        let mut st = self.lock();
        st.queues
            .entry((group, kind, self.rank))
            .or_default()
            .push_back((seq, payload.to_vec()));
        self.cv.notify_all();
    }
}

/// One rank's handle on one group of a [`TcpMesh`].
pub struct TcpComm {
    mesh: Arc<TcpMesh>,
    group: u32,
    /// World ranks of the members, in group-rank order.
    members: Vec<usize>,
    rank: usize,
    collectives: AtomicU64,
    /// Per group rank: point-to-point messages sent to it / received from it.
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
}

impl TcpComm {
    fn new(mesh: &Arc<TcpMesh>, group: u32, members: Vec<usize>) -> TcpComm {
        let me = mesh.rank();
        let rank = members.iter().position(|&m| m == me).expect("a member of its groups");
        let n = members.len();
        TcpComm {
            mesh: mesh.clone(),
            group,
            members,
            rank,
            collectives: AtomicU64::new(0),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            received: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn check_peer(&self, r: usize, what: &str) -> Result<usize> {
        self.members.get(r).copied().ok_or_else(|| CommError::Invalid {
            rank: self.mesh.rank(),
            msg: format!("{what} rank {r} of a group of {}", self.members.len()),
        })
    }
}

impl HostComm for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_gather_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let sh = &self.mesh.shared;
        let seq = self.collectives.fetch_add(1, Ordering::Relaxed);
        for (i, &m) in self.members.iter().enumerate() {
            if i != self.rank {
                sh.send(m, COLLECTIVE, self.group, seq, input)?;
            }
        }
        let mut out = Vec::with_capacity(self.members.len());
        for (i, &m) in self.members.iter().enumerate() {
            out.push(if i == self.rank {
                input.to_vec()
            } else {
                sh.recv(m, COLLECTIVE, self.group, seq, "a collective")?
            });
        }
        Ok(out)
    }

    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        let peer = self.check_peer(dst, "send to")?;
        let seq = self.sent[dst].fetch_add(1, Ordering::Relaxed);
        let sh = &self.mesh.shared;
        if peer == sh.rank {
            sh.loopback(P2P, self.group, seq, data);
            return Ok(());
        }
        sh.send(peer, P2P, self.group, seq, data)
    }

    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>> {
        let peer = self.check_peer(src, "receive from")?;
        let seq = self.received[src].fetch_add(1, Ordering::Relaxed);
        self.mesh.shared.recv(peer, P2P, self.group, seq, "a receive")
    }

    fn abort(&self, reason: &str) {
        self.mesh.abort(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::{rendezvous, Bootstrap, Launcher};
    use std::net::TcpListener;

    /// A `tp x pp` job over loopback TCP, one thread per rank, each with its own mesh.
    fn run<T: Send>(
        tp: usize,
        pp: usize,
        timeout: Duration,
        f: impl Fn(usize, &Arc<TcpMesh>, RankComms) -> T + Sync,
    ) -> Vec<T> {
        let world = tp * pp;
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let f = &f;
                    s.spawn(move || {
                        let b = Bootstrap {
                            rank: r,
                            world_size: world,
                            local_rank: r,
                            node_id: None,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            launcher: Launcher::Cli,
                        };
                        let rv = rendezvous(&b, Duration::from_secs(20), Vec::new).unwrap();
                        let mesh = TcpMesh::connect(rv, timeout).unwrap();
                        let comms = mesh.rank_comms(tp, pp).unwrap();
                        f(r, &mesh, comms)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_and_p2p_in_order() {
        let out = run(2, 2, Duration::from_secs(20), |r, mesh, c| {
            for round in 0..50 {
                let mut v = vec![r as f32 + round as f32, 1.0, -(r as f32)];
                c.world.all_reduce_sum(&mut v).unwrap();
                assert_eq!(v, vec![6.0 + 4.0 * round as f32, 4.0, -6.0]);
                let mut t = vec![r as f32 * 10.0];
                c.tp.all_reduce_sum(&mut t).unwrap();
                assert_eq!(t[0], ((r / 2) * 2) as f32 * 20.0 + 10.0);
                // p2p interleaved with the collectives of the same group.
                if c.pp.rank() == 0 {
                    c.pp.send(&[round as f32, r as f32], 1).unwrap();
                }
                c.pp.barrier().unwrap();
                if c.pp.rank() == 1 {
                    let mut b = [0.0; 2];
                    c.pp.recv(&mut b, 0).unwrap();
                    assert_eq!(b, [round as f32, (r - 2) as f32]);
                }
            }
            let mut g = vec![0.0; 4];
            c.world.all_gather(&[r as f32], &mut g).unwrap();
            assert_eq!(g, vec![0.0, 1.0, 2.0, 3.0]);
            let mut ids = if r == 3 { vec![7, 8] } else { vec![0, 0] };
            c.world.broadcast_u32(&mut ids, 3).unwrap();
            assert_eq!(ids, vec![7, 8]);
            // Many sends queue up in order; a large message goes through whole.
            if c.pp.rank() == 0 {
                for k in 0..20 {
                    c.pp.send(&[k as f32], 1).unwrap();
                }
                let big: Vec<f32> = (0..300_000).map(|i| i as f32).collect();
                c.pp.send(&big, 1).unwrap();
                c.pp.send(&[5.0], 0).unwrap();
                let mut me = [0.0];
                c.pp.recv(&mut me, 0).unwrap();
                assert_eq!(me, [5.0]);
            } else {
                for k in 0..20 {
                    let mut b = [0.0];
                    c.pp.recv(&mut b, 0).unwrap();
                    assert_eq!(b[0], k as f32);
                }
                let mut big = vec![0.0; 300_000];
                c.pp.recv(&mut big, 0).unwrap();
                assert!(big.iter().enumerate().all(|(i, &x)| x == i as f32));
            }
            // A second layout on the same mesh.
            let c2 = mesh.rank_comms(4, 1).unwrap();
            let mut v = vec![1.0];
            c2.tp.all_reduce_sum(&mut v).unwrap();
            assert_eq!(v, [4.0]);
            mesh.finish().unwrap();
            r
        });
        assert_eq!(out, vec![0, 1, 2, 3]);
    }

    #[test]
    fn abort_reaches_every_rank_with_its_reason() {
        let out = run(3, 1, Duration::from_secs(30), |r, mesh, c| {
            if r == 1 {
                c.world.abort("rank 1 failed: out of memory");
                return String::new();
            }
            let mut v = vec![1.0];
            let e = c.world.all_reduce_sum(&mut v).unwrap_err();
            assert!(e.is_secondary());
            assert_eq!(mesh.aborted().map(|a| a.1), Some(false));
            e.to_string()
        });
        for r in [0, 2] {
            assert!(
                out[r].contains(&format!("rank {r}: the job was aborted: rank 1 failed: out of memory")),
                "{}",
                out[r]
            );
        }
    }

    #[test]
    fn a_peer_that_drops_its_connections_is_named() {
        let t0 = Instant::now();
        let out = run(2, 2, Duration::from_secs(30), |r, mesh, c| {
            if r == 2 {
                drop(c);
                return String::new(); // the last handle on the mesh goes: every socket closes
            }
            let _ = mesh;
            let mut v = vec![1.0];
            c.world.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "survivors waited for the timeout"
        );
        for r in [0, 1, 3] {
            let e = &out[r];
            assert!(e.contains("lost rank 2 on") && e.contains("without a goodbye"), "{e}");
        }
    }

    #[test]
    fn a_hung_peer_times_out_and_the_others_fail_fast() {
        let t0 = Instant::now();
        let out = run(3, 1, Duration::from_millis(800), |r, _mesh, c| {
            if r == 2 {
                std::thread::sleep(Duration::from_millis(1600));
                return c.world.barrier().unwrap_err().to_string();
            }
            if r == 1 {
                // Not waiting on rank 2 yet: rank 0's timeout reaches it as an abort.
                std::thread::sleep(Duration::from_millis(200));
            }
            c.world.barrier().unwrap_err().to_string()
        });
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(
            out[0].contains("timed out after 0 s") || out[0].contains("timed out"),
            "{}",
            out[0]
        );
        assert!(
            out[0].contains("waiting for rank") && out[0].contains("--comm-timeout"),
            "{}",
            out[0]
        );
        assert!(out[1].contains("timed out"), "{}", out[1]);
        assert!(out[2].contains("aborted"), "{}", out[2]);
    }

    #[test]
    fn a_peer_that_left_early_is_named() {
        let out = run(2, 1, Duration::from_secs(20), |r, mesh, c| {
            if r == 0 {
                c.world.barrier().unwrap();
                return c.world.barrier().unwrap_err().to_string();
            }
            c.world.barrier().unwrap();
            mesh.finish().unwrap_err().to_string()
        });
        assert!(
            out[0].contains("rank 1 on") && out[0].contains("left the job"),
            "{}",
            out[0]
        );
        assert!(out[1].contains("lost rank 0 on"), "{}", out[1]);
    }
}
