//! Caller control (DESIGN.md "Caller control"): which peer, which caller,
//! and for which user. It runs right after the router and before the body
//! is read, so a refused caller costs no body read, no parse and no vendor
//! call.

use http::{HeaderMap, header};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use uuid::Uuid;

use crate::config::{AccessConfig, Caller};
use crate::error::Error;
use crate::peer::Peer;
use crate::secret::CallerKey;

/// Who is calling: refuses a Unix-socket peer whose uid is not allowed
/// (403), and, with callers configured, a request without a known key
/// (401). The caller found, if any, names the request in the logs from here
/// on, refusals by [`authorize`] included.
pub fn identify<'c>(
    cfg: &'c AccessConfig,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Option<&'c Caller>, Error> {
    // The connection first: a uid that may not call learns nothing about keys.
    if !cfg.allowed_uids.is_empty() && !peer.uid().is_some_and(|u| cfg.allowed_uids.contains(&u)) {
        return Err(Error::Forbidden {
            detail: "this peer's uid may not call this gateway",
        });
    }
    if cfg.callers.is_empty() {
        return Ok(None);
    }
    known_caller(&cfg.callers, headers)
        .map(Some)
        .ok_or(Error::Unauthorized)
}

/// Whether this gateway (`access.allowed_users`) and then the caller (its
/// `users`) may act for `user_id`: 403 otherwise.
pub fn authorize(cfg: &AccessConfig, caller: Option<&Caller>, user_id: Uuid) -> Result<(), Error> {
    if !cfg.allowed_users.is_empty() && !cfg.allowed_users.contains(&user_id) {
        return Err(Error::Forbidden {
            detail: "this gateway may not act for this user",
        });
    }
    if let Some(c) = caller
        && !c.users.is_empty()
        && !c.users.contains(&user_id)
    {
        return Err(Error::Forbidden {
            detail: "this caller may not act for this user",
        });
    }
    Ok(())
}

/// The caller whose key the one `Authorization: Bearer` header carries.
/// Every configured digest is compared, in constant time, and the match is
/// selected without a branch: how long this takes does not depend on which
/// caller matched or how much of a digest did.
fn known_caller<'c>(callers: &'c [Caller], headers: &HeaderMap) -> Option<&'c Caller> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    // Two credentials are one too many to pick from.
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let digest = CallerKey::from_authorization(value)?.digest();
    let mut found = u32::MAX;
    for (i, c) in callers.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        found.conditional_assign(&index, c.key.ct_eq(&digest));
    }
    callers.get(usize::try_from(found).ok()?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::secret::KeyDigest;

    const U1: &str = "5832d184-dd53-42a0-8ace-0bf8d660f4cc";
    const U2: &str = "f232d184-dd54-42a0-8ace-0bf8d660f4cc";

    fn uuid(s: &str) -> Uuid {
        s.parse().unwrap()
    }

    fn caller(name: &str, key: &str, users: &[&str]) -> Caller {
        Caller {
            name: name.into(),
            key: KeyDigest::of(key),
            users: users.iter().map(|u| uuid(u)).collect(),
        }
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        h
    }

    fn tcp() -> Peer {
        Peer::new("127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn without_callers_anyone_may_call_for_any_user() {
        let cfg = AccessConfig::default();
        assert!(identify(&cfg, &tcp(), &HeaderMap::new()).unwrap().is_none());
        assert!(
            identify(&cfg, &tcp(), &bearer("whatever"))
                .unwrap()
                .is_none()
        );
        authorize(&cfg, None, uuid(U1)).unwrap();
    }

    #[test]
    fn callers_are_told_apart_by_their_keys() {
        let cfg = AccessConfig {
            callers: vec![
                caller("billing", "k-billing", &[U1]),
                caller("ops", "k-ops", &[]),
            ],
            ..AccessConfig::default()
        };
        let who = |h: &HeaderMap| identify(&cfg, &tcp(), h).map(|c| c.map(|c| c.name.clone()));
        assert_eq!(
            who(&bearer("k-billing")).unwrap().as_deref(),
            Some("billing")
        );
        assert_eq!(who(&bearer("k-ops")).unwrap().as_deref(), Some("ops"));
        for h in [HeaderMap::new(), bearer("k-nobody"), bearer("")] {
            assert_eq!(who(&h).unwrap_err().reason(), "unauthorized");
        }
        let mut two = bearer("k-ops");
        two.append(header::AUTHORIZATION, "Bearer k-ops".parse().unwrap());
        assert_eq!(who(&two).unwrap_err().reason(), "unauthorized");

        let billing = &cfg.callers[0];
        authorize(&cfg, Some(billing), uuid(U1)).unwrap();
        let err = authorize(&cfg, Some(billing), uuid(U2)).unwrap_err();
        assert_eq!(err.status(), 403);
        authorize(&cfg, Some(&cfg.callers[1]), uuid(U2)).unwrap();
    }

    #[test]
    fn the_gateway_limits_users_and_uids_for_every_caller() {
        let cfg = AccessConfig {
            allowed_users: HashSet::from([uuid(U1)]),
            allowed_uids: HashSet::from([1000]),
            callers: vec![],
        };
        authorize(&cfg, None, uuid(U1)).unwrap();
        assert_eq!(authorize(&cfg, None, uuid(U2)).unwrap_err().status(), 403);
        identify(&cfg, &Peer::unix(1000), &HeaderMap::new()).unwrap();
        for peer in [Peer::unix(1001), tcp()] {
            let err = identify(&cfg, &peer, &HeaderMap::new()).unwrap_err();
            assert_eq!(err.reason(), "forbidden");
        }
    }
}
