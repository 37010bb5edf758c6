//! The runtime every command runs on, and the signals that stop it.

/// The runtime every command runs on: tokio's multi-threaded scheduler, with
/// its LIFO slot turned off when built with `--cfg tokio_unstable` (as
/// `.cargo/config.toml` does).
///
/// Why: the slot runs a task woken by the running task next. When a Redis
/// reply batch wakes many requests, each finished request wakes its HTTP/2
/// connection task into the slot, which then writes that one response before
/// the other requests finish: a `writev` per response. Without the slot the
/// finished requests are written together; on the warm GetUser benchmark this
/// took writes per call from about 1.1 to 0.4, system time per call from about
/// 15 µs to 6 µs, and throughput up by about half (docs/benchmarks.md).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
