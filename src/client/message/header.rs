//! The message header: writing its body, and reading it from a source (a slice or a stream)
//! within the limits a reader sets.

use super::*;

/// Named in the error of a message over the reader's limit of encrypted data keys.
pub(super) const TOO_MANY_DATA_KEYS: &str = "max_encrypted_data_keys";

pub(super) fn push_field(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    let len =
        u16::try_from(bytes.len()).map_err(|_| Error::invalid("a header field is over 64 KiB"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

impl Header {
    /// Reads a header (up to, not including, its auth tag), refusing more than
    /// `max_data_keys` encrypted data keys.
    pub(super) fn read(r: &mut impl Source, max_data_keys: u16) -> Result<Self> {
        if r.u8()? != VERSION {
            return Err(bad("only message format version 2 is supported"));
        }
        let suite = r.u16()?;
        if suite != SUITE_COMMIT_KEY && suite != SUITE_COMMIT_KEY_ECDSA_P384 {
            return Err(bad(
                "unsupported algorithm suite (only committing suites are read)",
            ));
        }
        let message_id = r.array::<32>()?;
        let context_len = usize::from(r.u16()?);
        let context = EncryptionContext::parse(&r.take(context_len)?)?;
        let count = r.u16()?;
        if count == 0 {
            return Err(bad("no encrypted data keys"));
        }
        if count > max_data_keys {
            return Err(Error::invalid(format!(
                "the message has {count} encrypted data keys, more than the {max_data_keys} allowed ({TOO_MANY_DATA_KEYS})"
            )));
        }
        let mut data_keys = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let provider_id =
                String::from_utf8(r.field()?).map_err(|_| bad("provider id is not UTF-8"))?;
            data_keys.push(EncryptedDataKey {
                provider_id,
                provider_info: r.field()?,
                ciphertext: r.field()?,
            });
        }
        if r.u8()? != CONTENT_FRAMED {
            return Err(bad("only framed content is supported"));
        }
        let frame_length = r.u32()?;
        if frame_length == 0 || frame_length > MAX_READ_FRAME_LENGTH {
            return Err(bad("frame length out of range (1 to 64 MiB is read)"));
        }
        let commitment = r.array::<32>()?;
        Ok(Self {
            suite,
            message_id,
            context,
            data_keys,
            frame_length,
            commitment,
        })
    }
}

/// Where message bytes come from. Every read is exact; running out of input is an error
/// ("truncated"), never a panic.
pub(super) trait Source {
    /// Fills `buf` exactly.
    fn read_into(&mut self, buf: &mut [u8]) -> Result<()>;
    /// True when no byte is left.
    fn at_end(&mut self) -> Result<bool>;

    /// `n` bytes; only used for header fields, whose lengths are at most 64 KiB.
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.read_into(&mut buf)?;
        Ok(buf)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_into(&mut buf)?;
        Ok(buf)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn field(&mut self) -> Result<Vec<u8>> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }
}

/// A stream of message bytes that can record what it reads (the header, for its tag) and
/// hash it (header and body, for the signature of signed suites).
pub(super) struct StreamSource<R> {
    pub(super) inner: R,
    pub(super) recorded: Option<Vec<u8>>,
    pub(super) hashed: Option<Sha384>,
}

impl<R: Read> Source for StreamSource<R> {
    fn read_into(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => bad("truncated"),
            _ => Error::invalid(format!("cannot read the message: {e}")),
        })?;
        if let Some(recorded) = &mut self.recorded {
            recorded.extend_from_slice(buf);
        }
        if let Some(hashed) = &mut self.hashed {
            hashed.update(&*buf);
        }
        Ok(())
    }

    fn at_end(&mut self) -> Result<bool> {
        let mut byte = [0u8; 1];
        loop {
            match self.inner.read(&mut byte) {
                Ok(n) => return Ok(n == 0),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::invalid(format!("cannot read the message: {e}"))),
            }
        }
    }
}

impl Header {
    /// The header bytes before the auth tag.
    pub(super) fn body(&self) -> Result<Vec<u8>> {
        let mut out = vec![VERSION];
        out.extend_from_slice(&self.suite.to_be_bytes());
        out.extend_from_slice(&self.message_id);
        push_field(&mut out, &self.context.serialize())?;
        let count = u16::try_from(self.data_keys.len())
            .map_err(|_| Error::invalid("too many data keys"))?;
        if count == 0 {
            return Err(Error::invalid(
                "a message needs at least one encrypted data key",
            ));
        }
        out.extend_from_slice(&count.to_be_bytes());
        for key in &self.data_keys {
            push_field(&mut out, key.provider_id.as_bytes())?;
            push_field(&mut out, &key.provider_info)?;
            push_field(&mut out, &key.ciphertext)?;
        }
        out.push(CONTENT_FRAMED);
        out.extend_from_slice(&self.frame_length.to_be_bytes());
        out.extend_from_slice(&self.commitment);
        Ok(out)
    }
}
