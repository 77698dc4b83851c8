//! NCCL communicators of one rank (NCCL 2.28 through cudarc, loaded at run time): the world,
//! its TP group (same PP stage) and its PP group (same TP rank), split from the world so one
//! unique id sets all three up. Collectives are enqueued on the backend's stream, so they are
//! captured into the decode CUDA graph with everything else.

use std::ffi::{c_char, c_void};

use cudarc::driver::sys;
use cudarc::nccl::{result as nccl, sys as nccl_sys};
use yalis_core::RankPlan;
use yalis_engine::{Error, Result};

use crate::nvrar::ElemType;

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Invalid(format!("nccl: {what} failed: {e:?}"))
}

/// A new unique id (rank 0 makes it; every rank of the world needs the same 128 bytes).
pub fn unique_id() -> Result<Vec<u8>> {
    let id = std::panic::catch_unwind(nccl::get_uniqueid)
        .map_err(|_| {
            Error::Invalid("nccl: libnccl.so could not be loaded (put its directory on LD_LIBRARY_PATH)".into())
        })?
        .map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

pub struct NcclGroups {
    world: nccl_sys::ncclComm_t,
    tp: nccl_sys::ncclComm_t,
    pp: nccl_sys::ncclComm_t,
}

// SAFETY: the communicators are used by the one thread that owns the backend at a time.
unsafe impl Send for NcclGroups {}

impl NcclGroups {
    /// Joins the world of `plan.tp * plan.pp` ranks with `id` and splits the TP and PP groups.
    /// The rank's GPU context must be current on this thread.
    pub fn new(id: &[u8], plan: &RankPlan) -> Result<Self> {
        let mut uid = nccl_sys::ncclUniqueId {
            internal: [0 as c_char; 128],
        };
        if id.len() != 128 {
            return Err(Error::Invalid(format!(
                "nccl: a unique id has 128 bytes, got {}",
                id.len()
            )));
        }
        for (d, &s) in uid.internal.iter_mut().zip(id) {
            *d = s as c_char;
        }
        let world_size = (plan.tp * plan.pp) as i32;
        let mut world = std::ptr::null_mut();
        // SAFETY: `world` receives a new communicator; every rank passes the same id and size.
        unsafe { nccl::comm_init_rank(&mut world, world_size, uid, plan.rank as i32) }
            .map_err(|e| nccl_err(&format!("ncclCommInitRank (rank {} of {world_size})", plan.rank), e))?;
        let split = |color: usize, key: usize, what: &str| -> Result<nccl_sys::ncclComm_t> {
            let mut c = std::ptr::null_mut();
            // SAFETY: every rank of `world` calls the split in the same order.
            unsafe { nccl_sys::ncclCommSplit(world, color as i32, key as i32, &mut c, std::ptr::null_mut()) }
                .result()
                .map_err(|e| nccl_err(&format!("ncclCommSplit ({what})"), e))?;
            Ok(c)
        };
        let tp = split(plan.pp_stage, plan.tp_rank, "TP group")?;
        let pp = split(plan.tp_rank, plan.pp_stage, "PP group")?;
        Ok(NcclGroups { world, tp, pp })
    }

    fn stream(s: sys::CUstream) -> nccl_sys::cudaStream_t {
        s as nccl_sys::cudaStream_t
    }

    /// In-place sum over the TP group of `n` bf16 elements at `ptr`.
    pub fn all_reduce_bf16(&self, ptr: sys::CUdeviceptr, n: usize, stream: sys::CUstream) -> Result<()> {
        self.all_reduce(ptr, ptr, n, ElemType::Bf16, stream)
    }

    /// Sum over the TP group of `n` elements of `ty` at `input` into `out` (may be the same).
    pub fn all_reduce(
        &self,
        input: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        n: usize,
        ty: ElemType,
        stream: sys::CUstream,
    ) -> Result<()> {
        let dt = match ty {
            ElemType::Bf16 => nccl_sys::ncclDataType_t::ncclBfloat16,
            ElemType::F16 => nccl_sys::ncclDataType_t::ncclFloat16,
            ElemType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
        };
        // SAFETY: `input` and `out` hold `n` elements of `ty` on this rank's GPU.
        unsafe {
            nccl::all_reduce(
                input as *const c_void,
                out as *mut c_void,
                n,
                dt,
                nccl_sys::ncclRedOp_t::ncclSum,
                self.tp,
                Self::stream(stream),
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_err("ncclAllReduce", e))
    }

    /// `out` (`[tp, n]` f32) = every TP rank's `n` f32 elements at `src`, in rank order.
    pub fn all_gather_f32(
        &self,
        src: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        n: usize,
        stream: sys::CUstream,
    ) -> Result<()> {
        // SAFETY: `src` holds n f32, `out` tp * n f32, both on this rank's GPU.
        unsafe {
            nccl::all_gather(
                src as *const c_void,
                out as *mut c_void,
                n,
                nccl_sys::ncclDataType_t::ncclFloat32,
                self.tp,
                Self::stream(stream),
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_err("ncclAllGather", e))
    }

    /// Sends `n` bf16 elements to PP stage `peer` / receives them from it.
    pub fn send_bf16(&self, ptr: sys::CUdeviceptr, n: usize, peer: usize, stream: sys::CUstream) -> Result<()> {
        // SAFETY: `ptr` holds n bf16 elements; the peer posts the matching receive.
        unsafe {
            nccl::send(
                ptr as *const c_void,
                n,
                nccl_sys::ncclDataType_t::ncclBfloat16,
                peer as i32,
                self.pp,
                Self::stream(stream),
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_err(&format!("ncclSend to stage {peer}"), e))
    }

    pub fn recv_bf16(&self, ptr: sys::CUdeviceptr, n: usize, peer: usize, stream: sys::CUstream) -> Result<()> {
        // SAFETY: `ptr` has room for n bf16 elements; the peer posts the matching send.
        unsafe {
            nccl::recv(
                ptr as *mut c_void,
                n,
                nccl_sys::ncclDataType_t::ncclBfloat16,
                peer as i32,
                self.pp,
                Self::stream(stream),
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_err(&format!("ncclRecv from stage {peer}"), e))
    }
}

impl Drop for NcclGroups {
    fn drop(&mut self) {
        for c in [self.tp, self.pp, self.world] {
            // SAFETY: each communicator was created in `new` and is destroyed once.
            unsafe {
                let _ = nccl::comm_destroy(c);
            }
        }
    }
}
