//! `wrapctl keys`: the lifecycle of master keys.

use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::KeyServiceClient;
use wrapd::key_import::{ImportAlgorithm, KEY_MATERIAL_LEN, wrap_key_material};
use wrapd::proto::{
    CreateKeyRequest, EnableKeyRotationRequest, GetParametersForImportRequest,
    ImportKeyMaterialRequest, KeyMetadata, KeyOrigin, KeyRef, KeyState, KeyVersionRequest,
    ListKeysRequest, ScheduleKeyDeletionRequest, ScheduleKeyVersionDestructionRequest,
    TagKeyRequest, UntagKeyRequest, WrappingAlgorithm,
};
use zeroize::Zeroizing;

use crate::error::CliError;
use crate::output::{ErasedReport, Report, fields, table};

/// `wrapctl keys ...`
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key (AES-256 in the token), optionally with an alias.
    Create {
        /// Free-text description.
        #[arg(long, default_value = "")]
        description: String,
        /// An alias to create with it (alias/NAME).
        #[arg(long)]
        alias: Option<String>,
        /// Create it without key material (PENDING_IMPORT), for `wrapctl keys import`.
        #[arg(long)]
        external: bool,
    },
    /// Import key material into a key created with --external: asks wrapd for a wrapping
    /// key, wraps the material for it here, and sends only the wrapped material (unwrapped
    /// inside the HSM). The material file holds the 32 raw bytes of an AES-256 key.
    Import {
        /// Key id or alias.
        key: String,
        /// File with the 32-byte key material.
        #[arg(long)]
        material: std::path::PathBuf,
        /// Wrapping algorithm (AWS KMS names). SoftHSM 2.6 unwraps only the *_SHA_1 ones.
        #[arg(long, default_value = "RSA_AES_KEY_WRAP_SHA_256")]
        algorithm: String,
        /// RSA size of the wrapping key: 3072 or 4096.
        #[arg(long, default_value_t = 4096)]
        wrapping_key_bits: u32,
        /// When the material expires and is destroyed (RFC 3339); default: never.
        #[arg(long)]
        valid_to: Option<String>,
    },
    /// Destroy a key's imported material (the key becomes PENDING_IMPORT until the same
    /// material is imported again).
    DeleteMaterial {
        /// Key id or alias.
        key: String,
    },
    /// List keys (all pages, or one page with --page-size/--page-token).
    List {
        /// Keys per page.
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        /// Start from this page token (prints only that page).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Describe a key by id or alias.
    Describe {
        /// Key id or alias.
        key: String,
    },
    /// A key's versions and how each has been used (wraps, unwraps, first and last use,
    /// fleet-wide): the evidence for whether an old version is still needed.
    Versions {
        /// Key id or alias.
        key: String,
    },
    /// Retire a version that is not the current one: its blobs stop unwrapping (with an
    /// error naming it) until it is restored; its key material stays in the HSM.
    RetireVersion {
        /// Key id or alias.
        key: String,
        /// The version.
        version: u32,
    },
    /// Restore a retired version: its blobs unwrap again.
    RestoreVersion {
        /// Key id or alias.
        key: String,
        /// The version.
        version: u32,
    },
    /// Schedule the destruction of a retired version's key material after 7 to 30 days.
    /// Once destroyed, what it wrapped can never be unwrapped again: check first with
    /// `wrapctl keys versions` and `wrapctl census` that nothing uses it.
    ScheduleVersionDestruction {
        /// Key id or alias.
        key: String,
        /// The version.
        version: u32,
        /// Waiting period in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled version destruction (the version stays retired).
    CancelVersionDestruction {
        /// Key id or alias.
        key: String,
        /// The version.
        version: u32,
    },
    /// Add a new version to a key.
    Rotate {
        /// Key id or alias.
        key: String,
    },
    /// Enable a key.
    Enable {
        /// Key id or alias.
        key: String,
    },
    /// Disable a key.
    Disable {
        /// Key id or alias.
        key: String,
    },
    /// Schedule a key's destruction after 7 to 30 days.
    ScheduleDeletion {
        /// Key id or alias.
        key: String,
        /// Waiting period in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled deletion (the key comes back disabled).
    CancelDeletion {
        /// Key id or alias.
        key: String,
    },
    /// Turn on automatic rotation: a new version every --period-days (90 to 2560).
    EnableRotation {
        /// Key id or alias.
        key: String,
        /// Days between rotations.
        #[arg(long, default_value_t = 365)]
        period_days: u32,
    },
    /// Turn automatic rotation off.
    DisableRotation {
        /// Key id or alias.
        key: String,
    },
    /// Add tags (KEY=VALUE), replacing the values of existing ones.
    Tag {
        /// Key id or alias.
        key: String,
        /// Tags, KEY=VALUE.
        #[arg(required = true, value_parser = crate::parse_entry)]
        tags: Vec<(String, String)>,
    },
    /// Remove tags by name.
    Untag {
        /// Key id or alias.
        key: String,
        /// Tag keys.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// A key, as printed.
#[derive(Serialize)]
pub struct Key {
    key_id: String,
    state: &'static str,
    description: String,
    current_version: u32,
    aliases: Vec<String>,
    created_at: Option<String>,
    deletion_date: Option<String>,
    rotation_period_days: Option<u32>,
    next_rotation: Option<String>,
    tags: std::collections::BTreeMap<String, String>,
    origin: &'static str,
    valid_to: Option<String>,
    versions: Vec<Version>,
}

/// A key version, as printed.
#[derive(Serialize)]
struct Version {
    version: u32,
    created_at: Option<String>,
    wrap_count: u64,
    available: bool,
    automatic: bool,
    retired: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    destruction_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destroyed_at: Option<String>,
    /// Counted uses (DescribeKey answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

impl Version {
    /// What the version is good for, in one word (or a destruction date).
    fn state(&self, current_version: u32) -> String {
        if let Some(at) = &self.destroyed_at {
            format!("destroyed {at}")
        } else if let Some(date) = &self.destruction_date {
            format!("retired, destroyed from {date}")
        } else if self.version == current_version {
            "current".to_owned()
        } else if self.retired {
            "retired".to_owned()
        } else {
            "active".to_owned()
        }
    }
}

/// How a version was used, as printed.
#[derive(Serialize, Clone)]
struct Usage {
    wraps: u64,
    unwraps: u64,
    first_used: Option<String>,
    last_used: Option<String>,
}

/// `wrapctl keys versions`: a key's versions with their usage.
#[derive(Serialize)]
struct Versions {
    key_id: String,
    current_version: u32,
    versions: Vec<Version>,
}

impl Report for Versions {
    fn human(&self) -> String {
        table(
            [
                "VERSION",
                "STATE",
                "CREATED",
                "WRAPS",
                "UNWRAPS",
                "FIRST USED",
                "LAST USED",
                "AVAILABLE",
            ],
            self.versions.iter().map(|v| {
                let usage = v.usage.clone().unwrap_or(Usage {
                    wraps: 0,
                    unwraps: 0,
                    first_used: None,
                    last_used: None,
                });
                let never = || "never".to_owned();
                [
                    v.version.to_string(),
                    v.state(self.current_version),
                    v.created_at.clone().unwrap_or_default(),
                    usage.wraps.to_string(),
                    usage.unwraps.to_string(),
                    usage.first_used.unwrap_or_else(never),
                    usage.last_used.unwrap_or_else(never),
                    v.available.to_string(),
                ]
            }),
        )
    }
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(ToString::to_string)
}

impl From<&KeyMetadata> for Key {
    fn from(k: &KeyMetadata) -> Self {
        Self {
            key_id: k.key_id.clone(),
            state: KeyState::try_from(k.state).map_or("UNKNOWN", |s| s.as_str_name()),
            description: k.description.clone(),
            current_version: k.current_version,
            aliases: k.aliases.clone(),
            created_at: timestamp(&k.created_at),
            deletion_date: timestamp(&k.deletion_date),
            rotation_period_days: (k.rotation_period_days > 0).then_some(k.rotation_period_days),
            next_rotation: timestamp(&k.next_rotation),
            tags: k.tags.clone().into_iter().collect(),
            origin: match KeyOrigin::try_from(k.origin) {
                Ok(KeyOrigin::External) => "EXTERNAL",
                _ => "HSM",
            },
            valid_to: timestamp(&k.valid_to),
            versions: k
                .versions
                .iter()
                .map(|v| Version {
                    version: v.version,
                    created_at: timestamp(&v.created_at),
                    wrap_count: v.wrap_count,
                    available: v.available,
                    automatic: v.automatic,
                    retired: v.retired,
                    destruction_date: timestamp(&v.destruction_date),
                    destroyed_at: timestamp(&v.destroyed_at),
                    usage: v.usage.as_ref().map(|u| Usage {
                        wraps: u.wraps,
                        unwraps: u.unwraps,
                        first_used: timestamp(&u.first_used),
                        last_used: timestamp(&u.last_used),
                    }),
                })
                .collect(),
        }
    }
}

impl Report for Key {
    fn human(&self) -> String {
        let mut text = fields(&[
            ("key_id", self.key_id.clone()),
            ("state", self.state.to_owned()),
            ("description", self.description.clone()),
            ("current_version", self.current_version.to_string()),
            ("aliases", self.aliases.join(", ")),
            ("origin", self.origin.to_owned()),
            (
                "material_valid_to",
                self.valid_to.clone().unwrap_or_default(),
            ),
            ("created_at", self.created_at.clone().unwrap_or_default()),
            (
                "deletion_date",
                self.deletion_date.clone().unwrap_or_default(),
            ),
            (
                "rotation",
                match (self.rotation_period_days, &self.next_rotation) {
                    (Some(days), Some(next)) => format!("every {days} days, next {next}"),
                    _ => "off".to_owned(),
                },
            ),
            (
                "tags",
                self.tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ]);
        text.push('\n');
        text.push_str(&table(
            [
                "VERSION",
                "CREATED",
                "WRAPS",
                "AVAILABLE",
                "AUTOMATIC",
                "STATE",
            ],
            self.versions.iter().map(|v| {
                [
                    v.version.to_string(),
                    v.created_at.clone().unwrap_or_default(),
                    v.wrap_count.to_string(),
                    v.available.to_string(),
                    v.automatic.to_string(),
                    v.state(self.current_version),
                ]
            }),
        ));
        text
    }
}

/// A list of keys, as printed.
#[derive(Serialize)]
struct KeyList {
    keys: Vec<Key>,
    next_page_token: String,
}

impl Report for KeyList {
    fn human(&self) -> String {
        let mut text = table(
            ["KEY ID", "STATE", "VERSION", "ALIASES", "DESCRIPTION"],
            self.keys.iter().map(|k| {
                [
                    k.key_id.clone(),
                    k.state.to_owned(),
                    k.current_version.to_string(),
                    k.aliases.join(","),
                    k.description.clone(),
                ]
            }),
        );
        if !self.next_page_token.is_empty() {
            text.push_str(&format!(
                "\nnext page: --page-token {}",
                self.next_page_token
            ));
        }
        text
    }
}

/// Runs a `keys` command.
pub async fn run(channel: Channel, cmd: KeysCommand) -> Result<Box<dyn ErasedReport>, CliError> {
    let mut client = KeyServiceClient::new(channel);
    let key_ref = |key: String| KeyRef { key_id: key };
    let metadata = match cmd {
        KeysCommand::Create {
            description,
            alias,
            external,
        } => {
            let origin = if external {
                KeyOrigin::External
            } else {
                KeyOrigin::Hsm
            };
            client
                .create_key(CreateKeyRequest {
                    description,
                    alias: alias.unwrap_or_default(),
                    origin: origin as i32,
                    ..Default::default()
                })
                .await
        }
        KeysCommand::Import {
            key,
            material,
            algorithm,
            wrapping_key_bits,
            valid_to,
        } => {
            let request = import_request(
                &mut client,
                key,
                &material,
                &algorithm,
                wrapping_key_bits,
                valid_to.as_deref(),
            )
            .await?;
            client.import_key_material(request).await
        }
        KeysCommand::DeleteMaterial { key } => {
            client.delete_imported_key_material(key_ref(key)).await
        }
        KeysCommand::Describe { key } => client.describe_key(key_ref(key)).await,
        KeysCommand::Versions { key } => {
            let described = Key::from(&client.describe_key(key_ref(key)).await?.into_inner());
            return Ok(Box::new(Versions {
                key_id: described.key_id,
                current_version: described.current_version,
                versions: described.versions,
            }));
        }
        KeysCommand::Rotate { key } => client.rotate_key(key_ref(key)).await,
        KeysCommand::RetireVersion { key, version } => {
            client
                .retire_key_version(KeyVersionRequest {
                    key_id: key,
                    version,
                })
                .await
        }
        KeysCommand::RestoreVersion { key, version } => {
            client
                .restore_key_version(KeyVersionRequest {
                    key_id: key,
                    version,
                })
                .await
        }
        KeysCommand::ScheduleVersionDestruction { key, version, days } => {
            client
                .schedule_key_version_destruction(ScheduleKeyVersionDestructionRequest {
                    key_id: key,
                    version,
                    pending_window_days: days,
                })
                .await
        }
        KeysCommand::CancelVersionDestruction { key, version } => {
            client
                .cancel_key_version_destruction(KeyVersionRequest {
                    key_id: key,
                    version,
                })
                .await
        }
        KeysCommand::Enable { key } => client.enable_key(key_ref(key)).await,
        KeysCommand::Disable { key } => client.disable_key(key_ref(key)).await,
        KeysCommand::ScheduleDeletion { key, days } => {
            client
                .schedule_key_deletion(ScheduleKeyDeletionRequest {
                    key_id: key,
                    pending_window_days: days,
                })
                .await
        }
        KeysCommand::CancelDeletion { key } => client.cancel_key_deletion(key_ref(key)).await,
        KeysCommand::EnableRotation { key, period_days } => {
            client
                .enable_key_rotation(EnableKeyRotationRequest {
                    key_id: key,
                    rotation_period_days: period_days,
                })
                .await
        }
        KeysCommand::DisableRotation { key } => client.disable_key_rotation(key_ref(key)).await,
        KeysCommand::Tag { key, tags } => {
            client
                .tag_key(TagKeyRequest {
                    key_id: key,
                    tags: tags.into_iter().collect(),
                })
                .await
        }
        KeysCommand::Untag { key, names } => {
            client
                .untag_key(UntagKeyRequest {
                    key_id: key,
                    tag_keys: names,
                })
                .await
        }
        KeysCommand::List {
            page_size,
            page_token,
        } => {
            let one_page = page_token.is_some();
            let mut token = page_token.unwrap_or_default();
            let mut keys = Vec::new();
            loop {
                let page = client
                    .list_keys(ListKeysRequest {
                        page_size,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                keys.extend(page.keys.iter().map(Key::from));
                token = page.next_page_token;
                if token.is_empty() || one_page {
                    break;
                }
            }
            return Ok(Box::new(KeyList {
                keys,
                next_page_token: if one_page { token } else { String::new() },
            }));
        }
    };
    Ok(Box::new(Key::from(&metadata?.into_inner())))
}

/// The whole import dance but the last call: read the material, get the wrapping key and
/// import token, wrap the material for it (RSA-OAEP, and RFC 5649 for RSA_AES_KEY_WRAP_*).
async fn import_request(
    client: &mut KeyServiceClient<Channel>,
    key: String,
    material: &std::path::Path,
    algorithm: &str,
    wrapping_key_bits: u32,
    valid_to: Option<&str>,
) -> Result<ImportKeyMaterialRequest, CliError> {
    let invalid = |message: String| CliError::new(crate::error::Failure::Invalid, message);
    let algorithm = ImportAlgorithm::parse(algorithm).ok_or_else(|| {
        invalid(format!(
            "--algorithm must be one of {}",
            ImportAlgorithm::ALL.map(ImportAlgorithm::name).join(", ")
        ))
    })?;
    let valid_to = valid_to
        .map(|t| {
            t.parse::<prost_types::Timestamp>()
                .map_err(|_| invalid(format!("--valid-to {t:?} is not an RFC 3339 time")))
        })
        .transpose()?;
    let bytes = Zeroizing::new(
        std::fs::read(material)
            .map_err(|err| invalid(format!("cannot read {}: {err}", material.display())))?,
    );
    if bytes.len() != KEY_MATERIAL_LEN {
        return Err(invalid(format!(
            "{} holds {} bytes; key material is the {KEY_MATERIAL_LEN} raw bytes of an AES-256 key",
            material.display(),
            bytes.len()
        )));
    }
    let wire = match algorithm {
        ImportAlgorithm::RsaesOaepSha1 => WrappingAlgorithm::RsaesOaepSha1,
        ImportAlgorithm::RsaesOaepSha256 => WrappingAlgorithm::RsaesOaepSha256,
        ImportAlgorithm::RsaAesKeyWrapSha1 => WrappingAlgorithm::RsaAesKeyWrapSha1,
        ImportAlgorithm::RsaAesKeyWrapSha256 => WrappingAlgorithm::RsaAesKeyWrapSha256,
    };
    let parameters = client
        .get_parameters_for_import(GetParametersForImportRequest {
            key_id: key.clone(),
            wrapping_algorithm: wire as i32,
            wrapping_key_bits,
        })
        .await?
        .into_inner();
    let wrapped = wrap_key_material(&parameters.public_key, algorithm, &bytes)?;
    Ok(ImportKeyMaterialRequest {
        key_id: key,
        import_token: parameters.import_token,
        encrypted_key_material: wrapped,
        valid_to,
    })
}
