//! The fault hook of fault tests (feature `fault-injection`): a queued fault replaces the
//! next PKCS#11 call's result as if the token had given it.

use super::*;

/// A fault to inject into a coming PKCS#11 call, for fault tests: the call fails (or stalls)
/// as if the token had done it, and the pool reacts as it would to the real thing. Only
/// with the `fault-injection` feature, so that the hook costs production calls no global lock.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `CKR_DEVICE_ERROR`: the context is retired and re-initialized.
    DeviceError,
    /// `CKR_SESSION_HANDLE_INVALID`: the session is dropped and replaced.
    SessionInvalid,
    /// The call holds its session this long before running (a slow HSM).
    Stall(std::time::Duration),
}

impl Pkcs11Token {
    /// Queues faults for the coming calls, one per call (fault tests).
    #[cfg(feature = "fault-injection")]
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut faults = self.inner.faults.lock();
        faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Runs one PKCS#11 call, or the fault queued for it.
    #[cfg(feature = "fault-injection")]
    pub(super) fn call_with_faults<T>(&self, call: impl FnOnce() -> Result<T>) -> Result<T> {
        if let Some(stall) = self.inner.stall_every_call {
            std::thread::sleep(stall);
        }
        let fault = self.inner.faults.lock().pop_front();
        let injected = |rv: &str, fault| Error::Pkcs11Library {
            message: format!("{rv} (injected)"),
            fault,
        };
        match fault {
            Some(Fault::DeviceError) => Err(injected("CKR_DEVICE_ERROR", Pkcs11Fault::Device)),
            Some(Fault::SessionInvalid) => {
                Err(injected("CKR_SESSION_HANDLE_INVALID", Pkcs11Fault::Session))
            }
            Some(Fault::Stall(duration)) => {
                std::thread::sleep(duration);
                call()
            }
            None => call(),
        }
    }

    /// Runs one PKCS#11 call (no fault hook in this build).
    #[cfg(not(feature = "fault-injection"))]
    pub(super) fn call_with_faults<T>(&self, call: impl FnOnce() -> Result<T>) -> Result<T> {
        call()
    }
}
