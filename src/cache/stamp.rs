//! Content stamps: proof that a cached file still holds the bytes whose sha256 was once verified.
//!
//! Hashing a model file costs a second or more, and every test process loads the model, so the digest is not
//! recomputed on every use. Instead, after a file's sha256 has been verified, a stamp records the digest together
//! with what the file system says about the file: size, modification time, status-change time, inode and device.
//! Any write to the file changes its status-change time (`ctime`), which, unlike the modification time, no user-level
//! tool can set back, so a stamp that still matches the file's metadata means the content is the verified one. A
//! stamp that does not match (or no stamp at all) makes the next use hash the file again: the same digest renews the
//! stamp, another digest is reported as corruption, naming the file and both digests.

use std::path::Path;

use crate::error::{Error, Result};

/// What the file system says about a file, in the fields a stamp compares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    size: u64,
    modified_ns: i128,
    changed_ns: i128,
    inode: u64,
    device: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        let meta = std::fs::metadata(path).ok()?;
        Some(identity_of(&meta))
    }

    fn render(&self) -> String {
        format!("{} {} {} {} {}", self.size, self.modified_ns, self.changed_ns, self.inode, self.device)
    }
}

#[cfg(unix)]
fn identity_of(meta: &std::fs::Metadata) -> FileIdentity {
    use std::os::unix::fs::MetadataExt;
    let nanos = |seconds: i64, nanos: i64| seconds as i128 * 1_000_000_000 + nanos as i128;
    FileIdentity {
        size: meta.len(),
        modified_ns: nanos(meta.mtime(), meta.mtime_nsec()),
        changed_ns: nanos(meta.ctime(), meta.ctime_nsec()),
        inode: meta.ino(),
        device: meta.dev(),
    }
}

#[cfg(not(unix))]
fn identity_of(meta: &std::fs::Metadata) -> FileIdentity {
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    // Without a status-change time, the modification time stands in for it.
    FileIdentity { size: meta.len(), modified_ns, changed_ns: modified_ns, inode: 0, device: 0 }
}

/// The state of a cached file against the digest it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The stamp matches the file: its content is the verified one (nothing was hashed).
    Stamped,
    /// The file was hashed now, has the expected digest, and its stamp was (re)written.
    Rehashed,
    /// No file.
    Missing,
    /// The file was hashed now and has another digest.
    Corrupt {
        /// The digest found.
        actual: String,
    },
}

/// Checks `file` against `expected` (lower-case hex sha256) using the stamp at `stamp`, hashing the file only when
/// the stamp is absent or no longer matches; a good hash renews the stamp.
pub fn verify(file: &Path, stamp: &Path, expected: &str) -> Result<Verdict> {
    let Some(identity) = FileIdentity::of(file) else {
        return Ok(Verdict::Missing);
    };
    if std::fs::read_to_string(stamp).is_ok_and(|text| text.trim() == render(expected, &identity)) {
        return Ok(Verdict::Stamped);
    }
    let actual = super::sha256_file(file)?;
    if actual != expected {
        return Ok(Verdict::Corrupt { actual });
    }
    record(file, stamp, expected)?;
    Ok(Verdict::Rehashed)
}

/// Writes the stamp of `file`, whose sha256 the caller has just verified to be `sha256`.
pub fn record(file: &Path, stamp: &Path, sha256: &str) -> Result<()> {
    let identity = FileIdentity::of(file)
        .ok_or_else(|| Error::io(file, std::io::Error::new(std::io::ErrorKind::NotFound, "the file vanished")))?;
    super::write_atomic(stamp, format!("{}\n", render(sha256, &identity)).as_bytes())
}

fn render(sha256: &str, identity: &FileIdentity) -> String {
    format!("sha256 {sha256} {}", identity.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn a_stamp_spares_the_hash_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (file, stamp) = (dir.path().join("m.gguf"), dir.path().join("m.gguf.stamp"));
        assert_eq!(verify(&file, &stamp, ABC).unwrap(), Verdict::Missing);
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(verify(&file, &stamp, ABC).unwrap(), Verdict::Rehashed);
        assert_eq!(verify(&file, &stamp, ABC).unwrap(), Verdict::Stamped);
        // A forged stamp of another digest is not trusted: the file is hashed again.
        std::fs::write(&stamp, "sha256 0000 1 2 3 4 5\n").unwrap();
        assert_eq!(verify(&file, &stamp, ABC).unwrap(), Verdict::Rehashed);
    }

    #[test]
    fn bytes_flipped_in_place_with_the_size_and_mtime_kept_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (file, stamp) = (dir.path().join("m.gguf"), dir.path().join("m.gguf.stamp"));
        std::fs::write(&file, b"abc").unwrap();
        record(&file, &stamp, ABC).unwrap();
        let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut handle = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        handle.seek(SeekFrom::Start(1)).unwrap();
        handle.write_all(b"X").unwrap();
        handle.set_modified(modified).unwrap();
        drop(handle);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 3);
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), modified);
        match verify(&file, &stamp, ABC).unwrap() {
            Verdict::Corrupt { actual } => assert_ne!(actual, ABC),
            other => panic!("expected corruption, got {other:?}"),
        }
    }
}
