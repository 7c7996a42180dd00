//! The Amazon S3 Encryption Client's object format (docs/DESIGN.md §10), so that a bucket is
//! shared with the official S3 Encryption Clients whose KMS keyring points at wrapd's AWS
//! KMS-compatible API.
//!
//! **V2 format** (written and read): the object body is AES-256-GCM ciphertext of the content
//! with the 16-byte tag appended, no AAD, under a per-object data key; the "envelope" travels
//! in the object's user metadata, or in an instruction file `KEY.instruction` whose body is
//! the same entries as a JSON object:
//!
//! | entry | value |
//! |---|---|
//! | `x-amz-key-v2` | base64 of the wrapped data key (a wrapd blob) |
//! | `x-amz-iv` | base64 of the 12-byte IV |
//! | `x-amz-cek-alg` | `AES/GCM/NoPadding` |
//! | `x-amz-tag-len` | `128` |
//! | `x-amz-wrap-alg` | `kms+context` |
//! | `x-amz-matdesc` | the encryption context as JSON, with the reserved entry `aws:x-amz-cek-alg` = `AES/GCM/NoPadding` |
//!
//! plus `x-amz-unencrypted-content-length` in the object's own metadata (in both placements,
//! as the Ruby client writes it). This is exactly what `Aws::S3::EncryptionV2::Client` (Ruby,
//! `ruby-aws-sdk-s3` in Debian) writes and checks: it asks KMS `GenerateDataKey` with that
//! context (the specification's KMS keyring uses `Encrypt`; both give a wrapd blob that
//! unwraps with the context), and on read requires the caller's context to equal the
//! envelope's, less the reserved entry.
//!
//! **V3 format** (read, and written on request): key commitment, suite
//! `ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY` (`0x0073`): a 28-byte message id (`x-amz-i`) salts
//! HKDF-SHA512 over the data key, which expands into the content key (`0x0073 ||
//! "DERIVEKEY"`, 32 bytes) and a 28-byte commitment (`0x0073 || "COMMITKEY"`, stored in
//! `x-amz-d` and compared in constant time before any content is decrypted); the content is
//! AES-256-GCM under the derived key with the IV of twelve `0x01` bytes and the suite id as
//! AAD. Entries: `x-amz-c` = `115`, `x-amz-3` (wrapped key), `x-amz-w` = `12`
//! (`kms+context`), `x-amz-t` (the context, its reserved entry `aws:x-amz-cek-alg` = `115`),
//! `x-amz-d`, `x-amz-i`; with an instruction file, `x-amz-c`, `x-amz-d` and `x-amz-i` stay in
//! the object's metadata and the rest goes in the file (the specification's
//! `s3-encryption/` documents, and the Python client 4.0 that implements them).
//!
//! The content is encrypted and decrypted as a stream ([`ContentEncryptor`],
//! [`ContentDecryptor`]) with OpenSSL's AES-256-GCM (the same implementation the Ruby client
//! uses; `ring`, used elsewhere, has no streaming GCM): memory stays constant whatever the
//! object's size. A decryption's output must not be used until [`ContentDecryptor::finish`]
//! accepted the tag (`wrapctl s3 get` writes to a temporary file and renames it then).

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use openssl::symm::{Cipher, Crypter, Mode};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// `x-amz-cek-alg`: the content cipher.
pub const CEK_ALG: &str = "AES/GCM/NoPadding";
/// `x-amz-wrap-alg`: the data key wrapped by KMS with the encryption context.
pub const WRAP_ALG: &str = "kms+context";
/// The encryption context entry the S3 Encryption Client reserves for the content cipher.
pub const RESERVED_CONTEXT_KEY: &str = "aws:x-amz-cek-alg";
/// GCM tag bytes, appended to the body.
pub const TAG_LEN: usize = 16;
/// GCM IV bytes.
pub const IV_LEN: usize = 12;
/// Data key bytes (AES-256).
pub const DATA_KEY_LEN: usize = 32;
/// The instruction file's name is the object's with this suffix.
pub const INSTRUCTION_SUFFIX: &str = ".instruction";
/// The metadata entry with the plaintext's length.
pub const UNENCRYPTED_LENGTH: &str = "x-amz-unencrypted-content-length";

/// The V2 envelope entry holding the wrapped data key (base64).
pub const KEY_V2: &str = "x-amz-key-v2";
const IV: &str = "x-amz-iv";
const CEK: &str = "x-amz-cek-alg";
const TAG_LEN_BITS: &str = "x-amz-tag-len";
const WRAP: &str = "x-amz-wrap-alg";
const MATDESC: &str = "x-amz-matdesc";

/// S3 caps user metadata at 2 KB; an envelope must fit with room to spare.
pub const MAX_METADATA_BYTES: usize = 2048;

/// Which format an object's metadata says it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `x-amz-key-v2` in the metadata.
    V2,
    /// `x-amz-c` (the V3 format with key commitment).
    V3,
    /// `x-amz-key` (V1, legacy, unauthenticated modes): refused.
    V1,
    /// No envelope in the metadata: look for an instruction file.
    None,
}

/// The format of an object from its user metadata (keys without `x-amz-meta-`).
pub fn detect(metadata: &HashMap<String, String>) -> Format {
    if metadata.contains_key(KEY_V2) {
        Format::V2
    } else if metadata.contains_key(C_V3) || metadata.contains_key(KEY_V3) {
        Format::V3
    } else if metadata.contains_key("x-amz-key") {
        Format::V1
    } else {
        Format::None
    }
}

/// A V2 envelope: the wrapped data key, the IV and the encryption context (with the
/// reserved entry).
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The wrapped data key (a wrapd blob).
    pub encrypted_key: Vec<u8>,
    /// The GCM IV.
    pub iv: [u8; IV_LEN],
    /// The whole encryption context, `aws:x-amz-cek-alg` included.
    pub context: BTreeMap<String, String>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("encrypted_key_len", &self.encrypted_key.len())
            .field("context_keys", &self.context.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn bad(message: impl std::fmt::Display) -> Error {
    Error::invalid(format!("S3 encryption envelope: {message}"))
}

/// The context a writer asks the key service for: the caller's entries plus the reserved
/// one. A caller entry named like the reserved one is refused (as the official clients do).
pub fn context_for(user: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    if user.contains_key(RESERVED_CONTEXT_KEY) {
        return Err(Error::invalid(format!(
            "the encryption context entry {RESERVED_CONTEXT_KEY} is reserved for the S3 Encryption Client"
        )));
    }
    let mut context = user.clone();
    context.insert(RESERVED_CONTEXT_KEY.to_owned(), CEK_ALG.to_owned());
    Ok(context)
}

impl Envelope {
    /// The envelope of a new object.
    pub fn new(
        encrypted_key: Vec<u8>,
        iv: [u8; IV_LEN],
        user_context: &BTreeMap<String, String>,
    ) -> Result<Self> {
        Ok(Self {
            encrypted_key,
            iv,
            context: context_for(user_context)?,
        })
    }

    /// The entries, as metadata (S3 adds `x-amz-meta-`) or instruction-file members.
    pub fn entries(&self) -> BTreeMap<String, String> {
        let matdesc = serde_json::to_string(&self.context).unwrap_or_default();
        [
            (KEY_V2, STANDARD.encode(&self.encrypted_key)),
            (IV, STANDARD.encode(self.iv)),
            (CEK, CEK_ALG.to_owned()),
            (TAG_LEN_BITS, (TAG_LEN * 8).to_string()),
            (WRAP, WRAP_ALG.to_owned()),
            (MATDESC, matdesc),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The instruction file's body.
    pub fn to_instruction_file(&self) -> Vec<u8> {
        serde_json::to_vec(&self.entries()).unwrap_or_default()
    }

    /// Reads an envelope from entries (metadata or instruction file), checking every field.
    pub fn from_entries(entries: &HashMap<String, String>) -> Result<Self> {
        let get = |name: &str| {
            entries
                .get(name)
                .map(String::as_str)
                .ok_or_else(|| bad(format!("{name} is missing")))
        };
        if get(CEK)? != CEK_ALG {
            return Err(bad(format!(
                "x-amz-cek-alg must be {CEK_ALG} (CBC objects of the legacy client are not read)"
            )));
        }
        if get(WRAP)? != WRAP_ALG {
            return Err(bad(format!(
                "x-amz-wrap-alg must be {WRAP_ALG} (the object's data key is not a KMS one)"
            )));
        }
        // Optional in the format (the Ruby client defaults it), 128 when present.
        if entries
            .get(TAG_LEN_BITS)
            .is_some_and(|t| t != &(TAG_LEN * 8).to_string())
        {
            return Err(bad("x-amz-tag-len must be 128"));
        }
        let encrypted_key = STANDARD
            .decode(get(KEY_V2)?)
            .map_err(|_| bad("x-amz-key-v2 is not base64"))?;
        if encrypted_key.is_empty() {
            return Err(bad("x-amz-key-v2 is empty"));
        }
        let iv = STANDARD
            .decode(get(IV)?)
            .ok()
            .and_then(|iv| <[u8; IV_LEN]>::try_from(iv).ok())
            .ok_or_else(|| bad("x-amz-iv must be 12 bytes of base64"))?;
        let context: BTreeMap<String, String> = serde_json::from_str(get(MATDESC)?)
            .map_err(|_| bad("x-amz-matdesc is not a JSON object of strings"))?;
        if context.get(RESERVED_CONTEXT_KEY).map(String::as_str) != Some(CEK_ALG) {
            return Err(bad(format!(
                "x-amz-matdesc must hold {RESERVED_CONTEXT_KEY} = {CEK_ALG}"
            )));
        }
        Ok(Self {
            encrypted_key,
            iv,
            context,
        })
    }

    /// Reads an instruction file's body.
    pub fn from_instruction_file(body: &[u8]) -> Result<Self> {
        let entries: HashMap<String, String> = serde_json::from_slice(body)
            .map_err(|_| bad("the instruction file is not a JSON object of strings"))?;
        Self::from_entries(&entries)
    }

    /// The caller's part of the context (the reserved entry removed).
    pub fn user_context(&self) -> BTreeMap<String, String> {
        without_reserved(&self.context)
    }

    /// Checks the caller's expected context equals the envelope's, as the official clients
    /// require on read: a missing, extra or different entry is refused (the names of the
    /// entries that differ are given, never their values).
    pub fn check_context(&self, expected: &BTreeMap<String, String>) -> Result<()> {
        check_user_context(&self.user_context(), expected)
    }
}

/// A context without the reserved entry: the caller's part.
fn without_reserved(context: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut user = context.clone();
    user.remove(RESERVED_CONTEXT_KEY);
    user
}

/// The official clients' rule on read: the caller's context equals the object's, less the
/// reserved entry (a missing, extra or different entry is refused; the names of the
/// entries that differ are given, never their values).
fn check_user_context(
    actual: &BTreeMap<String, String>,
    expected: &BTreeMap<String, String>,
) -> Result<()> {
    if actual == expected {
        return Ok(());
    }
    let mut differing: Vec<&str> = actual
        .keys()
        .chain(expected.keys())
        .filter(|k| actual.get(*k) != expected.get(*k))
        .map(String::as_str)
        .collect();
    differing.sort_unstable();
    differing.dedup();
    Err(Error::invalid(format!(
        "the encryption context does not match the object's (entries that differ: {})",
        differing.join(", ")
    )))
}

fn openssl_error(err: openssl::error::ErrorStack) -> Error {
    Error::Internal(format!("AES-GCM: {err}"))
}

/// AES-256-GCM encryption of a stream, no AAD.
pub struct ContentEncryptor {
    crypter: Crypter,
}

impl ContentEncryptor {
    /// Starts encrypting under `key` with `iv` (V2: no AAD).
    pub fn new(key: &[u8], iv: &[u8; IV_LEN]) -> Result<Self> {
        Self::with_aad(key, iv, &[])
    }

    /// Starts encrypting under `key` with `iv` and `aad` (V3: the suite id).
    pub fn with_aad(key: &[u8], iv: &[u8; IV_LEN], aad: &[u8]) -> Result<Self> {
        if key.len() != DATA_KEY_LEN {
            return Err(Error::invalid("the data key must be 32 bytes"));
        }
        let mut crypter = Crypter::new(Cipher::aes_256_gcm(), Mode::Encrypt, key, Some(iv))
            .map_err(openssl_error)?;
        if !aad.is_empty() {
            crypter.aad_update(aad).map_err(openssl_error)?;
        }
        Ok(Self { crypter })
    }

    /// Encrypts `input`, appending the ciphertext to `output`.
    pub fn update(&mut self, input: &[u8], output: &mut Vec<u8>) -> Result<()> {
        let start = output.len();
        output.resize(start + input.len() + 16, 0);
        let n = self
            .crypter
            .update(input, &mut output[start..])
            .map_err(openssl_error)?;
        output.truncate(start + n);
        Ok(())
    }

    /// Ends the stream; returns the tag to append.
    pub fn finish(mut self) -> Result<[u8; TAG_LEN]> {
        let mut rest = [0u8; 32];
        let n = self.crypter.finalize(&mut rest).map_err(openssl_error)?;
        if n != 0 {
            return Err(Error::Internal("AES-GCM finalize produced bytes".into()));
        }
        let mut tag = [0u8; TAG_LEN];
        self.crypter.get_tag(&mut tag).map_err(openssl_error)?;
        Ok(tag)
    }
}

/// AES-256-GCM decryption of a stream whose tag comes last: the output is unauthenticated
/// until [`ContentDecryptor::finish`] succeeds.
pub struct ContentDecryptor {
    crypter: Crypter,
    /// The last [`TAG_LEN`] bytes seen, held back: they may be the tag.
    held: Zeroizing<Vec<u8>>,
}

impl ContentDecryptor {
    /// Starts decrypting under `key` with `iv` (V2: no AAD).
    pub fn new(key: &[u8], iv: &[u8; IV_LEN]) -> Result<Self> {
        Self::with_aad(key, iv, &[])
    }

    /// Starts decrypting under `key` with `iv` and `aad` (V3: the suite id).
    pub fn with_aad(key: &[u8], iv: &[u8; IV_LEN], aad: &[u8]) -> Result<Self> {
        if key.len() != DATA_KEY_LEN {
            return Err(Error::InvalidCiphertext);
        }
        let mut crypter = Crypter::new(Cipher::aes_256_gcm(), Mode::Decrypt, key, Some(iv))
            .map_err(openssl_error)?;
        if !aad.is_empty() {
            crypter.aad_update(aad).map_err(openssl_error)?;
        }
        Ok(Self {
            crypter,
            held: Zeroizing::new(Vec::with_capacity(2 * TAG_LEN)),
        })
    }

    /// Feeds the next body bytes (ciphertext, then the tag), appending (unauthenticated)
    /// plaintext to `output`.
    pub fn update(&mut self, input: &[u8], output: &mut Vec<u8>) -> Result<()> {
        // Ciphertext is everything but the last TAG_LEN bytes of the stream so far.
        let total = self.held.len() + input.len();
        let release = total.saturating_sub(TAG_LEN);
        let from_held = release.min(self.held.len());
        let from_input = release - from_held;
        let start = output.len();
        output.resize(start + release + 16, 0);
        let mut n = self
            .crypter
            .update(&self.held[..from_held], &mut output[start..])
            .map_err(openssl_error)?;
        n += self
            .crypter
            .update(&input[..from_input], &mut output[start + n..])
            .map_err(openssl_error)?;
        output.truncate(start + n);
        self.held.drain(..from_held);
        self.held.extend_from_slice(&input[from_input..]);
        Ok(())
    }

    /// Checks the tag (the last bytes fed): [`Error::InvalidCiphertext`] for a body that was
    /// changed or truncated, or a wrong key or IV.
    pub fn finish(mut self) -> Result<()> {
        if self.held.len() != TAG_LEN {
            return Err(Error::InvalidCiphertext);
        }
        self.crypter
            .set_tag(&self.held)
            .map_err(|_| Error::InvalidCiphertext)?;
        let mut rest = [0u8; 32];
        self.crypter
            .finalize(&mut rest)
            .map(|_| ())
            .map_err(|_| Error::InvalidCiphertext)
    }
}

/// The V3 suite id, `ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY`.
pub const SUITE_V3: [u8; 2] = [0x00, 0x73];
/// `x-amz-c` of V3 objects (the suite id in decimal).
pub const CEK_ALG_V3: &str = "115";
/// `x-amz-w` of `kms+context` in V3.
pub const WRAP_ALG_V3: &str = "12";
/// Message id and commitment bytes of the V3 suite.
pub const V3_NONCE_LEN: usize = 28;
/// The content IV of the V3 suite: twelve `0x01` bytes.
pub const IV_V3: [u8; IV_LEN] = [0x01; IV_LEN];

const C_V3: &str = "x-amz-c";
/// The V3 envelope entry holding the wrapped data key (base64).
pub const KEY_V3: &str = "x-amz-3";
const W_V3: &str = "x-amz-w";
const T_V3: &str = "x-amz-t";
const D_V3: &str = "x-amz-d";
const I_V3: &str = "x-amz-i";
/// The V3 entries that stay in the object's metadata when the rest is in an instruction file.
pub const V3_METADATA_ONLY: [&str; 3] = [C_V3, D_V3, I_V3];

/// A V3 envelope (key commitment).
#[derive(Clone, PartialEq, Eq)]
pub struct EnvelopeV3 {
    /// The wrapped data key (a wrapd blob).
    pub encrypted_key: Vec<u8>,
    /// The whole encryption context, `aws:x-amz-cek-alg` = `115` included.
    pub context: BTreeMap<String, String>,
    /// The message id: HKDF's salt.
    pub message_id: [u8; V3_NONCE_LEN],
    /// The key commitment.
    pub commitment: [u8; V3_NONCE_LEN],
}

impl std::fmt::Debug for EnvelopeV3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeV3")
            .field("encrypted_key_len", &self.encrypted_key.len())
            .field("context_keys", &self.context.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The context a V3 writer asks the key service for.
pub fn context_for_v3(user: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let mut context = context_for(user)?;
    context.insert(RESERVED_CONTEXT_KEY.to_owned(), CEK_ALG_V3.to_owned());
    Ok(context)
}

/// HKDF-SHA512 of the V3 suite: the content key and the commitment of `data_key` under
/// `message_id`.
pub fn derive_v3(
    data_key: &[u8],
    message_id: &[u8; V3_NONCE_LEN],
) -> Result<(Zeroizing<[u8; DATA_KEY_LEN]>, [u8; V3_NONCE_LEN])> {
    use ring::hkdf::{HKDF_SHA512, KeyType, Salt};
    struct Len(usize);
    impl KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    if data_key.len() != DATA_KEY_LEN {
        return Err(Error::InvalidCiphertext);
    }
    let prk = Salt::new(HKDF_SHA512, message_id).extract(data_key);
    let expand = |label: &[u8], out: &mut [u8]| {
        prk.expand(&[&SUITE_V3, label], Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| Error::Internal("HKDF expand".into()))
    };
    let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
    expand(b"DERIVEKEY", key.as_mut_slice())?;
    let mut commitment = [0u8; V3_NONCE_LEN];
    expand(b"COMMITKEY", &mut commitment)?;
    Ok((key, commitment))
}

fn decode_fixed<const N: usize>(entries: &HashMap<String, String>, name: &str) -> Result<[u8; N]> {
    let value = entries
        .get(name)
        .ok_or_else(|| bad(format!("{name} is missing")))?;
    STANDARD
        .decode(value)
        .ok()
        .and_then(|v| <[u8; N]>::try_from(v).ok())
        .ok_or_else(|| bad(format!("{name} must be {N} bytes of base64")))
}

impl EnvelopeV3 {
    /// The envelope of a new object, and the content key derived for it.
    pub fn new(
        encrypted_key: Vec<u8>,
        data_key: &[u8],
        user_context: &BTreeMap<String, String>,
        message_id: [u8; V3_NONCE_LEN],
    ) -> Result<(Self, Zeroizing<[u8; DATA_KEY_LEN]>)> {
        let (content_key, commitment) = derive_v3(data_key, &message_id)?;
        Ok((
            Self {
                encrypted_key,
                context: context_for_v3(user_context)?,
                message_id,
                commitment,
            },
            content_key,
        ))
    }

    /// Every entry (metadata placement).
    pub fn entries(&self) -> BTreeMap<String, String> {
        [
            (C_V3, CEK_ALG_V3.to_owned()),
            (KEY_V3, STANDARD.encode(&self.encrypted_key)),
            (W_V3, WRAP_ALG_V3.to_owned()),
            (
                T_V3,
                serde_json::to_string(&self.context).unwrap_or_default(),
            ),
            (D_V3, STANDARD.encode(self.commitment)),
            (I_V3, STANDARD.encode(self.message_id)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The entries split for an instruction file: (object metadata, instruction file body).
    pub fn split_for_instruction_file(&self) -> (BTreeMap<String, String>, Vec<u8>) {
        let (metadata, file): (BTreeMap<_, _>, BTreeMap<_, _>) = self
            .entries()
            .into_iter()
            .partition(|(k, _)| V3_METADATA_ONLY.contains(&k.as_str()));
        (metadata, serde_json::to_vec(&file).unwrap_or_default())
    }

    /// Reads an envelope from entries (metadata, with an instruction file's merged in).
    pub fn from_entries(entries: &HashMap<String, String>) -> Result<Self> {
        let get = |name: &str| {
            entries
                .get(name)
                .map(String::as_str)
                .ok_or_else(|| bad(format!("{name} is missing")))
        };
        if get(C_V3)? != CEK_ALG_V3 {
            return Err(bad(format!("x-amz-c must be {CEK_ALG_V3}")));
        }
        if get(W_V3)? != WRAP_ALG_V3 {
            return Err(bad(format!(
                "x-amz-w must be {WRAP_ALG_V3} (kms+context): the object's data key is not a KMS one"
            )));
        }
        if [KEY_V2, "x-amz-key"]
            .iter()
            .any(|k| entries.contains_key(*k))
        {
            return Err(bad("V3 entries mixed with another format's"));
        }
        let encrypted_key = STANDARD
            .decode(get(KEY_V3)?)
            .map_err(|_| bad("x-amz-3 is not base64"))?;
        if encrypted_key.is_empty() {
            return Err(bad("x-amz-3 is empty"));
        }
        let context: BTreeMap<String, String> = match entries.get(T_V3) {
            Some(json) => serde_json::from_str(json)
                .map_err(|_| bad("x-amz-t is not a JSON object of strings"))?,
            None => BTreeMap::new(),
        };
        if context.get(RESERVED_CONTEXT_KEY).map(String::as_str) != Some(CEK_ALG_V3) {
            return Err(bad(format!(
                "x-amz-t must hold {RESERVED_CONTEXT_KEY} = {CEK_ALG_V3}"
            )));
        }
        Ok(Self {
            encrypted_key,
            context,
            message_id: decode_fixed(entries, I_V3)?,
            commitment: decode_fixed(entries, D_V3)?,
        })
    }

    /// The caller's part of the context (the reserved entry removed).
    pub fn user_context(&self) -> BTreeMap<String, String> {
        without_reserved(&self.context)
    }

    /// Checks the caller's expected context equals the envelope's (see
    /// [`Envelope::check_context`]).
    pub fn check_context(&self, expected: &BTreeMap<String, String>) -> Result<()> {
        check_user_context(&self.user_context(), expected)
    }

    /// The content key for `data_key`, once the stored commitment matches the derived one
    /// (constant time): a data key that is not the object's is [`Error::InvalidCiphertext`]
    /// before any content is decrypted.
    pub fn content_key(&self, data_key: &[u8]) -> Result<Zeroizing<[u8; DATA_KEY_LEN]>> {
        let (key, commitment) = derive_v3(data_key, &self.message_id)?;
        let differ = commitment
            .iter()
            .zip(&self.commitment)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if differ != 0 {
            return Err(Error::InvalidCiphertext);
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn encrypt(key: &[u8; 32], iv: &[u8; 12], plaintext: &[u8], chunk: usize) -> Vec<u8> {
        let mut enc = ContentEncryptor::new(key, iv).unwrap();
        let mut out = Vec::new();
        for piece in plaintext.chunks(chunk.max(1)) {
            enc.update(piece, &mut out).unwrap();
        }
        out.extend_from_slice(&enc.finish().unwrap());
        out
    }

    fn decrypt(key: &[u8; 32], iv: &[u8; 12], body: &[u8], chunk: usize) -> Result<Vec<u8>> {
        let mut dec = ContentDecryptor::new(key, iv)?;
        let mut out = Vec::new();
        for piece in body.chunks(chunk.max(1)) {
            dec.update(piece, &mut out)?;
        }
        dec.finish()?;
        Ok(out)
    }

    #[test]
    fn streaming_gcm_matches_one_shot_gcm_whatever_the_chunking() {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = [7u8; 32];
        let iv = [9u8; 12];
        let plaintext: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut one_shot = plaintext.clone();
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap())
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::empty(),
                &mut one_shot,
            )
            .unwrap();
        for chunk in [1, 15, 16, 17, 1000, 10_000] {
            assert_eq!(encrypt(&key, &iv, &plaintext, chunk), one_shot);
            assert_eq!(decrypt(&key, &iv, &one_shot, chunk).unwrap(), plaintext);
        }
        assert_eq!(
            decrypt(&key, &iv, &encrypt(&key, &iv, b"", 1), 3).unwrap(),
            b""
        );
    }

    #[test]
    fn a_changed_or_truncated_body_fails_the_tag() {
        let (key, iv) = ([1u8; 32], [2u8; 12]);
        let body = encrypt(&key, &iv, b"some content", 4);
        let mut changed = body.clone();
        changed[3] ^= 1;
        for bad in [
            changed,
            body[..body.len() - 1].to_vec(),
            body[..10].to_vec(),
            vec![],
        ] {
            assert!(matches!(
                decrypt(&key, &iv, &bad, 5),
                Err(Error::InvalidCiphertext)
            ));
        }
        assert!(matches!(
            decrypt(&key, &[3u8; 12], &body, 5),
            Err(Error::InvalidCiphertext)
        ));
    }

    #[test]
    fn envelopes_round_trip_through_metadata_and_instruction_files() {
        let user = context(&[("tenant", "acme")]);
        let envelope = Envelope::new(b"blob".to_vec(), [4u8; 12], &user).unwrap();
        let entries: HashMap<String, String> = envelope.entries().into_iter().collect();
        assert_eq!(entries["x-amz-cek-alg"], "AES/GCM/NoPadding");
        assert_eq!(entries["x-amz-wrap-alg"], "kms+context");
        assert_eq!(entries["x-amz-tag-len"], "128");
        assert_eq!(
            serde_json::from_str::<BTreeMap<String, String>>(&entries["x-amz-matdesc"]).unwrap(),
            context(&[
                ("aws:x-amz-cek-alg", "AES/GCM/NoPadding"),
                ("tenant", "acme")
            ])
        );
        assert_eq!(detect(&entries), Format::V2);
        assert_eq!(Envelope::from_entries(&entries).unwrap(), envelope);
        assert_eq!(
            Envelope::from_instruction_file(&envelope.to_instruction_file()).unwrap(),
            envelope
        );
        assert_eq!(envelope.user_context(), user);
        envelope.check_context(&user).unwrap();
        for wrong in [
            context(&[]),
            context(&[("tenant", "other")]),
            context(&[("tenant", "acme"), ("x", "y")]),
        ] {
            let err = envelope.check_context(&wrong).unwrap_err();
            assert!(
                !err.to_string().contains("acme"),
                "values are not echoed: {err}"
            );
        }
    }

    #[test]
    fn v3_derivation_commits_to_the_data_key() {
        let data_key = [5u8; 32];
        let (envelope, key) = EnvelopeV3::new(
            b"blob".to_vec(),
            &data_key,
            &context(&[("a", "b")]),
            [6u8; 28],
        )
        .unwrap();
        assert_eq!(*envelope.content_key(&data_key).unwrap(), *key);
        assert!(matches!(
            envelope.content_key(&[7u8; 32]),
            Err(Error::InvalidCiphertext)
        ));
        let entries: HashMap<String, String> = envelope.entries().into_iter().collect();
        assert_eq!(detect(&entries), Format::V3);
        assert_eq!(entries["x-amz-c"], "115");
        assert_eq!(entries["x-amz-w"], "12");
        assert_eq!(EnvelopeV3::from_entries(&entries).unwrap(), envelope);
        assert_eq!(envelope.user_context(), context(&[("a", "b")]));
        let (metadata, file) = envelope.split_for_instruction_file();
        assert_eq!(
            metadata.keys().map(String::as_str).collect::<Vec<_>>(),
            ["x-amz-c", "x-amz-d", "x-amz-i"]
        );
        let mut merged: HashMap<String, String> = serde_json::from_slice(&file).unwrap();
        merged.extend(metadata);
        assert_eq!(EnvelopeV3::from_entries(&merged).unwrap(), envelope);
        let mut tampered = entries.clone();
        tampered.insert("x-amz-d".into(), STANDARD.encode([0u8; 28]));
        let tampered = EnvelopeV3::from_entries(&tampered).unwrap();
        assert!(
            tampered.content_key(&data_key).is_err(),
            "a changed commitment is refused"
        );
    }

    #[test]
    fn malformed_envelopes_are_refused_with_the_field_named() {
        let envelope = Envelope::new(b"blob".to_vec(), [4u8; 12], &BTreeMap::new()).unwrap();
        let good: HashMap<String, String> = envelope.entries().into_iter().collect();
        let cases = [
            ("x-amz-cek-alg", Some("AES/CBC/PKCS5Padding")),
            ("x-amz-wrap-alg", Some("kms")),
            ("x-amz-tag-len", Some("96")),
            ("x-amz-iv", Some("AAAA")),
            ("x-amz-key-v2", Some("not base64!")),
            ("x-amz-matdesc", Some("[]")),
            ("x-amz-matdesc", Some("{}")),
            ("x-amz-iv", None),
            ("x-amz-matdesc", None),
        ];
        for (field, value) in cases {
            let mut entries = good.clone();
            match value {
                Some(v) => entries.insert(field.to_owned(), v.to_owned()),
                None => entries.remove(field),
            };
            let err = Envelope::from_entries(&entries).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        assert!(Envelope::from_instruction_file(b"not json").is_err());
        assert!(context_for(&context(&[("aws:x-amz-cek-alg", "x")])).is_err());
    }
}
