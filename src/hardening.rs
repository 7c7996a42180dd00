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
//! One of the crate's marked syscall spots: `unsafe` is allowed here, each block with its
//! `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::ffi::CStr;

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
    // SAFETY: prctl with PR_SET_DUMPABLE takes integer arguments and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(os_error("prctl(PR_SET_DUMPABLE)"));
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(os_error("setrlimit(RLIMIT_CORE)"));
    }
    let memory_locked = match lock {
        LockMemory::Off => false,
        LockMemory::Auto | LockMemory::Require => {
            let why_not = if can_lock_everything() {
                // SAFETY: mlockall takes flags only. MCL_ONFAULT locks pages as they are
                // touched instead of populating every mapping (thread stacks) up front.
                let rc = unsafe {
                    libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT)
                };
                (rc != 0).then(|| std::io::Error::last_os_error().to_string())
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
        // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
        dumpable: unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } != 0,
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

fn os_error(what: &str) -> Error {
    Error::Config(format!("{what}: {}", std::io::Error::last_os_error()))
}

fn core_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: u64::MAX,
        rlim_max: u64::MAX,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) };
    limit.rlim_cur
}

/// Whether `mlockall(MCL_FUTURE)` can never make a later allocation fail: the process has
/// `CAP_IPC_LOCK` (bit 14 of `CapEff`) or no `RLIMIT_MEMLOCK`.
fn can_lock_everything() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let unlimited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur == libc::RLIM_INFINITY;
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
