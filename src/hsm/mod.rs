//! The HSM layer: master keys as PKCS#11 token objects, and the few operations wrapd needs
//! on them.
//!
//! [`Token`] is the boundary the key store sees. [`Pkcs11Token`] implements it on `cryptoki`
//! and is the only place in the crate that calls PKCS#11 (`pkcs11/`, with its session pool
//! in `pool.rs`); `provision.rs` creates a SoftHSM token for `wrapd dev` and tests;
//! `memory.rs` is an in-memory token for unit tests of the rules above it. Every
//! method blocks: callers run them off the async executor.

#[cfg(test)]
pub(crate) mod memory;
mod pkcs11;
mod pool;
mod provision;
mod ticket;

use std::cell::Cell;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::error::Result;
use crate::ids::KeyId;

pub use crate::key_import::ImportAlgorithm;
#[cfg(feature = "fault-injection")]
pub use pkcs11::Fault;
pub use pkcs11::Pkcs11Token;
pub use provision::provision_softhsm_token;
pub use ticket::Ticket;

thread_local! {
    /// The deadline of the call running on this thread, if its caller set one.
    static CALL_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` (on this thread) with the caller's deadline in force: a call waiting for a free
/// session gives up at the earlier of this deadline and `session_wait`.
pub fn with_deadline<T>(deadline: Option<Instant>, f: impl FnOnce() -> T) -> T {
    /// Puts the previous deadline back, also when `f` panics (the thread may be a tokio
    /// thread that serves other calls next).
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CALL_DEADLINE.set(self.0);
        }
    }
    let _restore = Restore(CALL_DEADLINE.replace(deadline));
    f()
}

/// The deadline set by [`with_deadline`] on this thread.
pub(crate) fn call_deadline() -> Option<Instant> {
    CALL_DEADLINE.get()
}

/// One key version's object in the token: key id + version, stored as `CKA_ID`
/// (`key/<hex>:<version>`) and in the `CKA_LABEL`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    /// The key the object belongs to.
    pub key_id: KeyId,
    /// The version, from 1.
    pub version: u32,
}

impl ObjectId {
    /// The object of `key_id` at `version`.
    pub fn new(key_id: KeyId, version: u32) -> Self {
        Self { key_id, version }
    }

    /// The `CKA_ID` bytes.
    pub fn cka_id(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }

    /// Parses a `CKA_ID`; `None` for objects that are not wrapd's.
    pub fn from_cka_id(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (key, version) = text.rsplit_once(':')?;
        let version: u32 = version.parse().ok()?;
        (version > 0).then_some(())?;
        Some(Self::new(KeyId::parse(key).ok()?, version))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_id, self.version)
    }
}

/// A key check value: AES-256-ECB of a fixed block under the key, computed inside the token.
/// It tells whether two keys are the same without either leaving the token (re-imports
/// must bring the material imported before). The block is not all zeroes: E(0) is AES-GCM's
/// hash key H, which must never leave the token.
pub type KeyCheckValue = [u8; 16];

/// The fixed block of [`KeyCheckValue`]s.
pub const KEY_CHECK_BLOCK: &[u8; 16] = b"wrapd KCV block1";

/// Names a wrapping key pair made by `GetParametersForImport`: the key whose material it
/// imports, the algorithm and RSA size, when it expires (Unix seconds) and 128 random bits.
/// Its text form is the private key's `CKA_ID` and the import token callers carry: the
/// token is valid while an object with exactly this `CKA_ID` exists (the random part makes
/// it unguessable), so it needs no table of its own and every daemon of a fleet on the same
/// HSM sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WrappingKeyId {
    /// The key the material is for.
    pub key_id: KeyId,
    /// How the material is wrapped.
    pub algorithm: ImportAlgorithm,
    /// RSA modulus bits: 3072 or 4096.
    pub bits: u32,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Random, to make the token unguessable.
    pub nonce: [u8; 16],
}

impl WrappingKeyId {
    const PREFIX: &'static str = "import";

    /// Parses the text form (a `CKA_ID`, an import token); `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(':');
        (parts.next()? == Self::PREFIX).then_some(())?;
        let key_id = KeyId::parse(parts.next()?).ok()?;
        let algorithm = ImportAlgorithm::parse(parts.next()?)?;
        let bits = parts.next()?.parse().ok()?;
        let expires = parts.next()?.parse().ok()?;
        let nonce = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        parts.next().is_none().then_some(Self {
            key_id,
            algorithm,
            bits,
            expires,
            nonce,
        })
    }

    /// The text form's bytes (the `CKA_ID`, the import token).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for WrappingKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}:{}",
            Self::PREFIX,
            self.key_id,
            self.algorithm.name(),
            self.bits,
            self.expires,
            hex::encode(self.nonce)
        )
    }
}

/// Output of a wrap: the IV actually used and ciphertext || tag.
#[derive(Debug)]
pub struct Sealed {
    /// The GCM IV (chosen by wrapd on SoftHSM, by the HSM on CloudHSM).
    pub iv: [u8; crate::blob::IV_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// The operations wrapd needs from a token. Implementations block.
pub trait Token: Send + Sync + 'static {
    /// Generates a new AES-256 key object: token, private, sensitive, never extractable,
    /// encrypt/decrypt only.
    fn generate_key(&self, object: &ObjectId) -> Result<()>;
    /// AES-256-GCM encryption of `plaintext` under `object` with `aad`.
    fn encrypt(&self, object: &ObjectId, plaintext: &[u8], aad: &[u8]) -> Result<Sealed>;
    /// Draws `len` random bytes from the token and encrypts them, in one session checkout.
    fn generate_and_encrypt(
        &self,
        object: &ObjectId,
        len: usize,
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, Sealed)>;
    /// `len` random bytes from the token's generator (`C_GenerateRandom`).
    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>>;
    /// AES-256-GCM decryption. A tag mismatch is [`crate::Error::InvalidCiphertext`].
    fn decrypt(
        &self,
        object: &ObjectId,
        iv: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>>;
    /// Whether the token holds an object for `object` (one `C_FindObjects`).
    fn contains(&self, object: &ObjectId) -> Result<bool>;
    /// Destroys the object; an object that is already gone is not an error.
    fn destroy_key(&self, object: &ObjectId) -> Result<()>;
    /// Every wrapd key object in the token (objects with other `CKA_ID`s are skipped).
    fn list_keys(&self) -> Result<Vec<ObjectId>>;
    /// A cheap liveness check: a session can be had and the token answers.
    fn ping(&self) -> Result<()>;

    // ---- key import ------------------------------------------------------------------------

    /// Generates an RSA key pair for importing material: the private half a token object
    /// named by `id` (private, sensitive, never extractable, unwrap only), the public half a
    /// session object gone on return. Proves first, with the public half, that the token can
    /// unwrap with `id.algorithm` ([`crate::Error::Unsupported`] if not). Returns the public
    /// key as DER `SubjectPublicKeyInfo`.
    fn create_wrapping_key(&self, id: &WrappingKeyId) -> Result<Vec<u8>>;
    /// Unwraps imported material with the wrapping key `id`, inside the token, into a
    /// session object (`into` is `None`: a check) or the token object `into` (the same
    /// attributes as [`Token::generate_key`]'s), and returns its key check value.
    /// Intermediate keys are session objects destroyed before return. Material that does
    /// not unwrap is [`crate::Error::InvalidCiphertext`]; material that is not an AES-256
    /// key is [`crate::Error::InvalidArgument`], and then nothing is left in the token; a
    /// wrapping key that does not exist is [`crate::Error::InvalidImportToken`].
    fn import_key(
        &self,
        id: &WrappingKeyId,
        wrapped: &[u8],
        into: Option<&ObjectId>,
    ) -> Result<KeyCheckValue>;
    /// The key check value of a key object.
    fn key_check_value(&self, object: &ObjectId) -> Result<KeyCheckValue>;
    /// Every wrapping key in the token.
    fn wrapping_keys(&self) -> Result<Vec<WrappingKeyId>>;
    /// Destroys a wrapping key; one that is already gone is not an error.
    fn destroy_wrapping_key(&self, id: &WrappingKeyId) -> Result<()>;

    // ---- tickets (see `ticket.rs`) ----------------------------------------------------------

    /// Records `ticket` (a token object with no use). Recording one that exists is no error.
    fn create_ticket(&self, ticket: &Ticket) -> Result<()>;
    /// Every ticket in the token.
    fn tickets(&self) -> Result<Vec<Ticket>>;
    /// Whether the token holds `ticket` (one lookup by its `CKA_ID`).
    fn has_ticket(&self, ticket: &Ticket) -> Result<bool>;
    /// Destroys every copy of `ticket`; one already gone is no error.
    fn destroy_ticket(&self, ticket: &Ticket) -> Result<()>;

    /// The wrap counts recorded for a key version (see [`Token::record_wrap_mark`]).
    fn wrap_marks(&self, object: &ObjectId) -> Result<Vec<u64>>;
    /// Records that the wraps of a key version are counted up to `reserved`: a token object
    /// with no use (like a ticket), so that a metadata store rolled back to fewer wraps is
    /// noticed and the random-IV bound per version holds whatever the store says.
    fn record_wrap_mark(&self, object: &ObjectId, reserved: u64) -> Result<()>;
    /// Destroys the mark of `reserved`; one already gone is no error.
    fn destroy_wrap_mark(&self, object: &ObjectId, reserved: u64) -> Result<()>;
}

/// The `CKA_ID` of a wrap mark.
pub fn wrap_mark_id(object: &ObjectId, reserved: u64) -> Vec<u8> {
    format!("wraps:{object}:{reserved}").into_bytes()
}

/// The `CKA_LABEL` of a key version's wrap marks (found by it).
pub fn wrap_mark_label(object: &ObjectId) -> Vec<u8> {
    format!("wrapd wraps {object}").into_bytes()
}

/// The count a wrap mark's `CKA_ID` records, if it is one of `object`'s.
pub fn parse_wrap_mark(object: &ObjectId, id: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(id).ok()?;
    let rest = text
        .strip_prefix("wraps:")?
        .strip_prefix(&object.to_string())?;
    rest.strip_prefix(':')?.parse().ok()
}

/// How the HSM behaves where PKCS#11 implementations differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HsmProfile {
    /// SoftHSM2 (and most HSMs): the caller supplies the GCM IV.
    Softhsm,
    /// AWS CloudHSM: the HSM generates the GCM IV and writes it back into the IV buffer;
    /// GCM buffers are limited to 16 KB, single-part only.
    Cloudhsm,
}

impl HsmProfile {
    /// Whether each token call waits on the network (an HSM cluster) rather than on this
    /// machine's cores: then the daemon keeps many calls in flight (more sessions, a batch
    /// spread over every session) instead of sparing the cores.
    pub fn is_networked(self) -> bool {
        self == Self::Cloudhsm
    }

    /// `hsm.max_sessions` when the config does not say: 8 on a local token (more sessions
    /// than cores only queue for the cores), 32 on CloudHSM (a cluster of two HSMs takes
    /// about 16 calls at once; twice that keeps them busy while answers travel back).
    pub fn default_max_sessions(self) -> usize {
        if self.is_networked() { 32 } else { 8 }
    }

    /// `hsm.session_keepalive_ms` when the config does not say: a minute on a networked HSM,
    /// whose sessions live on connections that can be dropped while idle; off on a local
    /// token.
    pub fn default_session_keepalive_ms(self) -> u64 {
        if self.is_networked() { 60_000 } else { 0 }
    }
}

/// What [`Pkcs11Token::open`] needs. The PIN is zeroized on drop and never printed.
#[derive(Debug)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (`libsofthsm2.so`, `libcloudhsm_pkcs11.so`).
    pub module: PathBuf,
    /// Label of the token to use.
    pub token_label: String,
    /// The user PIN (for CloudHSM: `CryptoUser:password`).
    pub pin: Pin,
    /// Profile switch for IV handling.
    pub profile: HsmProfile,
    /// Most sessions open at once (HSMs limit sessions).
    pub max_sessions: usize,
    /// How long a call waits for a free session before failing with UNAVAILABLE.
    pub session_wait: Duration,
    /// Sessions idle this long get a cheap call, so that the client library and the network
    /// between it and the HSM keep them (`None`: never).
    pub session_keepalive: Option<Duration>,
    /// Re-initialize the PKCS#11 context when a key object the metadata lists is not found
    /// (a library whose view of the token went stale). Off in a fleet: there, a missing
    /// object is another daemon's scheduled deletion (or replication still under way), and
    /// the key store asks the shared metadata instead.
    pub reset_on_missing_object: bool,
}

/// A token PIN: zeroized on drop, redacted in `Debug`.
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN; surrounding whitespace (a trailing newline in a file) is dropped.
    pub fn new(pin: &str) -> Self {
        Self(Zeroizing::new(pin.trim().to_owned()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_round_trip() {
        let id = ObjectId::new(KeyId::generate(), 12);
        assert_eq!(ObjectId::from_cka_id(&id.cka_id()), Some(id));
        assert_eq!(ObjectId::from_cka_id(b"something-else"), None);
        assert_eq!(
            ObjectId::from_cka_id(b"key/00112233445566778899aabbccddeeff:0"),
            None
        );
    }

    #[test]
    fn pin_is_redacted() {
        assert_eq!(format!("{:?}", Pin::new("1234\n")), "Pin(<redacted>)");
        assert_eq!(Pin::new("1234\n").expose(), "1234");
    }
}
