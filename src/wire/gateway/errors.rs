//! How failures look on the gateway: gRPC codes mapped to HTTP statuses exactly as
//! grpc-gateway v1's `HTTPStatusFromCode`, and the three body shapes etcd's gateway writes:
//! - a unary error: `{"error":"<msg>","message":"<msg>","code":<grpc code>}`;
//! - a stream error: `{"error":{"grpc_code":N,"http_code":N,"message":"..","http_status":".."}}`;
//! - Go's `http.Error` plain text (`Not Found`, `Method Not Allowed`, ...).
//!
//! Zero fields are omitted in the JSON shapes, as `jsonpb` with `EmitDefaults: false` does.

use tonic::Code;

use super::json::write_string;

/// grpc-gateway v1 `runtime.HTTPStatusFromCode`.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 408,
        Code::Unknown => 500,
        Code::InvalidArgument => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists => 409,
        Code::PermissionDenied => 403,
        Code::Unauthenticated => 401,
        Code::ResourceExhausted => 429,
        Code::FailedPrecondition => 412,
        Code::Aborted => 409,
        Code::OutOfRange => 400,
        Code::Unimplemented => 501,
        Code::Internal => 500,
        Code::Unavailable => 503,
        Code::DataLoss => 500,
    }
}

/// Go's `http.StatusText` for the statuses the gateway produces.
pub fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// The body of a unary error (grpc-gateway's `errorBody`).
pub fn unary_body(code: Code, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() * 2 + 40);
    out.push(b'{');
    if !message.is_empty() {
        out.extend_from_slice(b"\"error\":");
        write_string(&mut out, message);
        out.extend_from_slice(b",\"message\":");
        write_string(&mut out, message);
    }
    let code = code as i32;
    if code != 0 {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(format!("\"code\":{code}").as_bytes());
    }
    out.push(b'}');
    out
}

/// The chunk a stream ends with when the call fails (no trailing newline, as etcd writes it).
pub fn stream_body(code: Code, message: &str) -> Vec<u8> {
    let http = http_status(code);
    let mut parts: Vec<Vec<u8>> = Vec::new();
    if code as i32 != 0 {
        parts.push(format!("\"grpc_code\":{}", code as i32).into_bytes());
    }
    parts.push(format!("\"http_code\":{http}").into_bytes());
    if !message.is_empty() {
        let mut m = b"\"message\":".to_vec();
        write_string(&mut m, message);
        parts.push(m);
    }
    let text = status_text(http);
    if !text.is_empty() {
        let mut m = b"\"http_status\":".to_vec();
        write_string(&mut m, text);
        parts.push(m);
    }
    let mut out = b"{\"error\":{".to_vec();
    out.extend_from_slice(&parts.join(&b","[..]));
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unary_shape() {
        assert_eq!(
            String::from_utf8(unary_body(
                Code::InvalidArgument,
                "invalid character 'b' looking for beginning of object key string"
            ))
            .unwrap(),
            r#"{"error":"invalid character 'b' looking for beginning of object key string","message":"invalid character 'b' looking for beginning of object key string","code":3}"#
        );
    }

    #[test]
    fn stream_shape() {
        assert_eq!(
            String::from_utf8(stream_body(Code::OutOfRange, "x")).unwrap(),
            r#"{"error":{"grpc_code":11,"http_code":400,"message":"x","http_status":"Bad Request"}}"#
        );
    }
}
