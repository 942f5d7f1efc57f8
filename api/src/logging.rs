//! The log set-up the binaries share: `log_level` and `log_format` from their configuration,
//! to standard error, with tss-esapi's per-handle chatter kept to warnings unless the operator
//! asks for debug. Only binaries call it (it installs the global subscriber); libraries log
//! through `tracing` and must not.

use crate::conf::LogFormat;

/// Installs the global subscriber at `level` (SPIRE's names: DEBUG, INFO, WARN, ERROR) in
/// `format`; `always` are directives kept whatever the level (e.g. `kame_audit=info`).
pub fn init(level: &str, format: LogFormat, always: &[&str]) {
    let level = level.to_lowercase();
    let mut directive = level.clone();
    if !matches!(level.as_str(), "debug" | "trace") {
        directive.push_str(",tss_esapi=warn");
    }
    for d in always {
        directive.push(',');
        directive.push_str(d);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}
