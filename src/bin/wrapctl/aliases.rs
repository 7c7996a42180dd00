//! `wrapctl aliases`: names for keys.

use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::KeyServiceClient;
use wrapd::proto::{AliasRequest, ListAliasesRequest};

use crate::error::CliError;
use crate::output::{ErasedReport, Report, fields, table};

/// `wrapctl aliases ...`
#[derive(Subcommand)]
pub enum AliasesCommand {
    /// Create an alias for a key.
    Create {
        /// alias/NAME.
        alias: String,
        /// Key id or alias.
        key: String,
    },
    /// Point an alias at another key.
    Update {
        /// alias/NAME.
        alias: String,
        /// Key id or alias.
        key: String,
    },
    /// Delete an alias.
    Delete {
        /// alias/NAME.
        alias: String,
    },
    /// List aliases, optionally only those of one key.
    List {
        /// Key id or alias.
        #[arg(long)]
        key: Option<String>,
    },
}

/// An alias, as printed.
#[derive(Serialize)]
struct Alias {
    alias_name: String,
    key_id: String,
}

impl Report for Alias {
    fn human(&self) -> String {
        fields(&[
            ("alias_name", self.alias_name.clone()),
            ("key_id", self.key_id.clone()),
        ])
    }
}

/// Aliases, as printed.
#[derive(Serialize)]
struct AliasList {
    aliases: Vec<Alias>,
}

impl Report for AliasList {
    fn human(&self) -> String {
        table(
            ["ALIAS", "KEY ID"],
            self.aliases
                .iter()
                .map(|a| [a.alias_name.clone(), a.key_id.clone()]),
        )
    }
}

/// Runs an `aliases` command.
pub async fn run(channel: Channel, cmd: AliasesCommand) -> Result<Box<dyn ErasedReport>, CliError> {
    let mut client = KeyServiceClient::new(channel);
    let request = |alias_name: String, key_id: String| AliasRequest { alias_name, key_id };
    let alias = match cmd {
        AliasesCommand::Create { alias, key } => client.create_alias(request(alias, key)).await,
        AliasesCommand::Update { alias, key } => client.update_alias(request(alias, key)).await,
        AliasesCommand::Delete { alias } => {
            client.delete_alias(request(alias, String::new())).await
        }
        AliasesCommand::List { key } => {
            let mut token = String::new();
            let mut aliases = Vec::new();
            loop {
                let page = client
                    .list_aliases(ListAliasesRequest {
                        key_id: key.clone().unwrap_or_default(),
                        page_size: 0,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                aliases.extend(page.aliases.into_iter().map(|a| Alias {
                    alias_name: a.alias_name,
                    key_id: a.key_id,
                }));
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            return Ok(Box::new(AliasList { aliases }));
        }
    }?
    .into_inner();
    Ok(Box::new(Alias {
        alias_name: alias.alias_name,
        key_id: alias.key_id,
    }))
}
