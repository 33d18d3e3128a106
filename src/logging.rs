//! Log set-up: tracing to stderr, as text for people or JSON for shippers. What is logged is
//! decided where it happens; this module only decides how lines look.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter directive did not parse (validated earlier for `run`, so only `simulate`).
    #[error("log_level: {directive:?} is not a valid filter: {message}")]
    Filter { directive: String, message: String },
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadySet,
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, directive: &str) -> Result<(), LoggingError> {
    let filter = EnvFilter::try_new(directive).map_err(|err| LoggingError::Filter {
        directive: directive.to_owned(),
        message: err.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|_| LoggingError::AlreadySet)
}
