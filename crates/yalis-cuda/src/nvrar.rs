//! NVRAR, the hierarchical recursive-doubling all-reduce of kernels/nvrar.cu, on NVSHMEM 3.4.5.
//!
//! One [`Nvrar`] per process (NVSHMEM has one PE per process): it joins the NVSHMEM world of the
//! job, allocates the kernel's LL buffer on the symmetric heap, registers the `nvrar` module with
//! `nvshmemx_cumodule_init`, and works out, for its group (the TP group: PEs listed in group
//! order), the node structure (`gpus_per_node` consecutive group members form a node, real or
//! virtual), the NVLink address of every peer of its node and of each recursive-doubling partner
//! (or none: the kernel then puts through NVSHMEM). A call is one kernel launch on the caller's
//! stream with all state on the device, so it can be captured in a CUDA graph.

use std::ffi::{c_void, CString};
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{result as drv, sys, CudaContext};
use nvshmem_sys::{Nvshmem, Session, SymmetricBuffer, UniqueId};
use yalis_engine::{Error, Result};

const MAX_G: usize = 8;
const MAX_STEPS: usize = 16;
/// kernels/nvrar.cu's NVRAR_FLAG_BLOCKS: the most blocks a call may use.
const FLAG_BLOCKS: usize = 256;
/// kernels/nvrar.cu's NVRAR_PHASES: flag sets per parity (reduce-scatter, all-gather, one-shot).
const PHASES: usize = 3;

/// The kernel's parameter block; must match `struct NvrarArgs` in kernels/nvrar.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct NvrarArgs {
    input: u64,
    out: u64,
    n: u64,
    ll: u64,
    slot_lines: u64,
    local_peer: [u64; MAX_G],
    rd_peer: [u64; MAX_STEPS],
    rd_pe: [i32; MAX_STEPS],
    fold_peer: u64,
    fold_pe: i32,
    g_size: i32,
    g: i32,
    n_nodes: i32,
    node: i32,
    oneshot: i32,
    /// 1: the plain paths move 16-byte packs (one node only).
    wide: i32,
    // 4 bytes of padding here (C's as well): `ctrl` is 8-byte aligned.
    ctrl: u64,
    timeout_ns: u64,
    os_lines: u64,
}

const _: () = assert!(std::mem::size_of::<NvrarArgs>() == 360);
const _: () = assert!(std::mem::offset_of!(NvrarArgs, wide) == 328 && std::mem::offset_of!(NvrarArgs, ctrl) == 336);

/// Element types the kernel sums (in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    Bf16,
    F16,
    F32,
}

impl ElemType {
    pub fn bytes(self) -> usize {
        match self {
            ElemType::Bf16 | ElemType::F16 => 2,
            ElemType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ElemType::Bf16 => "bf16",
            ElemType::F16 => "f16",
            ElemType::F32 => "f32",
        }
    }
}

/// NVRAR's tunables and limits.
#[derive(Clone, Debug)]
pub struct NvrarConfig {
    /// GPUs per node of the hierarchy (consecutive group members); smaller than the real node
    /// makes virtual nodes on one machine. 0: the whole group is one node.
    pub gpus_per_node: usize,
    /// Threads per block (a multiple of 32, at most 512: the kernels keep 8 peers' lines in registers).
    pub threads: usize,
    /// The most blocks a call uses (capped at the GPU's SM count: one wave).
    pub max_blocks: usize,
    /// The largest message of one launch; longer ones run as several calls. Sizes the LL buffer.
    pub max_bytes: usize,
    /// With one node: messages up to this size go one-shot (every GPU sends all of its input to
    /// every other and sums all of them) instead of reduce-scatter + all-gather. 0: never; None:
    /// the measured default (4 MiB for 2 GPUs, whose one-shot moves no more bytes than two-shot;
    /// 512 KiB for more).
    pub oneshot_max_bytes: Option<usize>,
    /// One-shot messages up to this size travel as LL lines (no fence or block barrier, twice
    /// the bytes); larger ones as plain data with a flag per block.
    pub oneshot_ll_max_bytes: usize,
    /// Send to recursive-doubling partners through NVSHMEM puts even when they have an NVLink
    /// address (exercises the other-node path on one machine).
    pub force_put: bool,
    /// With one node: the plain paths (plain one-shot, reduce-scatter, all-gather) move 16-byte
    /// packs, one per thread, instead of 8-byte ones (`--nvrar-pack-bytes 16`). Ignored across
    /// nodes (the recursive doubling works on the shard's 8-byte packs).
    pub wide_packs: bool,
    /// How long a kernel waits for a peer's data before it traps.
    pub timeout: Duration,
    /// The epoch the device counter starts from (the first call runs epoch + 1). 0 in use; a
    /// value near 2^32 makes the wrap-around (which skips epoch 0, the flag of never-written
    /// lines) happen within a short test (`--nvrar-start-epoch`). Every PE must pass the same.
    pub start_epoch: u32,
}

impl Default for NvrarConfig {
    fn default() -> Self {
        NvrarConfig {
            gpus_per_node: 0,
            threads: 512,
            max_blocks: 128,
            max_bytes: 16 << 20,
            oneshot_max_bytes: None,
            oneshot_ll_max_bytes: 64 << 10,
            force_put: false,
            wide_packs: true,
            timeout: Duration::from_secs(60),
            start_epoch: 0,
        }
    }
}

/// Where this PE sits in the hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// GPUs per node, this GPU's index in its node, nodes, this GPU's node.
    pub g_size: usize,
    pub g: usize,
    pub nodes: usize,
    pub node: usize,
    /// Group indices (not PEs) of the node's GPUs, of the partner at each recursive-doubling
    /// step, and of the fold partner (nodes beyond the largest power of two pair with node - N2).
    pub node_members: Vec<usize>,
    pub rd_partners: Vec<usize>,
    pub fold_partner: Option<usize>,
}

impl Layout {
    /// The hierarchy of group member `index` of `size`, with `gpus_per_node` per node (0: one node).
    pub fn new(index: usize, size: usize, gpus_per_node: usize) -> Result<Layout> {
        let g_size = if gpus_per_node == 0 { size } else { gpus_per_node };
        if size == 0 || index >= size {
            return Err(Error::Invalid(format!("nvrar: member {index} of a group of {size}")));
        }
        if !size.is_multiple_of(g_size) {
            return Err(Error::Invalid(format!(
                "nvrar: --gpus-per-node {g_size} does not divide the group of {size} GPUs; pick a divisor of {size}"
            )));
        }
        if g_size > MAX_G {
            return Err(Error::Invalid(format!(
                "nvrar: {g_size} GPUs per node; at most {MAX_G} are supported (set --gpus-per-node)"
            )));
        }
        let (nodes, node, g) = (size / g_size, index / g_size, index % g_size);
        let steps = nodes.ilog2() as usize;
        if steps > MAX_STEPS {
            return Err(Error::Invalid(format!(
                "nvrar: {nodes} nodes; at most 2^{MAX_STEPS} are supported"
            )));
        }
        let n2 = 1 << steps;
        let at = |n: usize| n * g_size + g;
        Ok(Layout {
            g_size,
            g,
            nodes,
            node,
            node_members: (0..g_size).map(|i| node * g_size + i).collect(),
            rd_partners: if node < n2 {
                (0..steps).map(|s| at(node ^ (1 << s))).collect()
            } else {
                vec![]
            },
            fold_partner: if node >= n2 {
                Some(at(node - n2))
            } else if node + n2 < nodes {
                Some(at(node + n2))
            } else {
                None
            },
        })
    }

    fn steps(&self) -> usize {
        self.nodes.ilog2() as usize
    }

    /// Slots per parity of the LL buffer (kernels/nvrar.cu: RS G, RD L, fold 2, AG G, stage L + 2).
    fn slots(&self) -> usize {
        2 * self.g_size + 2 * self.steps() + 4
    }
}

/// Lines (16 bytes) per main slot: one per 8-byte pack of a shard of the largest launch. Plain
/// phases store 8-byte packs (index < S) or 16-byte ones (index < SW <= S) there.
fn slot_lines(max_bytes: usize, g_size: usize) -> usize {
    max_bytes.div_ceil(8).div_ceil(g_size)
}

/// Lines per one-shot slot: one per 8-byte pack of the largest one-shot message.
fn os_lines(oneshot_max: usize) -> usize {
    oneshot_max.div_ceil(8)
}

/// How one launch runs: the kernel's `oneshot` (0 two-shot, 1 LL one-shot, 2 plain one-shot) and
/// `wide`, and its grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Launch {
    oneshot: i32,
    wide: bool,
    blocks: usize,
}

impl Launch {
    /// A message of `bytes` (> 0): one pack per thread (of the shard, or of the whole message
    /// one-shot), at most `blocks_cap` blocks. Every member of the group plans the same launch
    /// (the same configuration and sizes), so their grids and block flags match.
    fn plan(bytes: usize, cfg: &NvrarConfig, layout: &Layout, oneshot_max: usize, blocks_cap: usize) -> Launch {
        let oneshot = match bytes {
            b if b > oneshot_max => 0,
            b if b <= cfg.oneshot_ll_max_bytes => 1,
            _ => 2,
        };
        // 16-byte packs only where the kernel takes them: the plain paths of one node.
        let wide = cfg.wide_packs && layout.nodes == 1 && oneshot != 1;
        let packs = bytes.div_ceil(if wide { 16 } else { 8 });
        let per_gpu = if oneshot != 0 {
            packs
        } else {
            packs.div_ceil(layout.g_size)
        };
        Launch {
            oneshot,
            wide,
            blocks: per_gpu.div_ceil(cfg.threads).clamp(1, blocks_cap),
        }
    }
}

/// The NVRAR communicator of this process.
pub struct Nvrar {
    // Field order is drop order: the module is unregistered, then the buffer freed, then the
    // session (which the buffer also holds) finalised.
    module: sys::CUmodule,
    funcs: [sys::CUfunction; 3],
    ll: SymmetricBuffer,
    ctrl: sys::CUdeviceptr,
    args: NvrarArgs,
    layout: Layout,
    blocks_cap: usize,
    /// Messages up to this many bytes go one-shot (0: none).
    oneshot_max: usize,
    cfg: NvrarConfig,
    session: Session,
    ctx: Arc<CudaContext>,
}

// SAFETY: used by the one thread that owns the backend at a time, with its context current.
unsafe impl Send for Nvrar {}

fn cu(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Invalid(format!("nvrar: {what} failed: {e:?}"))
}

fn nv(e: nvshmem_sys::Error) -> Error {
    Error::Invalid(format!("nvrar: {e}"))
}

/// Loads NVSHMEM and makes rank 0's unique id (other ranks call [`Nvrar::new`] with it).
pub fn unique_id() -> Result<UniqueId> {
    Nvshmem::load().and_then(|n| n.unique_id()).map_err(nv)
}

impl Nvrar {
    /// Joins the NVSHMEM world (this process is PE `rank` of `world`, collective with every rank
    /// of the job) and sets NVRAR up for `group`, the PEs of this rank's all-reduce group in
    /// group order. `ctx` is the rank's GPU, current on this thread.
    pub fn new(
        ctx: &Arc<CudaContext>,
        id: &UniqueId,
        rank: usize,
        world: usize,
        group: &[usize],
        cfg: NvrarConfig,
    ) -> Result<Nvrar> {
        let index = group
            .iter()
            .position(|&pe| pe == rank)
            .ok_or_else(|| Error::Invalid(format!("nvrar: rank {rank} is not in its group {group:?}")))?;
        let layout = Layout::new(index, group.len(), cfg.gpus_per_node)?;
        if cfg.threads == 0 || !cfg.threads.is_multiple_of(32) || cfg.threads > 512 {
            return Err(Error::Invalid(format!(
                "nvrar: {} threads per block; use a multiple of 32 up to 512",
                cfg.threads
            )));
        }
        if cfg.max_blocks == 0 {
            return Err(Error::Invalid("nvrar: max blocks must be at least 1".into()));
        }
        ctx.bind_to_thread().map_err(|e| cu("binding the context", e))?;
        let nvshmem = Nvshmem::load().map_err(nv)?;
        let session = nvshmem.init(id, rank, world).map_err(nv)?;

        // The LL buffer: 2 parities x slots x slot_lines lines of 16 bytes.
        let slot_lines = slot_lines(cfg.max_bytes, layout.g_size);
        let oneshot_max = if layout.nodes == 1 && layout.g_size > 1 {
            let measured = if layout.g_size == 2 { 4 << 20 } else { 512 << 10 };
            cfg.oneshot_max_bytes.unwrap_or(measured).min(cfg.max_bytes)
        } else {
            0
        };
        let os_lines = os_lines(oneshot_max);
        // Then the node phases' block flags: [parity][phase][source][FLAG_BLOCKS] u32.
        let bytes = 2 * (layout.slots() * slot_lines + layout.g_size * os_lines) * 16
            + 2 * PHASES * layout.g_size * FLAG_BLOCKS * 4;
        let ll = session.malloc(bytes).map_err(nv)?;
        // SAFETY: `ll` holds `bytes` bytes on this GPU; zero flags are older than any epoch.
        unsafe { drv::memset_d8_sync(ll.device_ptr(), 0, bytes) }.map_err(|e| cu("clearing the LL buffer", e))?;
        // SAFETY: two words of device memory, freed in Drop.
        let ctrl = unsafe { drv::malloc_sync(8) }.map_err(|e| cu("cuMemAlloc", e))?;
        // ctrl = [the last finished epoch, block arrivals].
        let words = [cfg.start_epoch, 0u32];
        // SAFETY: `ctrl` holds 8 bytes; `words` is 8 bytes of host memory.
        unsafe { drv::memcpy_htod_sync(ctrl, &words) }.map_err(|e| cu("cuMemcpyHtoD (nvrar ctrl)", e))?;
        // Every PE's buffer is clear before any PE can write into it.
        session.barrier_all();

        let image = crate::kernels::cubin("nvrar").ok_or_else(|| {
            Error::Invalid(
                "nvrar: the kernel module 'nvrar' is not embedded in this build (build with --features cuda)".into(),
            )
        })?;
        let mut owned = image.to_vec();
        owned.push(0);
        // SAFETY: a complete cubin built by build.rs, device-linked against NVSHMEM 3.4.5.
        let module = unsafe { drv::module::load_data(owned.as_ptr() as *const c_void) }
            .map_err(|e| cu("loading the 'nvrar' module (needs an sm_90 GPU)", e))?;
        // SAFETY: `module` is live in this context and stays loaded until Drop unregisters it.
        unsafe { session.register_module(module.cast()) }.map_err(nv)?;
        let func = |name: &str| -> Result<sys::CUfunction> {
            let c = CString::new(name).expect("no NUL");
            // SAFETY: `module` is loaded.
            unsafe { drv::module::get_function(module, c) }.map_err(|e| cu(&format!("finding kernel {name}"), e))
        };
        let funcs = [func("nvrar_bf16")?, func("nvrar_f16")?, func("nvrar_f32")?];

        let addr = |member: usize| session.ptr(&ll, group[member]);
        let mut args = NvrarArgs {
            input: 0,
            out: 0,
            n: 0,
            ll: ll.device_ptr(),
            slot_lines: slot_lines as u64,
            local_peer: [0; MAX_G],
            rd_peer: [0; MAX_STEPS],
            rd_pe: [-1; MAX_STEPS],
            fold_peer: 0,
            fold_pe: -1,
            g_size: layout.g_size as i32,
            g: layout.g as i32,
            n_nodes: layout.nodes as i32,
            node: layout.node as i32,
            oneshot: 0,
            wide: 0,
            ctrl,
            timeout_ns: cfg.timeout.as_nanos().min(u64::MAX as u128) as u64,
            os_lines: os_lines as u64,
        };
        for (i, &m) in layout.node_members.iter().enumerate() {
            args.local_peer[i] = addr(m).ok_or_else(|| {
                Error::Invalid(format!(
                    "nvrar: PE {} cannot load and store PE {}'s memory (no NVLink or PCIe peer access), but both are in one node \
                     of the hierarchy; set --gpus-per-node to the GPUs that share a host",
                    rank, group[m]
                ))
            })?;
        }
        let remote = |member: usize| if cfg.force_put { 0 } else { addr(member).unwrap_or(0) };
        for (s, &m) in layout.rd_partners.iter().enumerate() {
            args.rd_peer[s] = remote(m);
            args.rd_pe[s] = group[m] as i32;
        }
        if let Some(m) = layout.fold_partner {
            args.fold_peer = remote(m);
            args.fold_pe = group[m] as i32;
        }
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cu("cuDeviceGetAttribute", e))? as usize;
        Ok(Nvrar {
            module,
            funcs,
            ll,
            ctrl,
            args,
            layout,
            blocks_cap: cfg.max_blocks.min(sms).min(FLAG_BLOCKS),
            oneshot_max,
            cfg,
            session,
            ctx: ctx.clone(),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn config(&self) -> &NvrarConfig {
        &self.cfg
    }

    /// How this build of NVRAR runs, for provenance.
    pub fn describe(&self) -> String {
        format!(
            "nvrar (NVSHMEM {}, {} node(s) x {} GPU(s), {} threads, <= {} blocks, one-shot <= {} KiB (LL <= {} KiB){}{})",
            self.session.version(),
            self.layout.nodes,
            self.layout.g_size,
            self.cfg.threads,
            self.blocks_cap,
            self.oneshot_max >> 10,
            self.cfg.oneshot_ll_max_bytes.min(self.oneshot_max) >> 10,
            match (self.cfg.wide_packs, self.layout.nodes) {
                (false, _) => "",
                (true, 1) => ", 16-byte plain packs",
                (true, _) => ", 16-byte packs off (several nodes)",
            },
            if self.cfg.force_put { ", puts forced" } else { "" }
        )
    }

    fn plan(&self, bytes: usize) -> Launch {
        Launch::plan(bytes, &self.cfg, &self.layout, self.oneshot_max, self.blocks_cap)
    }

    /// Blocks for a message of `bytes`: one pack (8 bytes, or 16 in the plain paths with
    /// `wide_packs`) per thread, of the shard or of the whole message one-shot, at most the cap.
    pub fn blocks(&self, bytes: usize) -> usize {
        self.plan(bytes).blocks
    }

    /// Sums `n` elements of `ty` at `input` over the group into `out` (may equal `input`; both
    /// 8-byte aligned device memory of this GPU), on `stream`. Every member must make the same
    /// sequence of calls with the same sizes. With `wide_packs`, 16-byte aligned buffers get
    /// 16-byte loads and stores; others still work (the kernel splits their accesses in two).
    ///
    /// # Safety
    /// `input` and `out` hold `n` elements of `ty` on this rank's GPU, and `stream` is a live
    /// stream of its context, current on this thread.
    pub unsafe fn all_reduce(
        &self,
        input: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        n: usize,
        ty: ElemType,
        stream: sys::CUstream,
        pdl: bool,
    ) -> Result<()> {
        if !input.is_multiple_of(8) || !out.is_multiple_of(8) {
            return Err(Error::Invalid(format!(
                "nvrar: buffers must be 8-byte aligned (input {input:#x}, output {out:#x})"
            )));
        }
        let es = ty.bytes();
        // Launches of at most max_bytes, each a whole number of 8-byte packs (16-byte with wide
        // packs, so that every launch starts as aligned as the first).
        let unit = if self.cfg.wide_packs && self.cfg.max_bytes >= 16 {
            16
        } else {
            8
        };
        let chunk = (self.cfg.max_bytes / unit * unit / es).max(8 / es);
        let f = self.funcs[ty as usize];
        let mut done = 0;
        while done < n {
            let len = chunk.min(n - done);
            let mut args = self.args;
            args.input = input + (done * es) as u64;
            args.out = out + (done * es) as u64;
            args.n = len as u64;
            let launch = self.plan(len * es);
            args.oneshot = launch.oneshot;
            args.wide = launch.wide as i32;
            let blocks = launch.blocks as u32;
            let mut params = [&mut args as *mut NvrarArgs as *mut c_void];
            // SAFETY: the single parameter is the kernel's NvrarArgs (same layout, checked size);
            // every pointer in it is live device memory of this context.
            unsafe {
                crate::backend::launch_on(
                    f,
                    (blocks, 1, 1),
                    (self.cfg.threads as u32, 1, 1),
                    0,
                    stream,
                    pdl,
                    &mut params,
                )
            }
            .map_err(|e| cu("launching nvrar", e))?;
            done += len;
        }
        Ok(())
    }
}

impl Drop for Nvrar {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: no kernel of the module runs (the owner synchronised its stream), and it was
        // registered with this session; then the module and the control words go.
        unsafe {
            let _ = self.session.unregister_module(self.module.cast());
            let _ = drv::module::unload(self.module);
            let _ = drv::free_sync(self.ctrl);
        }
        let _ = &self.ll;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        // One node of 4.
        let l = Layout::new(2, 4, 0).unwrap();
        assert_eq!((l.g_size, l.g, l.nodes, l.node), (4, 2, 1, 0));
        assert!(l.rd_partners.is_empty() && l.fold_partner.is_none());
        // 2 virtual nodes of 2: member 3 is node 1, index 1; its partner is member 1.
        let l = Layout::new(3, 4, 2).unwrap();
        assert_eq!((l.g, l.node, l.node_members.clone()), (1, 1, vec![2, 3]));
        assert_eq!(l.rd_partners, vec![1]);
        // 3 nodes of 1: node 2 folds into node 0, which also does the one doubling step with 1.
        let l = Layout::new(2, 3, 1).unwrap();
        assert_eq!((l.rd_partners.clone(), l.fold_partner), (vec![], Some(0)));
        let l = Layout::new(0, 3, 1).unwrap();
        assert_eq!((l.rd_partners.clone(), l.fold_partner), (vec![1], Some(2)));
        let l = Layout::new(1, 3, 1).unwrap();
        assert_eq!((l.rd_partners.clone(), l.fold_partner), (vec![0], None));
        // 6 nodes of 2: node 5 -> node 1; node 2 at steps 1, 2 pairs with nodes 3, 0 (members 7, 1 for g = 1).
        let l = Layout::new(5, 12, 2).unwrap();
        assert_eq!((l.node, l.rd_partners.clone()), (2, vec![7, 1]));
        assert_eq!(Layout::new(11, 12, 2).unwrap().fold_partner, Some(3));
        assert_eq!(l.slots(), 2 * 2 + 2 * 2 + 4);
        let e = Layout::new(0, 6, 4).unwrap_err().to_string();
        assert!(e.contains("does not divide"), "{e}");
        assert!(Layout::new(0, 16, 16).is_err());
    }

    #[test]
    fn launch_plans() {
        let one = Layout::new(0, 4, 0).unwrap();
        let two = Layout::new(0, 4, 2).unwrap();
        let wide = NvrarConfig::default();
        assert!(wide.wide_packs, "16-byte packs are the default");
        let narrow = NvrarConfig {
            wide_packs: false,
            ..NvrarConfig::default()
        };
        let p = |bytes, cfg: &NvrarConfig, l: &Layout, os| Launch::plan(bytes, cfg, l, os, 128);
        let l = |oneshot, wide, blocks| Launch { oneshot, wide, blocks };
        // LL one-shot: 8-byte packs either way (32 KiB: 4096 packs of 512 threads).
        assert_eq!(p(32 << 10, &narrow, &one, 512 << 10), l(1, false, 8));
        assert_eq!(p(32 << 10, &wide, &one, 512 << 10), l(1, false, 8));
        // Plain one-shot: 256 KiB is 32768 8-byte or 16384 16-byte packs.
        assert_eq!(p(256 << 10, &narrow, &one, 512 << 10), l(2, false, 64));
        assert_eq!(p(256 << 10, &wide, &one, 512 << 10), l(2, true, 32));
        // Two-shot: 1 MiB in 4 shards; the cap.
        assert_eq!(p(1 << 20, &narrow, &one, 512 << 10), l(0, false, 64));
        assert_eq!(p(1 << 20, &wide, &one, 512 << 10), l(0, true, 32));
        assert_eq!(p(16 << 20, &wide, &one, 512 << 10), l(0, true, 128));
        // Several nodes: never wide.
        assert_eq!(p(256 << 10, &wide, &two, 0), l(0, false, 32));
        // Tiny and odd sizes: at least one block.
        assert_eq!(p(2, &wide, &one, 0), l(0, true, 1));
        assert_eq!(p(2002, &wide, &one, 4096), l(1, false, 1));
        let small_ll = NvrarConfig {
            oneshot_ll_max_bytes: 1000,
            ..wide.clone()
        };
        assert_eq!(p(2002, &small_ll, &one, 4096), l(2, true, 1));
    }

    /// The wide kernel's packs and shards (kernels/nvrar.cu: W = ceil(n / E) 16-byte packs, shards
    /// of SW = ceil(W / G)) cover every element of a launch exactly once and index inside the
    /// slots `Nvrar::new` sizes, odd counts included.
    #[test]
    fn wide_shards_fit() {
        for es in [2usize, 4] {
            let e = 16 / es;
            for max_bytes in [16usize, 24, 4104, 16 << 20] {
                // The longest launch, as all_reduce cuts messages with wide packs.
                let chunk = (max_bytes / 16 * 16 / es).max(8 / es);
                assert!(chunk * es <= max_bytes);
                for g_size in 1..=MAX_G {
                    for n in [1usize, 3, 5, 7, 8, 9, 1001, 4097, 65537, 1_000_003] {
                        let len = n.min(chunk);
                        let wpacks = len.div_ceil(e);
                        let sw = wpacks.div_ceil(g_size);
                        assert!(
                            sw <= slot_lines(max_bytes, g_size),
                            "es {es} max {max_bytes} G {g_size} n {n}"
                        );
                        // One-shot: the message itself is at most the one-shot limit.
                        assert!(wpacks <= os_lines(len * es));
                        let mut seen = vec![0u8; len];
                        for s in 0..g_size {
                            for q in (0..sw).filter(|&q| s * sw + q < wpacks) {
                                let p = s * sw + q;
                                seen[p * e..((p + 1) * e).min(len)].iter_mut().for_each(|c| *c += 1);
                            }
                        }
                        assert!(seen.iter().all(|&c| c == 1), "es {es} G {g_size} n {n}");
                    }
                }
            }
        }
    }
}
