//! Unix sockets accept any gRPC client's `:authority`.
//!
//! gRPC C-core clients (Python, Ruby, C++, PHP, C#), grpc-java and grpc-swift send the
//! socket path (`/run/wrapd/wrapd.sock`, or percent-encoded) as the HTTP/2 `:authority` of
//! calls on a unix socket. h2 refuses that as a malformed authority and resets the stream
//! before tonic sees the request (hyperium/h2#487, hyperium/tonic#742). On a unix socket the
//! authority means nothing, so [`AuthorityRewriter`] sits between the socket and h2 and
//! replaces any `:authority` that is not a valid URI authority (a path, a percent-encoded
//! path, an empty string) with `localhost`.
//!
//! It works on the client-to-server byte stream: the connection preface and every frame but
//! HEADERS and CONTINUATION pass through untouched, streamed as they arrive. A header block
//! (HEADERS plus its CONTINUATIONs) is collected whole and decoded with an HPACK decoder that
//! mirrors the client's encoder.
//!
//! - The first header block of a connection decides. If its `:authority` is acceptable (a
//!   tonic, Go or Java client naming a host), the block goes on verbatim and the connection
//!   becomes transparent: from then on bytes are not even looked at, which costs nothing.
//!   A conforming client sends one authority per channel; a later bad one is refused by h2
//!   as it would be anyway.
//! - Otherwise every header block of the connection is transcoded: decoded, rewritten, and
//!   re-encoded with an HPACK encoder whose dynamic table h2's decoder mirrors, then sent as
//!   HEADERS (and CONTINUATION frames if it no longer fits one frame), with its END_STREAM
//!   and priority kept and its padding dropped. Both HPACK states stay consistent however
//!   the client indexes, evicts or resizes its table.
//!
//! Malformed input is an error: the connection is closed, as h2 would close it for a
//! compression error. TCP connections are not touched: there a malformed authority is still
//! refused by h2.

use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The authority put in place of one h2 would refuse.
pub const REPLACEMENT: &[u8] = b"localhost";

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames we send to h2 stay within its default SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME: usize = 16_384;
/// The largest header block collected (HEADERS + CONTINUATIONs), encoded. Each frame of it
/// is at most [`MAX_FRAME`], as h2 (which advertises no larger SETTINGS_MAX_FRAME_SIZE)
/// requires of every frame.
const MAX_BLOCK: usize = 128 * 1024;
/// The largest decoded header list (names + values + 32 per entry, as RFC 7541 counts): a
/// one-byte index can stand for a 4 KiB table entry, so the encoded size alone bounds
/// nothing. Twice h2's own limit (`MAX_HEADER_LIST`, 64 KiB), which then answers such
/// requests; it also bounds one re-encoded block.
const MAX_DECODED: usize = 128 * 1024;
/// What re-encoding may add over a connection: its re-encoded blocks stay within this many
/// times the client's encoded blocks, plus [`AMPLIFICATION_SLACK`]. One-byte references
/// to large table entries, with evictions that keep this encoder from indexing them, would
/// otherwise turn each byte the client sends into kilobytes for h2.
const MAX_AMPLIFICATION: u64 = 16;
const AMPLIFICATION_SLACK: u64 = 256 * 1024;
/// The dynamic table size h2 advertises (its default); a client may not use more.
const TABLE_SIZE: usize = 4096;

/// What went wrong with the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/2 from the unix socket peer: {0}")]
pub struct RewriteError(&'static str);

impl From<RewriteError> for io::Error {
    fn from(err: RewriteError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }
}

/// A header block being collected.
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received (headers and payloads), to pass on verbatim.
    raw: Vec<u8>,
}

/// What the rewriter does with the connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Until the first header block: parse, and decide on it.
    Deciding,
    /// Every header block is decoded, rewritten and re-encoded.
    Transcoding,
    /// Bytes pass through unlooked at.
    Transparent,
}

/// Where the parser is in the client's byte stream.
enum State {
    /// In the connection preface; this many bytes of it seen.
    Preface(usize),
    /// Collecting a frame header.
    Header,
    /// Passing through this many more payload bytes of a frame.
    PassThrough(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    HeaderPayload {
        kind: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
}

/// Rewrites the `:authority` of every request on one connection (see the module docs).
pub struct AuthorityRewriter {
    mode: Mode,
    state: State,
    /// Bytes of an incomplete frame header or header-frame payload.
    partial: Vec<u8>,
    block: Option<Block>,
    /// The frame header of the HEADERS or CONTINUATION frame being collected.
    raw_header: [u8; FRAME_HEADER],
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    /// Encoded bytes of the client's transcoded header blocks, and of what they became.
    transcoded_in: u64,
    transcoded_out: u64,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            mode: Mode::Deciding,
            state: State::Preface(0),
            partial: Vec::new(),
            block: None,
            raw_header: [0; FRAME_HEADER],
            decoder,
            encoder: Encoder::new(),
            transcoded_in: 0,
            transcoded_out: 0,
        }
    }
}

/// Whether h2 accepts `authority` as the `:authority` of a request.
fn acceptable(authority: &[u8]) -> bool {
    !authority.is_empty()
        && std::str::from_utf8(authority)
            .ok()
            .is_some_and(|a| tonic::codegen::http::uri::Authority::from_str(a).is_ok())
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len` is at most MAX_FRAME, which fits the 24-bit length.
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

impl AuthorityRewriter {
    /// Whether the connection's bytes now pass through unlooked at (see the module docs).
    pub fn is_transparent(&self) -> bool {
        self.mode == Mode::Transparent
    }

    /// Takes bytes from the client and appends what h2 should read to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !input.is_empty() {
            if self.mode == Mode::Transparent {
                out.extend_from_slice(input);
                return Ok(());
            }
            match self.state {
                State::Preface(seen) => {
                    let n = input.len().min(PREFACE.len() - seen);
                    if input[..n] != PREFACE[seen..seen + n] {
                        return Err(RewriteError("not an HTTP/2 connection preface"));
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if seen + n == PREFACE.len() {
                        State::Header
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::PassThrough(left) => {
                    let n = input.len().min(left);
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        State::Header
                    } else {
                        State::PassThrough(left - n)
                    };
                }
                State::Header => {
                    let n = input.len().min(FRAME_HEADER - self.partial.len());
                    self.partial.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.partial.len() == FRAME_HEADER {
                        let header = std::mem::take(&mut self.partial);
                        self.frame(&header, out)?;
                    }
                }
                State::HeaderPayload {
                    kind,
                    flags,
                    stream,
                    len,
                } => {
                    let n = input.len().min(len - self.partial.len());
                    self.partial.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.partial.len() == len {
                        let payload = std::mem::take(&mut self.partial);
                        self.state = State::Header;
                        self.header_frame(kind, flags, stream, &payload, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete frame header: pass the frame through, or start collecting its payload.
    fn frame(&mut self, header: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let kind = header[3];
        let flags = header[4];
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let in_block = self.block.is_some();
        match kind {
            HEADERS | CONTINUATION => {
                if (kind == HEADERS) == in_block {
                    return Err(RewriteError("a header block was interrupted"));
                }
                if len > MAX_FRAME {
                    return Err(RewriteError(
                        "header frame larger than SETTINGS_MAX_FRAME_SIZE (16 KiB)",
                    ));
                }
                self.raw_header = [0; FRAME_HEADER];
                self.raw_header.copy_from_slice(header);
                self.state = if len == 0 {
                    State::Header
                } else {
                    State::HeaderPayload {
                        kind,
                        flags,
                        stream,
                        len,
                    }
                };
                if len == 0 {
                    self.header_frame(kind, flags, stream, &[], out)?;
                }
            }
            _ if in_block => return Err(RewriteError("a header block was interrupted")),
            _ => {
                out.extend_from_slice(header);
                self.state = if len == 0 {
                    State::Header
                } else {
                    State::PassThrough(len)
                };
            }
        }
        Ok(())
    }

    /// A complete HEADERS or CONTINUATION frame.
    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let fragment = if kind == HEADERS {
            let mut rest = payload;
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&len, after) = rest
                    .split_first()
                    .ok_or(RewriteError("padded frame without a pad length"))?;
                pad = usize::from(len);
                rest = after;
            }
            let priority = if flags & PRIORITY != 0 {
                let fields: [u8; 5] = rest
                    .get(..5)
                    .and_then(|p| p.try_into().ok())
                    .ok_or(RewriteError("priority fields missing"))?;
                rest = &rest[5..];
                Some(fields)
            } else {
                None
            };
            if pad > rest.len() {
                return Err(RewriteError("padding longer than the frame"));
            }
            self.block = Some(Block {
                stream,
                flags,
                priority,
                fragment: Vec::new(),
                raw: Vec::new(),
            });
            &rest[..rest.len() - pad]
        } else {
            payload
        };
        let block = self
            .block
            .as_mut()
            .ok_or(RewriteError("CONTINUATION without HEADERS"))?;
        if block.stream != stream {
            return Err(RewriteError("CONTINUATION on another stream"));
        }
        if block.fragment.len() + fragment.len() > MAX_BLOCK {
            return Err(RewriteError("header block too large"));
        }
        block.fragment.extend_from_slice(fragment);
        if self.mode == Mode::Deciding {
            block.raw.extend_from_slice(&self.raw_header);
            block.raw.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().ok_or(RewriteError("no header block"))?;
            self.emit(block, out)?;
        }
        Ok(())
    }

    /// Decodes, rewrites and re-encodes a whole header block.
    fn emit(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded = decoded.saturating_add(name.len() + value.len() + 32);
                if decoded <= MAX_DECODED {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|_| RewriteError("the header block does not decode (HPACK)"))?;
        if decoded > MAX_DECODED {
            return Err(RewriteError("the header list is too large"));
        }
        let mut rewritten = false;
        for (name, value) in &mut headers {
            if name == b":authority" && !acceptable(value) {
                *value = REPLACEMENT.to_vec();
                rewritten = true;
            }
        }
        if self.mode == Mode::Deciding {
            if !rewritten {
                // h2's decoder has seen exactly what the client's encoder sent: from here on
                // the connection needs nothing from us.
                out.extend_from_slice(&block.raw);
                self.mode = Mode::Transparent;
                return Ok(());
            }
            self.mode = Mode::Transcoding;
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 16);
        self.encoder
            .encode_into(
                headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
                &mut encoded,
            )
            .map_err(|_| RewriteError("cannot encode the header block"))?;
        self.transcoded_in = self
            .transcoded_in
            .saturating_add(block.fragment.len() as u64);
        self.transcoded_out = self.transcoded_out.saturating_add(encoded.len() as u64);
        let allowed = self
            .transcoded_in
            .saturating_mul(MAX_AMPLIFICATION)
            .saturating_add(AMPLIFICATION_SLACK);
        if self.transcoded_out > allowed {
            return Err(RewriteError(
                "re-encoding would amplify the header blocks too much",
            ));
        }

        let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
        let first_room = MAX_FRAME - priority.len();
        let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
        let mut flags = block.flags & (END_STREAM | PRIORITY);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        frame_header(
            out,
            priority.len() + first.len(),
            HEADERS,
            flags,
            block.stream,
        );
        out.extend_from_slice(priority);
        out.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = after;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            frame_header(out, chunk.len(), CONTINUATION, flags, block.stream);
            out.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// A unix socket connection whose incoming header blocks go through an
/// [`AuthorityRewriter`]; writes pass straight through.
pub struct Rewritten<S> {
    inner: S,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet read by h2, from `start`.
    ready: Vec<u8>,
    start: usize,
    scratch: Box<[u8]>,
    failed: bool,
}

impl<S> Rewritten<S> {
    /// Wraps a connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: AuthorityRewriter::default(),
            ready: Vec::new(),
            start: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            failed: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewritten<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.start < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.start);
                buf.put_slice(&this.ready[this.start..this.start + n]);
                this.start += n;
                if this.start == this.ready.len() {
                    this.ready.clear();
                    this.start = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(io::ErrorKind::InvalidData.into()));
            }
            if this.rewriter.is_transparent() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut scratch = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut scratch) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if scratch.filled().is_empty() => {
                    return Poll::Ready(Ok(())); // end of stream
                }
                Poll::Ready(Ok(())) => {
                    let filled = scratch.filled().len();
                    if let Err(err) = this.rewriter.feed(&this.scratch[..filled], &mut this.ready) {
                        tracing::debug!(error = %err, "closing a unix socket connection");
                        this.failed = true;
                        // Bytes rewritten before the error still go to h2 first.
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewritten<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Frames a header block the way a client might: HEADERS with optional padding and
    /// priority, split into CONTINUATIONs at `splits`.
    fn client_frames(
        block: &[u8],
        stream: u32,
        end_stream: bool,
        pad: u8,
        priority: bool,
        splits: &[usize],
    ) -> Vec<u8> {
        let mut cuts: Vec<usize> = splits.iter().map(|s| s % (block.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut at = 0;
        for cut in cuts {
            pieces.push(&block[at..cut.max(at)]);
            at = cut.max(at);
        }
        pieces.push(&block[at..]);
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let mut flags = if last { END_HEADERS } else { 0 };
            let mut payload = Vec::new();
            let kind = if i == 0 {
                if end_stream {
                    flags |= END_STREAM;
                }
                if pad > 0 {
                    flags |= PADDED;
                    payload.push(pad);
                }
                if priority {
                    flags |= PRIORITY;
                    payload.extend_from_slice(&[0, 0, 0, 0, 15]);
                }
                HEADERS
            } else {
                CONTINUATION
            };
            payload.extend_from_slice(piece);
            if i == 0 {
                payload.extend(std::iter::repeat_n(0, usize::from(pad)));
            }
            frame_header(&mut out, payload.len(), kind, flags, stream);
            out.extend_from_slice(&payload);
        }
        out
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// Parses what the rewriter sent to h2 into (stream, flags, headers) per block, decoding
    /// with one decoder as h2 does.
    fn server_view(bytes: &[u8]) -> Vec<(u32, u8, Headers)> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut current: Option<(u32, u8, Vec<u8>)> = None;
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            assert!(len <= MAX_FRAME);
            let mut payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            rest = &rest[FRAME_HEADER + len..];
            match kind {
                HEADERS => {
                    assert!(current.is_none());
                    if flags & PADDED != 0 {
                        let pad = usize::from(payload[0]);
                        payload = &payload[1..payload.len() - pad];
                    }
                    if flags & PRIORITY != 0 {
                        payload = &payload[5..];
                    }
                    current = Some((stream, flags, payload.to_vec()));
                }
                CONTINUATION => current.as_mut().unwrap().2.extend_from_slice(payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                let (stream, first_flags, block) = current.take().unwrap();
                let headers = decoder.decode(&block).unwrap().into_iter().collect();
                blocks.push((stream, first_flags & (END_STREAM | PRIORITY), headers));
            }
        }
        blocks
    }

    fn request(authority: &str, extra: &str) -> Headers {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/wrapd.v1.DataKeyService/Unwrap"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("x-request-id", extra),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_a_valid_one_stays() {
        for (given, expected) in [
            ("/run/wrapd/wrapd.sock", "localhost"),
            ("%2Frun%2Fwrapd%2Fwrapd.sock", "localhost"),
            ("", "localhost"),
            ("unix:/run/x.sock", "localhost"),
            ("wrapd.invalid", "wrapd.invalid"),
            ("localhost:50051", "localhost:50051"),
        ] {
            let mut encoder = Encoder::new();
            let block = encoder.encode(request(given, "r").iter().map(|(n, v)| (&n[..], &v[..])));
            let mut input = PREFACE.to_vec();
            input.extend(client_frames(&block, 1, false, 0, false, &[]));
            let mut out = Vec::new();
            AuthorityRewriter::default().feed(&input, &mut out).unwrap();
            let blocks = server_view(&out);
            assert_eq!(blocks[0].2, request(expected, "r"), "{given:?}");
        }
    }

    #[test]
    fn a_header_list_that_decodes_too_large_is_refused() {
        // A transcoded connection (a path as authority), one 4000-byte header in the table,
        // then a block of one-byte references to it.
        let mut encoder = Encoder::new();
        let big = vec![b'v'; 4000];
        let first = encoder.encode([
            (&b":authority"[..], &b"/run/x.sock"[..]),
            (&b"x-big"[..], &big[..]),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(client_frames(&first, 1, true, 0, false, &[]));
        let index = 62u8 | 0x80; // the newest dynamic entry
        input.extend(client_frames(&vec![index; 300], 3, true, 0, false, &[]));
        let mut out = Vec::new();
        let err = AuthorityRewriter::default()
            .feed(&input, &mut out)
            .unwrap_err();
        assert_eq!(err, RewriteError("the header list is too large"));
    }

    #[test]
    fn a_header_frame_larger_than_h2_takes_is_refused() {
        let mut input = PREFACE.to_vec();
        let len = MAX_FRAME + 1;
        frame_header(&mut input, len, HEADERS, END_HEADERS, 1);
        input.extend(std::iter::repeat_n(0u8, len));
        let mut out = Vec::new();
        let err = AuthorityRewriter::default()
            .feed(&input, &mut out)
            .unwrap_err();
        assert_eq!(
            err,
            RewriteError("header frame larger than SETTINGS_MAX_FRAME_SIZE (16 KiB)")
        );
    }

    #[test]
    fn re_encoding_cannot_amplify_a_connection_without_bound() {
        // A transcoded connection with one large entry in the client's table; then blocks
        // of a one-byte reference to it and a small header "without indexing". This encoder
        // indexes the small header, which evicts the large one from its own table, so each
        // block would cost h2 the whole large value again: what reaches h2 stays within a
        // fixed multiple of what the client sent.
        let mut encoder = Encoder::new();
        let big = vec![b'v'; 4000];
        let first = encoder.encode([
            (&b":authority"[..], &b"/run/x.sock"[..]),
            (&b"x-big"[..], &big[..]),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(client_frames(&first, 1, true, 0, false, &[]));
        let index = 62u8 | 0x80; // the newest dynamic entry
        let mut sent = first.len() as u64;
        let mut block = vec![index, 0x00, 1, b'y', 90];
        block.extend([b'z'; 90]);
        for stream in 0..200u32 {
            input.extend(client_frames(&block, 3 + 2 * stream, true, 0, false, &[]));
            sent += block.len() as u64;
        }
        let mut out = Vec::new();
        let result = AuthorityRewriter::default().feed(&input, &mut out);
        assert!(
            (out.len() as u64) <= sent * MAX_AMPLIFICATION + AMPLIFICATION_SLACK + 64 * 1024,
            "{} bytes for h2 from {sent}",
            out.len()
        );
        assert_eq!(
            result.unwrap_err(),
            RewriteError("re-encoding would amplify the header blocks too much")
        );
    }

    #[test]
    fn a_connection_whose_first_authority_is_fine_becomes_transparent() {
        let mut encoder = Encoder::new();
        let block = encoder.encode(
            request("wrapd.invalid", "r")
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let mut input = PREFACE.to_vec();
        // Padded and with priority: passed on verbatim all the same.
        input.extend(client_frames(&block, 1, true, 3, true, &[5]));
        let mut rewriter = AuthorityRewriter::default();
        let mut out = Vec::new();
        rewriter.feed(&input, &mut out).unwrap();
        assert_eq!(out, input, "verbatim");
        assert!(rewriter.is_transparent());
        rewriter.feed(b"anything at all", &mut out).unwrap();
        assert!(out.ends_with(b"anything at all"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        assert!(
            AuthorityRewriter::default()
                .feed(b"GET / HTTP/1.1\r\n", &mut out)
                .is_err()
        );
        let mut input = PREFACE.to_vec();
        input.extend([0, 0, 3, HEADERS, END_HEADERS, 0, 0, 0, 1, 0xff, 0xff, 0xff]);
        assert!(AuthorityRewriter::default().feed(&input, &mut out).is_err());
    }

    proptest! {
        /// Rewritten header blocks decode (as h2 decodes them) to the client's headers,
        /// except `:authority`, over many blocks on one connection (so the client's dynamic
        /// table fills and evicts), whatever the framing and however the bytes arrive;
        /// other frames pass through unchanged. (A connection whose first authority is fine
        /// passes through verbatim.)
        #[test]
        fn rewritten_blocks_decode_to_the_same_headers_but_the_authority(
            requests in proptest::collection::vec(
                ("[a-z0-9/%._:-]{0,120}", "[a-z0-9]{1,40}", any::<bool>(), 0u8..8, any::<bool>(),
                 proptest::collection::vec(0usize..400, 0..4)),
                1..40),
            table_size in prop_oneof![Just(4096usize), 0usize..4096],
            chunk in 1usize..700,
        ) {
            let mut encoder = Encoder::new();
            encoder.set_max_table_size(table_size);
            let mut input = PREFACE.to_vec();
            let data_frame = [0u8, 0, 5, 0, 0, 0, 0, 0, 1, b'h', b'e', b'l', b'l', b'o'];
            let mut expected = Vec::new();
            // The first block decides: a good authority makes the connection transparent.
            let transcoding = !acceptable(requests[0].0.as_bytes());
            for (i, (authority, id, end_stream, pad, priority, splits)) in requests.iter().enumerate() {
                let headers = request(authority, id);
                let mut block = Vec::new();
                if i == 0 && table_size != 4096 {
                    // A dynamic table size update opens the first block.
                    loona_hpack::encoder::encode_integer_into(table_size, 5, 0x20, &mut block).unwrap();
                }
                block.extend(encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..]))));
                let stream = 2 * i as u32 + 1;
                input.extend(client_frames(&block, stream, *end_stream, *pad, *priority, splits));
                input.extend_from_slice(&data_frame);
                let authority = if transcoding && !acceptable(authority.as_bytes()) { "localhost" } else { authority.as_str() };
                expected.push((stream, (if *end_stream { END_STREAM } else { 0 }) | (if *priority { PRIORITY } else { 0 }), request(authority, id)));
            }
            let mut rewriter = AuthorityRewriter::default();
            let mut out = Vec::new();
            for piece in input.chunks(chunk) {
                rewriter.feed(piece, &mut out).unwrap();
            }
            prop_assert_eq!(server_view(&out), expected);
            let hellos = out.windows(data_frame.len()).filter(|w| *w == data_frame).count();
            prop_assert_eq!(hellos, requests.len());
        }

        /// Whatever the bytes, the rewriter returns (an error at worst), never panics.
        #[test]
        fn any_bytes_are_handled(bytes in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..64) {
            let mut input = PREFACE.to_vec();
            input.extend(bytes);
            let mut rewriter = AuthorityRewriter::default();
            let mut out = Vec::new();
            for piece in input.chunks(chunk) {
                if rewriter.feed(piece, &mut out).is_err() {
                    break;
                }
            }
        }
    }
}
