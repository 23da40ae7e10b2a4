//! The registry as the command line and the generated tests read it: parsed by [`crate::registry`], then checked by
//! the owner of each part it configures — architecture names by [`crate::model`], per-method settings by
//! [`crate::methods`], verdict thresholds by [`crate::thresholds`].
//!
//! The registry itself sits at the bottom of the crate and imports nothing above it; this module, above all three
//! owners, is where their checks meet. A registry read here is one every later stage can use without a late error
//! about a setting.

use std::path::Path;

use crate::error::Result;
use crate::registry::Registry;

/// Runs every owner's check of a parsed registry.
pub fn check(registry: &Registry) -> Result<()> {
    crate::model::check_architectures(registry)?;
    crate::methods::check_settings(registry)?;
    crate::thresholds::check_registry(registry)
}

/// [`Registry::discover`] (explicit path, `$EDITGUARD_MODELS`, `./models.toml`, the built-in copy), checked.
pub fn discover(explicit: Option<&Path>) -> Result<Registry> {
    let registry = Registry::discover(explicit)?;
    check(&registry)?;
    Ok(registry)
}

/// [`Registry::from_file`], checked.
pub fn from_file(path: &Path) -> Result<Registry> {
    let registry = Registry::from_file(path)?;
    check(&registry)?;
    Ok(registry)
}

/// [`Registry::parse`], checked.
pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Registry> {
    let registry = Registry::parse(text, origin, base_dir)?;
    check(&registry)?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::registry::tests::GOOD;

    fn err(text: &str) -> String {
        parse(text, "models.toml", Path::new(".")).unwrap_err().to_string()
    }

    #[test]
    fn shipped_registry_passes_every_check() {
        parse(crate::registry::BUILTIN_REGISTRY, "models.toml", Path::new(".")).unwrap();
    }

    #[test]
    fn unknown_architecture_names_file_line_and_field() {
        let message = err(&GOOD.replace("\"llama\"", "\"lama\""));
        assert!(
            message.starts_with("models.toml:5: models.tiny.architecture: unknown architecture `lama`"),
            "{message}"
        );
        assert!(message.contains("llama, gpt2, gptj"), "{message}");
    }

    #[test]
    fn unknown_method_and_bad_hyper_parameter_are_named() {
        let message = err(&format!("{GOOD}\n[models.tiny.methods.romeo]\nlayers = [1]\n"));
        assert!(message.contains("models.tiny.methods.romeo: unknown method `romeo`"), "{message}");
        let message =
            err(&format!("{GOOD}\n[models.tiny.methods.kn]\nsteps = \"many\"\nadaptive_threshold = 0.2\np = 0.4\n"));
        assert!(message.contains("models.tiny.methods.kn.steps"), "{message}");
    }

    #[test]
    fn bad_threshold_is_named() {
        let message = err(&format!("{GOOD}\n[models.tiny.thresholds]\ncollapse_ratio = 0.5\n"));
        assert!(message.contains("models.tiny.thresholds.collapse_ratio"), "{message}");
    }

    #[test]
    fn the_registry_alone_accepts_what_only_owners_check() {
        // The bottom floor reads the file's shape; the owners' checks are not its business.
        Registry::parse(&GOOD.replace("\"llama\"", "\"lama\""), "models.toml", Path::new(".")).unwrap();
    }
}
