//! `C_Encrypt` and `C_Decrypt` in one call each.
//!
//! cryptoki's `Session::encrypt` and `Session::decrypt` first ask the module for the output's
//! length (a call without an output buffer), then call again with a buffer of that length.
//! On a networked HSM a call may be a round trip to the HSM, so every Unwrap would wait for
//! two. An AES-GCM output's length is known beforehand (the input's, plus or minus the
//! tag), so wrapd sizes the buffer itself and calls once. cryptoki has no call that takes
//! the caller's buffer: this module calls the module's function list directly, from the same
//! library loaded once more (the dynamic loader hands back the instance already loaded, so
//! the sessions and handles are the ones cryptoki holds).
//!
//! A module that still finds the buffer too small answers `CKR_BUFFER_TOO_SMALL` with the
//! length it needs and keeps the operation, as PKCS#11 says; the call is then made again
//! with that length.
//!
//! This is the one place outside cryptoki where wrapd calls into the PKCS#11 module; each
//! `unsafe` block says what it relies on.

#![allow(unsafe_code)]

use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki_sys::{
    CK_BYTE_PTR, CK_FUNCTION_LIST, CK_FUNCTION_LIST_PTR, CK_FUNCTION_LIST_PTR_PTR, CK_MECHANISM,
    CK_OBJECT_HANDLE, CK_RV, CK_SESSION_HANDLE, CK_ULONG, CK_ULONG_PTR, CKR_BUFFER_TOO_SMALL,
    CKR_OK,
};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

type Init = unsafe extern "C" fn(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE) -> CK_RV;
type Call = unsafe extern "C" fn(
    CK_SESSION_HANDLE,
    CK_BYTE_PTR,
    CK_ULONG,
    CK_BYTE_PTR,
    CK_ULONG_PTR,
) -> CK_RV;

/// The module's encryption and decryption entry points.
pub(super) struct SingleCall {
    encrypt_init: Init,
    encrypt: Call,
    decrypt_init: Init,
    decrypt: Call,
    /// Keeps the library, and so the function pointers above, loaded.
    _library: libloading::Library,
}

impl SingleCall {
    /// Loads `module` (already loaded by cryptoki: this takes one more reference to it) and
    /// reads its entry points.
    pub(super) fn load(module: &Path) -> Result<Self> {
        let unavailable = |what: String| {
            Error::Unavailable(format!("PKCS#11 module {}: {what}", module.display()))
        };
        // SAFETY: loading a PKCS#11 module runs its initializers, as cryptoki's own load
        // of the same library already did.
        let library = unsafe { libloading::Library::new(module) }.map_err(|e| {
            Error::Unavailable(format!(
                "cannot load PKCS#11 module {}: {e}",
                module.display()
            ))
        })?;
        let list: &CK_FUNCTION_LIST = {
            // SAFETY: `C_GetFunctionList` has this signature in every PKCS#11 module.
            let get = unsafe {
                library.get::<unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV>(
                    b"C_GetFunctionList\0",
                )
            }
            .map_err(|e| unavailable(format!("no C_GetFunctionList: {e}")))?;
            let mut list: CK_FUNCTION_LIST_PTR = std::ptr::null_mut();
            // SAFETY: `list` is a valid place for the module to write its list's address.
            let rv = unsafe { get(&mut list) };
            if rv != CKR_OK || list.is_null() {
                return Err(unavailable(format!("C_GetFunctionList answered {rv:#x}")));
            }
            // SAFETY: the module keeps its list for as long as it is loaded, which
            // `_library` ensures for the life of `Self`.
            unsafe { &*list }
        };
        let missing = |name: &str| unavailable(format!("the module has no {name}"));
        Ok(Self {
            encrypt_init: list.C_EncryptInit.ok_or_else(|| missing("C_EncryptInit"))?,
            encrypt: list.C_Encrypt.ok_or_else(|| missing("C_Encrypt"))?,
            decrypt_init: list.C_DecryptInit.ok_or_else(|| missing("C_DecryptInit"))?,
            decrypt: list.C_Decrypt.ok_or_else(|| missing("C_Decrypt"))?,
            _library: library,
        })
    }

    /// Encrypts `input` in one `C_Encrypt`, into a buffer of `output_len` bytes.
    pub(super) fn encrypt(
        &self,
        session: &Session,
        mechanism: &Mechanism<'_>,
        key: ObjectHandle,
        input: &[u8],
        output_len: usize,
    ) -> std::result::Result<Vec<u8>, CkError> {
        let mut output = vec![0u8; output_len];
        let written = self.run(
            (self.encrypt_init, Function::EncryptInit),
            (self.encrypt, Function::Encrypt),
            session,
            mechanism,
            key,
            input,
            &mut output,
        )?;
        output.truncate(written);
        Ok(output)
    }

    /// Decrypts `input` in one `C_Decrypt`, into a buffer of `output_len` bytes that is
    /// zeroed when dropped.
    pub(super) fn decrypt(
        &self,
        session: &Session,
        mechanism: &Mechanism<'_>,
        key: ObjectHandle,
        input: &[u8],
        output_len: usize,
    ) -> std::result::Result<Zeroizing<Vec<u8>>, CkError> {
        let mut output = Zeroizing::new(vec![0u8; output_len]);
        let written = self.run(
            (self.decrypt_init, Function::DecryptInit),
            (self.decrypt, Function::Decrypt),
            session,
            mechanism,
            key,
            input,
            &mut output,
        )?;
        output.truncate(written);
        Ok(output)
    }

    /// The init call, then the single-part call, made again once with the length the module
    /// asks for if the buffer was too small (the operation stays active then). `output`
    /// grows to that length; the bytes written are its first ones.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        (init, init_name): (Init, Function),
        (call, call_name): (Call, Function),
        session: &Session,
        mechanism: &Mechanism<'_>,
        key: ObjectHandle,
        input: &[u8],
        output: &mut Vec<u8>,
    ) -> std::result::Result<usize, CkError> {
        let input_len = CK_ULONG::try_from(input.len())?;
        // The raw mechanism points into `mechanism`'s parameters, which outlive both calls.
        let mut raw: CK_MECHANISM = mechanism.into();
        // SAFETY: the session is checked out to this thread alone; `raw` and the key handle
        // are valid for the call.
        let rv = unsafe { init(session.handle(), &mut raw, key.handle()) };
        Rv::from(rv).into_result(init_name)?;
        for _ in 0..2 {
            let mut len = CK_ULONG::try_from(output.len())?;
            // SAFETY: `input` is read only (PKCS#11 takes it as a mutable pointer but does
            // not write it); `output` has `len` writable bytes; `len` is a valid place for
            // the module to write the length.
            let rv = unsafe {
                call(
                    session.handle(),
                    input.as_ptr().cast_mut(),
                    input_len,
                    output.as_mut_ptr(),
                    &mut len,
                )
            };
            let len = usize::try_from(len)?;
            // A length beyond any AES output for this input is the module's error: it is not
            // allocated (the call fails, and its session, with an operation still active, is
            // replaced).
            if rv == CKR_BUFFER_TOO_SMALL
                && len > output.len()
                && len <= input.len().saturating_add(MAX_OUTPUT_GROWTH)
            {
                output.resize(len, 0);
                continue;
            }
            Rv::from(rv).into_result(call_name)?;
            return Ok(len.min(output.len()));
        }
        Err(CkError::Pkcs11(RvError::BufferTooSmall, call_name))
    }
}

/// How much longer than its input a single-part call's output may be: an AES-GCM output is
/// its input plus a 16-byte tag; a module asking for more is not believed.
const MAX_OUTPUT_GROWTH: usize = 1024;
