//! The CUDA backend of one rank: bf16 activations and weights with f32 accumulation, cuBLAS for
//! the GEMMs, the kernels of kernels/ for everything else, one stream, and CUDA graphs for
//! decode steps.
//!
//! Memory: weights and KV caches are allocated once; activations come from one preallocated
//! arena with a deterministic first-fit allocator, so a step issues no cudaMalloc and the same
//! sequence of ops gets the same addresses every step (what a graph replay needs). The step's
//! inputs (ids, positions, slots, sampling keys) live in fixed device buffers written before the
//! step's ops, or before a graph's replay.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::rc::Rc;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys, CudaContext, CudaGraph, CudaStream, DriverError};
use half::bf16;
use yalis_core::sampling::SamplingParams;
use yalis_core::weights::{HostData, HostTensor, Slice, WeightSource};
use yalis_core::{ModelConfig, RankPlan};
use yalis_engine::backend::{Backend, QkvLayout, StepBatch, StepInputs, WeightPiece};
use yalis_engine::{Error, Result};

use crate::kernels;

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Invalid(format!("cuda: {what} failed: {e:?}"))
}

fn check(op: &str, ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("cuda backend: {op}: {}", msg())))
    }
}

/// Owned device memory, freed on drop.
struct DeviceBuf {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuf {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        // SAFETY: plain device allocation of at least one byte; freed once in Drop.
        let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }
            .map_err(|e| cuda_err(&format!("cuMemAlloc of {bytes} bytes (out of GPU memory?)"), e))?;
        Ok(DeviceBuf {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }
}

/// Device memory handed out by [`CudaBackend::raw_buffer`].
pub struct RawBuffer(DeviceBuf);

impl RawBuffer {
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.0.ptr
    }

    pub fn bytes(&self) -> usize {
        self.0.bytes
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from cuMemAlloc and is freed exactly once; cuMemFree waits for
        // pending work on it.
        unsafe {
            let _ = drv::free_sync(self.ptr);
        }
    }
}

/// First-fit allocator over one arena; deterministic for a given alloc/free sequence.
struct Arena {
    base: sys::CUdeviceptr,
    size: usize,
    /// Free blocks (offset, len), sorted by offset, coalesced.
    free: Vec<(usize, usize)>,
    high_water: usize,
}

const ALIGN: usize = 256;

/// The decode GEMV (kernels/gemv.cu): output rows per block of 256 threads, most rows of x.
const GEMV_ROWS_PER_BLOCK: usize = 16;
const GEMV_MAX_ROWS: usize = 8;

/// Dynamic shared memory of the tensor-core prefill attention for head_dim 65..=128.
const PREFILL_MMA_SMEM: u32 = 69_632;

impl Arena {
    fn alloc(&mut self, bytes: usize) -> Option<usize> {
        let bytes = bytes.max(1).div_ceil(ALIGN) * ALIGN;
        let i = self.free.iter().position(|&(_, len)| len >= bytes)?;
        let (off, len) = self.free[i];
        if len == bytes {
            self.free.remove(i);
        } else {
            self.free[i] = (off + bytes, len - bytes);
        }
        self.high_water = self.high_water.max(off + bytes);
        Some(off)
    }

    fn release(&mut self, off: usize, bytes: usize) {
        let bytes = bytes.max(1).div_ceil(ALIGN) * ALIGN;
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, bytes));
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
}

/// An activation `[rows, cols]` in the arena, returned to it on drop.
pub struct CudaTensor {
    pub ptr: sys::CUdeviceptr,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    off: usize,
    arena: Rc<RefCell<Arena>>,
}

impl Drop for CudaTensor {
    fn drop(&mut self) {
        self.arena
            .borrow_mut()
            .release(self.off, self.rows * self.cols * self.dtype.size());
    }
}

/// A weight `[rows, cols]` (bf16), or an f32 table.
pub struct CudaWeight {
    buf: DeviceBuf,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

/// One layer's K and V: `[slots, max_seq, kv_heads, head_dim]` bf16 each.
pub struct CudaKvCache {
    k: DeviceBuf,
    v: DeviceBuf,
    slots: usize,
    max_seq: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Sizes the backend preallocates for.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Most tokens in one step (a prefill of every prompt).
    pub max_tokens: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
    /// Bytes of the activation arena.
    pub arena_bytes: usize,
}

struct Kernels {
    _modules: Vec<sys::CUmodule>,
    f: HashMap<&'static str, sys::CUfunction>,
}

const KERNELS: &[(&str, &[&str])] = &[
    (
        "norm",
        &[
            "embedding_bf16",
            "rms_norm_bf16",
            "add_rms_norm_bf16",
            "add_bf16",
            "silu_mul_bf16",
            "gather_rows_bf16",
            "f32_to_bf16",
            "dummy_fill_bf16",
        ],
    ),
    ("rope", &["rope_bf16", "write_kv_bf16", "rope_write_kv_bf16"]),
    (
        "attention",
        &[
            "attn_decode_partial_bf16",
            "attn_decode_combine_bf16",
            "attn_prefill_bf16",
            "attn_prefill_mma_bf16",
        ],
    ),
    ("sampling", &["sample_tokens_f32"]),
    ("gemv", &["gemv_bf16", "gemv_silu_bf16"]),
];

impl Kernels {
    fn load() -> Result<Self> {
        let mut modules = Vec::new();
        let mut f = HashMap::new();
        for (stem, names) in KERNELS {
            let image = kernels::cubin(stem).ok_or_else(|| {
                Error::Invalid(format!(
                    "cuda backend: kernel module '{stem}' is not embedded in this build"
                ))
            })?;
            // cuModuleLoadData reads the image until its own end; keep a copy with a trailing
            // zero so no read runs past the embedded bytes.
            let mut owned = image.to_vec();
            owned.push(0);
            // SAFETY: `owned` is a complete cubin built by build.rs for this crate.
            let module = unsafe { drv::module::load_data(owned.as_ptr() as *const c_void) }
                .map_err(|e| cuda_err(&format!("loading kernel module '{stem}' (needs an sm_90 GPU)"), e))?;
            for name in *names {
                let cname = CString::new(*name).expect("kernel names have no NUL");
                // SAFETY: `module` was just loaded and is never unloaded while `self` lives.
                let func = unsafe { drv::module::get_function(module, cname) }
                    .map_err(|e| cuda_err(&format!("finding kernel '{name}' in module '{stem}'"), e))?;
                f.insert(*name, func);
            }
            modules.push(module);
        }
        Ok(Kernels { _modules: modules, f })
    }
}

/// Device buffers the step's inputs are written to.
struct StepBuffers {
    ids: DeviceBuf,        // [max_tokens] u32
    positions: DeviceBuf,  // [max_tokens] i32
    token_slot: DeviceBuf, // [max_tokens] i32
    seq_slot: DeviceBuf,   // [max_seqs] i32
    seq_kv_len: DeviceBuf, // [max_seqs] i32
    last_rows: DeviceBuf,  // [max_seqs] i32
    keys: DeviceBuf,       // [max_seqs] u64
    counters: DeviceBuf,   // [max_seqs] u64
    out_ids: DeviceBuf,    // [max_seqs] u32
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: blas_sys::cublasHandle_t,
    _blas_workspace: DeviceBuf,
    k: Kernels,
    arena: Rc<RefCell<Arena>>,
    _arena_buf: DeviceBuf,
    cap: Capacity,
    step: StepBuffers,
    /// Host copy of the step's last rows, to check `select_rows` against.
    last_rows: RefCell<Vec<usize>>,
    graphs: RefCell<HashMap<u64, CudaGraph>>,
    tp_size: usize,
    /// Prefill attention on tensor cores where head_dim allows (else the one-warp-per-query
    /// kernel); tests switch it to check both.
    prefill_mma: std::cell::Cell<bool>,
    gemv_on: std::cell::Cell<bool>,
    pdl: std::cell::Cell<bool>,
    /// NCCL groups and this rank's PP stage, for TP x PP > 1.
    nccl: Option<(crate::nccl::NcclGroups, usize)>,
    /// NVRAR for the TP all-reduce, and which all-reduce each message size uses.
    nvrar: Option<crate::nvrar::Nvrar>,
    policy: std::cell::Cell<AllReducePolicy>,
}

/// Which all-reduce a row-parallel output goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllReducePolicy {
    Nccl,
    Nvrar,
    /// NVRAR up to this many bytes, NCCL above.
    Auto {
        nvrar_max_bytes: usize,
    },
}

/// One all-reduce implementation, for [`CudaBackend::all_reduce_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    Nccl,
    Nvrar,
}

/// Launches `f` on `stream`, with programmatic stream serialization when `pdl` (the kernel may
/// start while the previous one drains; every kernel of kernels/ waits for its predecessor first).
///
/// # Safety
/// `params` must match `f`'s parameters, and `stream` be a live stream of the current context.
pub(crate) unsafe fn launch_on(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    stream: sys::CUstream,
    pdl: bool,
    params: &mut [*mut c_void],
) -> std::result::Result<(), DriverError> {
    if !pdl {
        return drv::launch_kernel(f, grid, block, smem, stream, params);
    }
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: smem,
        hStream: stream,
        attrs: &mut attr,
        numAttrs: 1,
    };
    sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()).result()
}

macro_rules! launch {
    ($self:expr, $name:expr, $grid:expr, $block:expr, $smem:expr; $($arg:expr),* $(,)?) => {{
        let f = $self.k.f[$name];
        let grid: (u32, u32, u32) = $grid;
        let block: (u32, u32, u32) = $block;
        // SAFETY: the argument list matches the kernel's signature in kernels/ (types and
        // order), every pointer is a live device allocation of the documented size, and the
        // temporaries the pointers refer to live until the end of this statement.
        unsafe { $self.launch_raw(f, grid, block, $smem, &mut [$(&($arg) as *const _ as *mut c_void),*]) }
            .map_err(|e| cuda_err(concat!("launching ", $name), e))
    }};
}

fn u32s(n: usize) -> u32 {
    u32::try_from(n).expect("grid dimension fits in u32")
}

impl CudaBackend {
    /// The backend of GPU `ordinal` (of those visible) for a TP group of `tp_size`; with TP x PP
    /// > 1 it needs its NCCL groups (`set_nccl`) before the first collective.
    pub fn new(ordinal: usize, cap: Capacity, tp_size: usize) -> Result<Self> {
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::Invalid("cuda: libcuda.so could not be loaded (no NVIDIA driver here?)".into()))?
            .map_err(|e| cuda_err(&format!("opening GPU {ordinal}"), e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("cuDeviceGetAttribute", e))?;
        if (major, minor) != (9, 0) {
            return Err(Error::Invalid(format!(
                "cuda: GPU {ordinal} has compute capability {major}.{minor}; this build's kernels are sm_90a (Hopper) only"
            )));
        }
        let stream = ctx.new_stream().map_err(|e| cuda_err("cuStreamCreate", e))?;
        let blas =
            blas::create_handle().map_err(|e| cuda_err("cublasCreate (is libcublas.so.13 on the library path?)", e))?;
        let ws = DeviceBuf::new(&ctx, 32 << 20)?;
        // SAFETY: the handle is live; the stream and workspace outlive it (both owned by self).
        unsafe {
            blas::set_stream(blas, stream.cu_stream() as blas_sys::cudaStream_t)
                .map_err(|e| cuda_err("cublasSetStream", e))?;
            blas_sys::cublasSetWorkspace_v2(blas, ws.ptr as *mut c_void, ws.bytes)
                .result()
                .map_err(|e| cuda_err("cublasSetWorkspace", e))?;
        }
        let k = Kernels::load()?;
        // SAFETY: a function of a loaded module; the attribute only raises its shared-memory cap.
        unsafe {
            drv::function::set_function_attribute(
                k.f["attn_prefill_mma_bf16"],
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                PREFILL_MMA_SMEM as i32,
            )
        }
        .map_err(|e| cuda_err("cuFuncSetAttribute (prefill attention shared memory)", e))?;
        let arena_buf = DeviceBuf::new(&ctx, cap.arena_bytes)?;
        let arena = Arena {
            base: arena_buf.ptr,
            size: cap.arena_bytes,
            free: vec![(0, cap.arena_bytes)],
            high_water: 0,
        };
        let (t, s) = (cap.max_tokens.max(1), cap.max_seqs.max(1));
        let step = StepBuffers {
            ids: DeviceBuf::new(&ctx, 4 * t)?,
            positions: DeviceBuf::new(&ctx, 4 * t)?,
            token_slot: DeviceBuf::new(&ctx, 4 * t)?,
            seq_slot: DeviceBuf::new(&ctx, 4 * s)?,
            seq_kv_len: DeviceBuf::new(&ctx, 4 * s)?,
            last_rows: DeviceBuf::new(&ctx, 4 * s)?,
            keys: DeviceBuf::new(&ctx, 8 * s)?,
            counters: DeviceBuf::new(&ctx, 8 * s)?,
            out_ids: DeviceBuf::new(&ctx, 4 * s)?,
        };
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            _blas_workspace: ws,
            k,
            arena: Rc::new(RefCell::new(arena)),
            _arena_buf: arena_buf,
            cap,
            step,
            last_rows: RefCell::default(),
            graphs: RefCell::default(),
            tp_size,
            prefill_mma: std::cell::Cell::new(true),
            gemv_on: std::cell::Cell::new(true),
            pdl: std::cell::Cell::new(std::env::var_os("YALIS_PDL").is_none_or(|v| v != "0")),
            nccl: None,
            nvrar: None,
            policy: std::cell::Cell::new(AllReducePolicy::Nccl),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Hands the backend NVRAR and the policy that picks it per message size.
    pub fn set_nvrar(&mut self, nvrar: crate::nvrar::Nvrar, policy: AllReducePolicy) {
        self.nvrar = Some(nvrar);
        self.policy.set(policy);
    }

    pub fn nvrar(&self) -> Option<&crate::nvrar::Nvrar> {
        self.nvrar.as_ref()
    }

    /// Sums `n` elements of `ty` at `input` over the TP group into `out` with `which`.
    pub fn all_reduce_with(
        &self,
        which: Collective,
        input: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        n: usize,
        ty: crate::nvrar::ElemType,
    ) -> Result<()> {
        let stream = self.stream.cu_stream();
        match which {
            Collective::Nccl => self.groups("all_reduce")?.0.all_reduce(input, out, n, ty, stream),
            Collective::Nvrar => self
                .nvrar
                .as_ref()
                .ok_or_else(|| Error::Invalid("cuda backend: NVRAR is not set up on this rank".into()))
                // SAFETY: the caller's buffers hold n elements of ty on this GPU; the stream is
                // the backend's own.
                .and_then(|nv| unsafe { nv.all_reduce(input, out, n, ty, stream, self.pdl.get()) }),
        }
    }

    /// The all-reduce the policy picks for a message of `bytes`.
    pub fn collective_for(&self, bytes: usize) -> Collective {
        match self.policy.get() {
            AllReducePolicy::Nvrar => Collective::Nvrar,
            AllReducePolicy::Auto { nvrar_max_bytes } if bytes <= nvrar_max_bytes && self.nvrar.is_some() => {
                Collective::Nvrar
            }
            _ => Collective::Nccl,
        }
    }

    /// Microseconds per call of `f` (enqueued work): with `graph`, `calls` calls captured into
    /// one CUDA graph, the median of `reps` launches after one warm-up launch; without, the
    /// median of `reps` eager batches of `calls` calls after one warm-up batch.
    pub fn time_calls_us(&self, graph: bool, calls: usize, reps: usize, f: impl Fn() -> Result<()>) -> Result<f64> {
        let calls = calls.max(1);
        let ms = if graph {
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| cuda_err("cuStreamBeginCapture", e))?;
            let captured = (0..calls).try_for_each(|_| f());
            let g = self
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .map_err(|e| cuda_err("cuStreamEndCapture", e))?;
            captured?;
            let g = g.ok_or_else(|| Error::Invalid("cuda: the captured calls are empty".into()))?;
            g.upload().map_err(|e| cuda_err("cuGraphUpload", e))?;
            self.time_ms(1, reps, || g.launch().map_err(|e| cuda_err("cuGraphLaunch", e)))?
        } else {
            self.time_ms(1, reps, || (0..calls).try_for_each(|_| f()))?
        };
        Ok(ms * 1e3 / calls as f64)
    }

    /// `bytes` of device memory for raw use (benchmarks), freed on drop.
    pub fn raw_buffer(&self, bytes: usize) -> Result<RawBuffer> {
        Ok(RawBuffer(DeviceBuf::new(&self.ctx, bytes)?))
    }

    pub fn upload_bytes(&self, dst: &RawBuffer, src: &[u8]) -> Result<()> {
        self.htod(&dst.0, src)
    }

    pub fn download_bytes(&self, src: &RawBuffer, bytes: usize) -> Result<Vec<u8>> {
        check("download_bytes", bytes <= src.0.bytes, || {
            format!("{bytes} bytes of {}", src.0.bytes)
        })?;
        self.dtoh::<u8>(src.0.ptr, bytes)
    }

    /// Launches `f` on the stream; with programmatic dependent launch on, the kernel may start
    /// while the previous one drains (every kernel of kernels/ waits for its predecessor first).
    ///
    /// # Safety
    /// `params` must match `f`'s parameters.
    unsafe fn launch_raw(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &mut [*mut c_void],
    ) -> std::result::Result<(), DriverError> {
        launch_on(f, grid, block, smem, self.stream.cu_stream(), self.pdl.get(), params)
    }

    /// Programmatic dependent launch on (default) or off; benchmarks compare both.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.set(on);
    }

    /// Hands the backend its NCCL communicators (TP x PP > 1); `pp_stage` is this rank's stage.
    pub fn set_nccl(&mut self, groups: crate::nccl::NcclGroups, pp_stage: usize) {
        self.nccl = Some((groups, pp_stage));
    }

    fn groups(&self, op: &str) -> Result<&(crate::nccl::NcclGroups, usize)> {
        self.nccl.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "cuda backend: {op} with TP x PP > 1 needs the NCCL communicators"
            ))
        })
    }

    /// Chooses the prefill attention kernel: tensor cores (default, where head_dim allows) or
    /// one warp per query.
    pub fn set_prefill_mma(&self, on: bool) {
        self.prefill_mma.set(on);
    }

    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Peak bytes of the activation arena used so far.
    pub fn arena_high_water(&self) -> usize {
        self.arena.borrow().high_water
    }

    /// Fills `t` with NaN (bytes 0xFF), so a test can tell which elements an op wrote.
    pub fn poison(&self, t: &CudaTensor) -> Result<()> {
        // SAFETY: `t` is a live arena allocation of exactly this many bytes.
        unsafe { drv::memset_d8_async(t.ptr, 0xFF, t.rows * t.cols * t.dtype.size(), self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemsetD8Async", e))
    }

    /// An activation holding `data` (`[rows, cols]`, rounded to bf16 when `dtype` is Bf16).
    pub fn from_host(&self, rows: usize, cols: usize, data: &[f32], dtype: DType) -> Result<CudaTensor> {
        check("from_host", data.len() == rows * cols, || {
            format!("{} values for [{rows}, {cols}]", data.len())
        })?;
        let t = self.alloc_typed(rows, cols, dtype)?;
        // SAFETY: `t` holds rows * cols elements of `dtype`; the copy is synchronised below.
        let r = match dtype {
            DType::F32 => unsafe { drv::memcpy_htod_async(t.ptr, data, self.stream.cu_stream()) },
            DType::Bf16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                let r = unsafe { drv::memcpy_htod_async(t.ptr, &v, self.stream.cu_stream()) };
                self.sync()?;
                r
            }
        };
        r.map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))?;
        self.sync()?;
        Ok(t)
    }

    /// Times `f` (enqueued work) with CUDA events: the median of `iters` runs after `warmup`,
    /// in milliseconds.
    pub fn time_ms(&self, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let (a, b) = (
                self.ctx.new_event(flags).map_err(|e| cuda_err("cuEventCreate", e))?,
                self.ctx.new_event(flags).map_err(|e| cuda_err("cuEventCreate", e))?,
            );
            a.record(&self.stream).map_err(|e| cuda_err("cuEventRecord", e))?;
            f()?;
            b.record(&self.stream).map_err(|e| cuda_err("cuEventRecord", e))?;
            b.synchronize().map_err(|e| cuda_err("cuEventSynchronize", e))?;
            times.push(a.elapsed_ms(&b).map_err(|e| cuda_err("cuEventElapsedTime", e))? as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// The two ceilings, measured on random data: device-to-device copy bandwidth (GB/s,
    /// bytes read plus written, over `bytes` bytes) and a bf16 `n x n x n` cuBLAS GEMM (TFLOP/s).
    pub fn measure_roofline(&self, bytes: usize, n: usize) -> Result<(f64, f64)> {
        let random = |rows: usize, cols: usize, seed: u64| -> Result<CudaWeight> {
            let w = self.new_weight(rows, cols, DType::Bf16)?;
            let key = yalis_core::rng::stream_key(seed, 7);
            launch!(self, "dummy_fill_bf16", (u32s((rows * cols).div_ceil(256 * 8).max(1)), 1, 1), (256, 1, 1), 0;
                w.buf.ptr, rows as i32, cols as i32, cols as i64, 0i64, 0i64, key, 0.0f32, 1.0f32)?;
            Ok(w)
        };
        let half = bytes / 2 / 2;
        let (src, dst) = (random(1, half, 1)?, random(1, half, 2)?);
        let copy_ms = self.time_ms(3, 20, || {
            // SAFETY: both buffers hold `half` bf16 elements.
            unsafe { drv::memcpy_dtod_async(dst.buf.ptr, src.buf.ptr, half * 2, self.stream.cu_stream()) }
                .map_err(|e| cuda_err("cuMemcpyDtoDAsync", e))
        })?;
        let gbps = 2.0 * (half * 2) as f64 / (copy_ms * 1e-3) / 1e9;
        drop((src, dst));
        let (a, w, o) = (random(n, n, 3)?, random(n, n, 4)?, self.new_weight(n, n, DType::Bf16)?);
        let (x, out) = (self.view(&a), self.view(&o));
        let gemm_ms = self.time_ms(3, 20, || self.gemm(&x, &w, &out))?;
        let tflops = 2.0 * (n as f64).powi(3) / (gemm_ms * 1e-3) / 1e12;
        Ok((gbps, tflops))
    }

    /// An activation view of `w`'s memory, which the arena does not own (`w` outlives it).
    fn view(&self, w: &CudaWeight) -> CudaTensor {
        CudaTensor {
            ptr: w.buf.ptr,
            rows: w.rows,
            cols: w.cols,
            dtype: w.dtype,
            off: usize::MAX,
            arena: self.arena.clone(),
        }
    }

    fn alloc_typed(&self, rows: usize, cols: usize, dtype: DType) -> Result<CudaTensor> {
        let bytes = rows * cols * dtype.size();
        let mut a = self.arena.borrow_mut();
        let off = a.alloc(bytes).ok_or_else(|| {
            Error::Invalid(format!(
                "cuda backend: the activation arena ({} MiB) has no room for [{rows}, {cols}] {dtype:?}; this step is larger than the plan's workspace",
                a.size >> 20
            ))
        })?;
        Ok(CudaTensor {
            ptr: a.base + off as u64,
            rows,
            cols,
            dtype,
            off,
            arena: self.arena.clone(),
        })
    }

    fn htod<T>(&self, dst: &DeviceBuf, src: &[T]) -> Result<()> {
        check("upload", std::mem::size_of_val(src) <= dst.bytes, || {
            format!("{} bytes into a buffer of {}", std::mem::size_of_val(src), dst.bytes)
        })?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `dst` holds at least that many bytes; the copy is synchronous with respect to
        // `src` (pageable host memory is staged before the call returns).
        unsafe { drv::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))
    }

    fn dtoh<T: Default + Clone>(&self, src: sys::CUdeviceptr, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        // SAFETY: `src` holds at least n elements of T; the stream is synchronised before the
        // host reads `out`.
        unsafe { drv::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        Ok(out)
    }

    /// A weight's values (tests).
    pub fn weight_to_host(&self, w: &CudaWeight) -> Result<Vec<f32>> {
        let n = w.rows * w.cols;
        Ok(match w.dtype {
            DType::F32 => self.dtoh::<f32>(w.buf.ptr, n)?,
            DType::Bf16 => self
                .dtoh::<u16>(w.buf.ptr, n)?
                .into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect(),
        })
    }

    fn new_weight(&self, rows: usize, cols: usize, dtype: DType) -> Result<CudaWeight> {
        Ok(CudaWeight {
            buf: DeviceBuf::new(&self.ctx, rows * cols * dtype.size())?,
            rows,
            cols,
            dtype,
        })
    }

    /// Writes `piece` into `dst` starting at row `row`: generated on the GPU for dummy weights,
    /// copied straight from the memory map for bf16 row slices, else through the host.
    fn fill_piece(&self, src: &dyn WeightSource, p: &WeightPiece, dst: &CudaWeight, row: usize) -> Result<usize> {
        let (full_rows, full_cols) = match p.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => {
                return Err(Error::Invalid(format!(
                    "cuda backend: weight '{}' has shape {s:?}",
                    p.name
                )))
            }
        };
        let (rows, cols, row0, col0) = match &p.slice {
            Slice::Full => (full_rows, full_cols, 0, 0),
            Slice::Rows(r) => (r.len(), full_cols, r.start, 0),
            Slice::Cols(c) => (full_rows, c.len(), 0, c.start),
        };
        check(
            "load_weight",
            cols == dst.cols && row + rows <= dst.rows && row0 + rows <= full_rows.max(1),
            || {
                format!(
                    "'{}' slice {:?} of {:?} into [{}, {}] at row {row}",
                    p.name, p.slice, p.shape, dst.rows, dst.cols
                )
            },
        )?;
        let at = dst.buf.ptr + (row * dst.cols * 2) as u64;
        if let Some(g) = src.generator(p.name, &p.shape) {
            if rows * cols > 0 {
                launch!(self, "dummy_fill_bf16", (u32s((rows * cols).div_ceil(256 * 8).max(1)), 1, 1), (256, 1, 1), 0;
                    at, rows as i32, cols as i32, full_cols as i64, row0 as i64, col0 as i64, g.key, g.mean, g.a)?;
            }
            return Ok(rows);
        }
        if let Some(bytes) = src.mapped_bf16(p.name, &p.shape, &p.slice)? {
            check("load_weight", bytes.len() == rows * cols * 2, || {
                format!("'{}': {} mapped bytes", p.name, bytes.len())
            })?;
            // SAFETY: `at` has rows * cols bf16 elements of room (checked above); the map
            // outlives the synchronous staging of the copy.
            unsafe { drv::memcpy_htod_async(at, bytes, self.stream.cu_stream()) }
                .map_err(|e| cuda_err("cuMemcpyHtoDAsync from the checkpoint map", e))?;
            self.stream
                .synchronize()
                .map_err(|e| cuda_err("cuStreamSynchronize", e))?;
            return Ok(rows);
        }
        let host = src.load(p.name, &p.shape, p.slice.clone())?;
        let data: Vec<bf16> = match host.data {
            HostData::Bf16(v) => v,
            HostData::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
        };
        // SAFETY: as above; `data` lives until the synchronisation below.
        unsafe { drv::memcpy_htod_async(at, &data, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        Ok(rows)
    }

    fn gemm(&self, x: &CudaTensor, w: &CudaWeight, out: &CudaTensor) -> Result<()> {
        let (m, n, k) = (x.rows as i32, w.rows as i32, w.cols as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let c_type = match out.dtype {
            DType::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        };
        // Row-major out[m, n] = x[m, k] w[n, k]^T is column-major out^T = w^T^T x^T:
        // C (n x m, ld n) = op_T(W: k x n, ld k) * X (k x m, ld k).
        // SAFETY: shapes checked by the caller; all pointers are live device allocations.
        unsafe {
            blas::gemm_ex(
                self.blas,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                &alpha as *const f32 as *const c_void,
                w.buf.ptr as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                x.ptr as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                &beta as *const f32 as *const c_void,
                out.ptr as *mut c_void,
                c_type,
                n,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| cuda_err(&format!("cublasGemmEx [{m}, {k}] x [{n}, {k}]^T"), e))
    }

    /// The cache fits the layout, and every sequence's slot and positions fit the cache.
    fn check_cache(&self, l: QkvLayout, batch: &StepBatch, cache: &CudaKvCache) -> Result<()> {
        check(
            "kv cache",
            l.kv_heads == cache.kv_heads && l.head_dim == cache.head_dim,
            || format!("{l:?} against a cache of {} heads x {}", cache.kv_heads, cache.head_dim),
        )?;
        match batch
            .seqs
            .iter()
            .find(|s| s.slot >= cache.slots || s.start_pos + s.len > cache.max_seq)
        {
            None => Ok(()),
            Some(s) => check("kv cache", false, || {
                format!(
                    "slot {} positions {}..{} exceed the cache ({} slots of {} positions)",
                    s.slot,
                    s.start_pos,
                    s.start_pos + s.len,
                    cache.slots,
                    cache.max_seq
                )
            }),
        }
    }

    /// The decode GEMV beats cuBLAS for a few rows (see benches/NOTES.md).
    fn use_gemv(&self, rows: usize, w: &CudaWeight) -> bool {
        self.gemv_on.get() && rows <= GEMV_MAX_ROWS && w.cols.is_multiple_of(8)
    }

    /// `out = x w^T` (or `silu_mul(x) w^T` for "gemv_silu_bf16") for a few rows of x.
    fn gemv(&self, name: &'static str, x: &CudaTensor, w: &CudaWeight, out: &CudaTensor) -> Result<()> {
        let out_f32 = i32::from(out.dtype == DType::F32);
        let grid = (u32s(w.rows.div_ceil(GEMV_ROWS_PER_BLOCK)), 1, 1);
        match name {
            "gemv_bf16" => launch!(self, "gemv_bf16", grid, (256, 1, 1), 0;
                x.ptr, w.buf.ptr, out.ptr, x.rows as i32, w.rows as i32, w.cols as i32, out_f32),
            _ => launch!(self, "gemv_silu_bf16", grid, (256, 1, 1), 0;
                x.ptr, w.buf.ptr, out.ptr, x.rows as i32, w.rows as i32, w.cols as i32, out_f32),
        }
    }

    /// Decode GEMV on (default) or cuBLAS for every GEMM; tests and benchmarks switch it.
    pub fn set_gemv(&self, on: bool) {
        self.gemv_on.set(on);
    }

    fn decode_splits(&self, seqs: usize, kv_heads: usize, max_seq: usize) -> (usize, usize) {
        // Enough blocks to cover the SMs twice, splits of at least 64 positions; fixed for a
        // given batch size and cache, so a graph's grid never changes.
        let want = (264 / (seqs * kv_heads).max(1)).max(1);
        let split_len = max_seq.div_ceil(want).max(64).div_ceil(64) * 64;
        (split_len, max_seq.div_ceil(split_len))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        self.graphs.borrow_mut().clear();
        // SAFETY: the handle was created in `new` and is destroyed once.
        unsafe {
            let _ = blas::destroy_handle(self.blas);
        }
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;

    fn describe(&self) -> String {
        format!("cuda {} (bf16, f32 accumulation)", self.device_name())
    }

    fn upload(&self, w: &HostTensor) -> Result<CudaWeight> {
        let (rows, cols) = match w.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => return Err(Error::Invalid(format!("cuda backend: upload of shape {s:?}"))),
        };
        let dst = self.new_weight(rows, cols, DType::Bf16)?;
        let data: Vec<bf16> = match &w.data {
            HostData::Bf16(v) => v.clone(),
            HostData::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
        };
        self.htod(&dst.buf, &data)?;
        self.sync()?;
        Ok(dst)
    }

    fn upload_table(&self, t: &HostTensor) -> Result<CudaWeight> {
        let (rows, cols) = (t.shape[0], t.shape.get(1).copied().unwrap_or(1));
        let dst = self.new_weight(rows, cols, DType::F32)?;
        self.htod(&dst.buf, &t.to_f32())?;
        self.sync()?;
        Ok(dst)
    }

    fn load_weight(
        &self,
        src: &dyn WeightSource,
        pieces: &[WeightPiece],
        padded_rows: Option<usize>,
    ) -> Result<CudaWeight> {
        let rows_of = |p: &WeightPiece| match (&p.slice, p.shape.as_slice()) {
            (Slice::Rows(r), _) => r.len(),
            (_, [_]) => 1,
            (_, s) => s[0],
        };
        let cols = match (&pieces[0].slice, pieces[0].shape.as_slice()) {
            (Slice::Cols(c), _) => c.len(),
            (_, [n]) => *n,
            (_, s) => s[1],
        };
        let rows: usize = pieces.iter().map(rows_of).sum();
        let total = padded_rows.unwrap_or(rows).max(rows);
        let dst = self.new_weight(total, cols, DType::Bf16)?;
        if total > rows {
            let at = dst.buf.ptr + (rows * cols * 2) as u64;
            // SAFETY: the padding rows lie inside `dst`.
            unsafe { drv::memset_d8_async(at, 0, (total - rows) * cols * 2, self.stream.cu_stream()) }
                .map_err(|e| cuda_err("cuMemsetD8Async", e))?;
        }
        let mut row = 0;
        for p in pieces {
            row += self.fill_piece(src, p, &dst, row)?;
        }
        self.sync()?;
        Ok(dst)
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        self.alloc_typed(rows, cols, DType::Bf16)
    }

    fn alloc_f32(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        self.alloc_typed(rows, cols, DType::F32)
    }

    fn alloc_kv_cache(&self, slots: usize, max_seq: usize, kv_heads: usize, head_dim: usize) -> Result<CudaKvCache> {
        let bytes = slots * max_seq * kv_heads * head_dim * 2;
        let (k, v) = (DeviceBuf::new(&self.ctx, bytes)?, DeviceBuf::new(&self.ctx, bytes)?);
        for b in [&k, &v] {
            // SAFETY: whole fresh allocations; zeroed so unwritten positions are finite.
            unsafe { drv::memset_d8_async(b.ptr, 0, bytes, self.stream.cu_stream()) }
                .map_err(|e| cuda_err("cuMemsetD8Async", e))?;
        }
        Ok(CudaKvCache {
            k,
            v,
            slots,
            max_seq,
            kv_heads,
            head_dim,
        })
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let n = x.rows * x.cols;
        Ok(match x.dtype {
            DType::F32 => self.dtoh::<f32>(x.ptr, n)?,
            DType::Bf16 => self
                .dtoh::<u16>(x.ptr, n)?
                .into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect(),
        })
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuStreamSynchronize", e))
    }

    fn embedding(&self, ids: &[u32], table: &CudaWeight, vocab_start: usize, out: &mut CudaTensor) -> Result<()> {
        check(
            "embedding",
            out.rows == ids.len() && out.cols == table.cols && ids.len() <= self.cap.max_tokens,
            || {
                format!(
                    "[{}, {}] for {} ids, table width {}",
                    out.rows,
                    out.cols,
                    ids.len(),
                    table.cols
                )
            },
        )?;
        launch!(self, "embedding_bf16", (u32s(out.rows), 1, 1), (256, 1, 1), 0;
            out.ptr, self.step.ids.ptr, table.buf.ptr, out.rows as i32, out.cols as i32, vocab_start as i32, table.rows as i32)
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaWeight, out: &mut CudaTensor) -> Result<()> {
        check(
            "matmul",
            x.cols == w.cols && out.rows == x.rows && out.cols == w.rows && x.dtype == DType::Bf16,
            || {
                format!(
                    "x [{}, {}] times w [{}, {}]^T into [{}, {}]",
                    x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
                )
            },
        )?;
        if x.rows == 0 {
            return Ok(());
        }
        if self.use_gemv(x.rows, w) {
            return self.gemv("gemv_bf16", x, w, out);
        }
        self.gemm(x, w, out)
    }

    fn silu_mul_matmul(&self, gate_up: &CudaTensor, w: &CudaWeight, out: &mut CudaTensor) -> Result<()> {
        check(
            "silu_mul_matmul",
            gate_up.cols == 2 * w.cols && out.rows == gate_up.rows && out.cols == w.rows,
            || {
                format!(
                    "[{}, {}] through w [{}, {}]^T into [{}, {}]",
                    gate_up.rows, gate_up.cols, w.rows, w.cols, out.rows, out.cols
                )
            },
        )?;
        // Fused only for up to 4 rows: from 5 on, every block's share of the SiLU work outgrows
        // its weight bytes (measured 61 us fused vs 43 us unfused at 8 rows, 4096 x 14336).
        if self.use_gemv(gate_up.rows, w) && gate_up.rows <= 4 {
            return self.gemv("gemv_silu_bf16", gate_up, w, out);
        }
        let mut act = self.alloc(gate_up.rows, w.cols)?;
        self.silu_mul(gate_up, &mut act)?;
        self.matmul(&act, w, out)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32, out: &mut CudaTensor) -> Result<()> {
        check(
            "rms_norm",
            x.cols == w.cols && out.rows == x.rows && out.cols == x.cols,
            || {
                format!(
                    "x [{}, {}], weight {}, out [{}, {}]",
                    x.rows, x.cols, w.cols, out.rows, out.cols
                )
            },
        )?;
        launch!(self, "rms_norm_bf16", (u32s(x.rows), 1, 1), (256, 1, 1), 0;
            out.ptr, x.ptr, w.buf.ptr, x.rows as i32, x.cols as i32, eps)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        delta: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        check(
            "add_rms_norm",
            residual.rows == delta.rows
                && residual.cols == delta.cols
                && residual.cols == w.cols
                && out.rows == residual.rows,
            || {
                format!(
                    "[{}, {}] += [{}, {}]",
                    residual.rows, residual.cols, delta.rows, delta.cols
                )
            },
        )?;
        launch!(self, "add_rms_norm_bf16", (u32s(residual.rows), 1, 1), (256, 1, 1), 0;
            residual.ptr, delta.ptr, w.buf.ptr, out.ptr, residual.rows as i32, residual.cols as i32, eps)
    }

    fn add(&self, acc: &mut CudaTensor, x: &CudaTensor) -> Result<()> {
        check("add", acc.rows == x.rows && acc.cols == x.cols, || {
            format!("[{}, {}] += [{}, {}]", acc.rows, acc.cols, x.rows, x.cols)
        })?;
        let n = acc.rows * acc.cols;
        launch!(self, "add_bf16", (u32s(n.div_ceil(256 * 8).max(1)), 1, 1), (256, 1, 1), 0; acc.ptr, x.ptr, n as i64)
    }

    fn rope(
        &self,
        qkv: &mut CudaTensor,
        l: QkvLayout,
        batch: &StepBatch,
        cos: &CudaWeight,
        sin: &CudaWeight,
    ) -> Result<()> {
        check(
            "rope",
            qkv.cols == l.width() && qkv.rows == batch.num_tokens() && cos.cols == l.head_dim / 2,
            || format!("qkv [{}, {}] for {l:?}", qkv.rows, qkv.cols),
        )?;
        launch!(self, "rope_bf16", (u32s(qkv.rows), 1, 1), (128, 1, 1), 0;
            qkv.ptr, self.step.positions.ptr, cos.buf.ptr, sin.buf.ptr, qkv.rows as i32,
            l.q_heads as i32, l.kv_heads as i32, l.head_dim as i32, cos.rows as i32)
    }

    fn write_kv(&self, qkv: &CudaTensor, l: QkvLayout, batch: &StepBatch, cache: &mut CudaKvCache) -> Result<()> {
        check(
            "write_kv",
            qkv.rows == batch.num_tokens() && qkv.cols == l.width(),
            || format!("qkv [{}, {}] for {l:?}", qkv.rows, qkv.cols),
        )?;
        self.check_cache(l, batch, cache)?;
        launch!(self, "write_kv_bf16", (u32s(qkv.rows), 1, 1), (128, 1, 1), 0;
            qkv.ptr, cache.k.ptr, cache.v.ptr, self.step.token_slot.ptr, self.step.positions.ptr,
            qkv.rows as i32, l.q_heads as i32, l.kv_heads as i32, l.head_dim as i32, cache.max_seq as i32)
    }

    fn rope_write_kv(
        &self,
        qkv: &mut CudaTensor,
        l: QkvLayout,
        batch: &StepBatch,
        cos: &CudaWeight,
        sin: &CudaWeight,
        cache: &mut CudaKvCache,
    ) -> Result<()> {
        check(
            "rope_write_kv",
            qkv.cols == l.width() && qkv.rows == batch.num_tokens() && cos.cols == l.head_dim / 2,
            || format!("qkv [{}, {}] for {l:?}", qkv.rows, qkv.cols),
        )?;
        self.check_cache(l, batch, cache)?;
        launch!(self, "rope_write_kv_bf16", (u32s(qkv.rows), 1, 1), (128, 1, 1), 0;
            qkv.ptr, self.step.positions.ptr, cos.buf.ptr, sin.buf.ptr, cache.k.ptr, cache.v.ptr,
            self.step.token_slot.ptr, qkv.rows as i32, l.q_heads as i32, l.kv_heads as i32,
            l.head_dim as i32, cos.rows as i32, cache.max_seq as i32)
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        l: QkvLayout,
        batch: &StepBatch,
        cache: &CudaKvCache,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (t, s) = (batch.num_tokens(), batch.seqs.len());
        check(
            "attention",
            out.rows == t && out.cols == l.q_heads * l.head_dim && qkv.rows == t,
            || format!("out [{}, {}] for {t} tokens of {l:?}", out.rows, out.cols),
        )?;
        let scale = 1.0 / (l.head_dim as f32).sqrt();
        if t == s {
            let (split_len, splits) = self.decode_splits(s, l.kv_heads, cache.max_seq);
            let part = self.alloc_f32(s * l.q_heads * splits, l.head_dim)?;
            let lse = self.alloc_f32(s * l.q_heads, splits)?;
            launch!(self, "attn_decode_partial_bf16", (u32s(splits), u32s(l.kv_heads), u32s(s)), (128, 1, 1), 0;
                qkv.ptr, cache.k.ptr, cache.v.ptr, self.step.seq_slot.ptr, self.step.seq_kv_len.ptr, part.ptr, lse.ptr,
                s as i32, l.q_heads as i32, l.kv_heads as i32, l.head_dim as i32, cache.max_seq as i32,
                split_len as i32, splits as i32, scale)?;
            launch!(self, "attn_decode_combine_bf16", (u32s(l.q_heads), u32s(s), 1), (128, 1, 1), 0;
                out.ptr, part.ptr, lse.ptr, s as i32, l.q_heads as i32, l.head_dim as i32, splits as i32)
        } else if self.prefill_mma.get() && l.head_dim.is_multiple_of(16) && (16..=128).contains(&l.head_dim) {
            let smem = if l.head_dim <= 64 { 36_864 } else { PREFILL_MMA_SMEM };
            launch!(self, "attn_prefill_mma_bf16", (u32s(t.div_ceil(64)), u32s(l.q_heads), 1), (128, 1, 1), smem;
                qkv.ptr, cache.k.ptr, cache.v.ptr, self.step.token_slot.ptr, self.step.positions.ptr, out.ptr,
                t as i32, l.q_heads as i32, l.kv_heads as i32, l.head_dim as i32, cache.max_seq as i32, scale)
        } else {
            launch!(self, "attn_prefill_bf16", (u32s(t.div_ceil(4)), u32s(l.q_heads), 1), (128, 1, 1), 0;
                qkv.ptr, cache.k.ptr, cache.v.ptr, self.step.token_slot.ptr, self.step.positions.ptr, out.ptr,
                t as i32, l.q_heads as i32, l.kv_heads as i32, l.head_dim as i32, cache.max_seq as i32, scale)
        }
    }

    fn silu_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        check(
            "silu_mul",
            gate_up.cols == 2 * out.cols && gate_up.rows == out.rows,
            || format!("[{}, {}] into [{}, {}]", gate_up.rows, gate_up.cols, out.rows, out.cols),
        )?;
        launch!(self, "silu_mul_bf16", (u32s(out.rows), 1, 1), (256, 1, 1), 0;
            out.ptr, gate_up.ptr, out.rows as i32, out.cols as i32)
    }

    fn select_rows(&self, x: &CudaTensor, rows: &[usize], out: &mut CudaTensor) -> Result<()> {
        check(
            "select_rows",
            *self.last_rows.borrow() == rows && out.rows == rows.len() && out.cols == x.cols,
            || format!("rows {rows:?}: the CUDA backend gathers the step's last rows only"),
        )?;
        launch!(self, "gather_rows_bf16", (u32s(out.rows), 1, 1), (256, 1, 1), 0;
            out.ptr, x.ptr, self.step.last_rows.ptr, out.rows as i32, out.cols as i32)
    }

    fn all_reduce(&self, x: &mut CudaTensor) -> Result<()> {
        if self.tp_size == 1 {
            return Ok(());
        }
        check("all_reduce", x.dtype == DType::Bf16, || format!("{:?} tensor", x.dtype))?;
        let n = x.rows * x.cols;
        self.all_reduce_with(
            self.collective_for(2 * n),
            x.ptr,
            x.ptr,
            n,
            crate::nvrar::ElemType::Bf16,
        )
    }

    fn all_gather_cols(&self, x: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        let tp = self.tp_size;
        check(
            "all_gather_cols",
            x.dtype == DType::F32 && out.dtype == DType::F32 && out.rows == x.rows && out.cols == x.cols * tp,
            || {
                format!(
                    "[{}, {}] {:?} from {tp} ranks into [{}, {}] {:?}",
                    x.rows, x.cols, x.dtype, out.rows, out.cols, out.dtype
                )
            },
        )?;
        let n = x.rows * x.cols;
        let parts = self.alloc_f32(tp, n)?;
        self.groups("all_gather_cols")?
            .0
            .all_gather_f32(x.ptr, parts.ptr, n, self.stream.cu_stream())?;
        // parts [tp][rows, cols] -> out [rows, tp * cols]: one strided copy per rank's part.
        for r in 0..tp {
            let copy = sys::CUDA_MEMCPY2D_st {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: parts.ptr + (r * n * 4) as u64,
                srcArray: std::ptr::null_mut(),
                srcPitch: x.cols * 4,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: out.ptr + (r * x.cols * 4) as u64,
                dstArray: std::ptr::null_mut(),
                dstPitch: out.cols * 4,
                WidthInBytes: x.cols * 4,
                Height: x.rows,
            };
            // SAFETY: source and destination regions lie inside `parts` and `out`.
            unsafe { sys::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream()) }
                .result()
                .map_err(|e| cuda_err("cuMemcpy2DAsync (gathering logits)", e))?;
        }
        Ok(())
    }

    fn send_next(&self, x: &CudaTensor) -> Result<()> {
        let (g, stage) = self.groups("send_next")?;
        g.send_bf16(x.ptr, x.rows * x.cols, stage + 1, self.stream.cu_stream())
    }

    fn recv_prev(&self, x: &mut CudaTensor) -> Result<()> {
        let (g, stage) = self.groups("recv_prev")?;
        let prev = stage
            .checked_sub(1)
            .ok_or_else(|| Error::Invalid("cuda backend: the first stage has no previous stage".into()))?;
        g.recv_bf16(x.ptr, x.rows * x.cols, prev, self.stream.cu_stream())
    }

    fn begin_step(&self, inputs: &StepInputs) -> Result<()> {
        let b = inputs.batch;
        let (t, s) = (b.num_tokens(), b.seqs.len());
        check("begin_step", t <= self.cap.max_tokens && s <= self.cap.max_seqs, || {
            format!(
                "{t} tokens in {s} sequences; the backend was sized for {} and {}",
                self.cap.max_tokens, self.cap.max_seqs
            )
        })?;
        let positions: Vec<i32> = b.positions().iter().map(|&p| p as i32).collect();
        let token_slot: Vec<i32> = b
            .seqs
            .iter()
            .flat_map(|q| std::iter::repeat_n(q.slot as i32, q.len))
            .collect();
        let seq_slot: Vec<i32> = b.seqs.iter().map(|q| q.slot as i32).collect();
        let kv_len: Vec<i32> = b.seqs.iter().map(|q| (q.start_pos + q.len) as i32).collect();
        let last = b.last_rows();
        let last_i32: Vec<i32> = last.iter().map(|&r| r as i32).collect();
        if inputs.ids.len() == t {
            self.htod(&self.step.ids, inputs.ids)?;
        }
        self.htod(&self.step.positions, &positions)?;
        self.htod(&self.step.token_slot, &token_slot)?;
        self.htod(&self.step.seq_slot, &seq_slot)?;
        self.htod(&self.step.seq_kv_len, &kv_len)?;
        self.htod(&self.step.last_rows, &last_i32)?;
        self.htod(&self.step.keys, inputs.sample_keys)?;
        self.htod(&self.step.counters, inputs.sample_counters)?;
        *self.last_rows.borrow_mut() = last;
        Ok(())
    }

    fn sample(&self, logits: &CudaTensor, vocab: usize, p: &SamplingParams) -> Result<()> {
        check(
            "sample",
            logits.dtype == DType::F32 && logits.cols >= vocab && logits.rows <= self.cap.max_seqs,
            || {
                format!(
                    "[{}, {}] {:?} logits for vocab {vocab}",
                    logits.rows, logits.cols, logits.dtype
                )
            },
        )?;
        launch!(self, "sample_tokens_f32", (u32s(logits.rows), 1, 1), (1024, 1, 1), 0;
            logits.ptr, logits.cols as i32, vocab as i32, self.step.out_ids.ptr, self.step.keys.ptr, self.step.counters.ptr,
            logits.rows as i32, p.temperature, p.top_k as i32, p.top_p)
    }

    fn sampled_tokens(&self, n: usize) -> Result<Vec<u32>> {
        self.dtoh::<u32>(self.step.out_ids.ptr, n)
    }

    fn time_all_reduce(&self, elems: usize) -> Result<Option<f64>> {
        if self.tp_size == 1 || elems == 0 {
            return Ok(None);
        }
        const CALLS: usize = 50;
        let x = self.alloc(1, elems)?;
        let key = yalis_core::rng::stream_key(elems as u64, 11);
        launch!(self, "dummy_fill_bf16", (u32s(elems.div_ceil(256 * 8)), 1, 1), (256, 1, 1), 0;
            x.ptr, 1i32, elems as i32, elems as i64, 0i64, 0i64, key, 0.0f32, 1.0f32)?;
        let which = self.collective_for(2 * elems);
        let us = self.time_calls_us(true, CALLS, 10, || {
            self.all_reduce_with(which, x.ptr, x.ptr, elems, crate::nvrar::ElemType::Bf16)
        })?;
        Ok(Some(us))
    }

    fn graph_begin(&self, _key: u64) -> Result<bool> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err("cuStreamBeginCapture", e))?;
        Ok(true)
    }

    fn graph_end(&self, key: u64) -> Result<()> {
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e: DriverError| cuda_err("cuStreamEndCapture / cuGraphInstantiate", e))?
            .ok_or_else(|| Error::Invalid("cuda: the captured decode step is empty".into()))?;
        graph.upload().map_err(|e| cuda_err("cuGraphUpload", e))?;
        self.graphs.borrow_mut().insert(key, graph);
        Ok(())
    }

    fn graph_launch(&self, key: u64) -> Result<bool> {
        match self.graphs.borrow().get(&key) {
            Some(g) => g.launch().map(|_| true).map_err(|e| cuda_err("cuGraphLaunch", e)),
            None => Ok(false),
        }
    }
}

/// Activation-arena bytes for a rank: the live set of the largest step (a prefill of
/// `max_tokens` tokens: hidden, normed input and pending MLP output, plus the larger of the
/// attention's and the MLP's temporaries), half again for fragmentation, the f32 logits, and
/// the decode-attention partials (at most `264 + seqs` splits per query head).
pub fn arena_bytes(cfg: &ModelConfig, plan: &RankPlan, max_tokens: usize, max_seqs: usize) -> usize {
    let h = cfg.hidden_size;
    let q = plan.num_heads_per_rank * plan.head_dim;
    let inter = plan.intermediate_per_rank;
    let per_token = 3 * h + (plan.qkv_width() + q + h).max(3 * inter + h);
    let live = max_tokens * per_token * 2;
    let logits = max_seqs * plan.vocab_per_rank * plan.tp * 4 * 2;
    let partials = plan.num_heads_per_rank * (264 + 2 * max_seqs) * (plan.head_dim + 1) * 4;
    (live + live / 2 + logits + partials + (64 << 20)).div_ceil(ALIGN) * ALIGN
}

#[cfg(test)]
mod tests {
    /// Every kernel the backend launches is in the load list and defined in kernels/ (so a
    /// missing or misspelt name fails here, not on a GPU node).
    #[test]
    fn launched_kernels_are_loaded_and_defined() {
        let src = include_str!("backend.rs");
        let sources: String = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        let loaded: Vec<&str> = super::KERNELS
            .iter()
            .flat_map(|(_, names)| names.iter().copied())
            .collect();
        for pat in ["launch!(self, \"", "k.f[\""] {
            for part in src.split(pat).skip(1) {
                let name = &part[..part.find('"').unwrap()];
                assert!(loaded.contains(&name), "kernel {name} is launched but not in KERNELS");
            }
        }
        // The name before the first '(' after each `extern "C" __global__`, past any
        // __launch_bounds__(...).
        let defined: Vec<&str> = sources
            .split("extern \"C\" __global__")
            .skip(1)
            .map(|rest| {
                let rest = match rest.find("__launch_bounds__") {
                    Some(i) if i < rest.find('(').unwrap() + 1 => &rest[i + rest[i..].find(')').unwrap() + 1..],
                    _ => rest,
                };
                let head = &rest[..rest.find('(').unwrap()];
                head.split_whitespace().last().unwrap_or("")
            })
            .collect();
        for name in loaded {
            let defined = defined.contains(&name);
            assert!(
                defined,
                "kernel {name} is in KERNELS but no kernels/*.cu defines it as a __global__ function"
            );
        }
    }
}
