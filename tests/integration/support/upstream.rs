//! The application upstream `call-route` tests call.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;

/// A small application upstream for `call-route`, on a real socket:
/// * `/echo` (any method): JSON of what arrived (method, path, query, headers, body);
/// * `/text`: `text/plain` "hello";
/// * `/redirect`: 302 to `/elsewhere`;
/// * `/missing`: 404 with a JSON body;
/// * `/slow`: answers after 5 s;
/// * `/hold`: answers when the returned `Notify` is notified (one permit per request).
pub struct Upstream {
    pub addr: SocketAddr,
    pub release: std::sync::Arc<tokio::sync::Semaphore>,
    pub held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

pub async fn spawn_upstream() -> Upstream {
    use http_body_util::{BodyExt, Full};
    use hyper::{server::conn::http1, service::service_fn, Response};
    use hyper_util::rt::TokioIo;
    use std::sync::{atomic::Ordering, Arc};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (release2, held2) = (release.clone(), held.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (release, held) = (release2.clone(), held2.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (release, held) = (release.clone(), held.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let header = |name: &str| {
                            parts
                                .headers
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_owned())
                        };
                        let json = |status: u16, v: Value| {
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json; charset=utf-8")
                                .header("x-upstream", "yes")
                                .body(Full::new(bytes::Bytes::from(v.to_string())))
                                .unwrap()
                        };
                        let response = match parts.uri.path() {
                            "/echo" => json(
                                200,
                                serde_json::json!({
                                    "method": parts.method.as_str(),
                                    "path": parts.uri.path(),
                                    "query": parts.uri.query(),
                                    "cookie": header("cookie"),
                                    "connection_id": header("x-socket-connection-id"),
                                    "digest": header("x-socket-digest"),
                                    "content_type": header("content-type"),
                                    "body": String::from_utf8_lossy(&body),
                                }),
                            ),
                            "/text" => Response::builder()
                                .header("content-type", "text/plain")
                                .body(Full::new(bytes::Bytes::from_static(b"hello")))
                                .unwrap(),
                            "/redirect" => Response::builder()
                                .status(302)
                                .header("location", "/elsewhere")
                                .body(Full::new(bytes::Bytes::new()))
                                .unwrap(),
                            "/missing" => json(404, serde_json::json!({"error": "no such thing"})),
                            "/slow" => {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                json(200, serde_json::json!("late"))
                            }
                            "/hold" => {
                                held.fetch_add(1, Ordering::SeqCst);
                                release.acquire().await.unwrap().forget();
                                json(200, serde_json::json!("released"))
                            }
                            _ => json(500, serde_json::json!("unknown test route")),
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        release,
        held,
    }
}
