//! One error type for the library: every failure names the problem in words a user can act on.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// No adapter matched (or none exists at all). The message says how to get one.
    #[error("no GPU adapter found{filter}. {hint}")]
    NoAdapter { filter: String, hint: String },

    #[error("requesting the GPU device failed: {0}")]
    RequestDevice(String),

    /// Shapes, head counts, dtypes or options that the operation cannot take.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The device cannot run the request as asked (limits, missing features).
    #[error("unsupported on this device: {0}")]
    Unsupported(String),

    /// A part of the project this build was compiled without (a cargo feature).
    #[error("not in this build: {0}")]
    NotBuilt(String),

    /// An error raised by the GPU while running work (validation, out of memory, lost device).
    #[error("GPU error: {0}")]
    Gpu(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for returning `Error::InvalidInput` with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::InvalidInput(format!($($arg)*)))
    };
}
pub(crate) use invalid;
