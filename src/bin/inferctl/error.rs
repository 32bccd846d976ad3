//! What can go wrong in `inferctl`, sorted by the exit code a script sees.

/// Every failure of a command; `main` prints it and exits with [`CliError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Exit 1: a file that cannot be read or written, a malformed dump, an unusable URL.
    #[error("{0:#}")]
    Local(#[from] anyhow::Error),
    /// Exit 3: no connection to the server (refused, unreachable, timed out).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// Exit 4: the server answered 4xx.
    #[error("the server refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// Exit 5: the server answered 5xx, sent an error event mid-stream, or broke the stream off.
    #[error("server error{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Server { status: Option<u16>, message: String },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Local(_) => 1,
            CliError::Connect { .. } => 3,
            CliError::Refused { .. } => 4,
            CliError::Server { .. } => 5,
        }
    }

    pub fn server(message: impl Into<String>) -> Self {
        CliError::Server {
            status: None,
            message: message.into(),
        }
    }

    /// A failure to write to stdout, stderr or a dump file.
    pub fn io(what: &str, e: std::io::Error) -> Self {
        CliError::Local(anyhow::anyhow!("{what}: {e}"))
    }
}

/// `e` and its causes on one line: reqwest's own message rarely says *why* ("connection refused").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

pub type Result<T> = std::result::Result<T, CliError>;
