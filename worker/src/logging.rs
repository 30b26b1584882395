//! Daemon logging: `tracing` to a file in the session directory, and to stderr when
//! running in the foreground. `IONET_LOG` (or `RUST_LOG`) sets the filter.

use std::path::Path;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

fn filter() -> EnvFilter {
    let directive = std::env::var("IONET_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| "info".into());
    EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs to `<logs>/<file_name>` and, when `to_stderr`, to stderr. Keep the guard alive
/// for the life of the process: dropping it flushes the file.
pub fn init_daemon(logs: &Path, file_name: &str, to_stderr: bool) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(tracing_appender::rolling::never(logs, file_name));
    let file_layer = fmt::layer().with_ansi(false).with_writer(writer).with_filter(filter());
    let stderr_layer = to_stderr.then(|| fmt::layer().with_writer(std::io::stderr).with_filter(filter()));
    let _ = tracing_subscriber::registry().with(file_layer).with(stderr_layer).try_init();
    guard
}

/// Client commands (status, stop) log warnings and errors to stderr only.
pub fn init_client() {
    let _ = tracing_subscriber::registry()
        .with(fmt::layer().with_writer(std::io::stderr).with_filter(EnvFilter::new("warn")))
        .try_init();
}

/// A process with no daemon log of its own (a driver's embedded cluster, a worker) logs to
/// stderr when `IONET_LOG` asks it to (a worker's stderr is its log file, or its daemon's).
pub fn init_when_asked() {
    if std::env::var_os("IONET_LOG").is_some() {
        let _ = tracing_subscriber::registry()
            .with(fmt::layer().with_writer(std::io::stderr).with_filter(filter()))
            .try_init();
    }
}
