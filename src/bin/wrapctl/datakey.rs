//! `wrapctl datakey`: generate, wrap, unwrap and re-wrap data keys (bytes in base64).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::DataKeyServiceClient;
use wrapd::proto::{GenerateDataKeyRequest, ReWrapRequest, UnwrapRequest, WrapRequest};

use crate::error::CliError;
use crate::output::{ErasedReport, Report, fields};

/// `wrapctl datakey ...`
#[derive(Subcommand)]
pub enum DatakeyCommand {
    /// Generate a data key: plaintext and wrapped.
    Generate {
        /// Key id or alias.
        key: String,
        /// Length in bytes (1 to 64).
        #[arg(long, default_value_t = 32)]
        bytes: u32,
        /// Return only the wrapped key.
        #[arg(long)]
        no_plaintext: bool,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Wrap plaintext (base64, 1 to 4096 bytes).
    Wrap {
        /// Key id or alias.
        key: String,
        /// The plaintext, base64.
        #[arg(long)]
        plaintext: String,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Unwrap a blob (base64).
    Unwrap {
        /// The ciphertext blob, base64.
        #[arg(long)]
        blob: String,
        /// Require the blob to be wrapped under this key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Re-wrap a blob under the newest version of a key, without exposing the plaintext.
    Rewrap {
        /// The ciphertext blob, base64.
        #[arg(long)]
        blob: String,
        /// Destination key (default: the blob's own key).
        #[arg(long)]
        to: Option<String>,
        /// Source context entry K=V (repeatable).
        #[arg(long = "source-context", value_parser = crate::parse_entry)]
        source_context: Vec<(String, String)>,
        /// Destination context entry K=V (repeatable; default: the source context).
        #[arg(long = "destination-context", value_parser = crate::parse_entry)]
        destination_context: Vec<(String, String)>,
    },
}

/// `--context K=V`, repeatable.
#[derive(Args)]
pub struct ContextArgs {
    /// Encryption context entry K=V (repeatable).
    #[arg(long = "context", value_parser = crate::parse_entry)]
    context: Vec<(String, String)>,
}

fn to_map(entries: Vec<(String, String)>) -> HashMap<String, String> {
    entries.into_iter().collect()
}

fn decode(what: &str, s: &str) -> Result<Vec<u8>, CliError> {
    B64.decode(s.trim())
        .map_err(|e| CliError::usage(format!("--{what} is not valid base64: {e}")))
}

/// A data key result, as printed (bytes in base64; absent fields are left out).
#[derive(Serialize, Default)]
struct DataKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext_blob: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_key_version: Option<u32>,
    key_id: String,
    key_version: u32,
}

impl Report for DataKey {
    fn human(&self) -> String {
        let mut pairs = Vec::new();
        if let Some(p) = &self.plaintext {
            pairs.push(("plaintext", p.clone()));
        }
        if let Some(c) = &self.ciphertext_blob {
            pairs.push(("ciphertext_blob", c.clone()));
        }
        if let (Some(id), Some(version)) = (&self.source_key_id, self.source_key_version) {
            pairs.push(("source_key_id", id.clone()));
            pairs.push(("source_key_version", version.to_string()));
        }
        pairs.push(("key_id", self.key_id.clone()));
        pairs.push(("key_version", self.key_version.to_string()));
        fields(&pairs)
    }
}

/// Runs a `datakey` command.
pub async fn run(channel: Channel, cmd: DatakeyCommand) -> Result<Box<dyn ErasedReport>, CliError> {
    let mut client = DataKeyServiceClient::new(channel);
    let out = match cmd {
        DatakeyCommand::Generate {
            key,
            bytes,
            no_plaintext,
            context,
        } => {
            let request = GenerateDataKeyRequest {
                key_id: key,
                encryption_context: to_map(context.context),
                number_of_bytes: bytes,
            };
            if no_plaintext {
                let r = client
                    .generate_data_key_without_plaintext(request)
                    .await?
                    .into_inner();
                DataKey {
                    ciphertext_blob: Some(B64.encode(&r.ciphertext_blob)),
                    key_id: r.key_id,
                    key_version: r.key_version,
                    ..Default::default()
                }
            } else {
                let r = client.generate_data_key(request).await?.into_inner();
                DataKey {
                    plaintext: Some(B64.encode(&r.plaintext)),
                    ciphertext_blob: Some(B64.encode(&r.ciphertext_blob)),
                    key_id: r.key_id,
                    key_version: r.key_version,
                    ..Default::default()
                }
            }
        }
        DatakeyCommand::Wrap {
            key,
            plaintext,
            context,
        } => {
            let r = client
                .wrap(WrapRequest {
                    key_id: key,
                    plaintext: decode("plaintext", &plaintext)?,
                    encryption_context: to_map(context.context),
                })
                .await?
                .into_inner();
            DataKey {
                ciphertext_blob: Some(B64.encode(&r.ciphertext_blob)),
                key_id: r.key_id,
                key_version: r.key_version,
                ..Default::default()
            }
        }
        DatakeyCommand::Unwrap { blob, key, context } => {
            let r = client
                .unwrap(UnwrapRequest {
                    ciphertext_blob: decode("blob", &blob)?,
                    encryption_context: to_map(context.context),
                    key_id: key.unwrap_or_default(),
                })
                .await?
                .into_inner();
            DataKey {
                plaintext: Some(B64.encode(&r.plaintext)),
                key_id: r.key_id,
                key_version: r.key_version,
                ..Default::default()
            }
        }
        DatakeyCommand::Rewrap {
            blob,
            to,
            source_context,
            destination_context,
        } => {
            let destination_context = if destination_context.is_empty() {
                source_context.clone()
            } else {
                destination_context
            };
            let r = client
                .re_wrap(ReWrapRequest {
                    ciphertext_blob: decode("blob", &blob)?,
                    source_encryption_context: to_map(source_context),
                    destination_key_id: to.unwrap_or_default(),
                    destination_encryption_context: to_map(destination_context),
                })
                .await?
                .into_inner();
            DataKey {
                ciphertext_blob: Some(B64.encode(&r.ciphertext_blob)),
                source_key_id: Some(r.source_key_id),
                source_key_version: Some(r.source_key_version),
                key_id: r.key_id,
                key_version: r.key_version,
                ..Default::default()
            }
        }
    };
    Ok(Box::new(out))
}
