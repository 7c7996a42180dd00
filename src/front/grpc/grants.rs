//! The grant RPCs' wire forms (`KeyService` `CreateGrant`, `ListGrants`,
//! `ListRetirableGrants`, `RetireGrant`, `RevokeGrant`): requests into the operation
//! layer's terms, grants into messages, and the pages of a listing.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::grant::{Constraints, Grant, GrantOperation};
use crate::ids::KeyId;
use crate::ops::{NewGrant, RetiredGrant};
use crate::proto::{self, CreateGrantRequest, RetireGrantRequest};

/// Most grants on one page, and the page size of a request that names none.
const MAX_PAGE: usize = 100;
const DEFAULT_PAGE: usize = 50;

/// A `CreateGrant` request in the operation layer's terms.
pub(super) fn new_grant(req: CreateGrantRequest) -> Result<NewGrant> {
    let operations = req
        .operations
        .iter()
        .map(|name| {
            GrantOperation::parse(name).ok_or_else(|| {
                Error::invalid(format!(
                    "unknown grant operation {:?}; the operations are {}",
                    name.chars().take(64).collect::<String>(),
                    GrantOperation::ALL
                        .iter()
                        .map(|op| op.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let constraints = req.constraints.unwrap_or_default();
    Ok(NewGrant {
        key_id: req.key_id,
        grantee: req.grantee_principal,
        retiring: (!req.retiring_principal.is_empty()).then_some(req.retiring_principal),
        operations,
        // A map with entries is a constraint whatever its flag says (a client that fills
        // only the map must never get a grant without the constraint it asked for).
        constraints: Constraints {
            equals: (constraints.has_encryption_context_equals
                || !constraints.encryption_context_equals.is_empty())
            .then(|| sorted(constraints.encryption_context_equals)),
            subset: (constraints.has_encryption_context_subset
                || !constraints.encryption_context_subset.is_empty())
            .then(|| sorted(constraints.encryption_context_subset)),
        },
        name: req.name,
    })
}

fn sorted(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

/// A `RetireGrant` request in the operation layer's terms.
pub(super) fn retired_grant(req: RetireGrantRequest) -> Result<RetiredGrant> {
    if !req.grant_token.is_empty() {
        return Ok(RetiredGrant::Token(req.grant_token));
    }
    if req.key_id.is_empty() || req.grant_id.is_empty() {
        return Err(Error::invalid(
            "RetireGrant needs grant_token, or key_id and grant_id",
        ));
    }
    Ok(RetiredGrant::Id {
        key_id: req.key_id,
        grant_id: req.grant_id,
    })
}

/// The wire form of a grant of `key`.
pub(super) fn grant_message(key: &KeyId, grant: &Grant) -> proto::Grant {
    let constraints = &grant.constraints;
    proto::Grant {
        key_id: key.to_string(),
        grant_id: grant.id.clone(),
        name: grant.name.clone(),
        created_at: Some(grant.created_at.into()),
        grantee_principal: grant.grantee.clone(),
        retiring_principal: grant.retiring.clone().unwrap_or_default(),
        issuer: grant.issuer.clone(),
        operations: grant
            .operations
            .iter()
            .map(|op| op.name().to_owned())
            .collect(),
        constraints: (!constraints.is_empty()).then(|| proto::GrantConstraints {
            encryption_context_equals: constraints
                .equals
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            has_encryption_context_equals: constraints.equals.is_some(),
            encryption_context_subset: constraints
                .subset
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            has_encryption_context_subset: constraints.subset.is_some(),
        }),
    }
}

/// Where a page starts and how long it is: `page_size` (0: the default) from the index
/// `page_token` names (empty: the start).
pub(super) fn page_position(page_size: u32, page_token: &str) -> Result<(usize, usize)> {
    let size = match page_size as usize {
        0 => DEFAULT_PAGE,
        n if n <= MAX_PAGE => n,
        _ => {
            return Err(Error::invalid(format!("page_size is at most {MAX_PAGE}")));
        }
    };
    let start = if page_token.is_empty() {
        0
    } else {
        page_token
            .parse::<usize>()
            .map_err(|_| Error::invalid("page_token is not one a listing gave"))?
    };
    Ok((start, size))
}

/// One page of a listing, with the next page's token (empty: none).
pub(super) fn page(
    grants: Vec<proto::Grant>,
    (start, size): (usize, usize),
) -> proto::ListGrantsResponse {
    let end = start.saturating_add(size).min(grants.len());
    let next_page_token = if end < grants.len() {
        end.to_string()
    } else {
        String::new()
    };
    proto::ListGrantsResponse {
        grants: grants
            .get(start..end)
            .map(<[_]>::to_vec)
            .unwrap_or_default(),
        next_page_token,
    }
}
