//! Routing: each area of the API (tenants, storage, network, integration
//! services, overrides, and later checkpoints) registers its endpoints
//! from a module of its own with a `routes(&mut Router)` function; the
//! router matches `/v1/...` paths segment by segment, `{name}` segments
//! binding parameters, and answers 404 for unknown paths and 405 (with
//! `Allow`) for known paths with another method.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::http::{Request, Response, percent_decode};
use crate::Appliance;

/// What handlers reach: the running appliance, locked per use (never
/// held across a wait for a guest).
#[derive(Debug, Clone)]
pub struct Ctx {
    pub appliance: Arc<Mutex<Appliance>>,
}

impl Ctx {
    pub fn lock(&self) -> MutexGuard<'_, Appliance> {
        vmbus::worker::lock(&self.appliance)
    }
}

/// One matched request.
#[derive(Debug)]
pub struct Call<'a> {
    params: Vec<(&'static str, String)>,
    pub body: &'a [u8],
    pub query: Option<&'a str>,
}

impl Call<'_> {
    /// Path parameter `name` (decoded).
    pub fn param(&self, name: &str) -> &str {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("route without parameter {name:?}"))
    }

    /// Path parameter `name` as a number (404 when it is not one: no such
    /// thing can exist).
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<T, ApiError> {
        let v = self.param(name);
        v.parse()
            .map_err(|_| ApiError::not_found(format!("no {name} {v:?}")))
    }

    /// The body as JSON of type `T`: 400 when it is not JSON, 422 when it
    /// is JSON of the wrong shape (unknown or missing fields, bad values).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::bad_request("this endpoint needs a JSON body"));
        }
        serde_json::from_slice(self.body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::invalid(e.to_string()),
            _ => ApiError::bad_request(format!("malformed JSON: {e}")),
        })
    }

    /// The body as JSON, or `T::default()` when there is none.
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> Result<T, ApiError> {
        if self.body.is_empty() {
            Ok(T::default())
        } else {
            self.json()
        }
    }

    /// Query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| percent_decode(v).ok()).flatten()
        })
    }
}

pub type Handler = fn(&Ctx, &Call) -> Result<serde_json::Value, ApiError>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(&'static str),
    Param(&'static str),
}

/// One endpoint.
#[derive(Debug)]
struct Route {
    method: &'static str,
    pattern: &'static str,
    segments: Vec<Segment>,
    summary: &'static str,
    handler: Handler,
}

/// The endpoints of every area.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

fn segments(pattern: &'static str) -> Vec<Segment> {
    pattern
        .split('/')
        .filter(|s| !s.is_empty())
        .map(
            |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Segment::Param(name),
                None => Segment::Literal(s),
            },
        )
        .collect()
}

impl Router {
    /// Registers `method pattern` (e.g. `GET /v1/tenants/{tenant}`).
    ///
    /// # Panics
    /// If the same method and pattern are registered twice (a programming
    /// error between areas).
    pub fn add(
        &mut self,
        method: &'static str,
        pattern: &'static str,
        summary: &'static str,
        handler: Handler,
    ) {
        let segs = segments(pattern);
        assert!(
            !self
                .routes
                .iter()
                .any(|r| r.method == method && same_shape(&r.segments, &segs)),
            "{method} {pattern} registered twice"
        );
        self.routes.push(Route {
            method,
            pattern,
            segments: segs,
            summary,
            handler,
        });
    }

    /// Every endpoint as `(method, pattern, summary)`.
    pub fn endpoints(&self) -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
        self.routes.iter().map(|r| (r.method, r.pattern, r.summary))
    }

    /// Answers one request; a handler that panics gets a 500 and changes
    /// nothing more than it had changed.
    pub fn dispatch(&self, ctx: &Ctx, req: &Request) -> Response {
        let parts: Result<Vec<String>, ApiError> = req
            .path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect();
        let parts = match parts {
            Ok(p) => p,
            Err(e) => return Response::error(&e),
        };
        let mut allowed = Vec::new();
        for r in &self.routes {
            let Some(params) = matches(&r.segments, &parts) else {
                continue;
            };
            if r.method != req.method {
                allowed.push(r.method);
                continue;
            }
            let call = Call {
                params,
                body: &req.body,
                query: req.query.as_deref(),
            };
            let run = std::panic::AssertUnwindSafe(|| (r.handler)(ctx, &call));
            return match std::panic::catch_unwind(run) {
                Ok(Ok(body)) => Response::ok(body),
                Ok(Err(e)) => Response::error(&e),
                Err(_) => Response::error(&ApiError::internal(format!(
                    "{} {} failed inside vspa",
                    r.method, r.pattern
                ))),
            };
        }
        if allowed.is_empty() {
            return Response::error(&ApiError::not_found(format!(
                "no endpoint {} (see GET /v1)",
                req.path
            )));
        }
        let e = ApiError::new(
            405,
            "method_not_allowed",
            format!(
                "{} is not allowed on {} (allowed: {})",
                req.method,
                req.path,
                allowed.join(", ")
            ),
        );
        Response {
            allow: Some(allowed.join(", ")),
            ..Response::error(&e)
        }
    }
}

/// Two patterns that match the same paths (parameter names aside).
fn same_shape(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (Segment::Literal(x), Segment::Literal(y)) => x == y,
            (Segment::Param(_), Segment::Param(_)) => true,
            _ => false,
        })
}

fn matches(pattern: &[Segment], parts: &[String]) -> Option<Vec<(&'static str, String)>> {
    if pattern.len() != parts.len() {
        return None;
    }
    let mut params = Vec::new();
    for (s, p) in pattern.iter().zip(parts) {
        match s {
            Segment::Literal(l) if l == p => {}
            Segment::Literal(_) => return None,
            Segment::Param(name) => params.push((*name, p.clone())),
        }
    }
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Ctx {
        let appliance = Appliance::start(&Default::default(), &Default::default()).unwrap();
        Ctx {
            appliance: Arc::new(Mutex::new(appliance)),
        }
    }

    fn echo(_: &Ctx, c: &Call) -> Result<serde_json::Value, ApiError> {
        Ok(json!({ "name": c.param("name"), "n": c.number::<u8>("n")? }))
    }

    fn body(_: &Ctx, c: &Call) -> Result<serde_json::Value, ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct B {
            #[allow(dead_code)]
            up: bool,
        }
        c.json::<B>()?;
        Ok(json!({}))
    }

    fn boom(_: &Ctx, _: &Call) -> Result<serde_json::Value, ApiError> {
        panic!("a bug")
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: None,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routes_bind_parameters_and_map_errors() {
        let mut r = Router::default();
        r.add("GET", "/v1/things/{name}/{n}", "", echo);
        r.add("PUT", "/v1/things/{name}/{n}", "", body);
        r.add("POST", "/v1/boom", "", boom);
        let ctx = ctx();
        let got = r.dispatch(&ctx, &req("GET", "/v1/things/a%20b/7", ""));
        assert_eq!(
            (got.status, got.body),
            (200, json!({"name": "a b", "n": 7}))
        );
        let cases = [
            (req("GET", "/v1/things/a/300", ""), 404, "not_found"),
            (req("GET", "/v1/nothing", ""), 404, "not_found"),
            (
                req("DELETE", "/v1/things/a/1", ""),
                405,
                "method_not_allowed",
            ),
            (
                req("PUT", "/v1/things/a/1", "{\"up\": "),
                400,
                "bad_request",
            ),
            (req("PUT", "/v1/things/a/1", ""), 400, "bad_request"),
            (req("PUT", "/v1/things/a/1", "{\"up\": 3}"), 422, "invalid"),
            (
                req("PUT", "/v1/things/a/1", "{\"down\": true}"),
                422,
                "invalid",
            ),
            (req("POST", "/v1/boom", ""), 500, "internal"),
            (req("GET", "/v1/things/%zz/1", ""), 400, "bad_request"),
        ];
        for (rq, status, code) in cases {
            let got = r.dispatch(&ctx, &rq);
            assert_eq!(
                (got.status, got.body["code"].as_str()),
                (status, Some(code)),
                "{rq:?}"
            );
        }
        let got = r.dispatch(&ctx, &req("DELETE", "/v1/things/a/1", ""));
        assert_eq!(got.allow.as_deref(), Some("GET, PUT"));
        assert_eq!(r.endpoints().count(), 3);
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn an_endpoint_registers_once() {
        let mut r = Router::default();
        r.add("GET", "/v1/x/{a}", "", echo);
        r.add("GET", "/v1/x/{b}", "", echo);
    }
}
