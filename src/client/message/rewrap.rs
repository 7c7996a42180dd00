//! Re-wrapping a stored message: its encrypted data keys replaced and its header
//! authenticated again, every frame byte left as it is.
//!
//! Sound for the committing suites: the frame key is derived from the message id and the
//! data key alone (`HKDF(salt = message id, ikm = DEK)`), so a header that carries the same
//! data key wrapped differently opens the same frames. The header tag covers the encrypted
//! data keys, so it is computed again, after the old one and the key commitment were checked
//! with the data key: a header that was tampered with is refused, never re-authenticated.
//! Signed messages (suite 0x0578) cannot be re-wrapped: their footer signature covers the
//! header, and its private key was discarded when the message was written.

use super::*;

/// What the start of a stored object is, for the tools that walk stored data (census,
/// re-wrap).
#[derive(Debug)]
pub enum Found {
    /// A message's header.
    Message(Box<StoredHeader>),
    /// A message with more encrypted data keys than the reader allows: it may be protected
    /// by wrapd keys the reader did not look at.
    OverLimit(Error),
    /// Not a message (or not one this reader can read), and why.
    NotAMessage(String),
}

impl Found {
    /// Reads the start of `input`: a version-2 message's header, or what else it is.
    pub fn read(input: &mut impl Read, max_data_keys: u16) -> Self {
        let mut first = [0u8; 1];
        if input.read(&mut first).ok() != Some(1) || first[0] != VERSION {
            return Self::NotAMessage("not an Encryption SDK message".into());
        }
        let mut whole = Read::chain(&first[..], input);
        match StoredHeader::read(&mut whole, max_data_keys) {
            Ok(stored) => Self::Message(Box::new(stored)),
            Err(err) if err.to_string().contains(header::TOO_MANY_DATA_KEYS) => {
                Self::OverLimit(err)
            }
            Err(err) => Self::NotAMessage(format!("not a readable Encryption SDK message: {err}")),
        }
    }
}

/// The header at the start of a stored message, with its bytes as written.
#[derive(Debug, Clone)]
pub struct StoredHeader {
    /// The parsed header.
    pub header: Header,
    /// The header's bytes before its tag, exactly as written.
    body: Vec<u8>,
    tag: [u8; TAG_LEN],
}

impl StoredHeader {
    /// Reads the header at the start of `input`, its tag included (nothing after it), with
    /// at most `max_data_keys` encrypted data keys. Nothing is authenticated yet.
    pub fn read(input: &mut (impl Read + ?Sized), max_data_keys: u16) -> Result<Self> {
        let mut source = StreamSource {
            inner: input,
            recorded: Some(Vec::new()),
            hashed: None,
        };
        let header = Header::read(&mut source, max_data_keys)?;
        let body = source.recorded.take().unwrap_or_default();
        let tag = source.array::<TAG_LEN>()?;
        Ok(Self { header, body, tag })
    }

    /// How many bytes the header takes at the start of the message: where the frames begin.
    pub fn len(&self) -> usize {
        self.body.len() + TAG_LEN
    }

    /// Always false: a header has at least its fixed fields.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the message is signed (and so cannot be re-wrapped).
    pub fn is_signed(&self) -> bool {
        self.header.suite == SUITE_COMMIT_KEY_ECDSA_P384
    }

    /// Checks that `dek` is the message's data key (the key commitment) and that the header
    /// is as written (its tag).
    pub fn verify(&self, dek: &[u8]) -> Result<()> {
        let (key, commitment) = derive(self.header.suite, &self.header.message_id, dek)?;
        if !constant_time_eq(&commitment[..], &self.header.commitment) {
            return Err(bad("the key commitment does not match"));
        }
        key.open_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; IV_LEN]),
            Aad::from(&self.body[..]),
            Tag::from(self.tag),
            &mut [],
            0..,
        )
        .map_err(|_| bad("the header does not authenticate"))?;
        Ok(())
    }

    /// The header with `data_keys` in place of its encrypted data keys, its tag computed
    /// again under `dek`; every other byte as written (the encryption context too). `dek`
    /// is checked first ([`StoredHeader::verify`]).
    pub fn with_data_keys(&self, dek: &[u8], data_keys: &[EncryptedDataKey]) -> Result<Vec<u8>> {
        if self.is_signed() {
            return Err(Error::invalid(
                "a signed message (algorithm suite 0x0578) cannot be re-wrapped: its signature covers the header, and the signing key was discarded when it was written",
            ));
        }
        self.verify(dek)?;
        let count = u16::try_from(data_keys.len())
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| Error::invalid("a message needs 1 to 65535 encrypted data keys"))?;
        // version 1 | suite 2 | message id 32 | context length 2 | context
        let context_len = usize::from(u16::from_be_bytes([self.body[35], self.body[36]]));
        let prefix = 37 + context_len;
        // content type 1 | frame length 4 | commitment 32
        let suffix = self.body.len() - (1 + 4 + 32);
        let mut body = self.body[..prefix].to_vec();
        body.extend_from_slice(&count.to_be_bytes());
        for key in data_keys {
            header::push_field(&mut body, key.provider_id.as_bytes())?;
            header::push_field(&mut body, &key.provider_info)?;
            header::push_field(&mut body, &key.ciphertext)?;
        }
        body.extend_from_slice(&self.body[suffix..]);
        let (key, _) = derive(self.header.suite, &self.header.message_id, dek)?;
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; IV_LEN]),
                Aad::from(&body[..]),
                &mut [],
            )
            .map_err(|_| Error::Internal("AES-GCM failed".into()))?;
        body.extend_from_slice(tag.as_ref());
        Ok(body)
    }
}
