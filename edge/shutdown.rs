//! Shutdown signals. The gateway has one shutdown mechanism: a `CancellationToken` to tell
//! every task, and a `TaskTracker` to wait for them (see [`crate::run`]). This module only
//! turns process signals into a future.

/// Resolves on the next SIGINT or SIGTERM (Ctrl-C elsewhere), naming it.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            // Without signal handlers the process can only be killed; wait forever.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(_) => std::future::pending().await,
        }
    }
}
