//! Binding the unix socket listener with an explicit file mode.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::error::{Error, Result};

/// Binds `path` and sets its mode. A stale socket file is removed first, but only if it is
/// a socket: any other file there is an error, never deleted.
pub fn bind_unix_socket(path: &Path, mode: u32) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| {
                Error::Config(format!(
                    "cannot remove stale socket {}: {e}",
                    path.display()
                ))
            })?;
        }
        Ok(_) => {
            return Err(Error::Config(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        Err(_) => {}
    }
    // Bind with a restrictive umask so the socket never exists with a wider mode than
    // asked, even for the moment before the chmod below.
    // SAFETY: umask only swaps the process file-mode mask; it has no memory effects.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener =
        bound.map_err(|e| Error::Config(format!("cannot bind {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Config(format!("cannot chmod {}: {e}", path.display())))?;
    Ok(listener)
}
