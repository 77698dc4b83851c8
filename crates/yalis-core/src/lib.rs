//! Pure-Rust parts of yalis, with no CUDA: the model config (HF `config.json` and presets), the
//! parallel plan, weight sources (safetensors checkpoints and dummy weights, per-rank slices),
//! the tokenizer, sampling, and the report schema.

pub mod config;
pub mod error;
pub mod perf;
pub mod plan;
pub mod report;
pub mod rng;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::{ModelConfig, ResolvedModel, RopeScaling};
pub use error::{Error, Result};
pub use plan::{ParallelPlan, RankPlan};
