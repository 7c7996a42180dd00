//! Principals of a unix socket peer, from its uid and gid.

use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

/// `unix:uid=N`, `unix:user=NAME`, `unix:gid=N`, `unix:group=NAME` for the primary group and
/// every supplementary group of the user. Names that do not resolve are left out.
pub fn unix_principals(uid: u32, gid: u32) -> Vec<String> {
    let mut principals = vec![format!("unix:uid={uid}")];
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    if let Some(user) = &user {
        principals.push(format!("unix:user={}", user.name));
    }
    let mut gids = vec![Gid::from_raw(gid)];
    if let Some(user) = &user {
        if let Ok(name) = std::ffi::CString::new(user.name.as_str()) {
            if let Ok(groups) = getgrouplist(&name, user.gid) {
                gids.extend(groups);
            }
        }
    }
    gids.sort_by_key(|g| g.as_raw());
    gids.dedup();
    for gid in gids {
        principals.push(format!("unix:gid={gid}"));
        if let Ok(Some(group)) = Group::from_gid(gid) {
            principals.push(format!("unix:group={}", group.name));
        }
    }
    principals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_its_names() {
        let p = unix_principals(0, 0);
        assert_eq!(p[0], "unix:uid=0");
        assert!(p.contains(&"unix:user=root".to_owned()), "{p:?}");
        assert!(p.contains(&"unix:gid=0".to_owned()), "{p:?}");
    }

    #[test]
    fn unknown_ids_keep_their_numbers() {
        let p = unix_principals(4_000_000_000, 4_000_000_001);
        assert_eq!(p, ["unix:uid=4000000000", "unix:gid=4000000001"]);
    }
}
