//! [`Token`] on `cryptoki`: the one module that talks PKCS#11.
//!
//! Every cryptoki error becomes an [`Error`] in [`p11_error`], which keeps the PKCS#11
//! function and return value for the log and decides whether the fault is the device's.
//! Object handles are cached per context (no `C_FindObjects` per request); a stale handle is
//! looked up again once.
//!
//! Here: the token, its sessions (checkout, one retry on a fresh session) and handle cache,
//! and the [`Token`] implementation; `templates.rs` the objects' attributes and the searches
//! by `CKA_ID`; `import.rs` wrapping key pairs and imported material; `single_call.rs`
//! AES-GCM in one module call (no length query first); `random_reserve.rs` data keys drawn
//! ahead from a networked HSM; `faults.rs` the fault hook of fault tests.

mod faults;
mod import;
mod random_reserve;
mod single_call;
mod templates;

#[cfg(feature = "fault-injection")]
pub use faults::Fault;
use import::*;
use random_reserve::RandomReserve;
use single_call::SingleCall;
use templates::*;

use std::collections::HashMap;
#[cfg(feature = "fault-injection")]
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Ulong};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use zeroize::Zeroizing;

use super::pool::{Context, Outcome, Pool};
use super::{
    HsmConfig, HsmProfile, ImportAlgorithm, KEY_CHECK_BLOCK, KeyCheckValue, ObjectId, Sealed,
    Ticket, Token, WrappingKeyId,
};
use crate::blob::{IV_LEN, TAG_LEN};
use crate::error::{Error, Pkcs11Fault, Result};

/// At most one context re-initialization per this interval because of a missing object.
const MISSING_RESET_INTERVAL: Duration = Duration::from_secs(2);

/// How long a call waits out a busy CloudHSM or a key not yet replicated to the HSM its
/// call went to, when the caller set no earlier deadline.
const CLOUDHSM_PATIENCE: Duration = Duration::from_secs(5);

/// Waiting out CloudHSM's transient answers: until when, and the next pause.
struct TransientWaits {
    until: Instant,
    backoff: Duration,
}

impl TransientWaits {
    /// Whether `err` is transient and there is time to wait for it.
    fn allows(&self, err: &Error) -> bool {
        is_transient(err) && Instant::now() + self.backoff < self.until
    }

    /// Pauses before the next attempt (doubling up to 100 ms).
    fn wait(&mut self, err: &Error) {
        tracing::debug!(error = %err, pause_ms = self.backoff.as_millis() as u64, "CloudHSM busy or key not replicated yet; retrying");
        metrics::counter!("wrapd_hsm_transient_retries_total").increment(1);
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_millis(100));
    }
}

/// A busy HSM, or a key object the HSM the call went to does not have yet.
fn is_transient(err: &Error) -> bool {
    match err {
        Error::Pkcs11 { rv, .. } => matches!(
            rv,
            RvError::FunctionFailed | RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid
        ),
        Error::Unavailable(message) => message.starts_with(MISSING_OBJECT),
        _ => false,
    }
}

/// The start of the error of a key object the token does not find.
const MISSING_OBJECT: &str = "the token has no object for";

/// The largest buffer CloudHSM takes in one AES-GCM call (its PKCS#11 mechanisms page).
const CLOUDHSM_MAX_GCM_BYTES: usize = 16_224;

/// A PKCS#11 token behind a bounded session pool. Cheap to clone.
#[derive(Clone)]
pub struct Pkcs11Token {
    inner: Arc<Inner>,
}

struct Inner {
    config: HsmConfig,
    pool: Pool,
    /// AES-GCM in one module call each (see `single_call.rs`).
    single_call: SingleCall,
    /// Data keys drawn ahead from a networked HSM (`None` on a local token; see
    /// `random_reserve.rs`).
    random_reserve: Option<RandomReserve>,
    /// Handles of key objects in the current context; cleared when the context is retired.
    handles: Mutex<HashMap<ObjectId, ObjectHandle>>,
    /// Creating or destroying a token object takes this exclusively, every other call
    /// shares it. SoftHSM's file store fails (`CKR_GENERAL_ERROR`, `CKR_FUNCTION_FAILED`,
    /// garbled attributes) when objects change while other sessions use it; changes are rare
    /// control-plane operations, so queueing them costs nothing on the hot path.
    object_store: RwLock<()>,
    /// When a missing object last made us re-initialize the context (see `handle`).
    last_missing_reset: Mutex<Option<Instant>>,
    /// Faults to inject into the next calls (fault tests).
    #[cfg(feature = "fault-injection")]
    faults: Mutex<VecDeque<Fault>>,
    /// How long every call stalls (`WRAPD_FAULT_STALL_MS`, fault tests).
    #[cfg(feature = "fault-injection")]
    stall_every_call: Option<std::time::Duration>,
    /// PKCS#11 contexts initialized so far (1 after start; +1 per re-initialization).
    contexts: AtomicU64,
}

/// Converts a cryptoki error: the one place that does. The fault kind decides what happens
/// next: a device fault re-initializes the context, a session fault replaces the session.
pub(super) fn p11_error(err: CkError) -> Error {
    match err {
        CkError::Pkcs11(rv, function) => Error::Pkcs11 {
            function,
            rv,
            fault: fault_of(rv),
        },
        CkError::LibraryLoading(e) => Error::Pkcs11Library {
            message: format!("cannot load the module: {e}"),
            fault: Pkcs11Fault::Device,
        },
        other => Error::Pkcs11Library {
            message: other.to_string(),
            fault: Pkcs11Fault::Call,
        },
    }
}

fn fault_of(rv: RvError) -> Pkcs11Fault {
    match rv {
        RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::CryptokiNotInitialized
        | RvError::GeneralError
        | RvError::HostMemory
        | RvError::SessionCount
        | RvError::SlotIdInvalid => Pkcs11Fault::Device,
        // A call that could not be given a large enough buffer leaves its operation active
        // (PKCS#11 keeps it for a second try), and a session that still holds one refuses
        // every new operation: either way the session is replaced, not pooled again.
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::UserNotLoggedIn
        | RvError::BufferTooSmall
        | RvError::OperationActive => Pkcs11Fault::Session,
        _ => Pkcs11Fault::Call,
    }
}

/// How a failed call affects its session.
fn outcome_of(err: &Error) -> Outcome {
    match err {
        Error::Pkcs11 { fault, .. } | Error::Pkcs11Library { fault, .. } => match fault {
            Pkcs11Fault::Device => Outcome::DeviceFault,
            Pkcs11Fault::Session => Outcome::SessionBroken,
            Pkcs11Fault::Call => Outcome::Healthy,
        },
        _ => Outcome::Healthy,
    }
}

/// A session handle the library does not know (closed by it, or by the network on the way):
/// the call was refused before it ran.
fn is_session_gone(err: &Error) -> bool {
    matches!(
        err,
        Error::Pkcs11 {
            rv: RvError::SessionHandleInvalid,
            ..
        }
    )
}

fn is_stale_handle(err: &Error) -> bool {
    matches!(
        err,
        Error::Pkcs11 {
            rv: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
            ..
        }
    )
}

impl Pkcs11Token {
    /// Loads the module, finds the token, logs in once to check the PIN. Errors here are
    /// start-up errors with a clear message (missing module, missing token, wrong PIN).
    pub fn open(config: HsmConfig) -> Result<Self> {
        let single_call = SingleCall::load(&config.module)?;
        let token = Self {
            inner: Arc::new(Inner {
                pool: Pool::new(config.max_sessions),
                single_call,
                random_reserve: config.profile.is_networked().then(RandomReserve::new),
                config,
                handles: Mutex::new(HashMap::new()),
                object_store: RwLock::new(()),
                last_missing_reset: Mutex::new(None),
                #[cfg(feature = "fault-injection")]
                faults: Mutex::new(VecDeque::new()),
                #[cfg(feature = "fault-injection")]
                stall_every_call: std::env::var("WRAPD_FAULT_STALL_MS")
                    .ok()
                    .and_then(|ms| ms.parse().ok())
                    .map(std::time::Duration::from_millis),
                contexts: AtomicU64::new(0),
            }),
        };
        token
            .with_session(false, |_, _| Ok(()))
            .map_err(|err| match err {
                Error::Pkcs11 {
                    function,
                    rv: rv @ RvError::PinIncorrect,
                    ..
                } => Error::Config(format!("C_{function:?}: the PIN is incorrect ({rv})")),
                other => other,
            })?;
        Ok(token)
    }

    /// The configured profile.
    pub fn profile(&self) -> HsmProfile {
        self.inner.config.profile
    }

    /// How often sessions idle that long get a keep-alive call (`hsm.session_keepalive_ms`).
    pub fn session_keepalive(&self) -> Option<Duration> {
        self.inner.config.session_keepalive
    }

    /// Gives every session idle for the keep-alive interval a cheap call to the HSM (one
    /// random byte), so that the client library and the network keep it open; a session
    /// whose call fails is dropped here, and replaced when next needed, rather than in a
    /// caller's call. Returns how many sessions were called.
    pub fn keep_alive(&self) -> usize {
        let Some(idle_for) = self.inner.config.session_keepalive else {
            return 0;
        };
        let _shared = self.shared();
        let loans = self.inner.pool.take_idle_for(idle_for);
        let count = loans.len();
        for loan in loans {
            let mut byte = [0u8; 1];
            let result = loan
                .session
                .generate_random_slice(&mut byte)
                .map_err(p11_error);
            let outcome = match &result {
                Ok(()) => Outcome::Healthy,
                Err(err) => {
                    tracing::warn!(error = %err, "an idle HSM session failed its keep-alive call");
                    outcome_of(err)
                }
            };
            if outcome == Outcome::DeviceFault {
                self.clear_handles();
            }
            self.inner.pool.checkin(loan, outcome);
        }
        count
    }

    /// Closes idle sessions (graceful shutdown); busy ones close when returned.
    pub fn close(&self) {
        self.inner.pool.close_idle();
    }

    /// Forces the context to be re-initialized on next use (after a device error).
    pub fn reset(&self) {
        self.clear_handles();
        self.inner.pool.retire_context();
    }

    fn clear_handles(&self) {
        self.inner.handles.lock().clear();
    }

    fn connect(config: &HsmConfig) -> Result<Context> {
        let pkcs11 = Pkcs11::new(&config.module).map_err(|err| match err {
            CkError::LibraryLoading(e) => Error::Unavailable(format!(
                "cannot load PKCS#11 module {}: {e}",
                config.module.display()
            )),
            other => p11_error(other),
        })?;
        match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(err) => return Err(p11_error(err)),
        }
        let found = pkcs11
            .get_slots_with_token()
            .map_err(p11_error)
            .and_then(|slots| {
                for slot in slots {
                    let info = pkcs11.get_token_info(slot).map_err(p11_error)?;
                    if info.label() == config.token_label {
                        return Ok(Some(slot));
                    }
                }
                Ok(None)
            });
        match found {
            Ok(Some(slot)) => return Ok(Context { pkcs11, slot }),
            Ok(None) => {
                // Leave the library uninitialized for the next attempt.
                let _ = pkcs11.finalize();
            }
            Err(err) => {
                let _ = pkcs11.finalize();
                return Err(err);
            }
        }
        Err(Error::Unavailable(format!(
            "no token labelled {:?} in PKCS#11 module {}",
            config.token_label,
            config.module.display()
        )))
    }

    fn open_session(config: &HsmConfig, context: &Context) -> Result<Session> {
        let session = context
            .pkcs11
            .open_rw_session(context.slot)
            .map_err(p11_error)?;
        let pin = AuthPin::from(config.pin.expose().to_owned());
        match session.login(UserType::User, Some(&pin)) {
            // Login state is per application: another session may have logged in already.
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(err) => Err(p11_error(err)),
        }
    }

    /// Shared use of the object store (see `Inner::object_store`). Taken before a session
    /// is checked out, never while holding one, so it cannot deadlock with the pool.
    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.inner.object_store.read()
    }

    /// Exclusive use of the object store, to create or destroy objects.
    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.inner.object_store.write()
    }

    /// How many PKCS#11 contexts have been initialized (re-initializations show here).
    pub fn contexts_initialized(&self) -> u64 {
        self.inner.contexts.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pooled session. With `retry`, a call that failed because its session or
    /// the device failed runs once more on a fresh session (after re-initialization for a
    /// device fault); only idempotent calls may retry.
    ///
    /// On CloudHSM two answers are waited out instead of failing the caller, with a backoff,
    /// until the caller's deadline (or [`CLOUDHSM_PATIENCE`]): a busy HSM
    /// (`CKR_FUNCTION_FAILED`, which the HSM answers without doing the call, so that any
    /// call may be sent again), and a key object that has not reached the HSM the call was
    /// routed to yet (a key just created or rotated through another HSM of the cluster).
    fn with_session<T>(&self, retry: bool, f: impl Fn(&Session, &Self) -> Result<T>) -> Result<T> {
        let mut retried = false;
        // Idle sessions the library dropped are found one call at a time, each dropped from
        // the pool when found; the call ran on none of them, so any call goes again, on the
        // next session, at most once per session the pool can hold.
        let mut gone = 0;
        let mut waits = self.transient_waits();
        loop {
            match self.attempt(&f) {
                Err(err) if waits.as_mut().is_some_and(|w| w.allows(&err)) => {
                    if let Some(waits) = waits.as_mut() {
                        waits.wait(&err);
                    }
                }
                Err(err) if is_session_gone(&err) && gone < self.inner.config.max_sessions => {
                    tracing::warn!(error = %err, "the HSM session was gone; retrying on another");
                    gone += 1;
                }
                Err(err) if retry && !retried && outcome_of(&err) != Outcome::Healthy => {
                    tracing::warn!(error = %err, "PKCS#11 call failed; retrying once on a fresh session");
                    retried = true;
                }
                Err(Error::Unavailable(message))
                    if waits.is_some() && message.starts_with(MISSING_OBJECT) =>
                {
                    // Still missing after the wait: not replication. As on SoftHSM, a fresh
                    // context answers whether the library's view went stale.
                    if self.inner.config.reset_on_missing_object {
                        self.reset_for_missing(&message);
                    }
                    return Err(Error::Unavailable(message));
                }
                Err(err @ Error::Pkcs11 { .. }) if waits.is_some() && is_transient(&err) => {
                    // Busy (or without the key) for as long as the caller could wait: the
                    // cluster could not serve this call now, which the caller may try again;
                    // the module did nothing wrong, so this is no internal error.
                    return Err(Error::Unavailable(format!(
                        "the HSM stayed busy, or without the key, until the call's deadline: {err}"
                    )));
                }
                other => return other,
            }
        }
    }

    /// How a call waits out CloudHSM's transient answers (`None` on other HSMs).
    fn transient_waits(&self) -> Option<TransientWaits> {
        if self.profile() != HsmProfile::Cloudhsm {
            return None;
        }
        let mut until = Instant::now() + CLOUDHSM_PATIENCE;
        if let Some(caller) = super::call_deadline() {
            until = until.min(caller);
        }
        Some(TransientWaits {
            until,
            backoff: Duration::from_millis(2),
        })
    }

    /// Whether a decryption's `rv` means the ciphertext (or its tag) is bad, when the session
    /// still answers. SoftHSM reports a tag mismatch as `CKR_GENERAL_ERROR`; on CloudHSM
    /// `CKR_FUNCTION_FAILED` is a busy HSM, never a verdict on the ciphertext.
    fn is_bad_ciphertext(&self, rv: RvError) -> bool {
        match rv {
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::GeneralError => true,
            RvError::FunctionFailed => self.profile() != HsmProfile::Cloudhsm,
            _ => false,
        }
    }

    /// One checkout, call and checkin.
    fn attempt<T>(&self, f: &impl Fn(&Session, &Self) -> Result<T>) -> Result<T> {
        let config = &self.inner.config;
        let waiting = Instant::now();
        let mut deadline = waiting + config.session_wait;
        if let Some(caller) = super::call_deadline() {
            deadline = deadline.min(caller);
        }
        // Declared before the loan, so that a panicking call drops (closes) its session
        // before the slot is given back: until then the session still counts.
        let slot;
        let loan = self.inner.pool.checkout(
            deadline,
            || {
                // A new context has new handles.
                self.clear_handles();
                let context = Self::connect(config)?;
                self.inner.contexts.fetch_add(1, Ordering::Relaxed);
                Ok(context)
            },
            |context| Self::open_session(config, context),
        );
        metrics::histogram!("wrapd_hsm_session_wait_seconds")
            .record(waiting.elapsed().as_secs_f64());
        let loan = loan.inspect_err(|_| {
            metrics::counter!("wrapd_hsm_errors_total", "kind" => "session_wait").increment(1);
        })?;
        slot = self.inner.pool.slot();
        let started = Instant::now();
        let result = self.call_with_faults(|| f(&loan.session, self));
        metrics::histogram!("wrapd_hsm_call_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => Outcome::Healthy,
            Err(err) => outcome_of(err),
        };
        if let Err(err) = &result {
            // A bad ciphertext is the caller's error, not the HSM's.
            if err.kind() != crate::error::ErrorKind::InvalidCiphertext {
                let kind = match outcome {
                    Outcome::DeviceFault => "device",
                    Outcome::SessionBroken => "session",
                    Outcome::Healthy => "call",
                };
                metrics::counter!("wrapd_hsm_errors_total", "kind" => kind).increment(1);
            }
        }
        if outcome == Outcome::DeviceFault {
            self.clear_handles();
        }
        self.inner.pool.checkin(loan, outcome);
        slot.returned();
        result
    }

    /// The handle of `object`, from the cache or one `C_FindObjects`.
    fn handle(&self, session: &Session, object: &ObjectId) -> Result<ObjectHandle> {
        if let Some(handle) = self.cached(object) {
            return Ok(handle);
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(object.cka_id()),
        ];
        let found = session.find_objects(&template).map_err(p11_error)?;
        match found.as_slice() {
            [handle] => {
                self.inner.handles.lock().insert(object.clone(), *handle);
                Ok(*handle)
            }
            [] => {
                // The metadata says this object exists. Either it was lost, or the library's
                // view of the token is stale (SoftHSM does not see a token directory that was
                // moved away and back). A fresh context answers which, so retire this one,
                // at most every MISSING_RESET_INTERVAL so that a really lost key cannot make
                // every other call pay for re-initialization.
                // On CloudHSM the call may have gone to an HSM the object has not reached
                // yet: the caller waits it out first (`with_session`).
                if self.inner.config.reset_on_missing_object
                    && self.profile() != HsmProfile::Cloudhsm
                {
                    self.reset_for_missing(object);
                }
                Err(Error::Unavailable(format!(
                    "{MISSING_OBJECT} {object}: key material is missing (see the daemon log)"
                )))
            }
            _ => Err(Error::Internal(format!(
                "the token has {} objects for {object}",
                found.len()
            ))),
        }
    }

    fn reset_for_missing(&self, object: &dyn std::fmt::Display) {
        let mut last = self.inner.last_missing_reset.lock();
        if last.is_none_or(|at| at.elapsed() >= MISSING_RESET_INTERVAL) {
            *last = Some(Instant::now());
            tracing::error!(object = %object, "key object not found in the token; re-initializing the PKCS#11 context");
            self.clear_handles();
            self.inner.pool.retire_context();
        }
    }

    fn cached(&self, object: &ObjectId) -> Option<ObjectHandle> {
        self.inner.handles.lock().get(object).copied()
    }

    fn forget(&self, object: &ObjectId) {
        self.inner.handles.lock().remove(object);
    }

    /// Runs `op` with the object's handle; on a stale handle, looks it up again once.
    fn with_handle<T>(
        &self,
        session: &Session,
        object: &ObjectId,
        op: impl Fn(ObjectHandle) -> Result<T>,
    ) -> Result<T> {
        let handle = self.handle(session, object)?;
        match op(handle) {
            Err(err) if is_stale_handle(&err) => {
                self.forget(object);
                op(self.handle(session, object)?)
            }
            other => other,
        }
    }

    fn seal(
        &self,
        session: &Session,
        object: &ObjectId,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Sealed> {
        if self.profile() == HsmProfile::Cloudhsm
            && plaintext.len() + aad.len() + TAG_LEN > CLOUDHSM_MAX_GCM_BYTES
        {
            return Err(Error::invalid(
                "request too large for a CloudHSM GCM operation",
            ));
        }
        self.with_handle(session, object, |handle| {
            let mut iv = [0u8; IV_LEN];
            if self.profile() == HsmProfile::Softhsm {
                session.generate_random_slice(&mut iv).map_err(p11_error)?;
            }
            // On CloudHSM the HSM writes the IV it chose into `iv` (zeroes going in).
            let params =
                GcmParams::new(&mut iv, aad, Ulong::from(TAG_LEN as u64 * 8)).map_err(p11_error)?;
            let ciphertext = self
                .inner
                .single_call
                .encrypt(
                    session,
                    &Mechanism::AesGcm(params),
                    handle,
                    plaintext,
                    plaintext.len() + TAG_LEN,
                )
                .map_err(p11_error)?;
            if ciphertext.len() != plaintext.len() + TAG_LEN {
                return Err(Error::Internal(format!(
                    "C_Encrypt returned {} bytes for {} bytes of plaintext",
                    ciphertext.len(),
                    plaintext.len()
                )));
            }
            if iv == [0u8; IV_LEN] {
                return Err(Error::Internal(
                    "the HSM returned an all-zero GCM IV; check the hsm.profile setting".into(),
                ));
            }
            Ok(Sealed { iv, ciphertext })
        })
    }
}

impl Token for Pkcs11Token {
    fn generate_key(&self, object: &ObjectId) -> Result<()> {
        let mut template = master_key_attributes(object);
        template.push(Attribute::ValueLen(32.into()));
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            let handle = session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(p11_error)?;
            self.inner.handles.lock().insert(object.clone(), handle);
            Ok(())
        })
    }

    fn encrypt(&self, object: &ObjectId, plaintext: &[u8], aad: &[u8]) -> Result<Sealed> {
        let _shared = self.shared();
        self.with_session(true, |session, this| {
            this.seal(session, object, plaintext, aad)
        })
    }

    fn generate_and_encrypt(
        &self,
        object: &ObjectId,
        len: usize,
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, Sealed)> {
        let _shared = self.shared();
        self.with_session(true, |session, this| {
            let plaintext = match &this.inner.random_reserve {
                Some(reserve) => reserve.take(session, len)?,
                None => {
                    let mut plaintext = Zeroizing::new(vec![0u8; len]);
                    session
                        .generate_random_slice(&mut plaintext)
                        .map_err(p11_error)?;
                    plaintext
                }
            };
            let sealed = this.seal(session, object, &plaintext, aad)?;
            Ok((plaintext, sealed))
        })
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        let _shared = self.shared();
        self.with_session(true, |session, _| {
            let mut bytes = Zeroizing::new(vec![0u8; len]);
            session
                .generate_random_slice(&mut bytes)
                .map_err(p11_error)?;
            Ok(bytes)
        })
    }

    fn decrypt(
        &self,
        object: &ObjectId,
        iv: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let _shared = self.shared();
        self.with_session(true, |session, this| {
            this.with_handle(session, object, |handle| {
                let mut iv = iv.to_vec();
                let params = GcmParams::new(&mut iv, aad, Ulong::from(TAG_LEN as u64 * 8))
                    .map_err(p11_error)?;
                let decrypted = this.inner.single_call.decrypt(
                    session,
                    &Mechanism::AesGcm(params),
                    handle,
                    ciphertext,
                    ciphertext.len(),
                );
                match decrypted {
                    Ok(plaintext) => Ok(plaintext),
                    Err(CkError::Pkcs11(rv, Function::Decrypt))
                        if this.is_bad_ciphertext(rv) && session.get_session_info().is_ok() =>
                    {
                        // SoftHSM reports a tag mismatch as CKR_GENERAL_ERROR. The session
                        // still answers, so this is a bad ciphertext, not a device fault,
                        // and the session goes back to the pool. Only C_Decrypt has seen the
                        // ciphertext: a failed C_DecryptInit says nothing about it.
                        Err(Error::InvalidCiphertext)
                    }
                    Err(err) => Err(p11_error(err)),
                }
            })
        })
    }

    fn contains(&self, object: &ObjectId) -> Result<bool> {
        let _shared = self.shared();
        self.with_session(true, |session, _| {
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Id(object.cka_id()),
            ];
            Ok(!session
                .find_objects(&template)
                .map_err(p11_error)?
                .is_empty())
        })
    }

    fn destroy_key(&self, object: &ObjectId) -> Result<()> {
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            destroy_all(session, ObjectClass::SECRET_KEY, object.cka_id())?;
            self.forget(object);
            Ok(())
        })
    }

    fn list_keys(&self) -> Result<Vec<ObjectId>> {
        let _shared = self.shared();
        self.with_session(true, |session, _| {
            let mut objects: Vec<ObjectId> = ids_of_class(session, ObjectClass::SECRET_KEY)?
                .iter()
                .filter_map(|id| ObjectId::from_cka_id(id))
                .collect();
            objects.sort();
            Ok(objects)
        })
    }

    fn ping(&self) -> Result<()> {
        let _shared = self.shared();
        self.with_session(false, |session, _| {
            session.get_session_info().map(|_| ()).map_err(p11_error)
        })
    }

    fn create_wrapping_key(&self, id: &WrappingKeyId) -> Result<Vec<u8>> {
        let public_template = [
            Attribute::Token(false),
            Attribute::ModulusBits(Ulong::from(u64::from(id.bits))),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Encrypt(true),
            Attribute::Wrap(false),
            Attribute::Verify(false),
        ];
        // The slow part (prime generation, seconds for 4096 bits) must not hold the object
        // store exclusively: that would stall every encrypt and decrypt. On SoftHSM the pair
        // is made as session objects (which leave its file store alone) while other calls
        // go on, and only the finished private key is copied into a token object under the
        // exclusive lock (a quick file write). CloudHSM has no local object store to guard:
        // the private key is a token object at once.
        let on_token_now = self.profile() == HsmProfile::Cloudhsm;
        let private_template = [
            Attribute::Token(on_token_now),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Unwrap(true),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Derive(false),
            Attribute::Id(id.to_bytes()),
            Attribute::Label(format!("wrapd import {}", id.key_id).into_bytes()),
        ];
        let generated = {
            let _shared = self.shared();
            self.with_session(false, |session, _| {
                generate_wrapping_pair(session, id, &public_template, &private_template)
            })?
        };
        let (private, der) = generated;
        if on_token_now {
            return Ok(der);
        }
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            let copied = session.copy_object(private, &[Attribute::Token(true)]);
            if let Err(err) = session.destroy_object(private) {
                tracing::warn!(error = %p11_error(err), wrapping_key = %id, "could not destroy the session copy of a wrapping key");
            }
            copied.map_err(p11_error)?;
            Ok(der.clone())
        })
    }

    fn import_key(
        &self,
        id: &WrappingKeyId,
        wrapped: &[u8],
        into: Option<&ObjectId>,
    ) -> Result<KeyCheckValue> {
        let measurable = into.is_none() && self.profile() == HsmProfile::Softhsm;
        // The check object. On SoftHSM (which reports no CKA_VALUE_LEN for unwrapped keys)
        // it is extractable, only ever wrapped under a session key that never leaves the
        // token, so that its length can be measured (see `material_len`); on other HSMs it
        // is never extractable and the library's CKA_VALUE_LEN is used.
        let template = match into {
            Some(object) => master_key_attributes(object),
            None => session_aes_key(SessionKeyUse::Check {
                extractable: measurable,
            }),
        };
        // Only a token object changes the object store; a check makes a session object.
        let _exclusive = into.map(|_| self.exclusive());
        let _shared = into.is_none().then(|| self.shared());
        self.with_session(false, |session, _| {
            let handle = self.unwrap_material(session, id, wrapped, &template)?;
            // The kept object comes from the same bytes as the check object, whose length
            // was measured.
            let checked = Self::check_imported(session, handle, measurable);
            let keep = into.is_some() && checked.is_ok();
            if keep {
                if let Some(object) = into {
                    self.inner.handles.lock().insert(object.clone(), handle);
                }
            } else if let Err(err) = session.destroy_object(handle) {
                tracing::warn!(error = %p11_error(err), "could not destroy an unwrapped key that is not kept");
            }
            checked
        })
    }

    fn key_check_value(&self, object: &ObjectId) -> Result<KeyCheckValue> {
        let _shared = self.shared();
        self.with_session(true, |session, this| {
            this.with_handle(session, object, |handle| {
                Self::check_value_of(session, handle)
            })
        })
    }

    fn wrapping_keys(&self) -> Result<Vec<WrappingKeyId>> {
        let _shared = self.shared();
        self.with_session(true, |session, _| {
            Ok(ids_of_class(session, ObjectClass::PRIVATE_KEY)?
                .iter()
                .filter_map(|id| WrappingKeyId::parse(id))
                .collect())
        })
    }

    fn destroy_wrapping_key(&self, id: &WrappingKeyId) -> Result<()> {
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            destroy_all(session, ObjectClass::PRIVATE_KEY, id.to_bytes())
        })
    }

    fn wrap_marks(&self, object: &ObjectId) -> Result<Vec<u64>> {
        let _shared = self.shared();
        self.with_session(true, |session, _| {
            let ids = ids_matching(
                session,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(super::wrap_mark_label(object)),
                ],
            )?;
            Ok(ids
                .iter()
                .filter_map(|id| super::parse_wrap_mark(object, id))
                .collect())
        })
    }

    fn record_wrap_mark(&self, object: &ObjectId, reserved: u64) -> Result<()> {
        let template = record_attributes(
            super::wrap_mark_id(object, reserved),
            super::wrap_mark_label(object),
        );
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map(drop)
                .map_err(p11_error)
        })
    }

    fn destroy_wrap_mark(&self, object: &ObjectId, reserved: u64) -> Result<()> {
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            destroy_all(
                session,
                ObjectClass::SECRET_KEY,
                super::wrap_mark_id(object, reserved),
            )
        })
    }

    fn create_ticket(&self, ticket: &Ticket) -> Result<()> {
        let template = record_attributes(ticket.to_bytes(), Ticket::LABEL.to_vec());
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            let found = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Id(ticket.to_bytes()),
                ])
                .map_err(p11_error)?;
            if found.is_empty() {
                session
                    .generate_key(&Mechanism::AesKeyGen, &template)
                    .map_err(p11_error)?;
            }
            // Two daemons recording one ticket at once make two copies: harmless, both go
            // together.
            Ok(())
        })
    }

    fn tickets(&self) -> Result<Vec<Ticket>> {
        let _shared = self.shared();
        self.with_session(true, |session, _| {
            let ids = ids_matching(
                session,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(Ticket::LABEL.to_vec()),
                ],
            )?;
            let tickets: std::collections::BTreeSet<Ticket> =
                ids.iter().filter_map(|id| Ticket::parse(id)).collect();
            Ok(tickets.into_iter().collect())
        })
    }

    fn has_ticket(&self, ticket: &Ticket) -> Result<bool> {
        let _shared = self.shared();
        self.with_session(true, |session, _| {
            let found = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Id(ticket.to_bytes()),
                ])
                .map_err(p11_error)?;
            Ok(!found.is_empty())
        })
    }

    fn destroy_ticket(&self, ticket: &Ticket) -> Result<()> {
        let _exclusive = self.exclusive();
        self.with_session(false, |session, _| {
            destroy_all(session, ObjectClass::SECRET_KEY, ticket.to_bytes())
        })
    }
}
