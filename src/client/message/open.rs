//! Opening: the header and its commitment are checked before any frame is opened; frames
//! are opened a batch at a time in parallel, and a signed message's footer is verified
//! before the last plaintext is released.

use super::*;

/// Limits on what decryption accepts, as the official SDKs' client settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecryptLimits {
    /// Most encrypted data keys a message may carry (each may cost a daemon call, so a
    /// hostile message must not name thousands). The official SDKs'
    /// `max_encrypted_data_keys`; default 10.
    pub max_encrypted_data_keys: u16,
}

impl Default for DecryptLimits {
    fn default() -> Self {
        Self {
            max_encrypted_data_keys: 10,
        }
    }
}

/// Parses a message's header without authenticating it, e.g. to unwrap its data key with
/// an async keyring before calling [`decrypt`]. Nothing in it is authenticated until
/// [`decrypt`] has checked the key commitment and the header tag.
pub fn peek_header(message: &[u8]) -> Result<Header> {
    Header::read(
        &mut StreamSource {
            inner: message,
            recorded: None,
            hashed: None,
        },
        DecryptLimits::default().max_encrypted_data_keys,
    )
}

/// Decrypts a whole message. `unwrap_dek` gets the header and returns the plaintext DEK
/// (from whichever data key entry it can unwrap).
pub fn decrypt(
    message: &[u8],
    unwrap_dek: impl FnOnce(&Header) -> Result<Zeroizing<Vec<u8>>>,
) -> Result<(Header, Zeroizing<Vec<u8>>)> {
    let mut out = Zeroizing::new(Vec::with_capacity(message.len()));
    let header = decrypt_stream(&mut &message[..], &mut *out, unwrap_dek)?;
    Ok((header, out))
}

/// Decrypts `input` onto `output`. Checks, in order: the key commitment, the header tag,
/// then each frame's tag before its plaintext is written; at the end, the signature of a
/// signed suite, that the final frame came and that nothing follows it.
///
/// Frames are read a batch at a time (their framing checked in order), opened in parallel,
/// and a batch is written only once every frame in it authenticated; while one batch is
/// opened the calling thread writes the previous one and reads the next. A message cut
/// short or altered later still fails after earlier batches were written: callers writing
/// to a file write to a temporary one and keep it only on success (as `wrapctl` does).
pub fn decrypt_stream(
    input: &mut (impl Read + Send + ?Sized),
    output: &mut (impl Write + Send + ?Sized),
    unwrap_dek: impl FnOnce(&Header) -> Result<Zeroizing<Vec<u8>>>,
) -> Result<Header> {
    decrypt_stream_with(input, output, DecryptLimits::default(), unwrap_dek)
}

/// [`decrypt_stream`] with other [`DecryptLimits`] than the defaults.
pub fn decrypt_stream_with(
    input: &mut (impl Read + Send + ?Sized),
    output: &mut (impl Write + Send + ?Sized),
    limits: DecryptLimits,
    unwrap_dek: impl FnOnce(&Header) -> Result<Zeroizing<Vec<u8>>>,
) -> Result<Header> {
    let mut r = StreamSource {
        inner: std::io::BufReader::with_capacity(64 * 1024, input),
        recorded: Some(Vec::new()),
        hashed: Some(Sha384::new()),
    };
    let header = Header::read(&mut r, limits.max_encrypted_data_keys)?;
    let header_bytes = r.recorded.take().unwrap_or_default();
    let signer = if header.suite == SUITE_COMMIT_KEY_ECDSA_P384 {
        Some(signature_key(&header)?)
    } else {
        r.hashed = None;
        None
    };
    let dek = unwrap_dek(&header)?;
    let (key, commitment) = derive(header.suite, &header.message_id, &dek)?;
    if !constant_time_eq(&commitment[..], &header.commitment) {
        return Err(bad("the key commitment does not match"));
    }
    let tag = r.array::<TAG_LEN>()?;
    key.open_in_place_separate_tag(
        Nonce::assume_unique_for_key([0; IV_LEN]),
        Aad::from(&header_bytes[..]),
        Tag::from(tag),
        &mut [],
        0..,
    )
    .map_err(|_| bad("the header does not authenticate"))?;

    let frame = header.frame_length as usize;
    let per_batch = frames_per_batch(frame);
    let mut frames = FrameReader {
        source: &mut r,
        frame,
        expected: 1,
    };
    pipeline(
        OpenBatch::new(frame, per_batch.min(first_batch_frames(frame))),
        || OpenBatch::new(frame, per_batch),
        |batch| frames.read(batch),
        |batch| batch.open(&key, &header.message_id),
        |batch| write_plaintext(output, batch),
    )?;
    if let Some(key) = signer {
        // The footer: the signature over everything before it (ECDSA P-384, SHA-384).
        let digest = r.hashed.take().map(|h| h.finalize()).unwrap_or_default();
        let signature = r.field()?;
        let signature = Signature::from_der(&signature).map_err(|_| bad("malformed signature"))?;
        key.verify_prehash(&digest, &signature)
            .map_err(|_| bad("the signature does not verify"))?;
    }
    if !r.at_end()? {
        return Err(bad("trailing bytes after the final frame"));
    }
    Ok(header)
}

pub(super) fn write_plaintext(output: &mut (impl Write + ?Sized), batch: &OpenBatch) -> Result<()> {
    output
        .write_all(batch.opened())
        .map_err(|e| Error::invalid(format!("cannot write the plaintext: {e}")))
}

/// One frame of an [`OpenBatch`]: where its ciphertext sits and what authenticates it.
pub(super) struct FrameInfo {
    seq: u32,
    last: bool,
    len: usize,
    tag: [u8; TAG_LEN],
}

/// One batch of frames on their way in: ciphertexts side by side at `frame` strides,
/// opened in place, so the plaintext of the batch ends up contiguous.
pub(super) struct OpenBatch {
    data: Scratch,
    frames: Vec<FrameInfo>,
    frame: usize,
}

impl OpenBatch {
    pub(super) fn new(frame: usize, per_batch: usize) -> Self {
        Self {
            data: Scratch::new(frame * per_batch),
            frames: Vec::with_capacity(per_batch),
            frame,
        }
    }

    /// Frames this batch holds.
    pub(super) fn capacity(&self) -> usize {
        self.data.len() / self.frame
    }

    pub(super) fn open(&mut self, key: &LessSafeKey, message_id: &[u8; 32]) -> Result<()> {
        let open_one = |(chunk, info): (&mut [u8], &FrameInfo)| {
            key.open_in_place_separate_tag(
                frame_nonce(info.seq),
                frame_aad(message_id, info.last, info.seq, info.len),
                Tag::from(info.tag),
                &mut chunk[..info.len],
                0..,
            )
            .map(|_| ())
            .map_err(|_| bad("a frame does not authenticate"))
        };
        let used = self.frames.len() * self.frame;
        let data = self.data.area(0..used);
        if used >= PARALLEL_FROM {
            data.par_chunks_mut(self.frame)
                .zip(self.frames.par_iter())
                .try_for_each(open_one)
        } else {
            data.chunks_mut(self.frame)
                .zip(self.frames.iter())
                .try_for_each(open_one)
        }
    }

    /// The plaintext of the batch (every frame is full but a final one).
    pub(super) fn opened(&self) -> &[u8] {
        let len = self.frames.iter().map(|f| f.len).sum::<usize>();
        &self.data[..len]
    }
}

/// Parses frames off the message in order, checking sequence numbers, IVs and lengths.
pub(super) struct FrameReader<'a, S> {
    source: &'a mut S,
    frame: usize,
    expected: u32,
}

impl<S: Source> FrameReader<'_, S> {
    /// Reads up to one batch of frames; true once the final frame was read.
    pub(super) fn read(&mut self, batch: &mut OpenBatch) -> Result<bool> {
        batch.frames.clear();
        while batch.frames.len() < batch.capacity() {
            let r = &mut *self.source;
            let first = r.u32()?;
            let (last, seq) = if first == FINAL_FRAME {
                (true, r.u32()?)
            } else {
                (false, first)
            };
            if seq != self.expected {
                return Err(bad("frames out of order"));
            }
            if r.array::<IV_LEN>()? != frame_iv(seq) {
                return Err(bad("unexpected frame IV"));
            }
            let len = if last {
                let len = r.u32()? as usize;
                if len > self.frame {
                    return Err(bad("final frame longer than the frame length"));
                }
                len
            } else {
                self.frame
            };
            let at = batch.frames.len() * self.frame;
            r.read_into(batch.data.area(at..at + len))?;
            let tag = r.array::<TAG_LEN>()?;
            batch.frames.push(FrameInfo {
                seq,
                last,
                len,
                tag,
            });
            if last {
                return Ok(true);
            }
            self.expected = self
                .expected
                .checked_add(1)
                .filter(|s| *s != FINAL_FRAME)
                .ok_or_else(|| bad("too many frames"))?;
        }
        Ok(false)
    }
}

/// The verification key of a signed message: its `aws-crypto-public-key` context entry,
/// a base64 compressed P-384 point.
pub(super) fn signature_key(header: &Header) -> Result<VerifyingKey> {
    use base64::Engine;
    let encoded = header
        .context
        .get(PUBLIC_KEY_CONTEXT_KEY)
        .ok_or_else(|| bad("a signed message without its public key"))?;
    let point = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| bad("malformed public key"))?;
    VerifyingKey::from_sec1_bytes(&point).map_err(|_| bad("malformed public key"))
}
