//! `wrapctl encrypt` and `wrapctl decrypt`: streaming files through the thin client, with
//! the output written under a temporary name and moved into place only on success.
use std::fs::File;
use std::io::{BufReader, IsTerminal, Read, Write};
use std::path::Path;

use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::keyring::{Keyring, WrapdKey};
use wrapd::client::message;
use wrapd::client::{DataKeyServiceClient, Output};
use wrapd::context::EncryptionContext;

use crate::error::CliError;
use crate::output::{ErasedReport, Report, fields};

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
