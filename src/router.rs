//! The route table. taskgate knows exactly one route; everything else is
//! answered here and never forwarded.

use http::{Method, Uri};
use uuid::Uuid;

use crate::error::Error;
use crate::ids::parse_canonical_uuid;

/// A task-update target whose ids passed the canonical-UUID check. The
/// upstream URI is built from these values, never from the raw request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRoute {
    pub user_id: Uuid,
    pub task_id: Uuid,
}

/// `PUT /agent-api/user/{user_id}/task/{task_id}`; the same path with another
/// method is 405; anything else 404. A query string is refused too: the
/// vendor route takes none, and a proxy that silently drops part of the
/// target invites tricks.
pub fn route(method: &Method, uri: &Uri) -> Result<TaskRoute, Error> {
    if uri.query().is_some() {
        return Err(Error::NotFound);
    }
    let mut parts = uri.path().split('/');
    let (Some(""), Some("agent-api"), Some("user"), Some(user), Some("task"), Some(task), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(Error::NotFound);
    };
    let (Some(user_id), Some(task_id)) = (parse_canonical_uuid(user), parse_canonical_uuid(task))
    else {
        return Err(Error::NotFound);
    };
    if method != Method::PUT {
        return Err(Error::MethodNotAllowed);
    }
    Ok(TaskRoute { user_id, task_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "5832d184-dd53-42a0-8ace-0bf8d660f4cc";
    const T: &str = "f232d184-dd54-42a0-8ace-0bf8d660f4cc";

    fn r(method: Method, target: &str) -> Result<TaskRoute, &'static str> {
        route(&method, &target.parse().unwrap()).map_err(|e| e.reason())
    }

    #[test]
    fn the_task_route() {
        let ok = r(Method::PUT, &format!("/agent-api/user/{U}/task/{T}")).unwrap();
        assert_eq!(ok.user_id.to_string(), U);
        assert_eq!(ok.task_id.to_string(), T);
        let upper = r(
            Method::PUT,
            &format!("/agent-api/user/{}/task/{T}", U.to_uppercase()),
        )
        .unwrap();
        assert_eq!(
            upper.user_id.to_string(),
            U,
            "ids are normalised to lower case"
        );
    }

    #[test]
    fn other_methods_are_405() {
        for m in [
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
            Method::HEAD,
        ] {
            assert_eq!(
                r(m, &format!("/agent-api/user/{U}/task/{T}")),
                Err("method_not_allowed")
            );
        }
    }

    #[test]
    fn everything_else_is_404() {
        for target in [
            "/".to_string(),
            "/agent-api/user".to_string(),
            format!("/agent-api/user/{U}/task/{T}/"),
            format!("/agent-api/user/{U}/task/{T}/extra"),
            format!("/agent-api/user/{U}/task/{T}?x=1"),
            format!("/agent-api/user/{U}//task/{T}"),
            format!("//agent-api/user/{U}/task/{T}"),
            format!("/agent-api/user/{U}/task/create"),
            format!("/agent-api/user/{U}/task/..%2F{T}"),
            format!("/agent-api/user/{U}%2Ftask/{T}"),
            format!("/agent-api/user/../user/{U}/task/{T}"),
            "/agent-api/user/not-a-uuid/task/also-not".to_string(),
            format!("/Agent-api/user/{U}/task/{T}"),
        ] {
            assert_eq!(r(Method::PUT, &target), Err("not_found"), "{target}");
            assert_eq!(r(Method::GET, &target), Err("not_found"), "{target}");
        }
    }
}
