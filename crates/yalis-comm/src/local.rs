//! Ranks as threads of one process: a hub holding every group's rendezvous state under one
//! mutex, with a job-wide abort flag.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{CommError, HostComm, RankComms, Result};

struct Group {
    /// World ranks of the members, in group-rank order.
    members: Vec<usize>,
    generation: u64,
    arrived: usize,
    slots: Vec<Vec<u8>>,
    /// The last completed all-gather; a member reads it after its generation moved on.
    result: Arc<Vec<Vec<u8>>>,
    mailboxes: HashMap<(usize, usize), VecDeque<Vec<u8>>>,
}

struct HubState {
    aborted: Option<String>,
    groups: Vec<Group>,
}

struct Hub {
    state: Mutex<HubState>,
    cv: Condvar,
    timeout: Duration,
}

/// One rank's handle on one group.
pub struct LocalComm {
    hub: Arc<Hub>,
    group: usize,
    rank: usize,
    size: usize,
    world_rank: usize,
}

/// Ends a job of threads from outside its ranks (a rank that failed before it could speak).
#[derive(Clone)]
pub struct JobAbort(Arc<Hub>);

impl JobAbort {
    pub fn abort(&self, reason: &str) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.aborted.is_none() {
            st.aborted = Some(reason.to_string());
        }
        self.0.cv.notify_all();
    }
}

/// Communicators for a `tp x pp` job of threads, indexed by world rank
/// (`rank = pp_stage * tp + tp_rank`), and a handle that aborts the job.
pub fn local_job(tp: usize, pp: usize, timeout: Duration) -> (Vec<RankComms>, JobAbort) {
    let world = tp * pp;
    let mut groups = vec![(0..world).collect::<Vec<_>>()];
    groups.extend((0..pp).map(|s| (s * tp..(s + 1) * tp).collect()));
    groups.extend((0..tp).map(|t| (0..pp).map(|s| s * tp + t).collect()));
    let hub = Arc::new(Hub {
        state: Mutex::new(HubState {
            aborted: None,
            groups: groups
                .into_iter()
                .map(|members| Group {
                    slots: vec![Vec::new(); members.len()],
                    members,
                    generation: 0,
                    arrived: 0,
                    result: Arc::new(Vec::new()),
                    mailboxes: HashMap::new(),
                })
                .collect(),
        }),
        cv: Condvar::new(),
        timeout,
    });
    let comm = |group: usize, rank: usize, size: usize, world_rank: usize| -> Box<dyn HostComm> {
        Box::new(LocalComm {
            hub: hub.clone(),
            group,
            rank,
            size,
            world_rank,
        })
    };
    let comms = (0..world)
        .map(|r| {
            let (stage, t) = (r / tp, r % tp);
            RankComms {
                world: comm(0, r, world, r),
                tp: comm(1 + stage, t, tp, r),
                pp: comm(1 + pp + t, stage, pp, r),
            }
        })
        .collect();
    (comms, JobAbort(hub))
}

impl LocalComm {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A rank that panicked while holding the lock leaves plain data behind; keep going so
        // the others can report the abort instead of a poisoned mutex.
        self.hub.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on the hub until `done` holds, the job aborts, or the timeout passes.
    fn wait_until<'a, T>(
        &self,
        mut st: MutexGuard<'a, HubState>,
        op: &'static str,
        mut done: impl FnMut(&mut HubState) -> Option<T>,
        detail: impl Fn(&HubState) -> String,
    ) -> Result<T> {
        let deadline = Instant::now() + self.hub.timeout;
        loop {
            if let Some(reason) = &st.aborted {
                return Err(CommError::Aborted {
                    rank: self.world_rank,
                    reason: reason.clone(),
                });
            }
            if let Some(v) = done(&mut st) {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                let err = CommError::Timeout {
                    rank: self.world_rank,
                    op,
                    secs: self.hub.timeout.as_secs(),
                    detail: detail(&st),
                };
                st.aborted = Some(err.to_string());
                self.hub.cv.notify_all();
                return Err(err);
            }
            st = self
                .hub
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl HostComm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut st = self.lock();
        if let Some(reason) = &st.aborted {
            return Err(CommError::Aborted {
                rank: self.world_rank,
                reason: reason.clone(),
            });
        }
        let g = &mut st.groups[self.group];
        let my_gen = g.generation;
        g.slots[self.rank] = input.to_vec();
        g.arrived += 1;
        if g.arrived == self.size {
            g.result = Arc::new(std::mem::replace(&mut g.slots, vec![Vec::new(); self.size]));
            g.arrived = 0;
            g.generation += 1;
            self.hub.cv.notify_all();
            return Ok(g.result.as_ref().clone());
        }
        let group = self.group;
        let result = self.wait_until(
            st,
            "a collective",
            |st| {
                let g = &st.groups[group];
                (g.generation != my_gen).then(|| g.result.clone())
            },
            |st| {
                let g = &st.groups[group];
                format!(
                    "{} of {} ranks (world ranks {:?}) arrived",
                    g.arrived,
                    g.members.len(),
                    g.members
                )
            },
        )?;
        Ok(result.as_ref().clone())
    }

    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        if dst >= self.size {
            return Err(CommError::Invalid {
                rank: self.world_rank,
                msg: format!("send to rank {dst} of a group of {}", self.size),
            });
        }
        let mut st = self.lock();
        if let Some(reason) = &st.aborted {
            return Err(CommError::Aborted {
                rank: self.world_rank,
                reason: reason.clone(),
            });
        }
        st.groups[self.group]
            .mailboxes
            .entry((self.rank, dst))
            .or_default()
            .push_back(data.to_vec());
        self.hub.cv.notify_all();
        Ok(())
    }

    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>> {
        if src >= self.size {
            return Err(CommError::Invalid {
                rank: self.world_rank,
                msg: format!("recv from rank {src} of a group of {}", self.size),
            });
        }
        let (group, key) = (self.group, (src, self.rank));
        let st = self.lock();
        self.wait_until(
            st,
            "a receive",
            |st| st.groups[group].mailboxes.get_mut(&key).and_then(|q| q.pop_front()),
            |st| format!("waiting for world rank {}", st.groups[group].members[src]),
        )
    }

    fn abort(&self, reason: &str) {
        JobAbort(self.hub.clone()).abort(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn run<T: Send + 'static>(
        tp: usize,
        pp: usize,
        timeout: Duration,
        f: impl Fn(usize, RankComms) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = local_job(tp, pp, timeout)
            .0
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = f.clone();
                thread::spawn(move || f(r, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_gather_broadcast_and_p2p() {
        let out = run(2, 2, Duration::from_secs(20), |r, c| {
            for round in 0..50 {
                let mut v = vec![r as f32 + round as f32, 1.0, -(r as f32)];
                c.world.all_reduce_sum(&mut v).unwrap();
                assert_eq!(v, vec![6.0 + 4.0 * round as f32, 4.0, -6.0]);
                let mut t = vec![r as f32 * 10.0];
                c.tp.all_reduce_sum(&mut t).unwrap();
                let stage = r / 2;
                assert_eq!(t[0], (stage * 2) as f32 * 20.0 + 10.0);
            }
            let mut g = vec![0.0; 4];
            c.world.all_gather(&[r as f32], &mut g).unwrap();
            assert_eq!(g, vec![0.0, 1.0, 2.0, 3.0]);
            let mut ids = if r == 3 { vec![7, 8] } else { vec![0, 0] };
            c.world.broadcast_u32(&mut ids, 3).unwrap();
            assert_eq!(ids, vec![7, 8]);
            // PP: stage 0 sends to stage 1 along each TP rank.
            if c.pp.rank() == 0 {
                for k in 0..5 {
                    c.pp.send(&[r as f32, k as f32], 1).unwrap();
                }
            } else {
                for k in 0..5 {
                    let mut b = [0.0; 2];
                    c.pp.recv(&mut b, 0).unwrap();
                    assert_eq!(b, [(r - 2) as f32, k as f32]);
                }
            }
            c.world.barrier().unwrap();
            r
        });
        assert_eq!(out, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_failed_rank_aborts_the_others() {
        let out = run(3, 1, Duration::from_secs(30), |r, c| {
            if r == 1 {
                c.world.abort("rank 1 failed: out of memory");
                return String::new();
            }
            let mut v = vec![1.0];
            c.world.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 1 failed: out of memory"), "{}", out[0]);
        assert!(out[2].contains("aborted"), "{}", out[2]);
    }

    #[test]
    fn a_hung_rank_times_out_with_a_message() {
        let out = run(2, 1, Duration::from_millis(300), |r, c| {
            if r == 1 {
                thread::sleep(Duration::from_millis(1500));
                return c.world.barrier().unwrap_err().to_string();
            }
            c.world.barrier().unwrap_err().to_string()
        });
        assert!(
            out[0].contains("timed out") && out[0].contains("1 of 2 ranks"),
            "{}",
            out[0]
        );
        assert!(out[1].contains("aborted") || out[1].contains("timed out"), "{}", out[1]);
    }
}
