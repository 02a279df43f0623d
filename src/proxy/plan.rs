//! What the route's chains need for one request, decided before anything is read or sent:
//! from the route, the caller, the request line and headers, and the break-the-glass state.
//! `run_modules` follows it: stream, or read the body and take the buffered road.

use crate::gateway::Route;
use fhir_gateway_modules::conditional;
use fhir_gateway_modules::processor::{BodyAccess, PostProcess, Request as ModRequest};
use fhir_gateway_modules::Identity;
use std::borrow::Cow;
use std::sync::Arc;

/// What the chains need for one request.
pub(super) struct Plan<'r> {
    /// The route's post modules this request runs: a break-the-glass read skips the filters
    /// its session bypasses.
    pub post: Cow<'r, [Arc<dyn PostProcess>]>,
    /// Shadow candidates (judged on a copy of the answer, never enforced), with the scope
    /// filter; empty when nothing runs on the answer.
    pub shadow: Vec<Arc<dyn PostProcess>>,
    /// A pre module applies.
    pub pre_applies: bool,
    /// A pre module that applies may finish its work on the server's answer (`run_finish`).
    pub pre_finishes: bool,
    /// A post module or the scope filter applies.
    pub post_applies: bool,
    /// The exchange takes the buffered road: the request body is read whole and the
    /// gateway's client calls the FHIR server. Otherwise the answer streams through Pingora.
    pub buffered: bool,
    /// What applies (shadow candidates too) reads only what decides whose data a resource is,
    /// or headers: a Bundle may be parsed cut down to that (and, with `read_only`, a single
    /// resource too).
    pub filters_only: bool,
    /// Observers only (and no shadow run on a copy): nothing is kept to compare.
    pub read_only: bool,
    /// A filtered caller's conditional write, resolved here first (`conditional.rs`).
    pub conditional: bool,
}

impl<'r> Plan<'r> {
    /// `scope`: the caller's scope filter, if its scopes narrow. `glass`: `Some` when the
    /// request is served under break-the-glass, with the post modules its session bypasses.
    /// `has_body`: the request body was already read (admission). Each module is asked once.
    pub(super) fn new(
        route: &'r Route,
        scope: &[Arc<dyn PostProcess>],
        glass: Option<&[String]>,
        req: &ModRequest,
        caller: Option<&Identity>,
        has_body: bool,
    ) -> Plan<'r> {
        // A break-the-glass read skips the filters the session bypasses.
        let post: Cow<'r, [Arc<dyn PostProcess>]> = match glass {
            Some(bypass) => Cow::Owned(
                route
                    .post
                    .iter()
                    .filter(|m| !bypass.iter().any(|b| b == m.name()))
                    .cloned()
                    .collect(),
            ),
            None => Cow::Borrowed(&route.post),
        };
        // Each module is asked once (`applies` may classify the request).
        let pre_needs: Vec<(bool, bool)> = route
            .pre
            .iter()
            .filter(|m| m.applies(req, caller))
            .map(|m| (m.needs_body(), m.finishes()))
            .collect();
        let pre_applies = !pre_needs.is_empty();
        let pre_needs_body = pre_needs.iter().any(|(body, _)| *body);
        let pre_finishes = pre_needs.iter().any(|(_, finish)| *finish);
        let post_reads: Vec<BodyAccess> = post
            .iter()
            .chain(scope)
            .filter(|m| m.applies(req, caller))
            .map(|m| m.reads())
            .collect();
        let post_applies = !post_reads.is_empty();
        let post_needs_body = post_reads.iter().any(|r| *r != BodyAccess::Headers);
        // Shadow candidates judge a copy of the same tree (so it must hold what they read);
        // not under break-the-glass, whose reads skip the filters on purpose.
        let shadow: Vec<Arc<dyn PostProcess>> =
            match post_applies && glass.is_none() && !route.shadow.is_empty() {
                true => route.shadow.iter().chain(scope).cloned().collect(),
                false => Vec::new(),
            };
        let filters_only = post_reads
            .iter()
            .copied()
            .chain(
                shadow
                    .iter()
                    .filter(|m| m.applies(req, caller))
                    .map(|m| m.reads()),
            )
            .all(|r| {
                matches!(
                    r,
                    BodyAccess::Compartment | BodyAccess::ReadOwners | BodyAccess::Headers
                )
            });
        // Observers only (and no shadow run on a copy): nothing is kept to compare.
        let read_only = shadow.is_empty()
            && post_reads.iter().all(|r| {
                matches!(
                    r,
                    BodyAccess::Read | BodyAccess::ReadOwners | BodyAccess::Headers
                )
            });
        // A write a filter judges before it is sent needs its body (and a DELETE, which has
        // none, must not stream past the check).
        let checks_write = post
            .iter()
            .chain(scope)
            .any(|m| m.checks_write(req, caller));
        // A filtered caller's conditional write: its search is resolved here first, over what
        // the caller may see (`conditional.rs`), so it needs the buffered road.
        let conditional =
            conditional::may_be_conditional(req) && conditional::filtered(&post, caller);
        let buffered = has_body
            || pre_needs_body
            || pre_finishes
            || post_needs_body
            || checks_write
            || conditional;
        Plan {
            post,
            shadow,
            pre_applies,
            pre_finishes,
            post_applies,
            buffered,
            filters_only,
            read_only,
            conditional,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::policy::RolePolicy;
    use async_trait::async_trait;
    use fhir_gateway_modules::processor::{
        Context, ModuleError, PostOutcome, PreOutcome, PreProcess, Response,
    };
    use fhir_gateway_modules::Role;

    /// A pre module: whether it applies, needs the body, finishes on the answer.
    struct Pre(bool, bool, bool);

    #[async_trait]
    impl PreProcess for Pre {
        fn name(&self) -> &'static str {
            "Pre"
        }
        fn applies(&self, _req: &ModRequest, _caller: Option<&Identity>) -> bool {
            self.0
        }
        fn needs_body(&self) -> bool {
            self.1
        }
        fn finishes(&self) -> bool {
            self.2
        }
        async fn process(
            &self,
            _req: &mut ModRequest,
            _cx: &Context,
        ) -> Result<PreOutcome, ModuleError> {
            Ok(PreOutcome::Continue)
        }
    }

    /// A post module: its name, what it reads, whether it judges writes; it applies to
    /// every caller but an Administrator.
    struct Post(&'static str, BodyAccess, bool);

    #[async_trait]
    impl PostProcess for Post {
        fn name(&self) -> &'static str {
            self.0
        }
        fn applies(&self, _req: &ModRequest, caller: Option<&Identity>) -> bool {
            !caller.is_some_and(|c| c.roles.contains(&Role::Administrator))
        }
        fn reads(&self) -> BodyAccess {
            self.1
        }
        fn checks_write(&self, req: &ModRequest, caller: Option<&Identity>) -> bool {
            self.2 && self.applies(req, caller)
        }
        async fn process(
            &self,
            _req: &ModRequest,
            _resp: &mut Response,
            _cx: &Context,
        ) -> Result<PostOutcome, ModuleError> {
            Ok(PostOutcome::Continue)
        }
    }

    fn post(name: &'static str, reads: BodyAccess) -> Arc<dyn PostProcess> {
        Arc::new(Post(name, reads, false))
    }

    fn route(
        pre: Vec<Arc<dyn PreProcess>>,
        post: Vec<Arc<dyn PostProcess>>,
        shadow: Vec<Arc<dyn PostProcess>>,
    ) -> Route {
        Route {
            prefix: "/fhir".into(),
            public_base: None,
            pre,
            post,
            shadow,
            policy: RolePolicy::default(),
        }
    }

    fn req(method: &str, path: &str, query: &str) -> ModRequest {
        ModRequest {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: vec![],
            body: None,
        }
    }

    fn caller(role: Role) -> Identity {
        Identity {
            user_id: "u".into(),
            roles: vec![role],
            ..Default::default()
        }
    }

    fn plan<'r>(route: &'r Route, req: &ModRequest, role: Role) -> Plan<'r> {
        Plan::new(route, &[], None, req, Some(&caller(role)), false)
    }

    #[test]
    fn nothing_applies_nothing_buffers() {
        let r = route(vec![], vec![], vec![]);
        let p = plan(&r, &req("GET", "/Patient", ""), Role::Reader);
        assert!(!p.pre_applies && !p.post_applies && !p.buffered && !p.conditional);
        // A module that does not apply to this caller costs nothing either.
        let r = route(vec![], vec![post("F", BodyAccess::Whole)], vec![]);
        let p = plan(&r, &req("GET", "/Patient", ""), Role::Administrator);
        assert!(!p.post_applies && !p.buffered);
        // A body already read is sent by the gateway's client.
        let p = Plan::new(&r, &[], None, &req("POST", "/Patient", ""), None, true);
        assert!(p.buffered);
    }

    #[test]
    fn what_post_modules_read_decides_the_road_and_the_parse() {
        let get = req("GET", "/Observation", "");
        let plan_of = |reads: BodyAccess| {
            let r = route(vec![], vec![post("F", reads)], vec![]);
            let p = plan(&r, &get, Role::Reader);
            assert!(p.post_applies && !p.pre_applies);
            (p.buffered, p.filters_only, p.read_only)
        };
        // Headers only: the answer streams, the module runs on its head.
        assert_eq!(plan_of(BodyAccess::Headers), (false, true, true));
        assert_eq!(plan_of(BodyAccess::Compartment), (true, true, false));
        assert_eq!(plan_of(BodyAccess::Read), (true, false, true));
        assert_eq!(plan_of(BodyAccess::ReadOwners), (true, true, true));
        assert_eq!(plan_of(BodyAccess::Whole), (true, false, false));
        // Together, each narrows what the other allows.
        let two = |a: BodyAccess, b: BodyAccess| {
            let r = route(vec![], vec![post("A", a), post("B", b)], vec![]);
            let p = plan(&r, &get, Role::Reader);
            (p.filters_only, p.read_only)
        };
        let (owners, filter, read) = (
            BodyAccess::ReadOwners,
            BodyAccess::Compartment,
            BodyAccess::Read,
        );
        assert_eq!(two(owners, filter), (true, false));
        assert_eq!(two(owners, read), (false, true));
        assert_eq!(two(owners, BodyAccess::Headers), (true, true));
        assert_eq!(two(owners, BodyAccess::Whole), (false, false));
    }

    #[test]
    fn pre_modules_buffer_when_they_need_the_body_or_finish() {
        let get = req("GET", "/Patient", "");
        let plan_of = |pre: Pre| {
            let r = route(vec![Arc::new(pre)], vec![], vec![]);
            let p = plan(&r, &get, Role::Reader);
            (p.pre_applies, p.buffered, p.pre_finishes)
        };
        assert_eq!(plan_of(Pre(false, true, true)), (false, false, false));
        assert_eq!(plan_of(Pre(true, false, false)), (true, false, false));
        assert_eq!(plan_of(Pre(true, true, false)), (true, true, false));
        assert_eq!(plan_of(Pre(true, false, true)), (true, true, true));
    }

    #[test]
    fn the_scope_filter_counts_as_a_post_module() {
        let r = route(vec![], vec![], vec![]);
        let scope = [post("scopes", BodyAccess::Compartment)];
        let p = Plan::new(&r, &scope, None, &req("GET", "/Patient", ""), None, false);
        assert!(p.post_applies && p.buffered && p.filters_only);
    }

    #[test]
    fn judged_writes_and_filtered_conditional_writes_buffer() {
        let judge: Arc<dyn PostProcess> = Arc::new(Post("F", BodyAccess::Headers, true));
        let r = route(vec![], vec![judge], vec![]);
        let p = plan(&r, &req("DELETE", "/Patient/1", ""), Role::Writer);
        assert!(p.buffered && !p.conditional);
        let p = plan(&r, &req("DELETE", "/Patient/1", ""), Role::Administrator);
        assert!(!p.buffered);

        let r = route(vec![], vec![post("F", BodyAccess::Compartment)], vec![]);
        let conditional_delete = req("DELETE", "/Patient", "identifier=x");
        let p = plan(&r, &conditional_delete, Role::Writer);
        assert!(p.conditional && p.buffered);
        // Not conditional (no criteria), or a caller the filter does not judge.
        let p = plan(&r, &req("PUT", "/Patient/1", ""), Role::Writer);
        assert!(!p.conditional);
        let p = plan(&r, &conditional_delete, Role::Administrator);
        assert!(!p.conditional && !p.buffered);
    }

    #[test]
    fn break_the_glass_skips_the_bypassed_filters_and_the_shadow_run() {
        let r = route(
            vec![],
            vec![
                post("ParticipantFilter", BodyAccess::Compartment),
                post("DateSort", BodyAccess::Whole),
            ],
            vec![post("Candidate", BodyAccess::Compartment)],
        );
        let get = req("GET", "/Observation", "");
        let who = caller(Role::Practitioner);
        let p = Plan::new(&r, &[], None, &get, Some(&who), false);
        let names = |p: &Plan| p.post.iter().map(|m| m.name()).collect::<Vec<_>>();
        assert_eq!(names(&p), ["ParticipantFilter", "DateSort"]);
        assert_eq!(p.shadow.len(), 1);
        assert!(!p.read_only);

        let bypass = ["ParticipantFilter".to_string()];
        let p = Plan::new(&r, &[], Some(&bypass), &get, Some(&who), false);
        assert_eq!(names(&p), ["DateSort"]);
        assert!(p.shadow.is_empty());
    }

    #[test]
    fn shadow_candidates_run_only_with_the_chain_and_shape_the_parse() {
        let get = req("GET", "/Observation", "");
        let scope = [post("scopes", BodyAccess::Compartment)];
        let r = route(
            vec![],
            vec![post("F", BodyAccess::Compartment)],
            vec![post("Candidate", BodyAccess::Whole)],
        );
        let who = caller(Role::Reader);
        let p = Plan::new(&r, &scope, None, &get, Some(&who), false);
        // The candidates with the scope filter; a candidate reading the whole body needs the
        // whole tree.
        let names: Vec<_> = p.shadow.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["Candidate", "scopes"]);
        assert!(!p.filters_only && !p.read_only);
        // A caller no post module judges: no shadow run either.
        let p = plan(&r, &get, Role::Administrator);
        assert!(p.shadow.is_empty() && !p.post_applies);
    }
}
