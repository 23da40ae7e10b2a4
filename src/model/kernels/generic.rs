//! The switch between the CPU kernels and the device-generic paths.
//!
//! Every custom CPU operation of this folder has a device-generic form made of candle operations: the only form a
//! GPU runs. Each call site asks [`use_cpu_kernels`] which one to take: the kernels only for tensors on the CPU, and
//! never while the generic forms are forced — by `EDITGUARD_KERNELS=generic` for a whole process, or by a
//! [`GenericOnly`] guard for the current thread (what the tests use to run a GPU's code here and compare it with the
//! kernels). Every decision is taken on the thread that runs the forward or backward pass (the worker pool only runs
//! the pieces of a kernel already chosen), so a guard affects its own thread's model and no other test's.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::Device;

/// The environment variable that forces the device-generic forms for a whole process (`generic`).
pub const KERNELS_VARIABLE: &str = "EDITGUARD_KERNELS";

thread_local! {
    static GENERIC_ONLY: Cell<bool> = const { Cell::new(false) };
}

fn forced_by_environment() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var(KERNELS_VARIABLE).is_ok_and(|value| value.trim() == "generic"))
}

/// Whether the generic forms are forced on this thread (by a guard or the environment).
pub fn generic_forced() -> bool {
    forced_by_environment() || GENERIC_ONLY.with(Cell::get)
}

/// Whether an operation on `device` takes the CPU kernels: on the CPU, unless the generic forms are forced.
pub fn use_cpu_kernels(device: &Device) -> bool {
    device.is_cpu() && !generic_forced()
}

/// While alive, this thread computes with the device-generic forms only; dropping it restores what was before.
#[must_use = "the generic forms are forced only while the guard lives"]
pub struct GenericOnly {
    before: bool,
}

/// Forces the device-generic forms on this thread until the returned guard is dropped.
pub fn generic_only() -> GenericOnly {
    GenericOnly { before: GENERIC_ONLY.with(|forced| forced.replace(true)) }
}

impl Drop for GenericOnly {
    fn drop(&mut self) {
        GENERIC_ONLY.with(|forced| forced.set(self.before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_forces_the_generic_forms_on_its_thread_only() {
        let cpu = Device::Cpu;
        let before = use_cpu_kernels(&cpu);
        {
            let _guard = generic_only();
            assert!(!use_cpu_kernels(&cpu));
            let other_thread = std::thread::spawn(move || use_cpu_kernels(&Device::Cpu)).join().unwrap();
            assert_eq!(other_thread, before, "another thread is not affected");
        }
        assert_eq!(use_cpu_kernels(&cpu), before, "dropping the guard restores the kernels");
    }
}
