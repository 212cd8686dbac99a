//! HTTP/1.1 framing for the control API: one request per connection,
//! parsed with `httparse`, bounded in size and time, and one JSON response
//! (`Connection: close`). The client side of `vspa ctl` lives here too, so
//! both ends frame the same way.

use std::io::{self, Read, Write};
use std::time::Duration;

use super::error::ApiError;

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 32;
/// Time a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query, still percent-encoded.
    pub path: String,
    pub query: Option<String>,
    pub body: Vec<u8>,
}

/// A response: a status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
    /// The `Allow` header of a 405.
    pub allow: Option<String>,
}

impl Response {
    pub fn ok(body: serde_json::Value) -> Self {
        Response {
            status: 200,
            body,
            allow: None,
        }
    }

    pub fn error(e: &ApiError) -> Self {
        Response {
            status: e.status,
            body: e.body(),
            allow: None,
        }
    }
}

/// Why no request was read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed before sending anything.
    Closed,
    /// A request that gets an error response.
    Bad(ApiError),
}

impl From<ApiError> for ReadError {
    fn from(e: ApiError) -> Self {
        ReadError::Bad(e)
    }
}

fn io_error(e: io::Error) -> ReadError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ReadError::Bad(ApiError::new(
            408,
            "timeout",
            format!("the request was not complete within {REQUEST_TIMEOUT:?}"),
        )),
        _ => ReadError::Bad(ApiError::bad_request(format!("reading the request: {e}"))),
    }
}

/// Reads one request from `conn`; `conn` gets `100 Continue` when the
/// client asks for it.
pub fn read_request<C: Read + Write>(conn: &mut C) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).map_err(io_error)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ReadError::Closed
            } else {
                ApiError::bad_request("the connection closed inside the request").into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = parse_head(&buf)? {
            let body_start = head.len;
            let mut body = buf.split_off(body_start);
            if head.expect_continue && body.len() < head.content_length {
                conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .map_err(io_error)?;
            }
            while body.len() < head.content_length {
                let n = conn.read(&mut chunk).map_err(io_error)?;
                if n == 0 {
                    return Err(
                        ApiError::bad_request("the body is shorter than Content-Length").into(),
                    );
                }
                body.extend_from_slice(&chunk[..n]);
            }
            if body.len() > head.content_length {
                return Err(ApiError::bad_request(
                    "data after the body (one request per connection)",
                )
                .into());
            }
            return Ok(Request {
                method: head.method,
                path: head.path,
                query: head.query,
                body,
            });
        }
        if buf.len() > MAX_HEAD {
            return Err(ApiError::new(
                431,
                "headers_too_large",
                format!("the request head is over {MAX_HEAD} bytes"),
            )
            .into());
        }
    }
}

/// A complete request head.
#[derive(Debug)]
struct Head {
    len: usize,
    method: String,
    path: String,
    query: Option<String>,
    content_length: usize,
    expect_continue: bool,
}

/// Parses the head if it is complete (None: read more).
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::new(
                431,
                "headers_too_large",
                format!("more than {MAX_HEADERS} headers"),
            ));
        }
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "malformed HTTP request: {e}"
            )));
        }
    };
    if len > MAX_HEAD {
        return Err(ApiError::new(
            431,
            "headers_too_large",
            format!("the request head is over {MAX_HEAD} bytes"),
        ));
    }
    let mut content_length = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| ApiError::bad_request(format!("bad Content-Length {value:?}")))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(ApiError::bad_request("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::new(
                411,
                "length_required",
                "chunked bodies are not accepted: send Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(ApiError::new(
            413,
            "payload_too_large",
            format!("a body of {content_length} bytes is over the limit of {MAX_BODY}"),
        ));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    Ok(Some(Head {
        len,
        method: req.method.unwrap_or("").to_string(),
        path,
        query,
        content_length,
        expect_continue,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Writes `resp` as an HTTP/1.1 response that closes the connection.
pub fn write_response(w: &mut impl Write, resp: &Response) -> io::Result<()> {
    let mut body = serde_json::to_vec_pretty(&resp.body).map_err(io::Error::other)?;
    body.push(b'\n');
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status),
        body.len()
    );
    if let Some(allow) = &resp.allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Decodes `%XX` escapes of a path segment.
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad_request(format!("bad escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request(format!("{s:?} is not UTF-8")))
}

/// Encodes a path segment (everything but unreserved characters).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response as the client reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

/// Sends one request over `conn` and reads the response (the client side,
/// for `vspa ctl` and tests).
pub fn call<C: Read + Write>(
    conn: &mut C,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> io::Result<ClientResponse> {
    let body = body
        .map(serde_json::to_vec)
        .transpose()
        .map_err(io::Error::other)?
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: vspa\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(&body)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<ClientResponse> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad("incomplete response".into())),
        Err(e) => return Err(bad(format!("malformed response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let body = &raw[len..];
    let body = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| bad(format!("response body: {e}")))?
    };
    Ok(ClientResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection with fixed input that keeps what is written.
    struct Pipe {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn read(raw: &[u8]) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut p = Pipe {
            input: io::Cursor::new(raw.to_vec()),
            output: Vec::new(),
        };
        (read_request(&mut p), p.output)
    }

    fn status(raw: &[u8]) -> u16 {
        match read(raw).0 {
            Err(ReadError::Bad(e)) => e.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_parse_with_bodies_and_queries() {
        let (r, out) = read(b"POST /v1/controllers/c%200/luns?x=1 HTTP/1.1\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n{\"a\":1}");
        let r = r.unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/controllers/c%200/luns");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.body, b"{\"a\":1}");
        assert!(out.is_empty(), "the body came with the head: no 100");
        let (r, out) =
            read(b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n");
        assert!(matches!(r, Err(ReadError::Bad(_))), "short body");
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(matches!(read(b"").0, Err(ReadError::Closed)));
    }

    #[test]
    fn bad_requests_get_their_statuses() {
        assert_eq!(status(b"GARBAGE\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            413
        );
        assert_eq!(status(b"GET /x HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status(b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        let mut many = b"GET /x HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
        let mut huge = b"GET /x HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD + 100, b'a');
        assert_eq!(status(&huge), 431);
        assert_eq!(
            status(b"GET /x HTTP/1.1\r\nContent-Length: 1\r\n\r\nab"),
            400
        );
    }

    #[test]
    fn responses_round_trip_and_escapes_decode() {
        let mut out = Vec::new();
        let mut resp = Response::error(&ApiError::not_found("no LUN 9"));
        resp.allow = Some("GET".into());
        write_response(&mut out, &resp).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Allow: GET\r\n"));
        let back = parse_response(&out).unwrap();
        assert_eq!(back.status, 404);
        assert_eq!(back.body["code"], "not_found");
        assert_eq!(percent_decode("a%2Fb%20c").unwrap(), "a/b c");
        assert!(percent_decode("%zz").is_err());
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
    }
}
