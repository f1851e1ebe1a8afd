//! REST error responses: `{"error": {"code", "message"}}` (PROTOCOL §4).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{Error, ErrorBody};
use crate::metrics::{ErrorSource, record_error};

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.log_if_server_error("request failed");
        let code = self.code();
        record_error(ErrorSource::Rest, code);
        let status =
            StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(ErrorBody::of(&self))).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
