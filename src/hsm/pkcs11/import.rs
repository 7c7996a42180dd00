//! Key import in the token: RSA-OAEP wrapping key pairs, unwrapping material into a key
//! object, and its check value and length, with the errors an HSM without a mechanism gives.

use super::*;

/// The RSA-OAEP mechanism of an import algorithm (MGF1 over the same hash, no label).
pub(super) fn oaep(algorithm: ImportAlgorithm) -> Mechanism<'static> {
    let (hash, mgf) = if algorithm.sha256() {
        (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)
    } else {
        (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1)
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()))
}

/// The token refused the mechanism or its parameters: it cannot do this algorithm.
pub(super) fn is_unsupported_mechanism(err: &CkError) -> bool {
    matches!(
        err,
        CkError::Pkcs11(
            RvError::MechanismInvalid | RvError::MechanismParamInvalid | RvError::ArgumentsBad,
            _
        )
    )
}

/// The error of a probe call of `GetParametersForImport`: the token lacking the algorithm is
/// [`Error::Unsupported`], anything else a PKCS#11 error.
pub(super) fn probe_error(algorithm: ImportAlgorithm) -> impl Fn(CkError) -> Error {
    move |err| {
        if is_unsupported_mechanism(&err) {
            unsupported(algorithm)
        } else {
            p11_error(err)
        }
    }
}

pub(super) fn unsupported(algorithm: ImportAlgorithm) -> Error {
    Error::Unsupported(format!(
        "this HSM's PKCS#11 library cannot unwrap with {} inside the token (SoftHSM 2.6 does RSA-OAEP with SHA-1 only); use {}",
        algorithm.name(),
        if algorithm.aes_key_wrap() {
            ImportAlgorithm::RsaAesKeyWrapSha1.name()
        } else {
            ImportAlgorithm::RsaesOaepSha1.name()
        }
    ))
}

/// An unwrap that failed on the wrapped bytes (not on the device): a bad ciphertext. SoftHSM
/// reports a failed OAEP decoding as `CKR_GENERAL_ERROR` or `CKR_FUNCTION_FAILED`, so those
/// count when the session still answers (as for a GCM tag mismatch). With `busy_is_failed`
/// (CloudHSM) `CKR_FUNCTION_FAILED` is a busy HSM that did not do the call, never a verdict on
/// the bytes: it stays an HSM error, which the caller waits out (`with_session`).
pub(super) fn unwrap_error(
    session: &Session,
    algorithm: ImportAlgorithm,
    busy_is_failed: bool,
    err: CkError,
) -> Error {
    if is_unsupported_mechanism(&err) {
        return unsupported(algorithm);
    }
    match err {
        CkError::Pkcs11(RvError::FunctionFailed, _) if busy_is_failed => p11_error(err),
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::KeySizeRange
            | RvError::DataLenRange
            | RvError::DataInvalid
            | RvError::GeneralError
            | RvError::FunctionFailed,
            _,
        ) if session.get_session_info().is_ok() => Error::InvalidCiphertext,
        other => p11_error(other),
    }
}

impl Pkcs11Token {
    /// The handle of a wrapping key's private half; [`Error::InvalidImportToken`] if none.
    pub(super) fn wrapping_key_handle(
        &self,
        session: &Session,
        id: &WrappingKeyId,
    ) -> Result<ObjectHandle> {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id.to_bytes()),
            ])
            .map_err(p11_error)?;
        found.first().copied().ok_or_else(|| {
            Error::InvalidImportToken(format!(
                "the import token names no wrapping key of key {} (expired and removed, or not issued by wrapd)",
                id.key_id
            ))
        })
    }

    /// Unwraps `wrapped` into a key object with `template`, the RSA-OAEP step (and for
    /// RSA_AES_KEY_WRAP_*, the RFC 5649 step under an ephemeral session key destroyed at
    /// once) inside the token.
    pub(super) fn unwrap_material(
        &self,
        session: &Session,
        id: &WrappingKeyId,
        wrapped: &[u8],
        template: &[Attribute],
    ) -> Result<ObjectHandle> {
        let private = self.wrapping_key_handle(session, id)?;
        let busy_is_failed = self.profile() == HsmProfile::Cloudhsm;
        let rsa_len = (id.bits / 8) as usize;
        if !id.algorithm.aes_key_wrap() {
            if wrapped.len() != rsa_len {
                return Err(Error::InvalidCiphertext);
            }
            return session
                .unwrap_key(&oaep(id.algorithm), private, wrapped, template)
                .map_err(|err| unwrap_error(session, id.algorithm, busy_is_failed, err));
        }
        // RSA-OAEP(ephemeral AES key) || RFC 5649 wrap of the material under it.
        if wrapped.len() < rsa_len + 16 || (wrapped.len() - rsa_len) % 8 != 0 {
            return Err(Error::InvalidCiphertext);
        }
        let (encrypted_key, wrapped_material) = wrapped.split_at(rsa_len);
        let ephemeral_template = session_aes_key(SessionKeyUse::Unwrap);
        let ephemeral = session
            .unwrap_key(
                &oaep(id.algorithm),
                private,
                encrypted_key,
                &ephemeral_template,
            )
            .map_err(|err| unwrap_error(session, id.algorithm, busy_is_failed, err))?;
        let result = session
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                ephemeral,
                wrapped_material,
                template,
            )
            .map_err(|err| unwrap_error(session, id.algorithm, busy_is_failed, err));
        if let Err(err) = session.destroy_object(ephemeral) {
            tracing::warn!(error = %p11_error(err), "could not destroy an ephemeral import key (a session object: it goes with the session)");
        }
        result
    }

    /// The key check value of a key object (see [`KeyCheckValue`]).
    pub(super) fn check_value_of(session: &Session, handle: ObjectHandle) -> Result<KeyCheckValue> {
        let block = session
            .encrypt(&Mechanism::AesEcb, handle, KEY_CHECK_BLOCK)
            .map_err(p11_error)?;
        block
            .try_into()
            .map_err(|_| Error::Internal("C_Encrypt (AES-ECB) returned a wrong-sized block".into()))
    }

    /// Checks an unwrapped object is an AES-256 key (with `measure`, also where the library
    /// does not report its length) and returns its check value.
    pub(super) fn check_imported(
        session: &Session,
        handle: ObjectHandle,
        measure: bool,
    ) -> Result<KeyCheckValue> {
        let wrong_size = || Error::invalid("the key material must be a 256-bit (32-byte) AES key");
        match Self::material_len(session, handle, measure)? {
            Some(32) | None => {}
            Some(_) => return Err(wrong_size()),
        }
        // An AES key of another length than 16, 24 or 32 bytes fails here.
        Self::check_value_of(session, handle).map_err(|err| match err {
            Error::Pkcs11 {
                rv: RvError::KeySizeRange | RvError::KeyTypeInconsistent | RvError::GeneralError,
                ..
            } => wrong_size(),
            other => other,
        })
    }

    /// The length of an unwrapped key: `CKA_VALUE_LEN`, or where the library leaves it 0
    /// (SoftHSM 2.6 does for unwrapped keys, and refuses it in the unwrap template), with
    /// `measure`, the length of the key wrapped with RFC 5649 under a fresh session key
    /// (sensitive, never extractable, destroyed at once): 8 bytes more than the key rounded
    /// up to 8. `None` when unknown.
    pub(super) fn material_len(
        session: &Session,
        handle: ObjectHandle,
        measure: bool,
    ) -> Result<Option<u64>> {
        let attributes = session
            .get_attributes(handle, &[AttributeType::ValueLen])
            .map_err(p11_error)?;
        let reported = attributes.iter().find_map(|a| match a {
            Attribute::ValueLen(len) => Some(u64::from(*len)),
            _ => None,
        });
        if let Some(len) = reported.filter(|len| *len > 0) {
            return Ok(Some(len));
        }
        if !measure {
            return Ok(None);
        }
        let mut kek_template = session_aes_key(SessionKeyUse::Wrap);
        kek_template.push(Attribute::ValueLen(32.into()));
        let kek = session
            .generate_key(&Mechanism::AesKeyGen, &kek_template)
            .map_err(p11_error)?;
        let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, kek, handle);
        if let Err(err) = session.destroy_object(kek) {
            tracing::warn!(error = %p11_error(err), "could not destroy a session key (it goes with the session)");
        }
        let wrapped = wrapped.map_err(p11_error)?;
        // 25..=32 bytes all wrap to 40; AES takes only 32 of them (the check value fails
        // for the others).
        Ok(Some(match wrapped.len() {
            40 => 32,
            n => n.saturating_sub(8) as u64,
        }))
    }
}

/// Generates a wrapping key pair on `session`, proves the token can unwrap with it, and
/// returns the private key's handle and the public key (DER). The public half is
/// always a session object, destroyed here.
pub(super) fn generate_wrapping_pair(
    session: &Session,
    id: &WrappingKeyId,
    public_template: &[Attribute],
    private_template: &[Attribute],
) -> Result<(ObjectHandle, Vec<u8>)> {
    use rsa::pkcs8::EncodePublicKey;
    {
        let (public, private) = session
            .generate_key_pair(
                &Mechanism::RsaPkcsKeyPairGen,
                public_template,
                private_template,
            )
            .map_err(p11_error)?;
        let result = (|| {
            let attributes = session
                .get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(p11_error)?;
            let (mut modulus, mut exponent) = (None, None);
            for attribute in attributes {
                match attribute {
                    Attribute::Modulus(n) => modulus = Some(n),
                    Attribute::PublicExponent(e) => exponent = Some(e),
                    _ => {}
                }
            }
            let (Some(n), Some(e)) = (modulus, exponent) else {
                return Err(Error::Internal("the RSA public key has no modulus".into()));
            };
            // Prove the token can unwrap with this algorithm before anyone wraps
            // material for it: a random AES key, encrypted with the public half, unwrapped
            // with the private half into a session object, destroyed.
            let mut probe = Zeroizing::new([0u8; 32]);
            session
                .generate_random_slice(probe.as_mut_slice())
                .map_err(p11_error)?;
            let encrypted = session
                .encrypt(&oaep(id.algorithm), public, probe.as_slice())
                .map_err(probe_error(id.algorithm))?;
            let unwrapped = session
                .unwrap_key(
                    &oaep(id.algorithm),
                    private,
                    &encrypted,
                    &session_aes_key(SessionKeyUse::Unwrap),
                )
                .map_err(probe_error(id.algorithm))?;
            session.destroy_object(unwrapped).map_err(p11_error)?;
            let key = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(&n),
                rsa::BigUint::from_bytes_be(&e),
            )
            .map_err(|err| Error::Internal(format!("the token's RSA public key: {err}")))?;
            key.to_public_key_der()
                .map(|der| der.into_vec())
                .map_err(|err| Error::Internal(format!("encoding the RSA public key: {err}")))
        })();
        if let Err(err) = session.destroy_object(public) {
            tracing::warn!(error = %p11_error(err), "could not destroy the public half of a wrapping key (a session object)");
        }
        if result.is_err() {
            if let Err(err) = session.destroy_object(private) {
                tracing::warn!(error = %p11_error(err), wrapping_key = %id, "could not destroy a wrapping key that failed its check");
            }
        }
        result.map(|der| (private, der))
    }
}
