//! The generated regression suite: every case × method × model under `cases/`, judged against `models.toml`'s
//! thresholds and the insta baselines in `snapshots/` (see `editguard::harness`).

fn main() -> std::process::ExitCode {
    editguard::harness::main()
}
