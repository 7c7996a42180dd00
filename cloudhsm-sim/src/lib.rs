//! A PKCS#11 module that behaves like an AWS CloudHSM cluster seen through the Client SDK 5
//! library, for wrapd's tests: the cryptography is SoftHSM's (the module forwards every call
//! to it), and on top of it the module does what CloudHSM does differently, where AWS
//! documents it, and what a networked cluster does to its callers.
//!
//! **CloudHSM's PKCS#11 library** (modelled):
//! - AES-GCM encryption: the HSM generates the IV. The caller passes a zeroed 12-byte IV
//!   buffer; the module refuses any other IV (`CKR_MECHANISM_PARAM_INVALID`), draws the IV
//!   from the token and writes it back into the caller's buffer. Decryption takes the IV as
//!   usual.
//! - AES-GCM is single-part (`C_EncryptUpdate`/`C_DecryptUpdate` answer
//!   `CKR_MECHANISM_INVALID`, as documented) and its `C_Encrypt`/`C_Decrypt` buffers are at
//!   most 16,224 bytes (the documented maximum; the code is not documented: the module answers
//!   `CKR_DATA_LEN_RANGE`, `CKR_ENCRYPTED_DATA_LEN_RANGE` on decryption).
//! - No read-only sessions: `C_OpenSession` without `CKF_RW_SESSION` is `CKR_FUNCTION_FAILED`,
//!   as documented.
//! - The PIN is `USER:PASSWORD` (the crypto user's name and password); the module checks the
//!   form and forwards the password. A PIN without the user is `CKR_PIN_INCORRECT` (not
//!   documented).
//! - 1,024 sessions per application (`WRAPD_SIM_MAX_SESSIONS` per HSM; `CKR_SESSION_COUNT`
//!   beyond, not documented).
//! - `C_CopyObject` and `C_SetAttributeValue`, missing from the SDK 5 API list, are
//!   `CKR_FUNCTION_NOT_SUPPORTED`.
//! - Session objects (`CKA_TOKEN` false) live on the HSM of the session that made them only.
//!
//! **Idle sessions dropped** (not from AWS's documentation: a stand-in for connections closed
//! while idle by the client library or the network on the way): with
//! `WRAPD_SIM_SESSION_IDLE_MS`, a session unused for longer is gone, and every call on it
//! answers `CKR_SESSION_HANDLE_INVALID`.
//!
//! **A cluster** (`cluster.rs`): `WRAPD_SIM_HSMS` HSMs. Every call that reaches an HSM
//! (encryption, decryption, key generation, unwrapping, destruction, random, search,
//! attributes, login) goes to the least busy HSM that is up, as the SDK balances operations
//! by each HSM's capacity (a session object's calls go to the HSM that holds it), takes one
//! of its `WRAPD_SIM_CONCURRENCY` slots and is answered `WRAPD_SIM_LATENCY_US` after it took
//! it (the round trip, SoftHSM's work done within it as an HSM's own work is within a real
//! one, waited out without the kernel's default timer slack); a call that finds the HSM busy
//! waits up to `WRAPD_SIM_QUEUE_MS`, then is answered as throttled (`CKR_FUNCTION_FAILED`:
//! "busy errors map to CKR_FUNCTION_FAILED"; the wait stands for the client's own retries
//! with backoff). An object made on one HSM is not visible on the others for `WRAPD_SIM_REPLICATION_MS` (a search routed there does not find
//! it, and a call using it that is routed there fails with `CKR_OBJECT_HANDLE_INVALID`: "if
//! the call you make routes to a HSM without the key, then the call fails"). The file
//! `WRAPD_SIM_CONTROL` takes one HSM down (`down N`: calls in flight on it fail with
//! `CKR_DEVICE_ERROR`, after the HSM did their work, as an answer lost on the way back;
//! later calls go to the others), slows it (`slow N MICROSECONDS`) or
//! makes it throttle (`throttle N`); it is re-read when it changes.
//!
//! **Not modelled**: the HSM's own key limits and attribute rules beyond SoftHSM's, CloudHSM's
//! mechanisms that SoftHSM lacks, the client's own retries, key availability checks, audit
//! logs, and anything about the network but its delay.
//!
//! The module to forward to is `WRAPD_SIM_LOWER` (default: SoftHSM's usual install paths).

#![allow(non_snake_case, clippy::missing_safety_doc)]

mod cluster;

use std::sync::OnceLock;

use cryptoki_sys::*;

use cluster::{Cluster, Settings};

/// The return codes the module answers with (CloudHSM's, where it documents them).
pub mod codes {
    use cryptoki_sys::{CK_RV, CKR_DEVICE_ERROR, CKR_FUNCTION_FAILED, CKR_SESSION_COUNT};

    /// An HSM too busy to take the call within the queue time (CloudHSM: "busy errors map
    /// to CKR_FUNCTION_FAILED").
    pub const THROTTLED: CK_RV = CKR_FUNCTION_FAILED;
    /// The session's HSM is down, or no HSM is up.
    pub const HSM_UNREACHABLE: CK_RV = CKR_DEVICE_ERROR;
    /// The HSM has as many sessions as it takes.
    pub const SESSION_LIMIT: CK_RV = CKR_SESSION_COUNT;
}

/// The largest AES-GCM buffer CloudHSM takes (its PKCS#11 mechanisms page).
pub const MAX_GCM_BYTES: usize = 16_224;
const GCM_IV_LEN: usize = 12;

/// An encryption or decryption under way in a session.
#[derive(Clone, Copy)]
struct Operation {
    key: CK_OBJECT_HANDLE,
    gcm: bool,
    encrypting: bool,
}

struct Sim {
    lower: &'static CK_FUNCTION_LIST,
    cluster: Cluster,
    operations: std::sync::Mutex<std::collections::HashMap<CK_SESSION_HANDLE, Operation>>,
    /// The HSM each session's search was routed to.
    searches: std::sync::Mutex<std::collections::HashMap<CK_SESSION_HANDLE, usize>>,
    /// When each open session was last used (`WRAPD_SIM_SESSION_IDLE_MS`).
    last_used: std::sync::Mutex<std::collections::HashMap<CK_SESSION_HANDLE, std::time::Instant>>,
}

impl Sim {
    /// Counts a call on `session` as its use; false if the session sat idle longer than
    /// the idle limit, and was dropped.
    fn use_session(&self, session: CK_SESSION_HANDLE) -> bool {
        let Some(limit) = self.cluster.settings().session_idle else {
            return true;
        };
        let mut last_used = lock(&self.last_used);
        let now = std::time::Instant::now();
        match last_used.get_mut(&session) {
            Some(at) if now.duration_since(*at) > limit => {
                last_used.remove(&session);
                false
            }
            Some(at) => {
                *at = now;
                true
            }
            // Dropped before, or not opened through this module.
            None => false,
        }
    }
}

static SIM: OnceLock<Option<Sim>> = OnceLock::new();
static LIST: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();

const LOWER_PATHS: [&str; 3] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

fn load() -> Option<Sim> {
    let path = std::env::var_os("WRAPD_SIM_LOWER")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            LOWER_PATHS
                .iter()
                .map(std::path::PathBuf::from)
                .find(|p| p.exists())
        })?;
    // The library stays loaded for the life of the process (PKCS#11 modules are never
    // unloaded while a caller may hold a function pointer).
    let library = unsafe { libloading::Library::new(&path) }.ok()?;
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    let get: libloading::Symbol<'_, unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV> =
        unsafe { library.get(b"C_GetFunctionList\0") }.ok()?;
    let mut list: CK_FUNCTION_LIST_PTR = std::ptr::null_mut();
    if unsafe { get(&mut list) } != CKR_OK || list.is_null() {
        return None;
    }
    Some(Sim {
        lower: unsafe { &*list },
        cluster: Cluster::new(Settings::from_env()),
        operations: std::sync::Mutex::new(std::collections::HashMap::new()),
        searches: std::sync::Mutex::new(std::collections::HashMap::new()),
        last_used: std::sync::Mutex::new(std::collections::HashMap::new()),
    })
}

fn sim() -> Option<&'static Sim> {
    SIM.get_or_init(load).as_ref()
}

/// Calls the lower module's `$name` (`CKR_FUNCTION_NOT_SUPPORTED` if it has none).
macro_rules! lower {
    ($sim:expr, $name:ident ( $($arg:expr),* $(,)? )) => {
        match $sim.lower.$name {
            Some(f) => unsafe { f($($arg),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}

/// The simulator, or `CKR_GENERAL_ERROR` from the calling function if it could not load.
macro_rules! sim_or_fail {
    () => {
        match sim() {
            Some(sim) => sim,
            None => return CKR_GENERAL_ERROR,
        }
    };
}

/// Refuses a call on a session the client library has dropped for being idle (`return`s
/// `CKR_SESSION_HANDLE_INVALID` from the calling function); counts the call as the
/// session's use otherwise.
macro_rules! live_session {
    ($sim:expr, $session:expr) => {
        if !$sim.use_session($session) {
            return CKR_SESSION_HANDLE_INVALID;
        }
    };
}

/// Sends the call to an HSM (`return`s the refusal), holding a slot until the end of the
/// calling function; with an object, to one that holds it. The caller ends with
/// [`cluster::Serving::answer`].
macro_rules! serve {
    ($sim:expr) => {
        match $sim.cluster.serve(None) {
            Ok(serving) => serving,
            Err(rv) => return rv,
        }
    };
    ($sim:expr, $object:expr) => {
        match $sim.cluster.serve(Some($object)) {
            Ok(serving) => serving,
            Err(rv) => return rv,
        }
    };
}

/// Whether a template makes a token object (`CKA_TOKEN` true; false when absent, the
/// PKCS#11 default).
unsafe fn is_token(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> bool {
    if template.is_null() {
        return false;
    }
    let attributes = unsafe { std::slice::from_raw_parts(template, count as usize) };
    attributes.iter().any(|a| {
        a.type_ == CKA_TOKEN
            && !a.pValue.is_null()
            && a.ulValueLen as usize == std::mem::size_of::<CK_BBOOL>()
            && unsafe { *(a.pValue as *const CK_BBOOL) } != 0
    })
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The module's entry point: SoftHSM's function list with the calls the simulation changes
/// replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let sim = sim_or_fail!();
    let ours = LIST.get_or_init(|| {
        let mut l = *sim.lower;
        l.C_GetFunctionList = Some(C_GetFunctionList);
        l.C_Finalize = Some(finalize);
        l.C_OpenSession = Some(open_session);
        l.C_CloseSession = Some(close_session);
        l.C_CloseAllSessions = Some(close_all_sessions);
        l.C_Login = Some(login);
        l.C_EncryptInit = Some(encrypt_init);
        l.C_Encrypt = Some(encrypt);
        l.C_EncryptUpdate = Some(encrypt_update);
        l.C_DecryptInit = Some(decrypt_init);
        l.C_Decrypt = Some(decrypt);
        l.C_DecryptUpdate = Some(decrypt_update);
        l.C_GenerateKey = Some(generate_key);
        l.C_GenerateKeyPair = Some(generate_key_pair);
        l.C_CreateObject = Some(create_object);
        l.C_CopyObject = Some(copy_object);
        l.C_SetAttributeValue = Some(set_attribute_value);
        l.C_UnwrapKey = Some(unwrap_key);
        l.C_WrapKey = Some(wrap_key);
        l.C_DestroyObject = Some(destroy_object);
        l.C_GetAttributeValue = Some(get_attribute_value);
        l.C_FindObjectsInit = Some(find_objects_init);
        l.C_FindObjects = Some(find_objects);
        l.C_GenerateRandom = Some(generate_random);
        l
    });
    unsafe { *list = ours as *const CK_FUNCTION_LIST as CK_FUNCTION_LIST_PTR };
    CKR_OK
}

unsafe extern "C" fn finalize(reserved: CK_VOID_PTR) -> CK_RV {
    let sim = sim_or_fail!();
    sim.cluster.close_all();
    lock(&sim.operations).clear();
    lock(&sim.searches).clear();
    lock(&sim.last_used).clear();
    lower!(sim, C_Finalize(reserved))
}

unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    application: CK_VOID_PTR,
    notify: CK_NOTIFY,
    session: CK_SESSION_HANDLE_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    if flags & CKF_RW_SESSION == 0 {
        return CKR_FUNCTION_FAILED;
    }
    if session.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    if let Err(refused) = sim.cluster.open_session() {
        return refused;
    }
    let rv = lower!(
        sim,
        C_OpenSession(slot, flags, application, notify, session)
    );
    if rv == CKR_OK {
        lock(&sim.last_used).insert(unsafe { *session }, std::time::Instant::now());
    } else {
        sim.cluster.close_session();
    }
    rv
}

unsafe extern "C" fn close_session(session: CK_SESSION_HANDLE) -> CK_RV {
    let sim = sim_or_fail!();
    lock(&sim.operations).remove(&session);
    lock(&sim.searches).remove(&session);
    lock(&sim.last_used).remove(&session);
    let rv = lower!(sim, C_CloseSession(session));
    if rv == CKR_OK {
        sim.cluster.close_session();
    }
    rv
}

unsafe extern "C" fn close_all_sessions(slot: CK_SLOT_ID) -> CK_RV {
    let sim = sim_or_fail!();
    sim.cluster.close_all();
    lock(&sim.operations).clear();
    lock(&sim.searches).clear();
    lock(&sim.last_used).clear();
    lower!(sim, C_CloseAllSessions(slot))
}

unsafe extern "C" fn login(
    session: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: CK_UTF8CHAR_PTR,
    len: CK_ULONG,
) -> CK_RV {
    let sim = sim_or_fail!();
    if pin.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let serving = serve!(sim);
    let bytes = unsafe { std::slice::from_raw_parts(pin, len as usize) };
    // USER:PASSWORD; the user must be named.
    let Some(colon) = bytes.iter().position(|b| *b == b':').filter(|i| *i > 0) else {
        return serving.answer(CKR_PIN_INCORRECT);
    };
    let password = &bytes[colon + 1..];
    serving.answer(lower!(
        sim,
        C_Login(
            session,
            user,
            password.as_ptr() as CK_UTF8CHAR_PTR,
            password.len() as CK_ULONG
        )
    ))
}

/// The GCM parameters of `mechanism`, if it is AES-GCM.
unsafe fn gcm_params(mechanism: CK_MECHANISM_PTR) -> Result<Option<*mut CK_GCM_PARAMS>, CK_RV> {
    if mechanism.is_null() {
        return Ok(None);
    }
    let mechanism = unsafe { &*mechanism };
    if mechanism.mechanism != CKM_AES_GCM {
        return Ok(None);
    }
    if mechanism.pParameter.is_null()
        || mechanism.ulParameterLen as usize != std::mem::size_of::<CK_GCM_PARAMS>()
    {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    Ok(Some(mechanism.pParameter as *mut CK_GCM_PARAMS))
}

unsafe extern "C" fn encrypt_init(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let params = match unsafe { gcm_params(mechanism) } {
        Ok(params) => params,
        Err(rv) => return rv,
    };
    if let Some(params) = params {
        let params = unsafe { &mut *params };
        if params.pIv.is_null() || params.ulIvLen as usize != GCM_IV_LEN {
            return CKR_MECHANISM_PARAM_INVALID;
        }
        let iv = unsafe { std::slice::from_raw_parts_mut(params.pIv, GCM_IV_LEN) };
        // The HSM chooses the IV: a caller's own is refused.
        if iv.iter().any(|b| *b != 0) {
            return CKR_MECHANISM_PARAM_INVALID;
        }
        let rv = lower!(
            sim,
            C_GenerateRandom(session, iv.as_mut_ptr(), GCM_IV_LEN as CK_ULONG)
        );
        if rv != CKR_OK {
            return rv;
        }
    }
    let rv = lower!(sim, C_EncryptInit(session, mechanism, key));
    if rv == CKR_OK {
        let operation = Operation {
            key,
            gcm: params.is_some(),
            encrypting: true,
        };
        lock(&sim.operations).insert(session, operation);
    }
    rv
}

/// Ends the lower module's operation of `session` after the module refused the call (a
/// refused call ends the operation, as in PKCS#11).
fn finish(sim: &Sim, session: CK_SESSION_HANDLE) {
    let Some(operation) = lock(&sim.operations).remove(&session) else {
        return;
    };
    let mut out = [0u8; 64];
    let mut len: CK_ULONG = out.len() as CK_ULONG;
    let mut nothing = [0u8; 16];
    if operation.encrypting {
        lower!(
            sim,
            C_Encrypt(session, nothing.as_mut_ptr(), 0, out.as_mut_ptr(), &mut len)
        );
    } else {
        // Too short to be a tag: the lower module ends the operation with an error.
        lower!(
            sim,
            C_Decrypt(session, nothing.as_mut_ptr(), 1, out.as_mut_ptr(), &mut len)
        );
    }
}

/// A single-part `C_Encrypt` or `C_Decrypt` (`call`): a GCM buffer over the limit is
/// refused with `too_long`, and the call goes to an HSM holding the operation's key. A
/// refused call ends the operation, as in PKCS#11; so does any answer but a size query or a
/// buffer too small.
fn single_part(
    sim: &Sim,
    session: CK_SESSION_HANDLE,
    len: CK_ULONG,
    out: CK_BYTE_PTR,
    too_long: CK_RV,
    call: impl FnOnce() -> CK_RV,
) -> CK_RV {
    let Some(operation) = lock(&sim.operations).get(&session).copied() else {
        return call();
    };
    if operation.gcm && len as usize > MAX_GCM_BYTES {
        finish(sim, session);
        return too_long;
    }
    let serving = match sim.cluster.serve(Some(operation.key)) {
        Ok(serving) => serving,
        Err(refused) => {
            finish(sim, session);
            return refused;
        }
    };
    let rv = call();
    let answered = serving.answer(rv);
    if answered != rv {
        // The answer was lost with its HSM: the operation is over whatever it was.
        finish(sim, session);
        return answered;
    }
    if !out.is_null() && rv != CKR_BUFFER_TOO_SMALL {
        lock(&sim.operations).remove(&session);
    }
    rv
}

/// A multi-part `C_EncryptUpdate` or `C_DecryptUpdate` (`call`): refused for GCM, which
/// CloudHSM does single-part only.
fn multi_part(sim: &Sim, session: CK_SESSION_HANDLE, call: impl FnOnce() -> CK_RV) -> CK_RV {
    if lock(&sim.operations).get(&session).is_some_and(|o| o.gcm) {
        return CKR_MECHANISM_INVALID;
    }
    let serving = serve!(sim);
    serving.answer(call())
}

unsafe extern "C" fn encrypt(
    session: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    single_part(sim, session, len, out, CKR_DATA_LEN_RANGE, || {
        lower!(sim, C_Encrypt(session, data, len, out, out_len))
    })
}

unsafe extern "C" fn encrypt_update(
    session: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    multi_part(sim, session, || {
        lower!(sim, C_EncryptUpdate(session, data, len, out, out_len))
    })
}

unsafe extern "C" fn decrypt_init(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let gcm = match unsafe { gcm_params(mechanism) } {
        Ok(params) => params.is_some(),
        Err(rv) => return rv,
    };
    let rv = lower!(sim, C_DecryptInit(session, mechanism, key));
    if rv == CKR_OK {
        let operation = Operation {
            key,
            gcm,
            encrypting: false,
        };
        lock(&sim.operations).insert(session, operation);
    }
    rv
}

unsafe extern "C" fn decrypt(
    session: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    single_part(sim, session, len, out, CKR_ENCRYPTED_DATA_LEN_RANGE, || {
        lower!(sim, C_Decrypt(session, data, len, out, out_len))
    })
}

unsafe extern "C" fn decrypt_update(
    session: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    multi_part(sim, session, || {
        lower!(sim, C_DecryptUpdate(session, data, len, out, out_len))
    })
}

unsafe extern "C" fn generate_key(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    key: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let serving = serve!(sim);
    let rv = lower!(sim, C_GenerateKey(session, mechanism, template, count, key));
    if rv == CKR_OK && !key.is_null() {
        let token = unsafe { is_token(template, count) };
        sim.cluster.made(serving.hsm, unsafe { *key }, token);
    }
    serving.answer(rv)
}

unsafe extern "C" fn generate_key_pair(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    public_template: CK_ATTRIBUTE_PTR,
    public_count: CK_ULONG,
    private_template: CK_ATTRIBUTE_PTR,
    private_count: CK_ULONG,
    public: CK_OBJECT_HANDLE_PTR,
    private: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let serving = serve!(sim);
    let rv = lower!(
        sim,
        C_GenerateKeyPair(
            session,
            mechanism,
            public_template,
            public_count,
            private_template,
            private_count,
            public,
            private
        )
    );
    if rv == CKR_OK && !public.is_null() && !private.is_null() {
        let public_token = unsafe { is_token(public_template, public_count) };
        let private_token = unsafe { is_token(private_template, private_count) };
        sim.cluster
            .made(serving.hsm, unsafe { *public }, public_token);
        sim.cluster
            .made(serving.hsm, unsafe { *private }, private_token);
    }
    serving.answer(rv)
}

unsafe extern "C" fn create_object(
    session: CK_SESSION_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    object: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let serving = serve!(sim);
    let rv = lower!(sim, C_CreateObject(session, template, count, object));
    if rv == CKR_OK && !object.is_null() {
        let token = unsafe { is_token(template, count) };
        sim.cluster.made(serving.hsm, unsafe { *object }, token);
    }
    serving.answer(rv)
}

/// Not in the SDK 5 API list.
unsafe extern "C" fn copy_object(
    _session: CK_SESSION_HANDLE,
    _source: CK_OBJECT_HANDLE,
    _template: CK_ATTRIBUTE_PTR,
    _count: CK_ULONG,
    _object: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not in the SDK 5 API list.
unsafe extern "C" fn set_attribute_value(
    _session: CK_SESSION_HANDLE,
    _object: CK_OBJECT_HANDLE,
    _template: CK_ATTRIBUTE_PTR,
    _count: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

unsafe extern "C" fn unwrap_key(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    unwrapping_key: CK_OBJECT_HANDLE,
    wrapped: CK_BYTE_PTR,
    wrapped_len: CK_ULONG,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    key: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    let serving = serve!(sim, unwrapping_key);
    let rv = lower!(
        sim,
        C_UnwrapKey(
            session,
            mechanism,
            unwrapping_key,
            wrapped,
            wrapped_len,
            template,
            count,
            key
        )
    );
    if rv == CKR_OK && !key.is_null() {
        let token = unsafe { is_token(template, count) };
        sim.cluster.made(serving.hsm, unsafe { *key }, token);
    }
    serving.answer(rv)
}

unsafe extern "C" fn wrap_key(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    wrapping_key: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    wrapped: CK_BYTE_PTR,
    wrapped_len: CK_ULONG_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    let serving = serve!(sim, wrapping_key);
    if !sim.cluster.visible_on(serving.hsm, key) {
        return serving.answer(CKR_KEY_HANDLE_INVALID);
    }
    serving.answer(lower!(
        sim,
        C_WrapKey(session, mechanism, wrapping_key, key, wrapped, wrapped_len)
    ))
}

unsafe extern "C" fn destroy_object(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let serving = serve!(sim, object);
    let rv = lower!(sim, C_DestroyObject(session, object));
    if rv == CKR_OK {
        sim.cluster.destroyed(object);
    }
    serving.answer(rv)
}

unsafe extern "C" fn get_attribute_value(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let serving = serve!(sim, object);
    serving.answer(lower!(
        sim,
        C_GetAttributeValue(session, object, template, count)
    ))
}

unsafe extern "C" fn find_objects_init(
    session: CK_SESSION_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let serving = serve!(sim);
    let rv = lower!(sim, C_FindObjectsInit(session, template, count));
    if rv == CKR_OK {
        lock(&sim.searches).insert(session, serving.hsm);
    }
    serving.answer(rv)
}

unsafe extern "C" fn find_objects(
    session: CK_SESSION_HANDLE,
    objects: CK_OBJECT_HANDLE_PTR,
    max: CK_ULONG,
    found: CK_ULONG_PTR,
) -> CK_RV {
    let sim = sim_or_fail!();
    if objects.is_null() || found.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // Objects that have not reached the HSM the search went to are not found: fetched and
    // dropped until the caller's buffer has what is visible, or the search is over.
    let hsm = lock(&sim.searches).get(&session).copied();
    let mut kept = 0usize;
    while kept < max as usize {
        let mut batch = vec![0 as CK_OBJECT_HANDLE; max as usize - kept];
        let mut got: CK_ULONG = 0;
        let rv = lower!(
            sim,
            C_FindObjects(
                session,
                batch.as_mut_ptr(),
                batch.len() as CK_ULONG,
                &mut got
            )
        );
        if rv != CKR_OK {
            return rv;
        }
        if got == 0 {
            break;
        }
        for handle in &batch[..got as usize] {
            if hsm.is_none_or(|hsm| sim.cluster.visible_on(hsm, *handle)) {
                unsafe { *objects.add(kept) = *handle };
                kept += 1;
            }
        }
    }
    unsafe { *found = kept as CK_ULONG };
    CKR_OK
}

unsafe extern "C" fn generate_random(
    session: CK_SESSION_HANDLE,
    out: CK_BYTE_PTR,
    len: CK_ULONG,
) -> CK_RV {
    let sim = sim_or_fail!();
    live_session!(sim, session);
    let serving = serve!(sim);
    serving.answer(lower!(sim, C_GenerateRandom(session, out, len)))
}
