//! The operations of the Kubernetes KMS v2 plugin, backed by one wrapd key.
//!
//! - Encrypt wraps the apiserver's DEK seed under the newest version of the key, bound to
//!   a reserved encryption context that no other caller can supply (its `wrapd:` prefix is
//!   refused from them): [`KMS_CONTEXT`], and with `[kms] bind_principal` the plugin's
//!   principal too ([`KMS_PRINCIPAL`]). So a principal with Unwrap on the key over the main
//!   API still cannot open the apiserver's DEK seeds, and with the principal bound neither
//!   can the plugin of another cluster served by the same fleet, whatever keys its grant
//!   names. Binding is a setting, not the default, because a daemon of an earlier release
//!   cannot open a bound blob: an HA control plane upgraded one node at a time would have
//!   nodes unable to read what the others wrote. The KMS key id of a blob is
//!   `key/<hex>:<version>`; no annotations are needed.
//! - Decrypt accepts every blob the plugin ever issued, bound to its principal or not: of
//!   every version of the key, and of keys the configured alias pointed at before it was
//!   re-pointed. Such a blob is authorized by the plugin's grant on its configured key,
//!   because only a plugin can make a blob bound to [`KMS_CONTEXT`] (and only one acting as
//!   this principal, one bound to it). Blobs from before the reserved context (bound to the
//!   empty context) still decrypt, against the policy on the blob's own key. The request's
//!   key id must be the one Encrypt returned with that ciphertext.
//! - Status: the current KMS key id (a rotation changes it, so the apiserver uses a new
//!   DEK), and healthz `ok` only while the audit log is writable and a real wrap + unwrap
//!   round trip through the token succeeded within `healthz_cache`; otherwise the reason.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use zeroize::Zeroizing;

use super::{Call, Ops, target_of};
use crate::auth::Target;
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::error::{Error, ErrorKind, Result};
use crate::ids::KeyRef;
use crate::keystore::Keystore;

/// Largest DEK (seed) Encrypt takes: its ciphertext stays under the 1 KiB the API allows.
pub const MAX_PLAINTEXT: usize = 512;
/// Largest ciphertext and key id Decrypt takes (the API's limits).
pub const MAX_CIPHERTEXT: usize = 1024;
/// Largest total size of the annotations Decrypt takes.
pub const MAX_ANNOTATIONS: usize = 32 * 1024;
/// The reserved entry of the encryption context every blob of the plugin is bound to.
pub const KMS_CONTEXT: (&str, &str) = ("wrapd:purpose", "kubernetes-kms-v2");

/// The context key of the other reserved entry: the principal of the plugin that made the
/// blob (`[kms] principal`), so that a plugin acting as another principal cannot open it.
pub const KMS_PRINCIPAL: &str = "wrapd:kms-principal";

/// The context of the blobs the plugin acting as `principal` makes.
fn kms_context(principal: &str) -> Result<EncryptionContext> {
    EncryptionContext::from_entries([
        (KMS_CONTEXT.0.to_owned(), KMS_CONTEXT.1.to_owned()),
        (KMS_PRINCIPAL.to_owned(), principal.to_owned()),
    ])
}

/// The context of the plugin's blobs from before they named the principal.
fn unbound_kms_context() -> EncryptionContext {
    EncryptionContext::from_entries([(KMS_CONTEXT.0.to_owned(), KMS_CONTEXT.1.to_owned())])
        // Two short valid strings: cannot fail.
        .unwrap_or_default()
}

/// `key/<hex>:<version>`, the KMS key id of a key version.
fn kms_key_id(key_id: &impl std::fmt::Display, version: u32) -> String {
    format!("{key_id}:{version}")
}

/// The policy target of a Decrypt of a blob the plugin issued: the configured key's names
/// and the blob key's own, so the plugin's grant on its configured key (e.g. on
/// `alias/kubernetes`) covers blobs of keys the alias pointed at before.
fn issued_by_plugin(ks: &Keystore, configured: &KeyRef, blob_key: &KeyRef) -> Target {
    let mut names = vec![configured.to_string()];
    // The blob key's policy and grants decide, as for any Decrypt of its blobs.
    let mut rules = (None, Default::default());
    for target in [target_of(ks, configured), target_of(ks, blob_key)] {
        if let Target::Key {
            names: more,
            policy,
            grants,
        } = target
        {
            names.extend(more);
            rules = (policy, grants);
        }
    }
    Target::Key {
        names,
        policy: rules.0,
        grants: rules.1,
    }
}

/// The KMS v2 plugin's operations over one configured key.
pub struct KmsPlugin {
    ops: Ops,
    key: KeyRef,
    /// The reserved contexts of its blobs, the one Encrypt binds to first (bound to the
    /// principal or not), then the other, which Decrypt also takes.
    contexts: [EncryptionContext; 2],
    healthz_cache: Duration,
    health: Mutex<Option<(Instant, String)>>,
}

/// What Encrypt returns: the blob and its KMS key id.
#[derive(Debug)]
pub struct KmsCiphertext {
    /// The wrapd blob.
    pub ciphertext: Vec<u8>,
    /// `key/<hex>:<version>`.
    pub key_id: String,
}

impl KmsPlugin {
    /// The plugin over `key`, acting as `principal` (`[kms] principal`), binding its blobs
    /// to it if `bind` (`[kms] bind_principal`).
    pub fn new(
        ops: Ops,
        key: KeyRef,
        (principal, bind): (&str, bool),
        healthz_cache: Duration,
    ) -> Result<Self> {
        let (bound, unbound) = (kms_context(principal)?, unbound_kms_context());
        Ok(Self {
            ops,
            key,
            contexts: if bind {
                [bound, unbound]
            } else {
                [unbound, bound]
            },
            healthz_cache,
            health: Mutex::new(None),
        })
    }

    /// The context Encrypt binds its blobs to.
    fn context(&self) -> &EncryptionContext {
        let [made, _] = &self.contexts;
        made
    }

    /// The current KMS key id and healthz (`ok`, or why not).
    pub async fn status(&self) -> (String, String) {
        match self.ops.keystore().resolve(&self.key) {
            Ok(key) => (
                kms_key_id(&key.id, key.current_version()),
                self.healthz().await,
            ),
            Err(_) => (
                String::new(),
                format!("the configured key {} does not exist", self.key),
            ),
        }
    }

    /// "ok", or why not: from the cache, or a fresh round trip through the token.
    async fn healthz(&self) -> String {
        if !self.ops.gate().audit_healthy() {
            return "the audit log cannot be written; key operations are refused".to_owned();
        }
        if let Some((at, healthz)) = &*self.health.lock() {
            if at.elapsed() < self.healthz_cache {
                return healthz.clone();
            }
        }
        let key = self.key.clone();
        let keystore = self.ops.keystore().clone();
        let context = self.context().clone();
        let probe = tokio::task::spawn_blocking(move || -> Result<()> {
            let probe = Zeroizing::new(b"wrapd kms health probe".to_vec());
            // The daemon's own round trip: not a use of the key's version.
            let wrapped = keystore.wrap_uncounted(&key, &probe, &context)?;
            let back = keystore.unwrap_uncounted(&wrapped.blob, &context, None)?;
            if back.plaintext == probe {
                Ok(())
            } else {
                Err(Error::Internal(
                    "the round trip returned other bytes".into(),
                ))
            }
        })
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("health probe task: {e}"))));
        let healthz = match probe {
            Ok(()) => "ok".to_owned(),
            Err(err) => format!("{:?}: {}", err.kind(), err.public_message()),
        };
        if healthz != "ok" {
            tracing::warn!(%healthz, "KMS plugin health probe failed");
        }
        *self.health.lock() = Some((Instant::now(), healthz.clone()));
        healthz
    }

    /// Wraps a DEK seed (1..=[`MAX_PLAINTEXT`] bytes) under the configured key.
    pub async fn encrypt(
        &self,
        call: Call,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<KmsCiphertext> {
        let key = self.key.clone();
        let context = self.context().clone();
        let wrapped = self
            .ops
            .run(call, move |gate, ks, call| {
                if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
                    return Err(Error::invalid(format!(
                        "plaintext must be 1 to {MAX_PLAINTEXT} bytes"
                    )));
                }
                call.key(key.to_string(), None);
                call.context(&context);
                gate.check(call, &target_of(ks, &key), Some(&context))?;
                let wrapped = ks.wrap(&key, &plaintext, &context)?;
                call.key(wrapped.key_id.to_string(), Some(wrapped.key_version));
                Ok(wrapped)
            })
            .await?;
        Ok(KmsCiphertext {
            key_id: kms_key_id(&wrapped.key_id, wrapped.key_version),
            ciphertext: wrapped.blob,
        })
    }

    /// Unwraps a blob the plugin issued; `key_id` must be the one Encrypt returned with it,
    /// `annotations` the total size of the request's annotations.
    pub async fn decrypt(
        &self,
        call: Call,
        ciphertext: Vec<u8>,
        key_id: String,
        annotations: usize,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let configured = self.key.clone();
        let contexts = self.contexts.clone();
        let unwrapped = self
            .ops
            .run(call, move |gate, ks, call| {
                if ciphertext.is_empty()
                    || ciphertext.len() > MAX_CIPHERTEXT
                    || key_id.len() > MAX_CIPHERTEXT
                    || annotations > MAX_ANNOTATIONS
                {
                    return Err(Error::invalid(
                        "ciphertext, key_id or annotations out of the KMS v2 size limits",
                    ));
                }
                let blob = Blob::parse(&ciphertext)?;
                if key_id != kms_key_id(&blob.key_id, blob.key_version) {
                    return Err(Error::InvalidCiphertext);
                }
                let key = KeyRef::Id(blob.key_id.clone());
                call.key(key.to_string(), Some(blob.key_version));
                // The plugin's blobs, the kind it makes first (those that name no principal
                // are covered by any plugin's grant on its own configured key: only binding
                // tells the plugins of several clusters apart); then a blob from before the
                // reserved context, which the policy on its own key decides. A context the
                // policy refuses is passed over, since the blob may be bound to another, and
                // its refusal is the answer if no other context opens the blob.
                let by_plugin = issued_by_plugin(ks, &configured, &key);
                let before = target_of(ks, &key);
                let [made, other] = contexts;
                let attempts = [
                    (made, &by_plugin),
                    (other, &by_plugin),
                    (EncryptionContext::default(), &before),
                ];
                let mut refused = None;
                for (context, target) in attempts {
                    call.context(&context);
                    if let Err(err) = gate.check(call, target, Some(&context)) {
                        if err.kind() != ErrorKind::PermissionDenied {
                            return Err(err);
                        }
                        refused.get_or_insert(err);
                        continue;
                    }
                    match ks.unwrap(&ciphertext, &context, None) {
                        Err(Error::InvalidCiphertext) => {}
                        other => return other,
                    }
                }
                Err(refused.unwrap_or(Error::InvalidCiphertext))
            })
            .await?;
        Ok(unwrapped.plaintext)
    }
}
