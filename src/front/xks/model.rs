//! The XKS proxy API's request bodies and the binary formats wrapd chooses within it: the
//! ciphertext metadata (which key version encrypted), the AAD given to the token, and the
//! ciphertext data integrity value. Pure functions of the request, so that they are tested
//! (and fuzzed) without a daemon.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::error::XksError;
use crate::auth::RequestAttributes;
use crate::blob::{IV_LEN, TAG_LEN};
use crate::keystore::{ExternalSealed, MAX_EXTERNAL_PLAINTEXT};

/// Longest request metadata value kept (ARNs are up to 2,048 characters).
pub const MAX_METADATA_VALUE: usize = 2048;

/// Largest caller AAD taken (what the specification requires a proxy to take).
pub const MAX_AAD: usize = 8192;

/// The only encryption algorithm of version 1 of the specification.
pub const AES_GCM: &str = "AES_GCM";

/// The only integrity value algorithm of version 1 of the specification.
pub const SHA_256: &str = "SHA_256";

/// The first byte of wrapd's ciphertext metadata: format 1, the key version that follows
/// as 4 big-endian bytes, and the AAD built with the lengths (see [`aad`]).
const METADATA_FORMAT: u8 = 1;

/// The `requestMetadata` AWS KMS sends with each request. Unknown members are kept out, not
/// refused: AWS may add some.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata {
    aws_principal_arn: Option<String>,
    aws_source_vpc: Option<String>,
    aws_source_vpce: Option<String>,
    kms_key_arn: Option<String>,
    kms_operation: Option<String>,
    kms_request_id: Option<String>,
    kms_via_service: Option<String>,
}

/// Which members an operation's metadata must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// GetHealthStatus: `kmsOperation`, `kmsRequestId`.
    Health,
    /// GetKeyMetadata: and `awsPrincipalArn`.
    Metadata,
    /// Encrypt, Decrypt: and `kmsKeyArn`.
    Crypto,
}

impl RequestMetadata {
    /// The members as request attributes (for the policy and the audit line), after
    /// checking that `required` ones are there and that none is too long. `kmsOperation` is
    /// never checked against a list: AWS KMS may add operations.
    pub fn attributes(&self, required: Required) -> Result<RequestAttributes, XksError> {
        let members = [
            (
                "awsPrincipalArn",
                &self.aws_principal_arn,
                required != Required::Health,
            ),
            ("awsSourceVpc", &self.aws_source_vpc, false),
            ("awsSourceVpce", &self.aws_source_vpce, false),
            ("kmsKeyArn", &self.kms_key_arn, required == Required::Crypto),
            ("kmsOperation", &self.kms_operation, true),
            ("kmsRequestId", &self.kms_request_id, true),
            ("kmsViaService", &self.kms_via_service, false),
        ];
        let mut attributes = RequestAttributes::new();
        for (name, value, needed) in members {
            match value {
                Some(value) if value.chars().count() > MAX_METADATA_VALUE => {
                    return Err(XksError::validation(format!(
                        "requestMetadata.{name} is longer than {MAX_METADATA_VALUE} characters"
                    )));
                }
                Some(value) => {
                    attributes.insert(name.to_owned(), value.clone());
                }
                None if needed => {
                    return Err(XksError::validation(format!(
                        "requestMetadata.{name} is required"
                    )));
                }
                None => {}
            }
        }
        Ok(attributes)
    }

    /// `kmsRequestId`, for the audit line's request id.
    pub fn request_id(&self) -> Option<&str> {
        self.kms_request_id.as_deref()
    }
}

/// A body that carries only `requestMetadata` (GetHealthStatus, GetKeyMetadata).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOnly {
    /// Required; its absence is a validation error.
    pub request_metadata: Option<RequestMetadata>,
}

/// An Encrypt body (no `Debug`: it holds the plaintext).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptBody {
    /// Required.
    pub request_metadata: Option<RequestMetadata>,
    plaintext: Option<Zeroizing<String>>,
    encryption_algorithm: Option<String>,
    additional_authenticated_data: Option<String>,
    ciphertext_data_integrity_value_algorithm: Option<String>,
}

/// A Decrypt body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptBody {
    /// Required.
    pub request_metadata: Option<RequestMetadata>,
    ciphertext: Option<String>,
    ciphertext_metadata: Option<String>,
    encryption_algorithm: Option<String>,
    additional_authenticated_data: Option<String>,
    initialization_vector: Option<String>,
    authentication_tag: Option<String>,
}

/// An Encrypt request, checked (no `Debug`: it holds the plaintext).
pub struct EncryptRequest {
    /// The plaintext.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The caller's AAD (empty when absent).
    pub aad: Vec<u8>,
    /// Whether the answer must carry the integrity value.
    pub integrity: bool,
}

/// A Decrypt request, checked.
pub struct DecryptRequest {
    /// The key version the ciphertext metadata names.
    pub version: u32,
    /// The ciphertext metadata as sent (part of the AAD).
    pub metadata: Vec<u8>,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
    /// The caller's AAD (empty when absent).
    pub aad: Vec<u8>,
    /// The IV.
    pub iv: Vec<u8>,
    /// The tag.
    pub tag: Vec<u8>,
}

/// Parses a JSON body; a malformed one is a validation error.
pub fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    serde_json::from_slice(body)
        .map_err(|e| XksError::validation(format!("the request body is not a valid request: {e}")))
}

/// The `requestMetadata` member, which every request must have.
pub fn metadata(member: Option<RequestMetadata>) -> Result<RequestMetadata, XksError> {
    member.ok_or_else(|| XksError::validation("requestMetadata is required"))
}

fn base64_member(name: &str, value: &str) -> Result<Vec<u8>, XksError> {
    STANDARD
        .decode(value)
        .map_err(|_| XksError::validation(format!("{name} is not valid Base64")))
}

fn algorithm(value: Option<&str>) -> Result<(), XksError> {
    match value {
        Some(AES_GCM) => Ok(()),
        Some(other) => Err(XksError::new(
            "UnsupportedOperationException",
            http::StatusCode::NOT_IMPLEMENTED,
            format!(
                "encryptionAlgorithm {:?} is not supported: the only one is {AES_GCM}",
                super::truncate(other)
            ),
        )),
        None => Err(XksError::validation("encryptionAlgorithm is required")),
    }
}

fn caller_aad(value: Option<&str>) -> Result<Vec<u8>, XksError> {
    let aad = value
        .map(|v| base64_member("additionalAuthenticatedData", v))
        .transpose()?
        .unwrap_or_default();
    if aad.len() > MAX_AAD {
        return Err(XksError::new(
            "UnsupportedOperationException",
            http::StatusCode::NOT_IMPLEMENTED,
            format!("additionalAuthenticatedData is longer than {MAX_AAD} bytes"),
        ));
    }
    Ok(aad)
}

fn too_large(name: &str) -> XksError {
    XksError::new(
        "UnsupportedOperationException",
        http::StatusCode::NOT_IMPLEMENTED,
        format!("{name} is longer than {MAX_EXTERNAL_PLAINTEXT} bytes"),
    )
}

impl EncryptBody {
    /// The checked request.
    pub fn request(&self) -> Result<EncryptRequest, XksError> {
        let plaintext = self
            .plaintext
            .as_ref()
            .ok_or_else(|| XksError::validation("plaintext is required"))?;
        let plaintext = Zeroizing::new(base64_member("plaintext", plaintext)?);
        algorithm(self.encryption_algorithm.as_deref())?;
        let aad = caller_aad(self.additional_authenticated_data.as_deref())?;
        if plaintext.len() > MAX_EXTERNAL_PLAINTEXT {
            return Err(too_large("plaintext"));
        }
        let integrity = match self.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some(SHA_256) => true,
            Some(other) => {
                return Err(XksError::validation(format!(
                    "ciphertextDataIntegrityValueAlgorithm {:?} is not {SHA_256}",
                    super::truncate(other)
                )));
            }
        };
        Ok(EncryptRequest {
            plaintext,
            aad,
            integrity,
        })
    }
}

impl DecryptBody {
    /// The checked request. Ciphertext metadata that wrapd did not write (absent, another
    /// format) is an invalid ciphertext, like any tampering.
    pub fn request(&self) -> Result<DecryptRequest, XksError> {
        let required = |value: &Option<String>, name: &str| {
            value
                .as_deref()
                .ok_or_else(|| XksError::validation(format!("{name} is required")))
                .and_then(|v| base64_member(name, v))
        };
        let ciphertext = required(&self.ciphertext, "ciphertext")?;
        algorithm(self.encryption_algorithm.as_deref())?;
        let iv = required(&self.initialization_vector, "initializationVector")?;
        let tag = required(&self.authentication_tag, "authenticationTag")?;
        let aad = caller_aad(self.additional_authenticated_data.as_deref())?;
        if ciphertext.len() > MAX_EXTERNAL_PLAINTEXT {
            return Err(too_large("ciphertext"));
        }
        let metadata = self
            .ciphertext_metadata
            .as_deref()
            .map(|v| base64_member("ciphertextMetadata", v))
            .transpose()?
            .unwrap_or_default();
        if metadata.len() > 20 {
            return Err(XksError::validation(
                "ciphertextMetadata is longer than 20 bytes",
            ));
        }
        let version = key_version(&metadata)
            .ok_or_else(|| XksError::from_error(&crate::error::Error::InvalidCiphertext))?;
        if iv.len() != IV_LEN && iv.len() != 16 {
            return Err(XksError::validation(
                "initializationVector must be 12 or 16 bytes",
            ));
        }
        if tag.len() != TAG_LEN {
            return Err(XksError::validation("authenticationTag must be 16 bytes"));
        }
        Ok(DecryptRequest {
            version,
            metadata,
            ciphertext,
            aad,
            iv,
            tag,
        })
    }
}

/// wrapd's ciphertext metadata for `version`.
pub fn ciphertext_metadata(version: u32) -> Vec<u8> {
    let mut metadata = vec![METADATA_FORMAT];
    metadata.extend_from_slice(&version.to_be_bytes());
    metadata
}

/// The key version wrapd's ciphertext metadata names, if it is wrapd's.
pub fn key_version(metadata: &[u8]) -> Option<u32> {
    match metadata {
        [METADATA_FORMAT, a, b, c, d] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The AAD given to the token, as the specification builds it: the caller's AAD's length
/// (2 bytes, big-endian) and bytes, then the ciphertext metadata's length (1 byte) and
/// bytes, so that neither can be moved into the other.
pub fn aad(caller_aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(3 + caller_aad.len() + metadata.len());
    // Both lengths are bounded before this is called (8,192 and 20 bytes).
    aad.extend_from_slice(
        &u16::try_from(caller_aad.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    aad.extend_from_slice(caller_aad);
    aad.push(u8::try_from(metadata.len()).unwrap_or(u8::MAX));
    aad.extend_from_slice(metadata);
    aad
}

/// The ciphertext data integrity value: SHA-256 over the caller's AAD, the ciphertext
/// metadata, the IV, the ciphertext and the tag, concatenated.
pub fn integrity_value(caller_aad: &[u8], metadata: &[u8], sealed: &ExternalSealed) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(caller_aad);
    hash.update(metadata);
    hash.update(sealed.iv);
    hash.update(&sealed.ciphertext);
    hash.update(sealed.tag);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_integrity_value_of_the_specification_example_is_reproduced() {
        // Appendix C of the specification: 33 bytes of AAD, 13 of metadata, and the
        // encryption output of its Encrypt example.
        let aad = STANDARD
            .decode("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n")
            .unwrap();
        let metadata = STANDARD.decode("a2V5X3ZlcnNpb249MQ==").unwrap();
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&STANDARD.decode("HMrlRw85cAJUd5Ax").unwrap());
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&STANDARD.decode("vBxN2ncH1oEkR8WVXpmyYQ==").unwrap());
        let sealed = ExternalSealed {
            version: 1,
            iv,
            ciphertext: STANDARD.decode("ghxkK1txeDNn3q8Y").unwrap(),
            tag,
        };
        assert_eq!(
            STANDARD.encode(integrity_value(&aad, &metadata, &sealed)),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }

    #[test]
    fn the_aad_carries_both_lengths_so_metadata_cannot_pass_as_aad() {
        let metadata = ciphertext_metadata(7);
        assert_eq!(key_version(&metadata), Some(7));
        // Encrypting without AAD, then offering the metadata as AAD and none as metadata,
        // gives a different AAD: the tag cannot verify.
        assert_ne!(aad(&[], &metadata), aad(&metadata, &[]));
        assert_eq!(aad(b"ab", &[9]), vec![0, 2, b'a', b'b', 1, 9]);
        // Never the start of a wrapd blob's AAD (its magic), whatever the caller's AAD.
        assert!(!aad(&[0x41; MAX_AAD], &metadata).starts_with(crate::blob::MAGIC));
    }

    #[test]
    fn metadata_not_written_by_wrapd_names_no_version() {
        assert_eq!(key_version(b""), None);
        assert_eq!(key_version(b"key_version=1"), None);
        assert_eq!(key_version(&[2, 0, 0, 0, 1]), None);
        assert_eq!(key_version(&[1, 0, 0, 1]), None);
    }

    #[test]
    fn request_metadata_needs_its_operations_members_and_takes_any_kms_operation() {
        let parsed: MetadataOnly = parse(br#"{"requestMetadata":{}}"#).unwrap();
        let err = metadata(parsed.request_metadata)
            .unwrap()
            .attributes(Required::Health)
            .unwrap_err();
        assert_eq!(err.name, "ValidationException");
        let parsed: MetadataOnly = parse(
            br#"{"requestMetadata":{"kmsOperation":"SomeFutureOperation","kmsRequestId":"r","extra":1}}"#,
        )
        .unwrap();
        let md = metadata(parsed.request_metadata).unwrap();
        let attributes = md.attributes(Required::Health).unwrap();
        assert_eq!(attributes["kmsOperation"], "SomeFutureOperation");
        assert_eq!(
            md.attributes(Required::Metadata).unwrap_err().name,
            "ValidationException"
        );
        let parsed: MetadataOnly = parse(b"{}").unwrap();
        assert!(metadata(parsed.request_metadata).is_err());
        let long = format!(
            r#"{{"requestMetadata":{{"kmsOperation":"x","kmsRequestId":"{}"}}}}"#,
            "r".repeat(MAX_METADATA_VALUE + 1)
        );
        let parsed: MetadataOnly = parse(long.as_bytes()).unwrap();
        assert!(
            metadata(parsed.request_metadata)
                .unwrap()
                .attributes(Required::Health)
                .is_err()
        );
    }

    #[test]
    fn encrypt_and_decrypt_bodies_are_checked_against_the_specification() {
        let encrypt: EncryptBody = parse(
            br#"{"plaintext":"SGVsbG8=","encryptionAlgorithm":"AES_GCM","ciphertextDataIntegrityValueAlgorithm":"SHA_256"}"#,
        )
        .unwrap();
        let request = encrypt.request().unwrap();
        assert_eq!(request.plaintext.as_slice(), b"Hello");
        assert!(request.integrity && request.aad.is_empty());
        let missing: EncryptBody = parse(br#"{"encryptionAlgorithm":"AES_GCM"}"#).unwrap();
        assert_eq!(missing.request().err().unwrap().name, "ValidationException");
        let other: EncryptBody =
            parse(br#"{"plaintext":"SGVsbG8=","encryptionAlgorithm":"RSA"}"#).unwrap();
        assert_eq!(
            other.request().err().unwrap().name,
            "UnsupportedOperationException"
        );
        let big = format!(
            r#"{{"plaintext":"{}","encryptionAlgorithm":"AES_GCM"}}"#,
            STANDARD.encode(vec![0u8; MAX_EXTERNAL_PLAINTEXT + 1])
        );
        let big: EncryptBody = parse(big.as_bytes()).unwrap();
        assert_eq!(big.request().err().unwrap().status, 501);

        let decrypt = |metadata: &str| -> Result<DecryptRequest, XksError> {
            let body = format!(
                r#"{{"ciphertext":"AAAA","ciphertextMetadata":"{metadata}","encryptionAlgorithm":"AES_GCM","initializationVector":"{}","authenticationTag":"{}"}}"#,
                STANDARD.encode([0u8; 12]),
                STANDARD.encode([0u8; 16])
            );
            parse::<DecryptBody>(body.as_bytes())?.request()
        };
        let ok = decrypt(&STANDARD.encode(ciphertext_metadata(3))).unwrap();
        assert_eq!((ok.version, ok.ciphertext.len()), (3, 3));
        assert_eq!(
            decrypt("a2V5X3ZlcnNpb249MQ==").err().unwrap().name,
            "InvalidCiphertextException"
        );
        assert_eq!(decrypt("!!").err().unwrap().name, "ValidationException");
        assert!(parse::<DecryptBody>(b"[1]").is_err());
    }
}
