//! `wrapctl encrypt` and `wrapctl decrypt`: streaming files through the thin client, with
//! the output written under a temporary name and moved into place only on success.
use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::DataKeyServiceClient;
use wrapd::client::keyring::{Keyring, WrapdKey};
use wrapd::client::message;
use wrapd::context::EncryptionContext;

use crate::error::CliError;
use crate::output::{ErasedReport, Report, fields};

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
pub(crate) struct Output {
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
    pub(crate) fn open(path: &str) -> Result<(Self, Box<dyn Write + Send>), String> {
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

    pub(crate) fn commit(self) -> Result<(), String> {
        let Some(target) = &self.target else {
            return Ok(());
        };
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

/// `wrapctl encrypt`'s result.
#[derive(Serialize)]
struct Encrypted {
    status: &'static str,
    bytes: u64,
    key_ids: Vec<String>,
}

impl Report for Encrypted {
    fn human(&self) -> String {
        fields(&[
            ("status", self.status.to_owned()),
            ("bytes", self.bytes.to_string()),
            ("key_ids", self.key_ids.join(", ")),
        ])
    }
}

/// `wrapctl decrypt`'s result.
#[derive(Serialize)]
struct Decrypted {
    status: &'static str,
    encryption_context: std::collections::BTreeMap<String, String>,
}

impl Report for Decrypted {
    fn human(&self) -> String {
        let context: Vec<String> = self
            .encryption_context
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        fields(&[
            ("status", self.status.to_owned()),
            ("encryption_context", context.join(" ")),
        ])
    }
}

/// Inputs at least this large get a progress bar (on a terminal).
const PROGRESS_FROM: u64 = 16 * 1024 * 1024;

fn input(path: &str) -> Result<Box<dyn Read + Send>, String> {
    if path == "-" {
        return Ok(Box::new(BufReader::new(std::io::stdin())));
    }
    let file = File::open(Path::new(path)).map_err(|e| format!("cannot open {path}: {e}"))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if size >= PROGRESS_FROM && std::io::stderr().is_terminal() {
        let style = indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let bar = indicatif::ProgressBar::new(size).with_style(style);
        return Ok(Box::new(bar.wrap_read(BufReader::new(file))));
    }
    Ok(Box::new(BufReader::new(file)))
}

/// Runs a blocking stream transform from `input_path` to `output_path` off the async
/// executor; the output is flushed, and a file output is moved into place only if `f`
/// succeeded.
async fn transform<T: Send + 'static>(
    input_path: &str,
    output_path: &str,
    f: impl FnOnce(&mut (dyn Read + Send), &mut (dyn Write + Send)) -> Result<T, CliError>
    + Send
    + 'static,
) -> Result<T, CliError> {
    let mut reader = input(input_path)?;
    let (output, mut writer) = Output::open(output_path)?;
    let result = tokio::task::spawn_blocking(move || {
        let result = f(&mut *reader, &mut *writer)?;
        writer
            .flush()
            .map_err(|e| format!("cannot write the output: {e}"))?;
        Ok::<_, CliError>(result)
    })
    .await
    .map_err(|e| CliError::from(e.to_string()))??;
    output.commit()?;
    Ok(result)
}

/// Encrypts under `keys` (key id or alias, and the daemon that holds it).
pub async fn encrypt(
    keys: Vec<(String, Channel)>,
    context: Vec<(String, String)>,
    input_path: &str,
    output_path: &str,
    frame_length: u32,
) -> Result<Box<dyn ErasedReport>, CliError> {
    let context = EncryptionContext::from_entries(context)?;
    let keyring = Keyring::new(
        keys.into_iter()
            .map(|(key_id, channel)| WrapdKey {
                client: DataKeyServiceClient::new(channel),
                key_id,
            })
            .collect(),
    )?;
    let data_key = keyring.generate(&context).await?;
    let key_ids: Vec<String> = data_key
        .data_keys
        .iter()
        .map(|e| String::from_utf8_lossy(&e.provider_info).into_owned())
        .collect();
    let bytes = transform(input_path, output_path, move |reader, writer| {
        message::encrypt_stream(
            reader,
            writer,
            &data_key.dek,
            &context,
            data_key.data_keys,
            frame_length,
        )
        .map_err(CliError::from)
    })
    .await?;
    Ok(Box::new(Encrypted {
        status: "encrypted",
        bytes,
        key_ids,
    }))
}

/// Decrypts with whichever of `daemons` unwraps a data key entry first.
pub async fn decrypt(
    daemons: Vec<Channel>,
    required: Vec<(String, String)>,
    limits: message::DecryptLimits,
    input_path: &str,
    output_path: &str,
) -> Result<Box<dyn ErasedReport>, CliError> {
    let keyring =
        Keyring::for_decryption(daemons.into_iter().map(DataKeyServiceClient::new).collect())?;
    let runtime = tokio::runtime::Handle::current();
    let header = transform(input_path, output_path, move |reader, writer| {
        message::decrypt_stream_with(reader, writer, limits, |header| {
            for (k, v) in &required {
                if header.context.get(k) != Some(v.as_str()) {
                    return Err(wrapd::Error::invalid(format!(
                        "the message's encryption context does not have {k}={v}"
                    )));
                }
            }
            runtime.block_on(keyring.unwrap(header))
        })
        .map_err(CliError::from)
    })
    .await?;
    Ok(Box::new(Decrypted {
        status: "decrypted",
        encryption_context: header
            .context
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }))
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
