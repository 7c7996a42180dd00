//! Data keys from the HSM's random generator, drawn ahead on a networked HSM.
//!
//! A GenerateDataKey needs random bytes and an encryption: two calls to the HSM. On a local
//! token both cost microseconds; on CloudHSM each is a network round trip, so the data key
//! would take twice the time and half the cluster's capacity. On a networked HSM the daemon
//! draws [`DRAW`] bytes at a time (32 data keys of 32 bytes) and hands them out, once each,
//! so a GenerateDataKey costs one round trip and 1/32 of another.
//!
//! The bytes are the HSM's, as before; what changes is that up to [`CAPACITY`] of them wait
//! in the daemon's memory before they become data keys, in a buffer that never moves (its
//! capacity is reserved once) and is zeroed where bytes are taken and when dropped. A data
//! key is in that memory anyway while its answer is built; the reserve only makes the stay
//! longer. The reserve lives as long as the token; a new PKCS#11 context keeps it, as the
//! bytes do not depend on the session that drew them.

use cryptoki::session::Session;
use parking_lot::Mutex;
use zeroize::{Zeroize, Zeroizing};

use super::p11_error;
use crate::error::Result;

/// Bytes drawn from the HSM in one `C_GenerateRandom`.
pub(super) const DRAW: usize = 1024;

/// Most bytes waiting at once.
pub(super) const CAPACITY: usize = 4 * DRAW;

/// Random bytes drawn from the HSM and not handed out yet.
pub(super) struct RandomReserve {
    bytes: Mutex<Zeroizing<Vec<u8>>>,
}

impl RandomReserve {
    pub(super) fn new() -> Self {
        Self {
            bytes: Mutex::new(Zeroizing::new(Vec::with_capacity(CAPACITY))),
        }
    }

    /// `len` random bytes, from the reserve, or from one new draw on `session` (whose rest
    /// is kept, as far as the reserve has room).
    pub(super) fn take(&self, session: &Session, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        if let Some(bytes) = self.take_reserved(len) {
            return Ok(bytes);
        }
        let mut drawn = Zeroizing::new(vec![0u8; DRAW.max(len)]);
        session
            .generate_random_slice(&mut drawn)
            .map_err(p11_error)?;
        let taken = Zeroizing::new(drawn[..len].to_vec());
        let rest = &drawn[len..];
        let mut reserve = self.bytes.lock();
        let room = CAPACITY.saturating_sub(reserve.len());
        // Within the capacity reserved at the start: the buffer never moves, so no copy of
        // these bytes is left behind in freed memory.
        reserve.extend_from_slice(&rest[..rest.len().min(room)]);
        Ok(taken)
    }

    /// `len` bytes off the end of the reserve, which are zeroed there.
    fn take_reserved(&self, len: usize) -> Option<Zeroizing<Vec<u8>>> {
        let mut reserve = self.bytes.lock();
        let at = reserve.len().checked_sub(len)?;
        let taken = Zeroizing::new(reserve[at..].to_vec());
        reserve[at..].zeroize();
        reserve.truncate(at);
        Some(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_bytes_are_handed_out_once_each_from_a_buffer_that_never_moves() {
        let reserve = RandomReserve::new();
        reserve
            .bytes
            .lock()
            .extend_from_slice(&(1..=64).collect::<Vec<u8>>());
        let first = reserve.take_reserved(32).expect("enough bytes");
        let second = reserve.take_reserved(32).expect("enough bytes");
        assert_eq!(first.as_slice(), (33..=64).collect::<Vec<u8>>().as_slice());
        assert_eq!(second.as_slice(), (1..=32).collect::<Vec<u8>>().as_slice());
        assert!(reserve.take_reserved(1).is_none());
        assert_eq!(
            reserve.bytes.lock().capacity(),
            CAPACITY,
            "the buffer never moved"
        );
    }
}
