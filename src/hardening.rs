//! Process hardening at start-up, so that the secrets the daemon holds (PINs, data keys, the
//! TLS private key) do not leak through core dumps, swap or `/proc`.
//!
//! - No core dumps: `PR_SET_DUMPABLE = 0` (also keeps other users' debuggers out) and
//!   `RLIMIT_CORE = 0`.
//! - No swap: `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` keeps every page the daemon
//!   touches (PINs, data keys passing through, the TLS private key) out of swap. It is only
//!   attempted when it cannot later make allocations fail: with `CAP_IPC_LOCK` (root) or an
//!   unlimited `RLIMIT_MEMLOCK` (systemd: `LimitMEMLOCK=infinity`). [`LockMemory`] says
//!   whether that is optional (`auto`, a warning) or required.
//! - The PIN's environment variable (`pin_env`) is wiped from the process's original
//!   environment block, so `/proc/PID/environ` no longer shows it ([`scrub_env_var`]).
//!
//! What cannot be zeroized is listed in `SECURITY.md` (bytes inside the HTTP/2 and TLS
//! buffers of tonic, hyper and rustls; the PKCS#11 library's own copies).
//!
//! The system calls go through `nix`'s safe wrappers. Wiping the environment block has no
//! safe wrapper (it writes through `environ`): that one function makes this one of the
//! crate's marked syscall spots, where `unsafe` is allowed with its `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::ffi::CStr;

use nix::sys::mman::{self, MlockAllFlags};
use nix::sys::prctl;
use nix::sys::resource::{self, Resource};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Whether the daemon locks its memory (`[process] lock_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMemory {
    /// Lock when it is safe to (see the module docs), warn otherwise.
    #[default]
    Auto,
    /// Refuse to start unless memory can be locked.
    Require,
    /// Do not lock.
    Off,
}

/// What [`harden`] achieved, read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardened {
    /// `PR_GET_DUMPABLE` after the change (false is what we want).
    pub dumpable: bool,
    /// The core file size limit in force.
    pub core_limit: u64,
    /// Whether `mlockall` is in force.
    pub memory_locked: bool,
}

/// Makes the process undumpable, sets the core limit to 0 and locks memory as `lock` says
/// (`MCL_CURRENT` also locks what is already in memory, such as the PIN read with the
/// configuration). Call it at start-up, while the process has one thread.
pub fn harden(lock: LockMemory) -> Result<Hardened> {
    prctl::set_dumpable(false).map_err(|e| os_error("prctl(PR_SET_DUMPABLE)", e))?;
    resource::setrlimit(Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| os_error("setrlimit(RLIMIT_CORE)", e))?;
    let memory_locked = match lock {
        LockMemory::Off => false,
        LockMemory::Auto | LockMemory::Require => {
            let why_not = if can_lock_everything() {
                // MCL_ONFAULT (which nix does not name) locks pages as they are touched
                // instead of populating every mapping (thread stacks) up front.
                let flags = MlockAllFlags::MCL_CURRENT
                    | MlockAllFlags::MCL_FUTURE
                    | MlockAllFlags::from_bits_retain(libc::MCL_ONFAULT);
                mman::mlockall(flags).err().map(|e| e.to_string())
            } else {
                Some(
                    "neither CAP_IPC_LOCK nor an unlimited RLIMIT_MEMLOCK (set LimitMEMLOCK=infinity)"
                        .to_owned(),
                )
            };
            match (why_not, lock) {
                (None, _) => true,
                (Some(why), LockMemory::Require) => {
                    return Err(Error::Config(format!(
                        "process.lock_memory = \"require\": cannot lock memory: {why}"
                    )));
                }
                (Some(why), _) => {
                    tracing::warn!(reason = %why, "memory is not locked: secrets may reach swap");
                    false
                }
            }
        }
    };
    let hardened = Hardened {
        // Unreadable counts as dumpable: the report must not claim what it cannot see.
        dumpable: prctl::get_dumpable().unwrap_or(true),
        core_limit: core_limit(),
        memory_locked,
    };
    tracing::info!(
        dumpable = hardened.dumpable,
        core_limit = hardened.core_limit,
        memory_locked = hardened.memory_locked,
        "process hardened"
    );
    Ok(hardened)
}

/// `CAP_IPC_LOCK` from `linux/capability.h`.
const CAP_IPC_LOCK: u32 = 14;

fn os_error(what: &str, errno: nix::errno::Errno) -> Error {
    Error::Config(format!("{what}: {errno}"))
}

/// The core file size limit in force (unreadable: reported as unlimited).
fn core_limit() -> u64 {
    resource::getrlimit(Resource::RLIMIT_CORE).map_or(u64::MAX, |(soft, _)| soft)
}

/// Whether `mlockall(MCL_FUTURE)` can never make a later allocation fail: the process has
/// `CAP_IPC_LOCK` (bit 14 of `CapEff`) or no `RLIMIT_MEMLOCK`.
fn can_lock_everything() -> bool {
    let unlimited = resource::getrlimit(Resource::RLIMIT_MEMLOCK)
        .is_ok_and(|(soft, _)| soft == resource::RLIM_INFINITY);
    let ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    unlimited || ipc_lock
}

/// Overwrites environment variable `name` (name and value) in place in the process's
/// environment block (what `/proc/PID/environ` shows) and removes the variable.
///
/// # Safety
///
/// No other thread may read or write the environment during the call (call it at start-up,
/// before any thread is spawned).
pub unsafe fn scrub_env_var(name: &str) {
    let prefix = format!("{name}=");
    // SAFETY: the caller guarantees exclusive access to the environment; `environ` is a
    // NULL-terminated array of pointers to NUL-terminated strings, which we only read up to
    // their NUL and overwrite within their length.
    unsafe {
        let mut entry = libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = CStr::from_ptr(*entry);
            if text.to_bytes().starts_with(prefix.as_bytes()) {
                // Name and value: the block then reads as empty entries.
                let len = text.to_bytes().len();
                for i in 0..len {
                    std::ptr::write_volatile((*entry).add(i), 0);
                }
            }
            entry = entry.add(1);
        }
        std::env::remove_var(name);
    }
}

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
