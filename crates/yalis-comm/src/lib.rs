//! Rank bootstrap and host communicators.
//!
//! [`HostComm`] is the communicator seam for host memory: a few byte-level primitives that a
//! transport implements (ranks as threads in `local`, ranks as processes over TCP in `tcp`),
//! and the typed collectives the engine uses, built on them. Every wait has a timeout, and a
//! failing rank aborts the whole job, so no rank ever hangs silently. `bootstrap` finds this
//! process's rank (Slurm, Open MPI, torchrun-style variables, the CLI; MPI itself with the `mpi`
//! feature) and runs the rendezvous.

pub mod bootstrap;
mod local;
#[cfg(feature = "mpi")]
mod mpi;
mod tcp;

pub use bootstrap::{hostname, rendezvous, Bootstrap, Explicit, Launcher, Peer, Rendezvous};
pub use local::{local_job, JobAbort, LocalComm};
pub use tcp::{TcpComm, TcpMesh};

use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: the job was aborted: {reason}")]
    Aborted { rank: usize, reason: String },
    #[error(
        "rank {rank}: timed out after {secs} s in {op}; {detail} (raise --comm-timeout if this is a slow but live job)"
    )]
    Timeout {
        rank: usize,
        op: &'static str,
        secs: u64,
        detail: String,
    },
    #[error("rank {rank}: {msg}")]
    Invalid { rank: usize, msg: String },
    /// Finding this rank, the rendezvous or the connections; the message names rank and host.
    #[error("{0}")]
    Bootstrap(String),
}

pub type Result<T> = std::result::Result<T, CommError>;

/// A group of ranks exchanging host memory. Ranks are numbered within the group.
pub trait HostComm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's `input`, in rank order.
    fn all_gather_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Point-to-point, in order per (sender, receiver) pair.
    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()>;
    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>>;
    /// Ends the whole job: every rank's pending and future calls fail with `reason`.
    fn abort(&self, reason: &str);

    /// In-place sum. Each rank adds the contributions in rank order, so every rank ends with
    /// bit-identical values.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let parts = self.all_gather_bytes(&f32_bytes(buf))?;
        check_lengths(self.rank(), &parts, buf.len() * 4, "all_reduce_sum")?;
        buf.fill(0.0);
        for p in &parts {
            for (b, x) in buf.iter_mut().zip(p.chunks_exact(4)) {
                *b += f32::from_le_bytes(x.try_into().unwrap());
            }
        }
        Ok(())
    }

    /// `output` = every rank's `input` concatenated in rank order (equal lengths).
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        if output.len() != input.len() * self.size() {
            return Err(CommError::Invalid {
                rank: self.rank(),
                msg: format!(
                    "all_gather: output has {} elements, expected {} x {}",
                    output.len(),
                    self.size(),
                    input.len()
                ),
            });
        }
        let parts = self.all_gather_bytes(&f32_bytes(input))?;
        check_lengths(self.rank(), &parts, input.len() * 4, "all_gather")?;
        for (chunk, p) in output.chunks_exact_mut(input.len().max(1)).zip(&parts) {
            for (o, x) in chunk.iter_mut().zip(p.chunks_exact(4)) {
                *o = f32::from_le_bytes(x.try_into().unwrap());
            }
        }
        Ok(())
    }

    /// Every rank ends with `root`'s `buf`.
    fn broadcast_u32(&self, buf: &mut [u32], root: usize) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let mine: Vec<u8> = if self.rank() == root {
            buf.iter().flat_map(|x| x.to_le_bytes()).collect()
        } else {
            Vec::new()
        };
        let parts = self.all_gather_bytes(&mine)?;
        let src = &parts[root];
        if src.len() != buf.len() * 4 {
            return Err(CommError::Invalid {
                rank: self.rank(),
                msg: format!("broadcast: root sent {} bytes, expected {}", src.len(), buf.len() * 4),
            });
        }
        for (b, x) in buf.iter_mut().zip(src.chunks_exact(4)) {
            *b = u32::from_le_bytes(x.try_into().unwrap());
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.all_gather_bytes(&[]).map(|_| ())
    }

    fn send(&self, buf: &[f32], dst: usize) -> Result<()> {
        self.send_bytes(&f32_bytes(buf), dst)
    }

    fn recv(&self, buf: &mut [f32], src: usize) -> Result<()> {
        let data = self.recv_bytes(src)?;
        check_lengths(self.rank(), std::slice::from_ref(&data), buf.len() * 4, "recv")?;
        for (b, x) in buf.iter_mut().zip(data.chunks_exact(4)) {
            *b = f32::from_le_bytes(x.try_into().unwrap());
        }
        Ok(())
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn check_lengths(rank: usize, parts: &[Vec<u8>], want: usize, op: &str) -> Result<()> {
    if let Some((i, p)) = parts.iter().enumerate().find(|(_, p)| p.len() != want) {
        return Err(CommError::Invalid {
            rank,
            msg: format!("{op}: peer {i} sent {} bytes, expected {want}", p.len()),
        });
    }
    Ok(())
}

/// The communicators of one rank: the whole job, its TP group (same PP stage) and its PP group
/// (same TP rank, one member per stage).
pub struct RankComms {
    pub world: Box<dyn HostComm>,
    pub tp: Box<dyn HostComm>,
    pub pp: Box<dyn HostComm>,
}

impl CommError {
    /// True for the errors a rank sees because another rank failed first.
    pub fn is_secondary(&self) -> bool {
        matches!(self, CommError::Aborted { .. })
    }
}

/// How long any collective or receive may wait before the job is declared hung.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
