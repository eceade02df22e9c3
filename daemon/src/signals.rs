//! SIGTERM and SIGINT, as a stream: the first starts the drain, a second one means the
//! operator will not wait for it (see `dtfed run` in `main.rs`).

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Both stop signals, installed once so that none is missed between two waits.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Installs the handlers (from then on the signals no longer kill the process).
    pub fn install() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT, with its name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
