//! The Llama model written once over the [`Backend`] trait, its KV cache and generation loop,
//! the CPU reference backend, and ranks as threads.

pub mod backend;
pub mod cpu;
pub mod generate;
pub mod layers;
pub mod llama;
pub mod ranks;

pub use backend::{Backend, QkvLayout, SeqChunk, StepBatch};
pub use cpu::CpuBackend;
pub use generate::{Engine, GenerateOptions, Generation};
pub use llama::Llama;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] yalis_core::Error),
    #[error(transparent)]
    Comm(#[from] yalis_comm::CommError),
    #[error("{0}")]
    Invalid(String),
    #[error("rank {rank} on {host}: {msg}")]
    Rank { rank: usize, host: String, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
