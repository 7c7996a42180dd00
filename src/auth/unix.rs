//! Principals of a unix socket peer, from its uid and gid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

/// How long resolved names are reused: user and group lookups read `/etc/passwd` and
/// `/etc/group` (or ask NSS), far too slow for every call. Membership changes take effect
/// within this time.
const NAMES_TTL: Duration = Duration::from_secs(60);

/// Principals resolved at a time.
struct Resolved {
    at: Instant,
    principals: Arc<[String]>,
}

/// A cache of [`unix_principals`] per (uid, gid).
#[derive(Default)]
pub struct UnixNames {
    cache: Mutex<HashMap<(u32, u32), Resolved>>,
}

impl UnixNames {
    /// The principals of (uid, gid), resolved at most once a minute.
    pub fn principals(&self, uid: u32, gid: u32) -> Arc<[String]> {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = cache.get(&(uid, gid)) {
            if now.duration_since(hit.at) < NAMES_TTL {
                return hit.principals.clone();
            }
        }
        if cache.len() > 10_000 {
            cache.clear(); // bounded: a flood of distinct ids cannot grow it without end
        }
        let principals: Arc<[String]> = unix_principals(uid, gid).into();
        cache.insert(
            (uid, gid),
            Resolved {
                at: now,
                principals: principals.clone(),
            },
        );
        principals
    }
}

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
