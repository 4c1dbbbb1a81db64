//! The `cliproxyapi` binary: everything lives in the library; this only hands over the exit code.

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    cliproxyapi::cli::main()
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed in
/// one is not reused by another: with the runtime's and SQLite's threads that more than doubled
/// the peak memory under load. Two arenas are plenty for two runtime threads.
///
/// Blocks of 1 MiB or more (an argon2 check's tens of MiB, a large request body) are mapped
/// on their own and unmapped when freed. By default glibc raises that threshold to the size of
/// the last large block freed (up to 32 MiB), after which such blocks come from the arenas'
/// heaps and, interleaved with small allocations, stay there: under a flood of wrong
/// management keys (19 MiB argon2 checks) beside slow uploads, the server grew to over 1 GB and
/// stayed there; with the threshold fixed, its peak stayed under 200 MB (tests/api/soak.rs).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_ARENA_MAX: i32 = -8;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        mallopt(M_ARENA_MAX, 2);
        mallopt(M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
