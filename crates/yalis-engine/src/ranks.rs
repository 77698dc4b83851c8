//! Ranks as threads of this process: one per (PP stage, TP rank), each with its own backend and
//! shards, talking through the local communicators.

use std::time::Duration;

use yalis_comm::{local_job, RankComms};
use yalis_core::{ParallelPlan, RankPlan};

use crate::{Error, Result};

/// Runs `f` once per rank on its own thread and returns the results in rank order. The first
/// rank to fail (error or panic) aborts the others, whose communicator calls then fail; its
/// error is the one returned, naming the rank and host.
pub fn run_threads<R: Send>(
    plan: &ParallelPlan,
    timeout: Duration,
    f: impl Fn(&RankPlan, RankComms) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let (comms, abort) = local_job(plan.tp, plan.pp, timeout);
    let host = yalis_comm::hostname();
    let results: Vec<std::result::Result<R, (bool, Error)>> = std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .ranks
            .iter()
            .zip(comms)
            .map(|(rp, c)| {
                let (f, abort, host) = (&f, abort.clone(), host.clone());
                std::thread::Builder::new()
                    .name(format!("rank{}", rp.rank))
                    .spawn_scoped(s, move || run_rank(rp.rank, &host, |m| abort.abort(m), || f(rp, c)))
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank threads catch their panics"))
            .collect()
    });
    // Report the rank that failed first, not the ranks that were aborted because of it.
    let mut secondary = None;
    let mut ok = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err((false, e)) => return Err(e),
            Err((true, e)) => {
                secondary.get_or_insert(e);
            }
        }
    }
    secondary.map_or(Ok(ok), Err)
}

/// Runs one rank's work. A panic becomes an error; a first failure (not one a rank sees because
/// another rank aborted the job) aborts the job with a message naming the rank and host. The
/// error comes back as `Error::Rank`, with whether it was secondary.
pub fn run_rank<R>(
    rank: usize,
    host: &str,
    abort: impl FnOnce(&str),
    f: impl FnOnce() -> Result<R>,
) -> std::result::Result<R, (bool, Error)> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(Error::Invalid(format!("panicked: {}", panic_message(&*p)))));
    r.map_err(|e| {
        let secondary = matches!(&e, Error::Comm(c) if c.is_secondary());
        if !secondary {
            abort(&format!("rank {rank} on {host} failed: {e}"));
        }
        (
            secondary,
            Error::Rank {
                rank,
                host: host.to_string(),
                msg: e.to_string(),
            },
        )
    })
}

/// The text of a panic's payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
