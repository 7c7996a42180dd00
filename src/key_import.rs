//! Key import ("bring your own key"): what the daemon and the thin client share.
//!
//! The wrapping algorithms ([`ImportAlgorithm`], AWS KMS's names and formats) and, in the
//! client, [`wrap_key_material`]: the key owner's side of `ImportKeyMaterial`, which wraps a
//! 256-bit key for the RSA public key `GetParametersForImport` returned, with the RustCrypto
//! `rsa` (OAEP) and `aes-kw` (RFC 5649) crates. The daemon unwraps inside the token
//! (`hsm::Token::import_key`).

/// How imported key material is wrapped for transport: the AWS KMS `WrappingAlgorithm`s
/// wrapd offers (RSA-OAEP with MGF1 over the same hash, no label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImportAlgorithm {
    /// The 32-byte material encrypted with RSA-OAEP, SHA-1.
    RsaesOaepSha1,
    /// The 32-byte material encrypted with RSA-OAEP, SHA-256.
    RsaesOaepSha256,
    /// An ephemeral AES-256 key encrypted with RSA-OAEP (SHA-1), followed by the material
    /// wrapped under it with AES key wrap with padding (RFC 5649).
    RsaAesKeyWrapSha1,
    /// As [`ImportAlgorithm::RsaAesKeyWrapSha1`], with RSA-OAEP over SHA-256.
    RsaAesKeyWrapSha256,
}

impl ImportAlgorithm {
    /// Every algorithm, in the order the docs list them.
    pub const ALL: [Self; 4] = [
        Self::RsaesOaepSha1,
        Self::RsaesOaepSha256,
        Self::RsaAesKeyWrapSha1,
        Self::RsaAesKeyWrapSha256,
    ];

    /// The AWS KMS name (`RSAES_OAEP_SHA_256`, …), also used by the gRPC API.
    pub fn name(self) -> &'static str {
        match self {
            Self::RsaesOaepSha1 => "RSAES_OAEP_SHA_1",
            Self::RsaesOaepSha256 => "RSAES_OAEP_SHA_256",
            Self::RsaAesKeyWrapSha1 => "RSA_AES_KEY_WRAP_SHA_1",
            Self::RsaAesKeyWrapSha256 => "RSA_AES_KEY_WRAP_SHA_256",
        }
    }

    /// Parses an AWS KMS name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// True for the SHA-256 variants (OAEP hash and MGF1 hash).
    pub fn sha256(self) -> bool {
        matches!(self, Self::RsaesOaepSha256 | Self::RsaAesKeyWrapSha256)
    }

    /// True when an ephemeral AES key wraps the material (RFC 5649).
    pub fn aes_key_wrap(self) -> bool {
        matches!(self, Self::RsaAesKeyWrapSha1 | Self::RsaAesKeyWrapSha256)
    }
}

/// Length of the key material wrapd imports: an AES-256 key.
pub const KEY_MATERIAL_LEN: usize = 32;

/// Wraps `material` (an AES-256 key) for import with `algorithm` under the wrapping public
/// key `public_key_der` (DER `SubjectPublicKeyInfo`, as `GetParametersForImport` returns it).
/// For the `RSA_AES_KEY_WRAP_*` algorithms, the ephemeral AES key is drawn from the OS and
/// zeroized after use.
#[cfg(feature = "client")]
pub fn wrap_key_material(
    public_key_der: &[u8],
    algorithm: ImportAlgorithm,
    material: &[u8],
) -> crate::Result<Vec<u8>> {
    use rsa::pkcs8::DecodePublicKey;
    use zeroize::Zeroizing;

    if material.len() != KEY_MATERIAL_LEN {
        return Err(crate::Error::invalid(format!(
            "the key material must be {KEY_MATERIAL_LEN} bytes (an AES-256 key), not {}",
            material.len()
        )));
    }
    let public = rsa::RsaPublicKey::from_public_key_der(public_key_der)
        .map_err(|err| crate::Error::invalid(format!("the wrapping public key: {err}")))?;
    let oaep = || {
        if algorithm.sha256() {
            rsa::Oaep::new::<sha2::Sha256>()
        } else {
            rsa::Oaep::new::<sha1::Sha1>()
        }
    };
    let encrypt = |plaintext: &[u8]| {
        public
            .encrypt(&mut rsa::rand_core::OsRng, oaep(), plaintext)
            .map_err(|err| crate::Error::invalid(format!("RSA-OAEP: {err}")))
    };
    if !algorithm.aes_key_wrap() {
        return encrypt(material);
    }
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    rsa::rand_core::RngCore::fill_bytes(&mut rsa::rand_core::OsRng, ephemeral.as_mut_slice());
    let mut wrapped = encrypt(ephemeral.as_slice())?;
    let kek = aes_kw::KekAes256::from(*ephemeral);
    let under_kek = kek
        .wrap_with_padding_vec(material)
        .map_err(|err| crate::Error::Internal(format!("AES key wrap: {err}")))?;
    wrapped.extend_from_slice(&under_kek);
    Ok(wrapped)
}
