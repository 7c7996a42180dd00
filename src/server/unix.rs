//! Binding a unix socket listener with an exact file mode.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::error::{Error, Result};

/// Binds `path` with exactly `mode`. A stale socket file is replaced, but only if it is a
/// socket: any other file there is an error, never deleted.
///
/// The socket is bound inside a fresh private directory (mode 0700) beside `path`, given its
/// mode there and then renamed into place, so it is never reachable with a wider mode, and
/// the process umask is never touched: changing it would race with every other thread
/// creating files.
pub fn bind_unix_socket(path: &Path, mode: u32) -> Result<UnixListener> {
    let config = |what: &str, e: &dyn std::fmt::Display| {
        Error::Config(format!("{what} {}: {e}", path.display()))
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => {
            return Err(Error::Config(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        Err(_) => {}
    }
    let parent = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("{} is not a socket path", path.display())))?;
    let private = tempfile::Builder::new()
        .prefix(".wrapd-bind-")
        .tempdir_in(parent)
        .map_err(|e| config("cannot create a private directory to bind", &e))?;
    let staged = private.path().join(name);
    let listener = UnixListener::bind(&staged).map_err(|e| config("cannot bind", &e))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .map_err(|e| config("cannot chmod", &e))?;
    std::fs::rename(&staged, path).map_err(|e| config("cannot move the socket to", &e))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Binding leaves the process umask alone, so files other threads create meanwhile get
    /// their usual mode; the socket gets exactly its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn binding_never_changes_the_umask_other_threads_see() {
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        let creator = {
            let (stop, files) = (stop.clone(), files.clone());
            std::thread::spawn(move || {
                let mut modes = std::collections::HashSet::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let path = files.join(i.to_string());
                    let file = std::fs::File::create(&path).unwrap();
                    modes.insert(file.metadata().unwrap().permissions().mode() & 0o777);
                    drop(file);
                    std::fs::remove_file(&path).unwrap();
                    i += 1;
                }
                modes
            })
        };
        let socket = dir.path().join("s.sock");
        for _ in 0..300 {
            let listener = bind_unix_socket(&socket, 0o660).unwrap();
            let meta = std::fs::symlink_metadata(&socket).unwrap();
            assert!(meta.file_type().is_socket());
            assert_eq!(meta.permissions().mode() & 0o777, 0o660);
            drop(listener);
        }
        stop.store(true, Ordering::Relaxed);
        let modes = creator.join().unwrap();
        assert_eq!(modes.len(), 1, "files got different modes: {modes:?}");
        // No staging directory is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "{left:?}");
        tokio::net::UnixStream::connect(&socket)
            .await
            .expect_err("the listener is closed");
        let listener = bind_unix_socket(&socket, 0o600).unwrap();
        tokio::net::UnixStream::connect(&socket).await.unwrap();
        drop(listener);
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"precious").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        assert!(bind_unix_socket(&path, 0o600).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
