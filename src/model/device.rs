//! Which device editguard computes on, always chosen explicitly.
//!
//! Every command takes `--device cpu|cuda[:N]|metal[:N]`; the harness (and a command given no flag) reads
//! `EDITGUARD_DEVICE`; without either it is the CPU. A build with the `cuda` feature therefore never takes a GPU on
//! its own, so snapshots recorded on the CPU are not silently compared against another device's arithmetic. Asking
//! for a device the build does not include, or that the machine does not have, is one error that says which and
//! what to do. On a device other than the CPU the model runs the device-generic forms of every operation (see
//! [`super::kernels::generic`]), and a model's `gpu_dtype` in `models.toml` replaces its `dtype`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// The environment variable the harness reads the device from (and the commands' default).
pub const DEVICE_VARIABLE: &str = "EDITGUARD_DEVICE";

/// A device as asked for, before it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// CUDA device number N (`cuda` is `cuda:0`).
    Cuda(usize),
    /// Metal device number N (`metal` is `metal:0`).
    Metal(usize),
}

impl FromStr for DeviceRequest {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = |reason: String| Error::Device {
            asked: text.to_string(),
            reason,
            remedy: "write cpu, cuda, cuda:N, metal or metal:N (N: the device number, from 0)".to_string(),
        };
        let trimmed = text.trim().to_ascii_lowercase();
        let (kind, number) = match trimmed.split_once(':') {
            Some((kind, number)) => {
                let number = number
                    .parse::<usize>()
                    .map_err(|_| invalid(format!("`{number}` after `:` is not a device number")))?;
                (kind, Some(number))
            }
            None => (trimmed.as_str(), None),
        };
        match (kind, number) {
            ("cpu", None) => Ok(DeviceRequest::Cpu),
            ("cpu", Some(_)) => Err(invalid("the CPU takes no device number".to_string())),
            ("cuda", number) => Ok(DeviceRequest::Cuda(number.unwrap_or(0))),
            ("metal", number) => Ok(DeviceRequest::Metal(number.unwrap_or(0))),
            _ => Err(invalid(format!("`{kind}` is not a device kind"))),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Cpu => write!(f, "cpu"),
            DeviceRequest::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceRequest::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceRequest {
    /// The device asked for by a command's `--device` flag, else by [`DEVICE_VARIABLE`], else the CPU.
    pub fn resolve(flag: Option<&str>) -> Result<Self> {
        match flag {
            Some(text) => text.parse(),
            None => match std::env::var(DEVICE_VARIABLE) {
                Ok(text) if !text.trim().is_empty() => text.parse().map_err(|error| match error {
                    Error::Device { asked, reason, remedy } => {
                        Error::Device { asked: format!("{asked}` from `{DEVICE_VARIABLE}"), reason, remedy }
                    }
                    other => other,
                }),
                _ => Ok(DeviceRequest::Cpu),
            },
        }
    }

    /// Whether this build of editguard includes the device's backend.
    pub fn compiled_in(self) -> bool {
        match self {
            DeviceRequest::Cpu => true,
            DeviceRequest::Cuda(_) => cfg!(feature = "cuda"),
            DeviceRequest::Metal(_) => cfg!(feature = "metal"),
        }
    }

    /// Opens the device: an error when the build lacks its backend or the machine lacks the device.
    pub fn open(self) -> Result<Device> {
        let (feature, opened) = match self {
            DeviceRequest::Cpu => return Ok(Device::Cpu),
            DeviceRequest::Cuda(_n) => {
                #[cfg(feature = "cuda")]
                let opened = Some(Device::new_cuda(_n));
                #[cfg(not(feature = "cuda"))]
                let opened: Option<candle_core::Result<Device>> = None;
                ("cuda", opened)
            }
            DeviceRequest::Metal(_n) => {
                #[cfg(feature = "metal")]
                let opened = Some(Device::new_metal(_n));
                #[cfg(not(feature = "metal"))]
                let opened: Option<candle_core::Result<Device>> = None;
                ("metal", opened)
            }
        };
        match opened {
            None => Err(Error::Device {
                asked: self.to_string(),
                reason: format!("this build of editguard has no {feature} support"),
                remedy: format!(
                    "rebuild with `cargo build --release --features {feature}` (and run the tests with \
                     `cargo test --release --features {feature}`), or use --device cpu"
                ),
            }),
            Some(Ok(device)) => Ok(device),
            Some(Err(error)) => Err(Error::Device {
                asked: self.to_string(),
                reason: format!("the device cannot be opened: {error}"),
                remedy: "check that the machine has it (`nvidia-smi` lists CUDA devices), or use --device cpu"
                    .to_string(),
            }),
        }
    }
}

/// The device asked for (flag, environment, CPU), opened.
pub fn open_requested(flag: Option<&str>) -> Result<Device> {
    DeviceRequest::resolve(flag)?.open()
}

/// A short name of an opened device for reports and snapshots: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!(" CUDA ".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda(3));
        assert_eq!("metal".parse::<DeviceRequest>().unwrap(), DeviceRequest::Metal(0));
        assert_eq!(DeviceRequest::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:x", "cpu:1", "", "cuda:-1"] {
            let message = bad.parse::<DeviceRequest>().unwrap_err().to_string();
            assert!(message.contains("cpu, cuda, cuda:N"), "{bad}: {message}");
        }
    }

    #[test]
    fn a_device_the_build_lacks_is_one_clear_error() {
        assert!(matches!(DeviceRequest::Cpu.open(), Ok(Device::Cpu)));
        if !DeviceRequest::Cuda(0).compiled_in() {
            let message = DeviceRequest::Cuda(0).open().unwrap_err().to_string();
            assert!(message.contains("no cuda support") && message.contains("--features cuda"), "{message}");
        }
        if !DeviceRequest::Metal(0).compiled_in() {
            let message = DeviceRequest::Metal(0).open().unwrap_err().to_string();
            assert!(message.contains("no metal support"), "{message}");
        }
    }
}
