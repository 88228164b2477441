//! `call-route`: a client calls the application's REST routes over its WebSocket.
//!
//! `{"action":"call-route","id":..,"uri":"/path?q","method":"post","input":{..}}` becomes an HTTP
//! request to the configured upstream: the method (default GET, any case), the uri's path and
//! query, `input` as a JSON body (as query parameters for GET and DELETE), the upgrade request's
//! `Cookie` header without the socket key cookie, and `X-Socket-Connection-Id` /
//! `X-Socket-Digest`. The reply carries the upstream's status, headers and body (parsed JSON when
//! the content type is JSON, else a string). Redirects are passed back, not followed.
//!
//! Failures: no upstream configured 501; bad message 400; upstream refused or reset 502;
//! slower than the timeout 504; a response body over the limit 502.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde::Deserialize;
use serde_json::{value::RawValue, Value};

use super::{Handler, Outcome, Request};
use crate::domain::Json;
use crate::error::BadUpstream;
use crate::protocol::{Body, Reply};

/// The action name.
pub(crate) const ACTION: &str = "call-route";

/// Largest upstream response body passed back, in bytes.
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 << 10;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// The `call-route` handler: a pooled HTTP/1.1 client to one upstream.
#[derive(Clone)]
pub(crate) struct CallRoute {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    base: Uri,
    timeout: Duration,
    key_cookie: Box<str>,
    /// Pooled connections; the pool's connection tasks belong to the client and end with it
    /// (spawned by hyper's executor, not the edge's task tracker).
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for CallRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRoute")
            .field("upstream", &self.inner.as_ref().map(|i| i.base.to_string()))
            .finish()
    }
}

impl CallRoute {
    /// A handler calling `upstream` (an `http://` base URL), or answering 501 when `None`.
    pub(crate) fn new(
        upstream: Option<&str>,
        timeout: Duration,
        key_cookie: &str,
    ) -> Result<Self, BadUpstream> {
        let Some(upstream) = upstream else {
            return Ok(Self { inner: None });
        };
        let base: Uri = upstream
            .trim_end_matches('/')
            .parse()
            .map_err(|_| BadUpstream(upstream.into()))?;
        if base.scheme_str() != Some("http") || base.host().is_none() {
            return Err(BadUpstream(upstream.into()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(Self {
            inner: Some(Arc::new(Inner {
                base,
                timeout,
                key_cookie: key_cookie.into(),
                client,
            })),
        })
    }
}

#[derive(Deserialize)]
struct Call<'a> {
    uri: Option<&'a str>,
    #[serde(default)]
    method: Option<&'a str>,
    #[serde(default, borrow)]
    input: Option<&'a RawValue>,
}

impl Handler for CallRoute {
    fn handle(&self, request: Request) -> Outcome {
        let Some(inner) = &self.inner else {
            return Outcome::Reply(request.reply(501, "call-route: no upstream configured"));
        };
        let http_request = match build(inner, &request) {
            Ok(r) => r,
            Err(why) => return Outcome::Reply(request.reply(400, why)),
        };
        let inner = inner.clone();
        Outcome::Pending(Box::pin(async move {
            let id = request.id.clone();
            Some(
                match tokio::time::timeout(inner.timeout, call(&inner, http_request)).await {
                    Ok(Ok(reply)) => Reply { id, ..reply },
                    Ok(Err(why)) => {
                        tracing::debug!(connection_id = %request.socket.connection_id, why, "call-route failed");
                        Reply::text(id, 502, why)
                    }
                    Err(_) => Reply::text(id, 504, "call-route: upstream timed out"),
                },
            )
        }))
    }
}

fn build(inner: &Inner, request: &Request) -> Result<http::Request<Full<Bytes>>, String> {
    let call: Call<'_> =
        serde_json::from_str(&request.text).map_err(|e| format!("call-route: {e}"))?;
    let uri = call.uri.ok_or("call-route: uri is required")?;
    if !uri.starts_with('/') || uri.starts_with("//") {
        return Err("call-route: uri must be a path like /posts?page=2".into());
    }
    let method = match call.method {
        None => Method::GET,
        Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("call-route: invalid method {m:?}"))?,
    };
    let input = call.input.filter(|raw| raw.get() != "null");
    let in_query = method == Method::GET || method == Method::DELETE || method == Method::HEAD;

    let mut target = format!("{}{}", inner.base.to_string().trim_end_matches('/'), uri);
    let mut body = Bytes::new();
    if let Some(input) = input {
        if in_query {
            let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(input.get()) else {
                return Err("call-route: input must be an object for GET and DELETE".into());
            };
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (name, value) in &fields {
                match value {
                    Value::String(s) => query.append_pair(name, s),
                    Value::Null => query.append_pair(name, ""),
                    other => query.append_pair(name, &other.to_string()),
                };
            }
            let query = query.finish();
            if !query.is_empty() {
                target.push(if target.contains('?') { '&' } else { '?' });
                target.push_str(&query);
            }
        } else {
            body = Bytes::copy_from_slice(input.get().as_bytes());
        }
    }
    let mut builder = http::Request::builder().method(method).uri(&target);
    let headers = builder.headers_mut().ok_or("call-route: invalid uri")?;
    if !body.is_empty() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/json, */*;q=0.5"),
    );
    let socket = &request.socket;
    if let Some(cookies) = socket
        .cookies
        .as_ref()
        .and_then(|c| without_cookie(c, &inner.key_cookie))
    {
        headers.insert(header::COOKIE, cookies);
    }
    let id = HeaderValue::from_str(&socket.connection_id).map_err(|_| "call-route: bad id")?;
    headers.insert("x-socket-connection-id", id);
    let digest =
        HeaderValue::from_str(&socket.digest.to_string()).map_err(|_| "call-route: bad digest")?;
    headers.insert("x-socket-digest", digest);
    builder
        .body(Full::new(body))
        .map_err(|e| format!("call-route: invalid request: {e}"))
}

/// `cookies` without the cookie `name` (the socket key never leaves the gateway).
fn without_cookie(cookies: &HeaderValue, name: &str) -> Option<HeaderValue> {
    let text = cookies.to_str().ok()?;
    let kept: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').is_none_or(|(n, _)| n != name))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join("; ")).ok()
}

async fn call(inner: &Inner, request: http::Request<Full<Bytes>>) -> Result<Reply, &'static str> {
    let response = inner
        .client
        .request(request)
        .await
        .map_err(|_| "call-route: upstream unreachable")?;
    let status = response.status().as_u16();
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.iter_mut().find(|(n, _)| n == name.as_str()) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            None => headers.push((name.as_str().to_owned(), value)),
        }
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        });
    let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|_| "call-route: upstream response failed or too large")?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let body = match is_json.then(|| Json::parse(&text)) {
        Some(Ok(json)) => Body::Json(json),
        _ => Body::Text(text.into_owned()),
    };
    Ok(Reply {
        id: None,
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_cookie_is_stripped() {
        let c = HeaderValue::from_static("session=s1; socket_key=secret; theme=dark");
        assert_eq!(
            without_cookie(&c, "socket_key").unwrap(),
            "session=s1; theme=dark"
        );
        let only = HeaderValue::from_static("socket_key=secret");
        assert!(without_cookie(&only, "socket_key").is_none());
    }

    #[test]
    fn upstreams_must_be_http() {
        let t = Duration::from_secs(1);
        assert!(CallRoute::new(Some("http://127.0.0.1:3000/"), t, "k").is_ok());
        assert!(CallRoute::new(Some("https://example.com"), t, "k").is_err());
        assert!(CallRoute::new(Some("not a url"), t, "k").is_err());
    }
}
