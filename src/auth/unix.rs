//! Principals of a unix socket peer, from the credentials and groups the kernel reports.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};
use parking_lot::Mutex;

/// How long resolved names are reused: user and group lookups read `/etc/passwd` and
/// `/etc/group` (or ask NSS), far too slow for every connection. Renames take effect within
/// this time.
const NAMES_TTL: Duration = Duration::from_secs(60);

/// The identity of a unix socket peer, from the kernel, at connect time: the connect info
/// of every unix socket connection (see `server::listen`).
#[derive(Debug, Clone)]
pub struct UnixPeer {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's pid (`None` if the kernel did not say).
    pub pid: Option<i32>,
    /// `unix:uid=N`, `unix:user=NAME`, then `unix:gid=N` and `unix:group=NAME` for its
    /// primary group and every supplementary group it had when it connected.
    pub principals: Arc<[String]>,
}

/// A name resolved at a time.
struct Resolved {
    at: Instant,
    name: Option<String>,
}

/// A cache of user and group names.
#[derive(Default)]
pub struct UnixNames {
    users: Mutex<HashMap<u32, Resolved>>,
    groups: Mutex<HashMap<u32, Resolved>>,
}

fn cached(
    cache: &Mutex<HashMap<u32, Resolved>>,
    id: u32,
    resolve: impl FnOnce(u32) -> Option<String>,
) -> Option<String> {
    let now = Instant::now();
    let mut cache = cache.lock();
    if let Some(hit) = cache.get(&id) {
        if now.duration_since(hit.at) < NAMES_TTL {
            return hit.name.clone();
        }
    }
    if cache.len() > 10_000 {
        cache.clear(); // bounded: a flood of distinct ids cannot grow it without end
    }
    let name = resolve(id);
    cache.insert(
        id,
        Resolved {
            at: now,
            name: name.clone(),
        },
    );
    name
}

impl UnixNames {
    /// The principals of a peer with `uid`, primary `gid` and supplementary `groups` (as
    /// `SO_PEERGROUPS` reports them). Names that do not resolve are left out.
    pub fn principals(&self, uid: u32, gid: u32, groups: &[u32]) -> Arc<[String]> {
        let mut principals = vec![format!("unix:uid={uid}")];
        let user = cached(&self.users, uid, |uid| {
            User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name)
        });
        if let Some(user) = user {
            principals.push(format!("unix:user={user}"));
        }
        let mut gids: Vec<u32> = std::iter::once(gid).chain(groups.iter().copied()).collect();
        gids.sort_unstable();
        gids.dedup();
        for gid in gids {
            principals.push(format!("unix:gid={gid}"));
            let group = cached(&self.groups, gid, |gid| {
                Group::from_gid(Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            });
            if let Some(group) = group {
                principals.push(format!("unix:group={group}"));
            }
        }
        principals.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_its_names() {
        let p = UnixNames::default().principals(0, 0, &[]);
        assert_eq!(p[0], "unix:uid=0");
        assert!(p.contains(&"unix:user=root".to_owned()), "{p:?}");
        assert!(p.contains(&"unix:gid=0".to_owned()), "{p:?}");
    }

    #[test]
    fn unknown_ids_keep_their_numbers() {
        let p = UnixNames::default().principals(4_000_000_000, 4_000_000_001, &[]);
        assert_eq!(&*p, ["unix:uid=4000000000", "unix:gid=4000000001"]);
    }

    /// Groups are the ones the kernel reports for the peer, not `/etc/group`'s list for
    /// its user name.
    #[test]
    fn groups_come_from_the_peer_not_from_etc_group() {
        let p = UnixNames::default().principals(4_000_000_000, 4_000_000_001, &[4_000_000_002]);
        assert!(p.contains(&"unix:gid=4000000002".to_owned()), "{p:?}");
        // root's /etc/group memberships are not added when the peer does not report them.
        let root = UnixNames::default().principals(0, 0, &[]);
        assert_eq!(
            root.iter().filter(|p| p.starts_with("unix:gid=")).count(),
            1
        );
    }
}
