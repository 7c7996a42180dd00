//! The AWS Encryption SDK message format, version 2, with the committing algorithm suite
//! 0x0478 (`AES_256_GCM_HKDF_SHA512_COMMIT_KEY`): the container the thin client writes and
//! reads around data encrypted locally with a DEK from wrapd.
//!
//! ```text
//! header:  0x02 | suite u16 | message id [32] | context len u16 | context
//!          | EDK count u16 | (provider id, provider info, ciphertext: u16 len + bytes)*
//!          | content type 0x02 (framed) | frame length u32 | commitment key [32]
//!          | header auth tag [16]        (AES-GCM, IV 0, AAD = the header before it)
//! frames:  seq u32 | IV [12] | ciphertext [frame length] | tag [16]
//! final:   0xFFFFFFFF | seq u32 | IV [12] | length u32 | ciphertext | tag [16]
//! ```
//! Keys: `derived = HKDF-SHA512(salt = message id, ikm = DEK, info = suite || "DERIVEKEY")`,
//! `commitment = HKDF-SHA512(salt = message id, ikm = DEK, info = "COMMITKEY")`, both 32 bytes;
//! decryption checks the commitment (constant time) before anything else. Frame IVs are the
//! sequence number, big-endian, left-padded with zeros; frame AAD is
//! `message id || "AWSKMSEncryptionClient Frame" (or "... Final Frame") || seq u32 || len u64`.
//!
//! [`encrypt_stream`] and [`decrypt_stream`] hold one batch of frames in memory at a time
//! (at most 8 MiB of plaintext) and seal or open the frames of a batch in parallel on all
//! cores; the whole-message [`encrypt`] and [`decrypt`] wrap them. Parallel frames, keyrings and
//! `wrapctl encrypt/decrypt` build on this. Messages of the signed suite 0x0578 (the
//! official SDKs' default) are read too: the footer's ECDSA P-384 signature over header and
//! body is checked with the key in the `aws-crypto-public-key` context entry.

use std::io::{Read, Write};

use p384::ecdsa::signature::hazmat::PrehashVerifier;
use p384::ecdsa::{Signature, VerifyingKey};
use rayon::prelude::*;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::hkdf::{HKDF_SHA512, KeyType, Salt};
use sha2::{Digest, Sha384};
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::error::{Error, Result};

/// `AES_256_GCM_HKDF_SHA512_COMMIT_KEY`: what the client writes.
pub const SUITE_COMMIT_KEY: u16 = 0x0478;
/// `AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384`: read (the official SDKs' default).
pub const SUITE_COMMIT_KEY_ECDSA_P384: u16 = 0x0578;
/// The default frame length.
pub const DEFAULT_FRAME_LENGTH: u32 = 4096;
/// Largest frame length read: one frame is held in memory, so a hostile header must not be
/// able to ask for gigabytes.
pub const MAX_READ_FRAME_LENGTH: u32 = 64 * 1024 * 1024;
/// The context key under which signed messages carry their verification key.
pub const PUBLIC_KEY_CONTEXT_KEY: &str = "aws-crypto-public-key";
/// The provider id wrapd's encrypted data keys carry.
pub const PROVIDER_ID: &str = "wrapd";

const VERSION: u8 = 0x02;
const CONTENT_FRAMED: u8 = 0x02;
const FINAL_FRAME: u32 = 0xFFFF_FFFF;
const TAG_LEN: usize = 16;
const IV_LEN: usize = 12;
const FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Frame";
const FINAL_FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Final Frame";

/// One encrypted data key entry of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedDataKey {
    /// Who can decrypt it (`wrapd`).
    pub provider_id: String,
    /// Which key (wrapd: the canonical key id).
    pub provider_info: Vec<u8>,
    /// The wrapped DEK (wrapd: the ciphertext blob).
    pub ciphertext: Vec<u8>,
}

/// A parsed message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The algorithm suite id.
    pub suite: u16,
    /// Random per message.
    pub message_id: [u8; 32],
    /// The encryption context, authenticated by the header tag.
    pub context: EncryptionContext,
    /// One entry per wrapping key.
    pub data_keys: Vec<EncryptedDataKey>,
    /// Plaintext bytes per frame.
    pub frame_length: u32,
    /// The key commitment.
    pub commitment: [u8; 32],
}

fn bad(what: &str) -> Error {
    Error::invalid(format!("not a valid encrypted message: {what}"))
}

struct Len32;

impl KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn hkdf(message_id: &[u8; 32], dek: &[u8], info: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    Salt::new(HKDF_SHA512, message_id)
        .extract(dek)
        .expand(&[info], Len32)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| Error::Internal("HKDF failed".into()))?;
    Ok(out)
}

/// The derived data key and the commitment key of a message.
fn derive(
    suite: u16,
    message_id: &[u8; 32],
    dek: &[u8],
) -> Result<(LessSafeKey, Zeroizing<[u8; 32]>)> {
    if dek.len() != 32 {
        return Err(Error::invalid("the data key must be 32 bytes"));
    }
    let mut info = suite.to_be_bytes().to_vec();
    info.extend_from_slice(b"DERIVEKEY");
    let derived = hkdf(message_id, dek, &info)?;
    let commitment = hkdf(message_id, dek, b"COMMITKEY")?;
    let key = UnboundKey::new(&AES_256_GCM, &derived[..])
        .map_err(|_| Error::Internal("AES-GCM key".into()))?;
    Ok((LessSafeKey::new(key), commitment))
}

fn push_field(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    let len =
        u16::try_from(bytes.len()).map_err(|_| Error::invalid("a header field is over 64 KiB"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

impl Header {
    /// The header bytes before the auth tag.
    fn body(&self) -> Result<Vec<u8>> {
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

/// Where message bytes come from: a slice or a stream. Every read is exact; running out of
/// input is an error ("truncated"), never a panic.
trait Source {
    fn take(&mut self, n: usize) -> Result<Vec<u8>>;
    /// True when no byte is left.
    fn at_end(&mut self) -> Result<bool>;

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.take(N)?.try_into().map_err(|_| bad("truncated"))
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
struct StreamSource<R> {
    inner: R,
    recorded: Option<Vec<u8>>,
    hashed: Option<Sha384>,
}

impl<R: Read> Source for StreamSource<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let read = (&mut self.inner)
            .take(n as u64)
            .read_to_end(&mut buf)
            .map_err(|e| Error::invalid(format!("cannot read the message: {e}")))?;
        if read != n {
            return Err(bad("truncated"));
        }
        if let Some(recorded) = &mut self.recorded {
            recorded.extend_from_slice(&buf);
        }
        if let Some(hashed) = &mut self.hashed {
            hashed.update(&buf);
        }
        Ok(buf)
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
    /// Reads a header (up to, not including, its auth tag).
    fn read(r: &mut impl Source) -> Result<Self> {
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

fn frame_nonce(seq: u32) -> Nonce {
    let mut iv = [0u8; IV_LEN];
    iv[8..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(iv)
}

fn frame_aad(message_id: &[u8; 32], last: bool, seq: u32, len: usize) -> Vec<u8> {
    let label = if last { FINAL_FRAME_AAD } else { FRAME_AAD };
    let mut aad = Vec::with_capacity(32 + label.len() + 12);
    aad.extend_from_slice(message_id);
    aad.extend_from_slice(label);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad.extend_from_slice(&(len as u64).to_be_bytes());
    aad
}

/// Encrypts `plaintext` into a whole message under suite 0x0478.
pub fn encrypt(
    plaintext: &[u8],
    dek: &[u8],
    context: &EncryptionContext,
    data_keys: Vec<EncryptedDataKey>,
    frame_length: u32,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encrypt_stream(
        &mut &plaintext[..],
        &mut out,
        dek,
        context,
        data_keys,
        frame_length,
    )?;
    Ok(out)
}

/// Encrypts `input` onto `output` under suite 0x0478, holding one frame in memory: full
/// frames while the input fills them, then a final frame with the rest (possibly empty).
/// Returns the number of plaintext bytes.
pub fn encrypt_stream(
    input: &mut (impl Read + ?Sized),
    output: &mut (impl Write + ?Sized),
    dek: &[u8],
    context: &EncryptionContext,
    data_keys: Vec<EncryptedDataKey>,
    frame_length: u32,
) -> Result<u64> {
    // As the official SDKs require: a positive multiple of the AES block size.
    if frame_length == 0 || frame_length % 16 != 0 {
        return Err(Error::invalid(
            "the frame length must be a positive multiple of 16",
        ));
    }
    let write_error = |e: std::io::Error| Error::invalid(format!("cannot write the message: {e}"));
    let mut message_id = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut message_id);
    let (key, commitment) = derive(SUITE_COMMIT_KEY, &message_id, dek)?;
    let header = Header {
        suite: SUITE_COMMIT_KEY,
        message_id,
        context: context.clone(),
        data_keys,
        frame_length,
        commitment: *commitment,
    };
    let mut head = header.body()?;
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; IV_LEN]),
            Aad::from(&head[..]),
            &mut [],
        )
        .map_err(|_| Error::Internal("AES-GCM".into()))?;
    head.extend_from_slice(tag.as_ref());
    output.write_all(&head).map_err(write_error)?;

    // Frames are read a batch at a time and sealed in parallel on all cores, then written
    // in order: memory stays bounded by the batch, whatever the input size.
    let batch = batch_frames(frame_length);
    let mut total = 0u64;
    let mut seq = 0u32;
    loop {
        let mut frames = Vec::with_capacity(batch);
        let mut last = false;
        while frames.len() < batch && !last {
            let mut buf = Zeroizing::new(vec![0u8; frame_length as usize]);
            let n = fill(input, &mut buf)?;
            buf.truncate(n);
            total += n as u64;
            seq = seq
                .checked_add(1)
                .filter(|s| *s != FINAL_FRAME)
                .ok_or_else(|| Error::invalid("too many frames"))?;
            last = n < frame_length as usize;
            frames.push((seq, last, buf));
        }
        let sealed: Vec<Result<Vec<u8>>> = frames
            .par_iter()
            .map(|(seq, last, plaintext)| seal_frame(&key, &message_id, *seq, *last, plaintext))
            .collect();
        for frame in sealed {
            output.write_all(&frame?).map_err(write_error)?;
        }
        if last {
            return Ok(total);
        }
    }
}

/// Frames per parallel batch: enough to keep every core busy, at most 8 MiB of plaintext.
fn batch_frames(frame_length: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_memory = (8 * 1024 * 1024 / frame_length.max(1) as usize).max(1);
    (cores * 8).clamp(1, 256).min(by_memory)
}

/// One serialized, sealed frame.
fn seal_frame(
    key: &LessSafeKey,
    message_id: &[u8; 32],
    seq: u32,
    last: bool,
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let n = plaintext.len();
    let mut frame = Vec::with_capacity(n + 40);
    if last {
        frame.extend_from_slice(&FINAL_FRAME.to_be_bytes());
    }
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.extend_from_slice(frame_nonce(seq).as_ref());
    if last {
        frame.extend_from_slice(&(n as u32).to_be_bytes());
    }
    let start = frame.len();
    frame.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            frame_nonce(seq),
            Aad::from(frame_aad(message_id, last, seq, n)),
            &mut frame[start..],
        )
        .map_err(|_| Error::Internal("AES-GCM".into()))?;
    frame.extend_from_slice(tag.as_ref());
    Ok(frame)
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn fill(input: &mut (impl Read + ?Sized), buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::invalid(format!("cannot read the input: {e}"))),
        }
    }
    Ok(filled)
}

/// Decrypts a whole message. `unwrap_dek` gets the header and returns the plaintext DEK
/// (from whichever data key entry it can unwrap).
pub fn decrypt(
    message: &[u8],
    unwrap_dek: impl FnOnce(&Header) -> Result<Zeroizing<Vec<u8>>>,
) -> Result<(Header, Zeroizing<Vec<u8>>)> {
    let mut out = Zeroizing::new(Vec::new());
    let header = decrypt_stream(&mut &message[..], &mut *out, unwrap_dek)?;
    Ok((header, out))
}

/// Decrypts `input` onto `output`, one frame in memory at a time. Checks, in order: the key
/// commitment, the header tag, then each frame's tag before its plaintext is written; at the
/// end, that the final frame came and nothing follows it. A frame is written only once it
/// authenticates, but a message cut short or altered later fails after earlier frames were
/// written: callers writing to a file write to a temporary one and keep it only on success.
pub fn decrypt_stream(
    input: &mut (impl Read + ?Sized),
    output: &mut (impl Write + ?Sized),
    unwrap_dek: impl FnOnce(&Header) -> Result<Zeroizing<Vec<u8>>>,
) -> Result<Header> {
    let mut r = StreamSource {
        inner: input,
        recorded: Some(Vec::new()),
        hashed: Some(Sha384::new()),
    };
    let header = Header::read(&mut r)?;
    let header_bytes = r.recorded.take().unwrap_or_default();
    let signer = if header.suite == SUITE_COMMIT_KEY_ECDSA_P384 {
        Some(signature_key(&header)?)
    } else {
        r.hashed = None;
        None
    };
    let dek = unwrap_dek(&header)?;
    let (key, commitment) = derive(header.suite, &header.message_id, &dek)?;
    if !ring_eq(&commitment[..], &header.commitment) {
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

    // Frames are read a batch at a time (their framing checked in order), opened in
    // parallel, and written in order once the whole batch authenticated.
    let batch = batch_frames(header.frame_length);
    let mut expected = 1u32;
    let mut done = false;
    while !done {
        let mut frames = Vec::with_capacity(batch);
        while frames.len() < batch && !done {
            let first = r.u32()?;
            let (last, seq) = if first == FINAL_FRAME {
                (true, r.u32()?)
            } else {
                (false, first)
            };
            if seq != expected {
                return Err(bad("frames out of order"));
            }
            let iv = r.array::<IV_LEN>()?;
            if iv != *frame_nonce(seq).as_ref() {
                return Err(bad("unexpected frame IV"));
            }
            let len = if last {
                let len = r.u32()?;
                if len > header.frame_length {
                    return Err(bad("final frame longer than the frame length"));
                }
                len as usize
            } else {
                header.frame_length as usize
            };
            let ciphertext = r.take(len)?;
            let tag = r.array::<TAG_LEN>()?;
            frames.push((seq, last, ciphertext, tag));
            done = last;
            if !done {
                expected = expected
                    .checked_add(1)
                    .ok_or_else(|| bad("too many frames"))?;
            }
        }
        let opened: Vec<Result<Zeroizing<Vec<u8>>>> = frames
            .into_par_iter()
            .map(|(seq, last, ciphertext, tag)| {
                let mut buf = Zeroizing::new(ciphertext);
                let len = buf.len();
                key.open_in_place_separate_tag(
                    frame_nonce(seq),
                    Aad::from(frame_aad(&header.message_id, last, seq, len)),
                    Tag::from(tag),
                    &mut buf,
                    0..,
                )
                .map_err(|_| bad("a frame does not authenticate"))?;
                Ok(buf)
            })
            .collect();
        let opened = opened.into_iter().collect::<Result<Vec<_>>>()?;
        for plaintext in opened {
            output
                .write_all(&plaintext)
                .map_err(|e| Error::invalid(format!("cannot write the plaintext: {e}")))?;
        }
    }
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

/// The verification key of a signed message: its `aws-crypto-public-key` context entry,
/// a base64 compressed P-384 point.
fn signature_key(header: &Header) -> Result<VerifyingKey> {
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

fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edk() -> EncryptedDataKey {
        EncryptedDataKey {
            provider_id: PROVIDER_ID.into(),
            provider_info: b"key/00112233445566778899aabbccddeeff".to_vec(),
            ciphertext: vec![7; 106],
        }
    }

    fn ctx() -> EncryptionContext {
        EncryptionContext::from_entries([("tenant".to_owned(), "acme".to_owned())]).unwrap()
    }

    #[test]
    fn round_trips_at_frame_boundaries() {
        let dek = [9u8; 32];
        for len in [0usize, 1, 15, 16, 17, 32, 100] {
            let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let message = encrypt(&plaintext, &dek, &ctx(), vec![edk()], 16).unwrap();
            assert!(encrypt(&plaintext, &dek, &ctx(), vec![edk()], 15).is_err());
            let (header, out) = decrypt(&message, |h| {
                assert_eq!(h.data_keys, vec![edk()]);
                Ok(Zeroizing::new(dek.to_vec()))
            })
            .unwrap();
            assert_eq!(&*out, &plaintext, "len {len}");
            assert_eq!(header.context, ctx());
            assert_eq!(header.frame_length, 16);
        }
    }

    #[test]
    fn many_batches_keep_frame_order() {
        let dek = [5u8; 32];
        let plaintext: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let message = encrypt(&plaintext, &dek, &ctx(), vec![edk()], 16).unwrap();
        let (_, out) = decrypt(&message, |_| Ok(Zeroizing::new(dek.to_vec()))).unwrap();
        assert_eq!(&*out, &plaintext);
        // Swapping two frames in the middle of the body is caught.
        let frame = 4 + 12 + 16 + 16;
        // 50 000 is a multiple of 16: the final frame is empty.
        let final_frame = 4 + 4 + 12 + 4 + 16;
        let body = message.len() - frame * (50_000 / 16) - final_frame;
        let mut swapped = message.clone();
        let (a, b) = (body + 100 * frame, body + 101 * frame);
        let first = swapped[a..a + frame].to_vec();
        swapped.copy_within(b..b + frame, a);
        swapped[b..b + frame].copy_from_slice(&first);
        assert!(decrypt(&swapped, |_| Ok(Zeroizing::new(dek.to_vec()))).is_err());
    }

    #[test]
    fn every_bit_flip_and_truncation_fails() {
        let dek = [3u8; 32];
        let message = encrypt(&[0x61; 40], &dek, &ctx(), vec![edk()], 16).unwrap();
        let open = |m: &[u8]| decrypt(m, |_| Ok(Zeroizing::new(dek.to_vec())));
        for i in 0..message.len() {
            let mut bad = message.clone();
            bad[i] ^= 0x01;
            // Flipping a byte inside the EDK ciphertext changes the header: the tag catches it.
            assert!(open(&bad).is_err(), "flip at {i}");
        }
        for len in 0..message.len() {
            assert!(open(&message[..len]).is_err(), "truncated to {len}");
        }
        let mut longer = message.clone();
        longer.push(0);
        assert!(open(&longer).is_err());
    }

    #[test]
    fn a_wrong_key_fails_on_the_commitment() {
        let message = encrypt(b"x", &[1u8; 32], &ctx(), vec![edk()], 16).unwrap();
        let err = decrypt(&message, |_| Ok(Zeroizing::new(vec![2u8; 32]))).unwrap_err();
        assert!(err.to_string().contains("commitment"), "{err}");
    }
}
