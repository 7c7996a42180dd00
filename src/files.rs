//! Writing the files wrapd creates for itself (dev state, certificates, keys): new files
//! only, with an exact mode, synced to disk, and never half-written.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Creates `path` (failing if it exists) with `contents` and exactly `mode`.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    write_new_with(path, mode, |file| file.write_all(contents))
}

/// Writes `path` with `contents` and exactly `mode`, replacing it atomically if it exists
/// (files wrapd rewrites, such as the dev AWS config with each run's port).
pub(crate) fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    write_file(path, mode, true, |file| file.write_all(contents))
}

/// Creates `path` (failing if it exists) with what `write` writes and exactly `mode`.
///
/// The contents go to a temporary file in the same directory (created exclusively, mode
/// 0600), which is synced and then linked into place only if `path` does not exist, so a
/// crash or a failed write never leaves a partial file at `path` for a later run to trip over.
pub(crate) fn write_new_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<()> {
    write_file(path, mode, false, write)
}

fn write_file(
    path: &Path,
    mode: u32,
    replace: bool,
    write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Config(format!("{what} {}: {e}", path.display()))
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".wrapd-new-")
        .tempfile_in(dir)
        .map_err(|e| fail("cannot create a temporary file for", &e))?;
    write(temp.as_file_mut())
        .and_then(|()| {
            temp.as_file()
                .set_permissions(fs::Permissions::from_mode(mode))
        })
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| fail("cannot write", &e))?;
    if replace {
        temp.persist(path)
            .map_err(|e| fail("cannot replace", &e.error))?;
    } else {
        temp.persist_noclobber(path)
            .map_err(|e| fail("cannot create", &e.error))?;
    }
    // The new directory entry is durable too.
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails half-way leaves nothing at the path, so the next attempt succeeds.
    #[test]
    fn a_failed_write_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        let failed = write_new_with(&path, 0o600, |file| {
            file.write_all(b"-----BEGIN PRIVATE")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert!(!path.exists());
        write_new(&path, b"complete", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"complete");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_new(&path, b"again", 0o600).is_err(), "never replaces");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }
}
