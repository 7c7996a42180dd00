//! Writing the files wrapd creates for itself (dev state, certificates, keys): new files
//! only, with an exact mode, synced to disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Creates `path` (failing if it exists) with `contents` and exactly `mode`.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))?;
    // create_new honours the umask; make the mode exact.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Config(format!("cannot chmod {}: {e}", path.display())))
}
