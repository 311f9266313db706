//! CPU thread count for the tensor kernels.
//!
//! candle asks for the thread count on every matrix multiplication; when `RAYON_NUM_THREADS` is not
//! set it re-reads `/proc/cpuinfo` each time, which costs more than a small model's whole step.
//! [`configure`] pins the count once, from the CPUs this process may run on.

/// Sets `RAYON_NUM_THREADS` to the available parallelism when unset. Call at the start of `main`,
/// before any other thread exists.
pub fn configure() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        // SAFETY: called at start-up while the process is single-threaded.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}

/// The thread count the kernels use.
pub fn configured() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}
