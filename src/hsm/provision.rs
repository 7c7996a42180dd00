//! Creating a SoftHSM token for `wrapd dev` and tests: initialize a free slot with a label,
//! an SO PIN and a user PIN, all through PKCS#11 (no PIN on any command line).

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::Pin;
use super::pkcs11::p11_error;
use crate::error::{Error, Result};

/// Makes sure a token labelled `label` exists in the module, creating it in a free slot if
/// not. Returns true when it created the token. The PKCS#11 context is finalized before
/// returning, so the caller may open the token normally afterwards.
pub fn provision_softhsm_token(
    module: &Path,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
) -> Result<bool> {
    let pkcs11 = Pkcs11::new(module).map_err(|err| {
        Error::Config(format!(
            "cannot load PKCS#11 module {}: {err} (is softhsm2 installed?)",
            module.display()
        ))
    })?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(err) => return Err(p11_error(err)),
    }
    let result = provision(&pkcs11, label, so_pin, user_pin);
    if let Err(err) = pkcs11.finalize() {
        tracing::debug!(error = %err, "C_Finalize after provisioning failed");
    }
    result
}

fn provision(pkcs11: &Pkcs11, label: &str, so_pin: &Pin, user_pin: &Pin) -> Result<bool> {
    let mut free = None;
    for slot in pkcs11.get_slots_with_token().map_err(p11_error)? {
        let info = pkcs11.get_token_info(slot).map_err(p11_error)?;
        if info.token_initialized() {
            if info.label() == label {
                return Ok(false);
            }
        } else if free.is_none() {
            free = Some(slot);
        }
    }
    let slot =
        free.ok_or_else(|| Error::Unavailable("no free slot to create a token in".into()))?;
    let so = AuthPin::from(so_pin.expose().to_owned());
    let user = AuthPin::from(user_pin.expose().to_owned());
    pkcs11.init_token(slot, &so, label).map_err(p11_error)?;
    // SoftHSM moves the new token to a new slot id: look it up again by label.
    let slot = pkcs11
        .get_slots_with_token()
        .map_err(p11_error)?
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .is_ok_and(|info| info.label() == label)
        })
        .ok_or_else(|| Error::Internal("the token just created is not listed".into()))?;
    let session = pkcs11.open_rw_session(slot).map_err(p11_error)?;
    session.login(UserType::So, Some(&so)).map_err(p11_error)?;
    session.init_pin(&user).map_err(p11_error)?;
    session.logout().map_err(p11_error)?;
    Ok(true)
}
