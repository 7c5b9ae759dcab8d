//! How the tools fail, each with its documented exit code.

/// Exit codes, as `--help` documents them.
pub mod exit {
    pub const OK: i32 = 0;
    /// At least one request failed.
    pub const REQUESTS_FAILED: i32 = 1;
    /// The target or the setup cannot be used.
    pub const BAD_TARGET: i32 = 2;
    pub const INTERNAL: i32 = 70;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load {url}: {detail}")]
    BadTarget { url: String, detail: String },

    #[error("{0}")]
    Rehearsal(String),

    #[error("{context}: {source}")]
    Internal {
        context: &'static str,
        source: std::io::Error,
    },
}

impl nginx_graceful::error::Failure for Error {
    fn exit_code(&self) -> i32 {
        Error::exit_code(self)
    }
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadTarget { .. } | Error::Rehearsal(_) => exit::BAD_TARGET,
            Error::Internal { .. } => exit::INTERNAL,
        }
    }

    pub fn internal(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Internal { context, source }
    }
}
