//! Sealing: a message's frames are encrypted a batch at a time, the frames of a batch in
//! parallel, with the output written in order (at most one batch of plaintext held).

use super::*;

/// Encrypts `plaintext` into a whole message under suite 0x0478.
pub fn encrypt(
    plaintext: &[u8],
    dek: &[u8],
    context: &EncryptionContext,
    data_keys: Vec<EncryptedDataKey>,
    frame_length: u32,
) -> Result<Vec<u8>> {
    let frames = plaintext.len() / (frame_length.max(1) as usize) + 1;
    let mut out = Vec::with_capacity(plaintext.len() + frames * 32 + 64 * 1024);
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

/// Encrypts `input` onto `output` under suite 0x0478: full frames while the input fills
/// them, then a final frame with the rest (possibly empty). Returns the number of plaintext
/// bytes.
///
/// Memory stays bounded whatever the input size: the input is read a batch of frames at a
/// time (about 1 MiB), the frames of a batch are sealed in parallel on the current rayon
/// pool, and while one batch is sealed the calling thread writes the previous one and reads
/// the next. On a one-thread pool everything runs in turn on that thread.
pub fn encrypt_stream(
    input: &mut (impl Read + Send + ?Sized),
    output: &mut (impl Write + Send + ?Sized),
    dek: &[u8],
    context: &EncryptionContext,
    data_keys: Vec<EncryptedDataKey>,
    frame_length: u32,
) -> Result<u64> {
    let mut message_id = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut message_id);
    encrypt_stream_with_id(
        input,
        output,
        dek,
        context,
        data_keys,
        frame_length,
        message_id,
    )
}

/// [`encrypt_stream`] with a chosen message id. Private: a message id repeated under one
/// data key would repeat the derived key and every frame IV; only the known-answer test
/// below chooses one.
pub(super) fn encrypt_stream_with_id(
    input: &mut (impl Read + Send + ?Sized),
    output: &mut (impl Write + Send + ?Sized),
    dek: &[u8],
    context: &EncryptionContext,
    data_keys: Vec<EncryptedDataKey>,
    frame_length: u32,
    message_id: [u8; 32],
) -> Result<u64> {
    // As the official SDKs require: a positive multiple of the AES block size.
    if frame_length == 0 || frame_length % 16 != 0 {
        return Err(Error::invalid(
            "the frame length must be a positive multiple of 16",
        ));
    }
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

    let layout = SealLayout::new(frame_length as usize);
    let mut reader = BatchReader {
        input,
        next_seq: 1,
        total: 0,
    };
    let small = layout.per_batch.min(first_batch_frames(layout.frame));
    pipeline(
        SealBatch::new(&layout, small),
        || SealBatch::new(&layout, layout.per_batch),
        |batch| reader.read(batch, &layout),
        |batch| batch.seal(&key, &message_id, &layout),
        |batch| output.write_all(batch.sealed()).map_err(write_error),
    )?;
    Ok(reader.total)
}

/// The batch pipeline of encryption and decryption: `read` fills a batch (true once the input
/// ended), `work` seals or opens it (in parallel on the rayon pool), `write` puts it out.
///
/// With more than one rayon thread the three overlap: a writer thread of its own writes the
/// worked batches in order, while the calling thread reads the next batch and the pool works
/// on the current one (`rayon::join`). Reading and writing are mostly the kernel copying
/// between the page cache and the batch buffers; with both on one thread in turn, as before,
/// a file went at about 70 % of a plain copy's rate with two threads. At most
/// [`PIPELINE_BATCHES`] batches exist at once. On a one-thread pool everything runs in turn
/// on the calling thread, with one batch.
///
/// `first` is small, so that small messages do not pay for big buffers; `big` makes the
/// others, and replaces `first` once it has been written. Only worked batches are written:
/// nothing unauthenticated gets out. After an error no further batch is read or worked.
pub(super) fn pipeline<B: Send>(
    mut first: B,
    big: impl Fn() -> B + Sync,
    mut read: impl FnMut(&mut B) -> Result<bool> + Send,
    work: impl Fn(&mut B) -> Result<()> + Sync,
    mut write: impl FnMut(&B) -> Result<()> + Send,
) -> Result<()> {
    let mut done = read(&mut first)?;
    if done {
        // One batch: nothing to overlap.
        work(&mut first)?;
        return write(&first);
    }
    if rayon::current_num_threads() == 1 {
        let mut batch = first;
        work(&mut batch)?;
        write(&batch)?;
        batch = big();
        loop {
            done = read(&mut batch)?;
            work(&mut batch)?;
            write(&batch)?;
            if done {
                return Ok(());
            }
        }
    }
    std::thread::scope(|scope| {
        // Worked batches to the writer, in order; written ones back for reuse.
        let (to_writer, worked) = std::sync::mpsc::sync_channel::<B>(1);
        let (written, free) = std::sync::mpsc::channel::<B>();
        let writer = scope.spawn(move || -> Result<()> {
            for batch in worked {
                write(&batch)?;
                // The reader may have finished: a batch nobody takes back is dropped.
                let _ = written.send(batch);
            }
            Ok(())
        });
        let mut batches = Batches {
            free,
            made: 1,
            first_returned: false,
        };
        let mut current = first;
        let outcome = (|| -> Result<()> {
            loop {
                let Some(mut next) = batches.next(&big) else {
                    return Ok(()); // the writer stopped: its error is reported below
                };
                let (filled, worked) = rayon::join(|| read(&mut next), || work(&mut current));
                worked?;
                done = filled?;
                if to_writer.send(current).is_err() {
                    return Ok(());
                }
                current = next;
                if done {
                    work(&mut current)?;
                    let _ = to_writer.send(current);
                    return Ok(());
                }
            }
        })();
        drop(to_writer);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the writer thread panicked".into())));
        // A write error explains a stop the reader saw; otherwise the reader's own error.
        wrote.and(outcome)
    })
}

/// Most batches of one message in memory at once in [`pipeline`]: one being read, one being
/// worked, one waiting for the writer and one being written.
const PIPELINE_BATCHES: usize = 4;

/// The batches of [`pipeline`]: new ones until [`PIPELINE_BATCHES`] exist, then the written
/// ones back from the writer.
struct Batches<B> {
    free: std::sync::mpsc::Receiver<B>,
    made: usize,
    /// Whether the small first batch has come back (it is replaced by a big one).
    first_returned: bool,
}

impl<B> Batches<B> {
    /// A batch to read into; `None` once the writer has stopped.
    fn next(&mut self, big: &impl Fn() -> B) -> Option<B> {
        let returned = match self.free.try_recv() {
            Ok(batch) => Some(batch),
            Err(_) if self.made < PIPELINE_BATCHES => None,
            Err(_) => Some(self.free.recv().ok()?),
        };
        match returned {
            // Batches come back in the order they were sent: the first is the small one.
            Some(_) if !self.first_returned => {
                self.first_returned = true;
                Some(big())
            }
            Some(batch) => Some(batch),
            None => {
                self.made += 1;
                Some(big())
            }
        }
    }
}

pub(super) fn write_error(e: std::io::Error) -> Error {
    Error::invalid(format!("cannot write the message: {e}"))
}

/// Plaintext bytes per batch: large enough that handing a batch to the workers costs little,
/// small enough to stay in the cores' caches. Measured with `wrapctl bench` on 2 cores:
/// 256 KiB lost a fifth of the two-thread library figure, 4 MiB a quarter of the one-thread
/// one (the batch no longer fits in L2).
pub(super) const BATCH_BYTES: usize = 1024 * 1024;

/// Batches smaller than this are sealed or opened on the calling thread: for small messages
/// a hand-off to the workers costs more than it saves.
pub(super) const PARALLEL_FROM: usize = 64 * 1024;

pub(super) fn frames_per_batch(frame_length: usize) -> usize {
    (BATCH_BYTES / frame_length.max(1)).max(1)
}

/// Frames in the first batch of a message: no more than a small message needs.
pub(super) fn first_batch_frames(frame_length: usize) -> usize {
    (PARALLEL_FROM / frame_length.max(1)).max(1)
}

/// Where frames sit in an encryption batch buffer: `per_batch` regular slots of
/// `seq | IV | plaintext→ciphertext | tag`, then room for the final frame.
pub(super) struct SealLayout {
    frame: usize,
    per_batch: usize,
}

impl SealLayout {
    /// seq 4 + IV 12 before, tag 16 after.
    const REGULAR_OVERHEAD: usize = 4 + IV_LEN + TAG_LEN;
    /// Marker 4 + seq 4 + IV 12 + length 4 before, tag 16 after.
    const FINAL_OVERHEAD: usize = 4 + 4 + IV_LEN + 4 + TAG_LEN;

    pub(super) fn new(frame: usize) -> Self {
        Self {
            frame,
            per_batch: frames_per_batch(frame),
        }
    }

    pub(super) fn slot(&self) -> usize {
        self.frame + Self::REGULAR_OVERHEAD
    }
}

/// A batch buffer that may hold plaintext. It is allocated zeroed (lazily, by the OS) and on
/// drop zeroizes only the part ever handed out for writing, so a hostile header declaring
/// 64 MiB frames costs no memory until frames actually arrive.
pub(super) struct Scratch {
    buf: Vec<u8>,
    dirty: usize,
}

impl Scratch {
    pub(super) fn new(len: usize) -> Self {
        Self {
            buf: vec![0u8; len],
            dirty: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    /// `range` for writing; it is zeroized on drop.
    pub(super) fn area(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        self.dirty = self.dirty.max(range.end.min(self.buf.len()));
        &mut self.buf[range]
    }
}

impl std::ops::Deref for Scratch {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf[..self.dirty]);
    }
}

/// One batch of frames on their way out: plaintext staged, then sealed into `slots`.
pub(super) struct SealBatch {
    /// The batch's plaintext as read, contiguous.
    staged: Scratch,
    /// Serialized frames; sealed in place.
    slots: Scratch,
    /// Regular frames in this batch, and their first sequence number.
    regular: usize,
    first_seq: u32,
    /// Plaintext length of the final frame, if this batch ends the message.
    final_len: Option<usize>,
    /// Bytes of `slots` in use.
    len: usize,
}

impl SealBatch {
    /// A batch of up to `frames` frames.
    pub(super) fn new(layout: &SealLayout, frames: usize) -> Self {
        Self {
            staged: Scratch::new(frames * layout.frame),
            slots: Scratch::new(frames * layout.slot() + layout.frame + SealLayout::FINAL_OVERHEAD),
            regular: 0,
            first_seq: 1,
            final_len: None,
            len: 0,
        }
    }

    /// Copies each frame's plaintext into its slot and seals it there, frames in parallel.
    pub(super) fn seal(
        &mut self,
        key: &LessSafeKey,
        message_id: &[u8; 32],
        layout: &SealLayout,
    ) -> Result<()> {
        let (frame, slot) = (layout.frame, layout.slot());
        let len = self.len;
        let (regular, rest) = self.slots.area(0..len).split_at_mut(self.regular * slot);
        let first_seq = self.first_seq;
        let seal_one = |(i, (slot, plaintext)): (usize, (&mut [u8], &[u8]))| -> Result<()> {
            // `regular` frames are below `FINAL_FRAME`: `BatchReader` checked.
            let seq = first_seq + i as u32;
            slot[..4].copy_from_slice(&seq.to_be_bytes());
            slot[4..16].copy_from_slice(&frame_iv(seq));
            seal_into(key, message_id, seq, false, plaintext, &mut slot[16..])
        };
        if self.regular * frame >= PARALLEL_FROM {
            regular
                .par_chunks_mut(slot)
                .zip(self.staged.par_chunks(frame))
                .enumerate()
                .try_for_each(seal_one)?;
        } else {
            regular
                .chunks_mut(slot)
                .zip(self.staged.chunks(frame))
                .enumerate()
                .try_for_each(seal_one)?;
        }
        if let Some(n) = self.final_len {
            let seq = first_seq + self.regular as u32;
            let plaintext = &self.staged[self.regular * frame..self.regular * frame + n];
            rest[..4].copy_from_slice(&FINAL_FRAME.to_be_bytes());
            rest[4..8].copy_from_slice(&seq.to_be_bytes());
            rest[8..20].copy_from_slice(&frame_iv(seq));
            rest[20..24].copy_from_slice(&(n as u32).to_be_bytes());
            seal_into(key, message_id, seq, true, plaintext, &mut rest[24..])?;
        }
        Ok(())
    }

    /// The sealed frames of this batch.
    pub(super) fn sealed(&self) -> &[u8] {
        &self.slots[..self.len]
    }
}

/// Copies a frame's `plaintext` to the start of `out`, seals it there and puts the tag
/// right after it.
pub(super) fn seal_into(
    key: &LessSafeKey,
    message_id: &[u8; 32],
    seq: u32,
    last: bool,
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let n = plaintext.len();
    let (body, tail) = out.split_at_mut(n);
    body.copy_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(frame_nonce(seq), frame_aad(message_id, last, seq, n), body)
        .map_err(|_| Error::Internal("AES-GCM".into()))?;
    tail[..TAG_LEN].copy_from_slice(tag.as_ref());
    Ok(())
}

/// Reads the plaintext of one batch at a time and numbers its frames.
pub(super) struct BatchReader<'a, R: ?Sized> {
    input: &'a mut R,
    next_seq: u32,
    total: u64,
}

impl<R: Read + ?Sized> BatchReader<'_, R> {
    /// Fills `batch` with up to one batch of plaintext; true if the input ended (the batch
    /// then holds the final frame, possibly empty).
    pub(super) fn read(&mut self, batch: &mut SealBatch, layout: &SealLayout) -> Result<bool> {
        let capacity = batch.staged.len();
        let n = fill(self.input, batch.staged.area(0..capacity))?;
        self.total += n as u64;
        let regular = n / layout.frame;
        let last = n < batch.staged.len();
        let frames = regular + usize::from(last);
        // Sequence numbers run from 1 and must stay below the final-frame marker.
        let next = u64::from(self.next_seq) + frames as u64;
        if next > u64::from(FINAL_FRAME) {
            return Err(Error::invalid("too many frames"));
        }
        batch.first_seq = self.next_seq;
        self.next_seq = next as u32;
        batch.regular = regular;
        batch.final_len = last.then_some(n - regular * layout.frame);
        batch.len = regular * layout.slot()
            + batch
                .final_len
                .map_or(0, |len| len + SealLayout::FINAL_OVERHEAD);
        Ok(last)
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(super) fn fill(input: &mut (impl Read + ?Sized), buf: &mut [u8]) -> Result<usize> {
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
