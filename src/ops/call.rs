//! One call in progress: who, what, and what its audit line will say.

use std::time::Instant;

use rand::RngCore;

use crate::audit::sha256_hex;
use crate::auth::{Identity, Operation, Refusal, RequestAttributes};
use crate::context::EncryptionContext;

/// A call, as a front end hands it to the operation layer: the caller (or why it has none),
/// the operation, the request id and the caller's deadline. The operation adds the key and
/// context it acted on, for the audit line.
pub struct Call {
    pub(super) identity: Result<Identity, Refusal>,
    pub(super) op: Operation,
    pub(super) request_id: String,
    pub(super) started: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) key_id: Option<String>,
    pub(super) key_version: Option<u32>,
    pub(super) context: Option<(Vec<String>, String)>,
    pub(super) api_operation: Option<String>,
    pub(super) attributes: RequestAttributes,
    /// The keys and grants of the request's grant tokens ([`Call::with_grant_tokens`]).
    pub(super) grant_tokens: Vec<(crate::ids::KeyId, String)>,
    /// Which grant would have allowed a denied call but for its request attributes: for the
    /// audit line only (the caller gets the plain denial, which names no grant).
    pub(super) denial: std::sync::OnceLock<String>,
}

impl Call {
    /// A call of `op` by `identity` (or an unauthenticated one, with the reason).
    /// `request_id` is the caller's (kept if it is 1..=128 printable ASCII characters),
    /// else a random one is made; `deadline` bounds waits for an HSM session.
    pub fn new(
        identity: Result<Identity, Refusal>,
        op: Operation,
        request_id: Option<&str>,
        deadline: Option<Instant>,
    ) -> Self {
        let request_id = request_id
            .filter(|id| {
                !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
            })
            .map_or_else(
                || {
                    let mut bytes = [0u8; 12];
                    rand::rng().fill_bytes(&mut bytes);
                    hex::encode(bytes)
                },
                str::to_owned,
            );
        Self {
            identity,
            op,
            request_id,
            started: Instant::now(),
            deadline,
            key_id: None,
            key_version: None,
            context: None,
            api_operation: None,
            attributes: RequestAttributes::new(),
            grant_tokens: Vec::new(),
            denial: std::sync::OnceLock::new(),
        }
    }

    /// The keys and grants named by the request's grant tokens
    /// ([`crate::ops::parse_grant_token`]): a grant the daemon has not heard of yet is read
    /// from the store before the call on its key is decided (for a caller that has some
    /// right to the operation), so that a grant is usable at once with its token.
    pub fn with_grant_tokens(mut self, tokens: Vec<(crate::ids::KeyId, String)>) -> Self {
        self.grant_tokens = tokens;
        self
    }

    /// Names the call as its front end knows it, for the audit line (e.g.
    /// `TrentService.Decrypt`, whose policy operation is `Unwrap`).
    pub fn with_api_operation(mut self, name: impl Into<String>) -> Self {
        self.api_operation = Some(name.into());
        self
    }

    /// Records what the front end knows of the call beyond its key and context (the XKS
    /// proxy API's request metadata): the policy's `require_request` matches it, and the
    /// audit line carries it.
    pub fn with_attributes(mut self, attributes: RequestAttributes) -> Self {
        self.attributes = attributes;
        self
    }

    /// The call of item `index` of a batch this call carries: the same caller, operation
    /// and deadline, the request id `ID.INDEX`.
    pub fn item(&self, index: usize) -> Self {
        self.copy_as(format!("{}.{index}", self.request_id))
    }

    /// A copy of this call with the same request id (a batch refused as a whole).
    pub fn whole(&self) -> Self {
        self.copy_as(self.request_id.clone())
    }

    fn copy_as(&self, request_id: String) -> Self {
        Self {
            identity: self.identity.clone(),
            op: self.op,
            request_id,
            started: self.started,
            deadline: self.deadline,
            key_id: None,
            key_version: None,
            context: None,
            api_operation: self.api_operation.clone(),
            attributes: self.attributes.clone(),
            grant_tokens: self.grant_tokens.clone(),
            denial: std::sync::OnceLock::new(),
        }
    }

    /// Records the key (and version) acted on, for the audit line.
    pub fn key(&mut self, key_id: impl Into<String>, version: Option<u32>) {
        self.key_id = Some(key_id.into());
        if version.is_some() {
            self.key_version = version;
        }
    }

    /// Records the encryption context (its keys and hash; never the values).
    pub fn context(&mut self, context: &EncryptionContext) {
        self.context = Some((
            context.iter().map(|(k, _)| k.to_owned()).collect(),
            sha256_hex(&context.serialize()),
        ));
    }

    /// The operation.
    pub fn op(&self) -> Operation {
        self.op
    }

    /// The caller's deadline, if it sent one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The request id (the caller's or a random one).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The caller, for log fields.
    pub fn who(&self) -> String {
        match &self.identity {
            Ok(identity) => identity.to_string(),
            Err(_) => "unauthenticated".to_owned(),
        }
    }
}
