//! `wrapctl grants`: rights on one key for one grantee (docs/grants.md).

use std::collections::HashMap;

use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::KeyServiceClient;
use wrapd::proto::{
    CreateGrantRequest, GrantConstraints, ListGrantsRequest, ListRetirableGrantsRequest,
    RetireGrantRequest, RevokeGrantRequest,
};

use crate::error::CliError;
use crate::output::{ErasedReport, Report, fields, table};
use crate::parse_entry;

/// `wrapctl grants ...`
#[derive(Subcommand)]
pub enum GrantsCommand {
    /// Grant a principal (by ARN) some operations on a key.
    Create {
        /// Key id or alias (resolved now: the grant stays on that key).
        key: String,
        /// The grantee's ARN, e.g. arn:aws:iam::111122223333:wrapd/unix:uid=1000.
        #[arg(long)]
        grantee: String,
        /// An operation, as AWS KMS names it: Decrypt, Encrypt, GenerateDataKey,
        /// GenerateDataKeyWithoutPlaintext, ReEncryptFrom, ReEncryptTo, CreateGrant,
        /// RetireGrant, DescribeKey (repeatable).
        #[arg(long = "operation", required = true)]
        operations: Vec<String>,
        /// Who else may retire the grant (an ARN).
        #[arg(long)]
        retiring: Option<String>,
        /// Only with an encryption context that includes K=V (repeatable).
        #[arg(long = "context-subset", value_parser = parse_entry)]
        subset: Vec<(String, String)>,
        /// Only with exactly this encryption context, K=V (repeatable).
        #[arg(long = "context-equals", value_parser = parse_entry)]
        equals: Vec<(String, String)>,
        /// A name that makes a retried creation answer with the same grant.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List a key's grants.
    List {
        /// Key id or alias.
        key: String,
        /// Only this grantee's.
        #[arg(long)]
        grantee: Option<String>,
    },
    /// List the grants a principal may retire (as their retiring principal), on every key.
    Retirable {
        /// The retiring principal's ARN.
        principal: String,
    },
    /// Retire a grant, by its token or by key and grant id.
    Retire {
        /// Key id (with --grant-id).
        #[arg(long, requires = "grant_id", conflicts_with = "token")]
        key: Option<String>,
        /// Grant id (with --key).
        #[arg(long, requires = "key")]
        grant_id: Option<String>,
        /// The grant token CreateGrant answered with.
        #[arg(long, required_unless_present = "key")]
        token: Option<String>,
    },
    /// Revoke a grant of a key.
    Revoke {
        /// Key id or alias.
        key: String,
        /// Grant id.
        grant_id: String,
    },
}

/// A grant, as printed.
#[derive(Serialize)]
struct Grant {
    key_id: String,
    grant_id: String,
    name: String,
    grantee: String,
    retiring: String,
    issuer: String,
    operations: Vec<String>,
    constraints: String,
}

impl Grant {
    fn of(grant: wrapd::proto::Grant) -> Self {
        let constraints = grant
            .constraints
            .map(|c| {
                let mut parts = Vec::new();
                let entries = |map: HashMap<String, String>| {
                    let mut pairs: Vec<String> =
                        map.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
                    pairs.sort();
                    pairs.join(",")
                };
                if c.has_encryption_context_equals || !c.encryption_context_equals.is_empty() {
                    parts.push(format!("equals {}", entries(c.encryption_context_equals)));
                }
                if c.has_encryption_context_subset || !c.encryption_context_subset.is_empty() {
                    parts.push(format!("subset {}", entries(c.encryption_context_subset)));
                }
                parts.join("; ")
            })
            .unwrap_or_default();
        Self {
            key_id: grant.key_id,
            grant_id: grant.grant_id,
            name: grant.name,
            grantee: grant.grantee_principal,
            retiring: grant.retiring_principal,
            issuer: grant.issuer,
            operations: grant.operations,
            constraints,
        }
    }
}

/// Grants, as printed.
#[derive(Serialize)]
struct GrantList {
    grants: Vec<Grant>,
}

impl Report for GrantList {
    fn human(&self) -> String {
        table(
            ["GRANT ID", "KEY ID", "GRANTEE", "OPERATIONS", "CONSTRAINTS"],
            self.grants.iter().map(|g| {
                [
                    g.grant_id.clone(),
                    g.key_id.clone(),
                    g.grantee.clone(),
                    g.operations.join(","),
                    g.constraints.clone(),
                ]
            }),
        )
    }
}

/// A grant made.
#[derive(Serialize)]
struct Created {
    grant_id: String,
    grant_token: String,
}

impl Report for Created {
    fn human(&self) -> String {
        fields(&[
            ("grant_id", self.grant_id.clone()),
            ("grant_token", self.grant_token.clone()),
        ])
    }
}

/// A grant retired or revoked.
#[derive(Serialize)]
struct Removed {
    removed: bool,
}

impl Report for Removed {
    fn human(&self) -> String {
        fields(&[("removed", self.removed.to_string())])
    }
}

/// Every grant of a listing, page after page (`fetch` asks for the page a token names).
async fn all_pages<F, Fut>(mut fetch: F) -> Result<Vec<Grant>, CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<
            Output = Result<tonic::Response<wrapd::proto::ListGrantsResponse>, tonic::Status>,
        >,
{
    let mut grants = Vec::new();
    let mut token = String::new();
    loop {
        let page = fetch(token).await?.into_inner();
        grants.extend(page.grants.into_iter().map(Grant::of));
        token = page.next_page_token;
        if token.is_empty() {
            return Ok(grants);
        }
    }
}

/// Runs a `grants` command.
pub async fn run(channel: Channel, cmd: GrantsCommand) -> Result<Box<dyn ErasedReport>, CliError> {
    let mut client = KeyServiceClient::new(channel);
    match cmd {
        GrantsCommand::Create {
            key,
            grantee,
            operations,
            retiring,
            subset,
            equals,
            name,
        } => {
            let constraints = GrantConstraints {
                has_encryption_context_equals: !equals.is_empty(),
                encryption_context_equals: equals.into_iter().collect(),
                has_encryption_context_subset: !subset.is_empty(),
                encryption_context_subset: subset.into_iter().collect(),
            };
            let made = client
                .create_grant(CreateGrantRequest {
                    key_id: key,
                    grantee_principal: grantee,
                    retiring_principal: retiring.unwrap_or_default(),
                    operations,
                    constraints: Some(constraints),
                    name,
                })
                .await?
                .into_inner();
            Ok(Box::new(Created {
                grant_id: made.grant_id,
                grant_token: made.grant_token,
            }))
        }
        GrantsCommand::List { key, grantee } => {
            let grants = all_pages(|page_token| {
                let mut client = client.clone();
                let request = ListGrantsRequest {
                    key_id: key.clone(),
                    grantee_principal: grantee.clone().unwrap_or_default(),
                    page_token,
                    ..Default::default()
                };
                async move { client.list_grants(request).await }
            })
            .await?;
            Ok(Box::new(GrantList { grants }))
        }
        GrantsCommand::Retirable { principal } => {
            let grants = all_pages(|page_token| {
                let mut client = client.clone();
                let request = ListRetirableGrantsRequest {
                    retiring_principal: principal.clone(),
                    page_size: 0,
                    page_token,
                };
                async move { client.list_retirable_grants(request).await }
            })
            .await?;
            Ok(Box::new(GrantList { grants }))
        }
        GrantsCommand::Retire {
            key,
            grant_id,
            token,
        } => {
            client
                .retire_grant(RetireGrantRequest {
                    grant_token: token.unwrap_or_default(),
                    key_id: key.unwrap_or_default(),
                    grant_id: grant_id.unwrap_or_default(),
                })
                .await?;
            Ok(Box::new(Removed { removed: true }))
        }
        GrantsCommand::Revoke { key, grant_id } => {
            client
                .revoke_grant(RevokeGrantRequest {
                    key_id: key,
                    grant_id,
                })
                .await?;
            Ok(Box::new(Removed { removed: true }))
        }
    }
}
