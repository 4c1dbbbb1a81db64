//! The `cliproxyapi` binary: everything lives in the library; this only hands over the exit code.

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    cliproxyapi::cli::main()
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed in
/// one is not reused by another: with the runtime's and SQLite's threads that more than doubled
/// the peak memory under load. Two arenas are plenty for two runtime threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_ARENA_MAX: i32 = -8;
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        mallopt(M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
