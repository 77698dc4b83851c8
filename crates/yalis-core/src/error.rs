use std::path::PathBuf;

/// Errors from the pure-Rust side of yalis. Each says what is wrong and, where one exists,
/// how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model config {path}: {msg}")]
    Config { path: String, msg: String },
    #[error("unknown model '{name}': not a preset ({presets}) and not a directory holding config.json")]
    UnknownModel { name: String, presets: String },
    #[error("parallel plan: {0}")]
    Plan(String),
    #[error("checkpoint {file}: tensor '{tensor}': {msg}")]
    Tensor { file: PathBuf, tensor: String, msg: String },
    #[error("checkpoint {file}: {msg}")]
    Checkpoint { file: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
