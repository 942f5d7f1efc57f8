//! The daemons' logging: `tracing` to stderr or to `log_file` (appended, never truncated), as
//! text or JSON, with colour only for a person at a terminal and source locations on request,
//! and a level that can be changed while running and reset to the one it started with
//! (SPIRE's Logger API, in SPIRE's levels). It does not decide what is logged, nor who may
//! change the level: the daemons' APIs do.

pub use crate::conf::Level;
use crate::conf::LogFormat;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    #[error("cannot open log_file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a logger is already installed in this process")]
    AlreadyInstalled,
    #[error("bad log filter {directive:?}: {reason}")]
    Filter { directive: String, reason: String },
    #[error("cannot change the log level: {0}")]
    Reload(String),
}

/// What a daemon logs and where.
#[derive(Debug, Clone)]
pub struct Settings<'a> {
    pub level: Level,
    pub format: LogFormat,
    /// Appended to; stderr when `None`.
    pub file: Option<&'a Path>,
    /// File and line of each event (SPIRE's `log_source_location`).
    pub source_location: bool,
    /// Directives in force at every level (targets always written, such as audit events).
    pub always: &'a [&'a str],
    /// Directives in force unless the level is debug or trace (noisy dependencies).
    pub quiet: &'a [&'a str],
}

/// The installed logger's level: as launched, as now, and the means to change it.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    launch: Level,
    current: Mutex<Level>,
    always: Vec<String>,
    quiet: Vec<String>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("launch", &self.launch)
            .field("current", &self.current())
            .finish()
    }
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// The logger [`init`] installed in this process, if any.
pub fn control() -> Option<&'static LogControl> {
    CONTROL.get()
}

fn filter(level: Level, always: &[String], quiet: &[String]) -> Result<EnvFilter, LoggingError> {
    let mut d = vec![level.directive().to_string()];
    if !matches!(level, Level::Debug | Level::Trace) {
        d.extend(quiet.iter().cloned());
    }
    d.extend(always.iter().cloned());
    let directive = d.join(",");
    EnvFilter::try_new(&directive).map_err(|e| LoggingError::Filter {
        directive,
        reason: e.to_string(),
    })
}

/// Installs the process's logger (once per process).
pub fn init(s: Settings<'_>) -> Result<&'static LogControl, LoggingError> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let writer = match s.file {
        Some(p) => BoxMakeWriter::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| LoggingError::File {
                    path: p.display().to_string(),
                    source,
                })?,
        )),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let always: Vec<String> = s.always.iter().map(|d| d.to_string()).collect();
    let quiet: Vec<String> = s.quiet.iter().map(|d| d.to_string()).collect();
    let (filter_layer, handle) = reload::Layer::new(filter(s.level, &always, &quiet)?);
    // Colour only for a person at a terminal, never in files or journals.
    let ansi = s.file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_file(s.source_location)
        .with_line_number(s.source_location)
        .with_writer(writer);
    let fmt = match s.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let control = LogControl {
        handle,
        launch: s.level,
        current: Mutex::new(s.level),
        always,
        quiet,
    };
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .try_init()
        .map_err(|_| LoggingError::AlreadyInstalled)?;
    // Libraries that log through the `log` crate are filtered by the reloadable filter too,
    // not capped at the launch level.
    log::set_max_level(log::LevelFilter::Trace);
    if CONTROL.set(control).is_err() {
        return Err(LoggingError::AlreadyInstalled);
    }
    CONTROL.get().ok_or(LoggingError::AlreadyInstalled)
}

impl LogControl {
    /// The level the process started with.
    pub fn launch(&self) -> Level {
        self.launch
    }

    /// The level in force.
    pub fn current(&self) -> Level {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `level` in force.
    pub fn set(&self, level: Level) -> Result<(), LoggingError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let f = filter(level, &self.always, &self.quiet)?;
        self.handle
            .reload(f)
            .map_err(|e| LoggingError::Reload(e.to_string()))?;
        *cur = level;
        Ok(())
    }

    /// Puts the launch level back in force.
    pub fn reset(&self) -> Result<(), LoggingError> {
        self.set(self.launch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logger_levels_match_spire_api_numbers_and_names() {
        for l in Level::ALL {
            assert_eq!(Level::from_api(l.api()), Some(l));
            assert_eq!(Level::parse(l.name()), Some(l));
            assert_eq!(Level::parse(&l.name().to_uppercase()), Some(l));
        }
        assert_eq!(Level::from_api(0), None);
        assert_eq!(Level::from_api(8), None);
        assert_eq!(Level::parse("warning"), Some(Level::Warn));
        assert_eq!(Level::parse("verbose"), None);
        assert_eq!(Level::Info.api(), 5);
        assert_eq!(Level::Trace.api(), 7);
    }

    #[test]
    fn logger_filter_keeps_quiet_targets_quiet_above_debug() {
        let always = vec!["kame_audit=info".to_string()];
        let quiet = vec!["tss_esapi=off".to_string()];
        let f = filter(Level::Error, &always, &quiet).unwrap().to_string();
        assert!(
            f.contains("tss_esapi=off") && f.contains("kame_audit=info"),
            "{f}"
        );
        let f = filter(Level::Debug, &always, &quiet).unwrap().to_string();
        assert!(
            !f.contains("tss_esapi") && f.contains("kame_audit=info"),
            "{f}"
        );
    }
}
