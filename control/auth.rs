//! Bearer-token authentication of control calls: `authorization: Bearer <token>`, compared in
//! constant time against every configured token (several, for rotation). With no token
//! configured every call passes.

use subtle::ConstantTimeEq;
use tonic::{service::Interceptor, Request, Status};

/// Checks the bearer token of each call.
#[derive(Clone)]
pub(crate) struct BearerAuth {
    tokens: std::sync::Arc<[Box<[u8]>]>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl BearerAuth {
    /// Accepts any of `tokens`; none means no authentication.
    pub(crate) fn new(tokens: &[String]) -> Self {
        Self {
            tokens: tokens
                .iter()
                .map(|t| t.as_bytes().to_vec().into_boxed_slice())
                .collect(),
        }
    }

    fn allows(&self, presented: &[u8]) -> bool {
        // Check every token so the time taken does not say which one nearly matched.
        self.tokens
            .iter()
            .fold(subtle::Choice::from(0), |ok, t| {
                ok | t.as_ref().ct_eq(presented)
            })
            .into()
    }

    /// Whether `headers` carry an accepted token (always, when none is configured).
    pub(crate) fn check(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        match presented {
            Some(token) if self.allows(token.trim().as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token (authorization: Bearer <token>)",
            )),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata().as_ref())?;
        Ok(request)
    }
}
