//! `wrapctl key-policy`: a key's policy document (docs/key-policies.md).

use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::KeyServiceClient;
use wrapd::proto::{GetKeyPolicyRequest, PutKeyPolicyRequest};

use crate::error::CliError;
use crate::output::{ErasedReport, Report};

/// `wrapctl key-policy ...`
#[derive(Subcommand)]
pub enum KeyPolicyCommand {
    /// Print a key's policy document (AWS's default policy for a key made without one).
    Get {
        /// Key id or alias.
        key: String,
    },
    /// Replace a key's policy document with the JSON of a file (`-`: standard input).
    Put {
        /// Key id or alias.
        key: String,
        /// The JSON policy document.
        #[arg(long)]
        file: PathBuf,
        /// Skip the check that the new policy still lets you replace it.
        #[arg(long)]
        bypass_lockout_check: bool,
    },
}

/// A policy document, as printed: the document itself for people, an object for `--json`.
#[derive(Serialize)]
struct Document {
    key_id: String,
    policy_name: String,
    policy: String,
}

impl Report for Document {
    fn human(&self) -> String {
        self.policy.clone()
    }
}

/// Runs a `key-policy` command.
pub async fn run(
    channel: Channel,
    cmd: KeyPolicyCommand,
) -> Result<Box<dyn ErasedReport>, CliError> {
    let mut client = KeyServiceClient::new(channel);
    match cmd {
        KeyPolicyCommand::Get { key } => {
            let got = client
                .get_key_policy(GetKeyPolicyRequest {
                    key_id: key.clone(),
                    policy_name: String::new(),
                })
                .await?
                .into_inner();
            Ok(Box::new(Document {
                key_id: key,
                policy_name: got.policy_name,
                policy: got.policy,
            }))
        }
        KeyPolicyCommand::Put {
            key,
            file,
            bypass_lockout_check,
        } => {
            let policy = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
            let metadata = client
                .put_key_policy(PutKeyPolicyRequest {
                    key_id: key,
                    policy_name: String::new(),
                    policy: policy.clone(),
                    bypass_lockout_check,
                })
                .await?
                .into_inner();
            Ok(Box::new(Document {
                key_id: metadata.key_id,
                policy_name: "default".into(),
                policy,
            }))
        }
    }
}
