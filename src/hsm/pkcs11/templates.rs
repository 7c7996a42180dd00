//! The attribute templates of the objects wrapd makes (master keys, session keys, records)
//! and the searches and destruction by `CKA_ID` that find them again.

use super::*;

/// The attributes of every master key object (generated or imported): token, private,
/// sensitive, never extractable, encrypt/decrypt only.
pub(super) fn master_key_attributes(object: &ObjectId) -> Vec<Attribute> {
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
pub(super) enum SessionKeyUse {
    /// The ephemeral key of `RSA_AES_KEY_WRAP_*`, and the wrapping key's unwrap probe.
    Unwrap,
    /// The key that wraps a check object to measure its length (`material_len`).
    Wrap,
    /// The check object of an import: encrypt only (its check value); extractable only to
    /// be measured.
    Check { extractable: bool },
}

/// The template of an AES session key: private, sensitive, and only the one use.
pub(super) fn session_aes_key(usage: SessionKeyUse) -> Vec<Attribute> {
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

/// A record wrapd keeps in the token (a ticket, a wrap mark): an AES key no mechanism may
/// use, since every HSM keeps one (CloudHSM has no data objects), and its value never
/// matters; what it records is its `CKA_ID`, and it is found by its label.
pub(super) fn record_attributes(id: Vec<u8>, label: Vec<u8>) -> [Attribute; 16] {
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

/// The `CKA_ID`s of every object of `class` (objects destroyed meanwhile are skipped).
pub(super) fn ids_of_class(session: &Session, class: ObjectClass) -> Result<Vec<Vec<u8>>> {
    ids_matching(session, &[Attribute::Class(class)])
}

/// The `CKA_ID`s of the objects that match `template`.
pub(super) fn ids_matching(session: &Session, template: &[Attribute]) -> Result<Vec<Vec<u8>>> {
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

/// Destroys every object of `class` with `CKA_ID` `id`.
pub(super) fn destroy_all(session: &Session, class: ObjectClass, id: Vec<u8>) -> Result<()> {
    let template = [Attribute::Class(class), Attribute::Id(id)];
    for handle in session.find_objects(&template).map_err(p11_error)? {
        session.destroy_object(handle).map_err(p11_error)?;
    }
    Ok(())
}
