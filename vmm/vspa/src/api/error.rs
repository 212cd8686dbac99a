//! The API's errors: a status code, a stable machine-readable code and a
//! message, sent as `{"error": "...", "code": "..."}`.

use serde_json::json;

use crate::overrides::ChangeError;

/// A request that did not succeed; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request cannot be parsed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }

    /// 404: no such endpoint, tenant, controller, LUN, switch or port.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }

    /// 409: conflicts with what runs (a duplicate, a device in use).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "conflict", message)
    }

    /// 422: well-formed, but a value is not acceptable.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "invalid", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// The response body.
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": self.message, "code": self.code })
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::NotFound(m) => ApiError::not_found(m),
            ChangeError::Conflict(m) => ApiError::conflict(m),
            ChangeError::Invalid(m) => ApiError::invalid(m),
            ChangeError::Failed(m) => ApiError::new(422, "apply_failed", m),
        }
    }
}

impl From<ic::IcError> for ApiError {
    fn from(e: ic::IcError) -> Self {
        use ic::IcError::*;
        let (status, code) = match &e {
            Disabled => (409, "service_disabled"),
            NotConnected | NotReady | Failed(_) => (409, "guest_not_connected"),
            Busy | NotAllowed(_) => (409, "conflict"),
            TimedOut => (504, "guest_timeout"),
            Refused(_) | BadReply(_) => (502, "guest_error"),
            InvalidArgument(_) => (422, "invalid"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_and_guest_errors_map_to_statuses() {
        let cases = [
            (ApiError::from(ChangeError::NotFound("x".into())), 404),
            (ChangeError::Conflict("x".into()).into(), 409),
            (ChangeError::Invalid("x".into()).into(), 422),
            (ChangeError::Failed("x".into()).into(), 422),
            (ic::IcError::TimedOut.into(), 504),
            (ic::IcError::NotConnected.into(), 409),
            (ic::IcError::InvalidArgument("k".into()).into(), 422),
        ];
        for (e, status) in cases {
            assert_eq!(e.status, status, "{e}");
        }
        let body = ApiError::conflict("LUN 1 is in use").body();
        assert_eq!(
            body,
            json!({"error": "LUN 1 is in use", "code": "conflict"})
        );
    }
}
