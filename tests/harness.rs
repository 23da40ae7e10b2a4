//! The generated regression suite: every case × method × model under `cases/`, judged against `models.toml`'s
//! thresholds and the insta baselines in `snapshots/` (see `editguard::harness`).

fn main() -> std::process::ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { editguard::runtime::configure_process() };
    editguard::harness::main()
}
