//! The eval harness's errors: the model's and core's, and its own.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] kframe_model::Error),

    #[error(transparent)]
    Core(#[from] kframe_core::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// An experiment that cannot run as asked, or whose output cannot be written.
    #[error("eval: {0}")]
    Eval(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
