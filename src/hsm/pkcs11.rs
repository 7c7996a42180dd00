//! [`Token`] on `cryptoki`: the one module that talks PKCS#11.
//!
//! Every cryptoki error becomes an [`Error`] in [`p11_error`], which keeps the PKCS#11
//! function and return value for the log and decides whether the fault is the device's.
//! Object handles are cached per context (no `C_FindObjects` per request); a stale handle is
//! looked up again once.

use std::collections::HashMap;
#[cfg(feature = "fault-injection")]
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
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
const MISSING_RESET_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// CloudHSM refuses single-part GCM buffers above 16 KB.
const CLOUDHSM_MAX_GCM_BYTES: usize = 16 * 1024;

/// A PKCS#11 token behind a bounded session pool. Cheap to clone.
#[derive(Clone)]
pub struct Pkcs11Token {
    inner: Arc<Inner>,
}

struct Inner {
    config: HsmConfig,
    pool: Pool,
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
        | RvError::FunctionFailed
        | RvError::HostMemory
        | RvError::SessionCount
        | RvError::SlotIdInvalid => Pkcs11Fault::Device,
        RvError::SessionHandleInvalid | RvError::SessionClosed | RvError::UserNotLoggedIn => {
            Pkcs11Fault::Session
        }
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
        let token = Self {
            inner: Arc::new(Inner {
                pool: Pool::new(config.max_sessions),
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

    /// Queues faults for the coming calls, one per call (fault tests).
    #[cfg(feature = "fault-injection")]
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut faults = self.inner.faults.lock();
        faults.extend(std::iter::repeat_n(fault, times));
    }

    /// How many PKCS#11 contexts have been initialized (re-initializations show here).
    pub fn contexts_initialized(&self) -> u64 {
        self.inner.contexts.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pooled session. With `retry`, a call that failed because its session or
    /// the device failed runs once more on a fresh session (after re-initialization for a
    /// device fault); only idempotent calls may retry.
    fn with_session<T>(&self, retry: bool, f: impl Fn(&Session, &Self) -> Result<T>) -> Result<T> {
        match self.attempt(&f) {
            Err(err) if retry && outcome_of(&err) != Outcome::Healthy => {
                tracing::warn!(error = %err, "PKCS#11 call failed; retrying once on a fresh session");
                self.attempt(&f)
            }
            other => other,
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
        result
    }

    /// Runs one PKCS#11 call, or the fault queued for it.
    #[cfg(feature = "fault-injection")]
    fn call_with_faults<T>(&self, call: impl FnOnce() -> Result<T>) -> Result<T> {
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
    fn call_with_faults<T>(&self, call: impl FnOnce() -> Result<T>) -> Result<T> {
        call()
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
                if self.inner.config.reset_on_missing_object {
                    self.reset_for_missing(object);
                }
                Err(Error::Unavailable(format!(
                    "the token has no object for {object}: key material is missing (see the daemon log)"
                )))
            }
            _ => Err(Error::Internal(format!(
                "the token has {} objects for {object}",
                found.len()
            ))),
        }
    }

    fn reset_for_missing(&self, object: &ObjectId) {
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
            let ciphertext = session
                .encrypt(&Mechanism::AesGcm(params), handle, plaintext)
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

/// The attributes of every master key object (generated or imported): token, private,
/// sensitive, never extractable, encrypt/decrypt only.
fn master_key_attributes(object: &ObjectId) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Id(object.cka_id()),
        Attribute::Label(format!("wrapd {object}").into_bytes()),
    ]
}

/// What an AES session key made during an import is for.
#[derive(Clone, Copy)]
enum SessionKeyUse {
    /// The ephemeral key of `RSA_AES_KEY_WRAP_*`, and the wrapping key's unwrap probe.
    Unwrap,
    /// The key that wraps a check object to measure its length (`material_len`).
    Wrap,
    /// The check object of an import: encrypt only (its check value); extractable only to
    /// be measured.
    Check { extractable: bool },
}

/// The template of an AES session key: private, sensitive, and only the one use.
fn session_aes_key(usage: SessionKeyUse) -> Vec<Attribute> {
    let (encrypt, wrap, unwrap, extractable) = match usage {
        SessionKeyUse::Unwrap => (false, false, true, false),
        SessionKeyUse::Wrap => (false, true, false, false),
        SessionKeyUse::Check { extractable } => (true, false, false, extractable),
    };
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Encrypt(encrypt),
        Attribute::Decrypt(false),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(unwrap),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

/// The RSA-OAEP mechanism of an import algorithm (MGF1 over the same hash, no label).
fn oaep(algorithm: ImportAlgorithm) -> Mechanism<'static> {
    let (hash, mgf) = if algorithm.sha256() {
        (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)
    } else {
        (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1)
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()))
}

/// The token refused the mechanism or its parameters: it cannot do this algorithm.
fn is_unsupported_mechanism(err: &CkError) -> bool {
    matches!(
        err,
        CkError::Pkcs11(
            RvError::MechanismInvalid | RvError::MechanismParamInvalid | RvError::ArgumentsBad,
            _
        )
    )
}

/// The error of a probe call of `GetParametersForImport`: the token lacking the algorithm is
/// [`Error::Unsupported`], anything else a PKCS#11 error.
fn probe_error(algorithm: ImportAlgorithm) -> impl Fn(CkError) -> Error {
    move |err| {
        if is_unsupported_mechanism(&err) {
            unsupported(algorithm)
        } else {
            p11_error(err)
        }
    }
}

fn unsupported(algorithm: ImportAlgorithm) -> Error {
    Error::Unsupported(format!(
        "this HSM's PKCS#11 library cannot unwrap with {} inside the token (SoftHSM 2.6 does RSA-OAEP with SHA-1 only); use {}",
        algorithm.name(),
        if algorithm.aes_key_wrap() {
            ImportAlgorithm::RsaAesKeyWrapSha1.name()
        } else {
            ImportAlgorithm::RsaesOaepSha1.name()
        }
    ))
}

/// An unwrap that failed on the wrapped bytes (not on the device): a bad ciphertext. SoftHSM
/// reports a failed OAEP decoding as `CKR_GENERAL_ERROR` or `CKR_FUNCTION_FAILED`, so those
/// count when the session still answers (as for a GCM tag mismatch).
fn unwrap_error(session: &Session, algorithm: ImportAlgorithm, err: CkError) -> Error {
    if is_unsupported_mechanism(&err) {
        return unsupported(algorithm);
    }
    match err {
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::KeySizeRange
            | RvError::DataLenRange
            | RvError::DataInvalid
            | RvError::GeneralError
            | RvError::FunctionFailed,
            _,
        ) if session.get_session_info().is_ok() => Error::InvalidCiphertext,
        other => p11_error(other),
    }
}

/// The `CKA_ID`s of every object of `class` (objects destroyed meanwhile are skipped).
fn ids_of_class(session: &Session, class: ObjectClass) -> Result<Vec<Vec<u8>>> {
    ids_matching(session, &[Attribute::Class(class)])
}

/// The `CKA_ID`s of the objects that match `template`.
fn ids_matching(session: &Session, template: &[Attribute]) -> Result<Vec<Vec<u8>>> {
    let handles = session.find_objects(template).map_err(p11_error)?;
    let mut ids = Vec::new();
    for handle in handles {
        let attributes = match session.get_attributes(handle, &[AttributeType::Id]) {
            Ok(attributes) => attributes,
            // Destroyed since C_FindObjects (by another session or process).
            Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
            Err(err) => return Err(p11_error(err)),
        };
        ids.extend(attributes.into_iter().filter_map(|a| match a {
            Attribute::Id(id) => Some(id),
            _ => None,
        }));
    }
    Ok(ids)
}

/// A record wrapd keeps in the token (a ticket, a wrap mark): an AES key no mechanism may
/// use, since every HSM keeps one (CloudHSM has no data objects), and its value never
/// matters; what it records is its `CKA_ID`, and it is found by its label.
fn record_attributes(id: Vec<u8>, label: Vec<u8>) -> [Attribute; 16] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::from(16u64)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Id(id),
        Attribute::Label(label),
    ]
}

/// Destroys every object of `class` with `CKA_ID` `id`.
fn destroy_all(session: &Session, class: ObjectClass, id: Vec<u8>) -> Result<()> {
    let template = [Attribute::Class(class), Attribute::Id(id)];
    for handle in session.find_objects(&template).map_err(p11_error)? {
        session.destroy_object(handle).map_err(p11_error)?;
    }
    Ok(())
}

impl Pkcs11Token {
    /// The handle of a wrapping key's private half; [`Error::InvalidImportToken`] if none.
    fn wrapping_key_handle(&self, session: &Session, id: &WrappingKeyId) -> Result<ObjectHandle> {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id.to_bytes()),
            ])
            .map_err(p11_error)?;
        found.first().copied().ok_or_else(|| {
            Error::InvalidImportToken(format!(
                "the import token names no wrapping key of key {} (expired and removed, or not issued by wrapd)",
                id.key_id
            ))
        })
    }

    /// Unwraps `wrapped` into a key object with `template`, the RSA-OAEP step (and for
    /// RSA_AES_KEY_WRAP_*, the RFC 5649 step under an ephemeral session key destroyed at
    /// once) inside the token.
    fn unwrap_material(
        &self,
        session: &Session,
        id: &WrappingKeyId,
        wrapped: &[u8],
        template: &[Attribute],
    ) -> Result<ObjectHandle> {
        let private = self.wrapping_key_handle(session, id)?;
        let rsa_len = (id.bits / 8) as usize;
        if !id.algorithm.aes_key_wrap() {
            if wrapped.len() != rsa_len {
                return Err(Error::InvalidCiphertext);
            }
            return session
                .unwrap_key(&oaep(id.algorithm), private, wrapped, template)
                .map_err(|err| unwrap_error(session, id.algorithm, err));
        }
        // RSA-OAEP(ephemeral AES key) || RFC 5649 wrap of the material under it.
        if wrapped.len() < rsa_len + 16 || (wrapped.len() - rsa_len) % 8 != 0 {
            return Err(Error::InvalidCiphertext);
        }
        let (encrypted_key, wrapped_material) = wrapped.split_at(rsa_len);
        let ephemeral_template = session_aes_key(SessionKeyUse::Unwrap);
        let ephemeral = session
            .unwrap_key(
                &oaep(id.algorithm),
                private,
                encrypted_key,
                &ephemeral_template,
            )
            .map_err(|err| unwrap_error(session, id.algorithm, err))?;
        let result = session
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                ephemeral,
                wrapped_material,
                template,
            )
            .map_err(|err| unwrap_error(session, id.algorithm, err));
        if let Err(err) = session.destroy_object(ephemeral) {
            tracing::warn!(error = %p11_error(err), "could not destroy an ephemeral import key (a session object: it goes with the session)");
        }
        result
    }

    /// The key check value of a key object (see [`KeyCheckValue`]).
    fn check_value_of(session: &Session, handle: ObjectHandle) -> Result<KeyCheckValue> {
        let block = session
            .encrypt(&Mechanism::AesEcb, handle, KEY_CHECK_BLOCK)
            .map_err(p11_error)?;
        block
            .try_into()
            .map_err(|_| Error::Internal("C_Encrypt (AES-ECB) returned a wrong-sized block".into()))
    }

    /// Checks an unwrapped object is an AES-256 key (with `measure`, also where the library
    /// does not report its length) and returns its check value.
    fn check_imported(
        session: &Session,
        handle: ObjectHandle,
        measure: bool,
    ) -> Result<KeyCheckValue> {
        let wrong_size = || Error::invalid("the key material must be a 256-bit (32-byte) AES key");
        match Self::material_len(session, handle, measure)? {
            Some(32) | None => {}
            Some(_) => return Err(wrong_size()),
        }
        // An AES key of another length than 16, 24 or 32 bytes fails here.
        Self::check_value_of(session, handle).map_err(|err| match err {
            Error::Pkcs11 {
                rv: RvError::KeySizeRange | RvError::KeyTypeInconsistent | RvError::GeneralError,
                ..
            } => wrong_size(),
            other => other,
        })
    }

    /// The length of an unwrapped key: `CKA_VALUE_LEN`, or where the library leaves it 0
    /// (SoftHSM 2.6 does for unwrapped keys, and refuses it in the unwrap template), with
    /// `measure`, the length of the key wrapped with RFC 5649 under a fresh session key
    /// (sensitive, never extractable, destroyed at once): 8 bytes more than the key rounded
    /// up to 8. `None` when unknown.
    fn material_len(session: &Session, handle: ObjectHandle, measure: bool) -> Result<Option<u64>> {
        let attributes = session
            .get_attributes(handle, &[AttributeType::ValueLen])
            .map_err(p11_error)?;
        let reported = attributes.iter().find_map(|a| match a {
            Attribute::ValueLen(len) => Some(u64::from(*len)),
            _ => None,
        });
        if let Some(len) = reported.filter(|len| *len > 0) {
            return Ok(Some(len));
        }
        if !measure {
            return Ok(None);
        }
        let mut kek_template = session_aes_key(SessionKeyUse::Wrap);
        kek_template.push(Attribute::ValueLen(32.into()));
        let kek = session
            .generate_key(&Mechanism::AesKeyGen, &kek_template)
            .map_err(p11_error)?;
        let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, kek, handle);
        if let Err(err) = session.destroy_object(kek) {
            tracing::warn!(error = %p11_error(err), "could not destroy a session key (it goes with the session)");
        }
        let wrapped = wrapped.map_err(p11_error)?;
        // 25..=32 bytes all wrap to 40; AES takes only 32 of them (the check value fails
        // for the others).
        Ok(Some(match wrapped.len() {
            40 => 32,
            n => n.saturating_sub(8) as u64,
        }))
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
            let mut plaintext = Zeroizing::new(vec![0u8; len]);
            session
                .generate_random_slice(&mut plaintext)
                .map_err(p11_error)?;
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
                match session.decrypt(&Mechanism::AesGcm(params), handle, ciphertext) {
                    Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
                    Err(CkError::Pkcs11(
                        RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::GeneralError
                        | RvError::FunctionFailed,
                        _,
                    )) if session.get_session_info().is_ok() => {
                        // SoftHSM reports a tag mismatch as CKR_GENERAL_ERROR. The session
                        // still answers, so this is a bad ciphertext, not a device fault,
                        // and the session goes back to the pool.
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

/// Generates a wrapping key pair on `session`, proves the token can unwrap with it, and
/// returns the private key's handle and the public key (DER). The public half is
/// always a session object, destroyed here.
fn generate_wrapping_pair(
    session: &Session,
    id: &WrappingKeyId,
    public_template: &[Attribute],
    private_template: &[Attribute],
) -> Result<(ObjectHandle, Vec<u8>)> {
    use rsa::pkcs8::EncodePublicKey;
    {
        let (public, private) = session
            .generate_key_pair(
                &Mechanism::RsaPkcsKeyPairGen,
                public_template,
                private_template,
            )
            .map_err(p11_error)?;
        let result = (|| {
            let attributes = session
                .get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(p11_error)?;
            let (mut modulus, mut exponent) = (None, None);
            for attribute in attributes {
                match attribute {
                    Attribute::Modulus(n) => modulus = Some(n),
                    Attribute::PublicExponent(e) => exponent = Some(e),
                    _ => {}
                }
            }
            let (Some(n), Some(e)) = (modulus, exponent) else {
                return Err(Error::Internal("the RSA public key has no modulus".into()));
            };
            // Prove the token can unwrap with this algorithm before anyone wraps
            // material for it: a random AES key, encrypted with the public half, unwrapped
            // with the private half into a session object, destroyed.
            let mut probe = Zeroizing::new([0u8; 32]);
            session
                .generate_random_slice(probe.as_mut_slice())
                .map_err(p11_error)?;
            let encrypted = session
                .encrypt(&oaep(id.algorithm), public, probe.as_slice())
                .map_err(probe_error(id.algorithm))?;
            let unwrapped = session
                .unwrap_key(
                    &oaep(id.algorithm),
                    private,
                    &encrypted,
                    &session_aes_key(SessionKeyUse::Unwrap),
                )
                .map_err(probe_error(id.algorithm))?;
            session.destroy_object(unwrapped).map_err(p11_error)?;
            let key = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(&n),
                rsa::BigUint::from_bytes_be(&e),
            )
            .map_err(|err| Error::Internal(format!("the token's RSA public key: {err}")))?;
            key.to_public_key_der()
                .map(|der| der.into_vec())
                .map_err(|err| Error::Internal(format!("encoding the RSA public key: {err}")))
        })();
        if let Err(err) = session.destroy_object(public) {
            tracing::warn!(error = %p11_error(err), "could not destroy the public half of a wrapping key (a session object)");
        }
        if result.is_err() {
            if let Err(err) = session.destroy_object(private) {
                tracing::warn!(error = %p11_error(err), wrapping_key = %id, "could not destroy a wrapping key that failed its check");
            }
        }
        result.map(|der| (private, der))
    }
}
