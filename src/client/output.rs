//! Output files that appear only when complete: what a decryption writes (plaintext that
//! must not be seen before it authenticates), written under no name or a private temporary
//! one, and moved into place on commit.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An output file written where nobody can see it until it is complete, then moved into
/// place only on success.
///
/// On Linux the file is unnamed (`O_TMPFILE`) in the target's directory, mode 0600: if the
/// process is killed before it commits, nothing is left behind, which matters because the
/// output may be plaintext that has not been authenticated yet. On commit it is linked under
/// an unpredictable temporary name and renamed over the target. Where the filesystem has no
/// unnamed files, a named temporary file is used instead, created exclusively (`O_EXCL`: no
/// symlink is followed), mode 0600, under an unpredictable name, and removed when not
/// committed.
pub struct Output {
    target: Option<PathBuf>,
    staged: Staged,
}

/// Where the output is until it commits.
enum Staged {
    /// Standard output: nothing to commit.
    Stdout,
    /// An unnamed file in the target's directory (its descriptor).
    Unnamed(std::os::fd::OwnedFd, PathBuf),
    /// A named temporary file, removed when dropped.
    Named(tempfile::TempPath),
}

impl Output {
    /// The output for `path` (`-`: standard output, which has nothing to commit), and the
    /// writer to fill it through.
    pub fn open(path: &str) -> Result<(Self, Box<dyn Write + Send>), String> {
        if path == "-" {
            return Ok((
                Output {
                    target: None,
                    staged: Staged::Stdout,
                },
                Box::new(BufWriter::new(std::io::stdout())),
            ));
        }
        let target = PathBuf::from(path);
        let name = target
            .file_name()
            .ok_or_else(|| format!("{path} is not a file name"))?
            .to_string_lossy()
            .into_owned();
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        if let Some(fd) = unnamed_file(&dir) {
            let file = File::from(fd.try_clone().map_err(|e| e.to_string())?);
            return Ok((
                Output {
                    target: Some(target),
                    staged: Staged::Unnamed(fd, dir),
                },
                Box::new(BufWriter::new(file)),
            ));
        }
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}.wrapctl-"))
            .tempfile_in(&dir)
            .map_err(|e| format!("cannot create a temporary file in {}: {e}", dir.display()))?;
        let (file, temp) = temp.into_parts();
        Ok((
            Output {
                target: Some(target),
                staged: Staged::Named(temp),
            },
            Box::new(BufWriter::new(file)),
        ))
    }

    /// Moves the complete output into place (after the writer is flushed and dropped).
    pub fn commit(self) -> Result<(), String> {
        self.commit_with(false, None, None)
    }

    /// [`Output::commit`] that survives a power loss: the file is synced before it is moved
    /// into place, and its directory after; with `mode` and `owner` (user and group), the
    /// file gets them first (the file it replaces had them). An owner that cannot be given
    /// is an error, and nothing is moved.
    pub fn commit_durable(
        self,
        mode: Option<u32>,
        owner: Option<(u32, u32)>,
    ) -> Result<(), String> {
        self.commit_with(true, mode, owner)
    }

    fn commit_with(
        self,
        durable: bool,
        mode: Option<u32>,
        owner: Option<(u32, u32)>,
    ) -> Result<(), String> {
        let Some(target) = self.target.clone() else {
            return Ok(());
        };
        let target = &target;
        let prepare = |file: &File| -> Result<(), String> {
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::fchown(file, Some(uid), Some(gid))
                    .map_err(|e| format!("cannot give the output the original's owner: {e}"))?;
            }
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("cannot set the output's permissions: {e}"))?;
            }
            if durable {
                file.sync_all()
                    .map_err(|e| format!("cannot sync the output: {e}"))?;
            }
            Ok(())
        };
        match &self.staged {
            Staged::Stdout => {}
            Staged::Unnamed(fd, _) => {
                prepare(&File::from(fd.try_clone().map_err(|e| e.to_string())?))?
            }
            Staged::Named(temp) => {
                prepare(&File::open(temp).map_err(|e| format!("cannot sync the output: {e}"))?)?
            }
        }
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        self.move_into_place(target)?;
        if durable {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    fn move_into_place(self, target: &Path) -> Result<(), String> {
        match self.staged {
            Staged::Stdout => Ok(()),
            Staged::Named(temp) => temp
                .persist(target)
                .map(drop)
                .map_err(|e| format!("cannot move the output into place: {}", e.error)),
            Staged::Unnamed(fd, dir) => {
                // A name first (linkat will not replace a file), then the rename over the
                // target, which is atomic.
                let name = format!(".wrapctl-{:016x}", rand::random::<u64>());
                let staged = dir.join(name);
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)),
                    rustix::fs::CWD,
                    &staged,
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(|e| format!("cannot move the output into place: {e}"))?;
                std::fs::rename(&staged, target).map_err(|e| {
                    let _ = std::fs::remove_file(&staged);
                    format!("cannot move the output into place: {e}")
                })
            }
        }
    }
}

/// An unnamed file (`O_TMPFILE`, mode 0600) in `dir`, where the filesystem has them (and
/// `/proc`, through which it is linked into place at commit).
fn unnamed_file(dir: &Path) -> Option<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    rustix::fs::open(
        dir,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The plaintext goes to a private file no one can find by name until it commits, in
    /// the target's directory, and a symlink planted at the target is replaced, never
    /// followed.
    #[test]
    fn output_is_private_unnamed_until_committed_and_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let target = dir.path().join("out");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let path = target.to_str().unwrap();

        let (first, mut writer) = Output::open(path).unwrap();
        let Staged::Unnamed(fd, staged_in) = &first.staged else {
            panic!("this filesystem has unnamed files (O_TMPFILE)");
        };
        assert_eq!(staged_in, dir.path());
        let file = File::from(fd.try_clone().unwrap());
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let names = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(names, 2, "nothing named before the commit");

        writer.write_all(b"plaintext").unwrap();
        writer.flush().unwrap();
        drop(writer);
        first.commit().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(std::fs::read(&target).unwrap(), b"plaintext");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "no temporary file is left behind");
    }
}
