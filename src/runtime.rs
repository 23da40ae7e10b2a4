//! Process-wide settings that keep the CPU paths fast on small (virtual) machines.
//!
//! Two measurements on the 2-core VM this project is developed on motivate them. First, candle's worker pool parks a
//! worker after about 25 000 spins (a millisecond or two) without work; the serial stretches of an optimisation step
//! (building and walking the autograd graph) are often longer, so a worker parked and had to be woken for the next
//! product. On a VM an idle vCPU halts, and waking it again is charged as steal time: with the default limit a ROME
//! benchmark showed 8–16 s of steal per run, with a limit of two million spins 1–3 s, and the edit took 10.3–12.1 s
//! instead of 12.8–16.1 s. Second, glibc returns freed large blocks to the kernel and maps them again on the next
//! allocation, so every step paid page faults for its temporaries (7 % of the optimisation's main-thread time); a
//! larger mmap threshold and trim threshold keep that memory in the heap.
//!
//! [`configure_process`] applies both unless the user set the corresponding variables (`CANDLE_BARRIER_POOL_SPIN_LIMIT`,
//! `GLIBC_TUNABLES` / `MALLOC_*`). The binary and the test harness call it first thing in `main`.

/// Spins a candle pool worker makes before it parks (candle's default is 25 000); about a tenth of a second here.
const WORKER_SPIN_LIMIT: &str = "2000000";

/// Allocations up to this size come from the heap instead of their own mapping (glibc's upper limit for the
/// threshold on 64-bit systems).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;

/// Free memory at the top of the heap is returned to the kernel only beyond this size.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD_BYTES: i32 = 1 << 30;

/// Applies the settings described in the module header.
///
/// # Safety
/// It sets an environment variable, so it must run before the process starts any other thread (first thing in
/// `main`), as [`std::env::set_var`] requires.
pub unsafe fn configure_process() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: the caller guarantees that no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", WORKER_SPIN_LIMIT) };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_tuned = std::env::vars_os().any(|(name, _)| {
            let name = name.to_string_lossy();
            name == "GLIBC_TUNABLES" || name.starts_with("MALLOC_")
        });
        if !user_tuned {
            // SAFETY: mallopt only changes allocator parameters; it is called before other threads allocate.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
            }
        }
    }
}
