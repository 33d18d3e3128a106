//! The shape of every IMDS answer: the headers real IMDS always sends, and its XHTML error
//! pages. Routing decides the status and body; this file makes them look like EC2ws.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT_RANGES, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE,
    LAST_MODIFIED, SERVER,
};
use http::{Response, StatusCode};

use super::clock;

/// Content type of metadata values, listings and the JSON documents alike.
pub(super) const TEXT_PLAIN: &str = "text/plain";
/// Content type of user data, which is opaque bytes.
pub(super) const OCTET_STREAM: &str = "application/octet-stream";
/// Content type of error pages.
const TEXT_HTML: &str = "text/html";

/// A 200 carrying `body`. `last_modified` is when the data last changed; it is capped at `now`
/// so a test clock set before the simulated launch never yields a date in the future.
pub(super) fn ok(
    body: Bytes,
    content_type: &'static str,
    last_modified: SystemTime,
    now: SystemTime,
) -> Response<Bytes> {
    let mut response = base(StatusCode::OK, content_type, body, now);
    let headers = response.headers_mut();
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("none"));
    headers.insert(LAST_MODIFIED, date_value(last_modified.min(now)));
    response
}

/// An error with IMDS's XHTML page for `status`.
pub(super) fn error(status: StatusCode, now: SystemTime) -> Response<Bytes> {
    base(status, TEXT_HTML, error_page(status).into(), now)
}

/// A 405 listing the methods the path accepts, as HTTP requires.
pub(super) fn method_not_allowed(allow: &'static str, now: SystemTime) -> Response<Bytes> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, now);
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// The page IMDS sends with every error status.
fn error_page(status: StatusCode) -> String {
    let title = format!(
        "{} - {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
         <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
         \t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
         <head>\n  \
         <title>{title}</title>\n \
         </head>\n \
         <body>\n  \
         <h1>{title}</h1>\n \
         </body>\n\
         </html>\n"
    )
}

/// Headers every answer carries. `Connection: close` even on keep-alive requests, because
/// IMDS does so and clients must cope with it.
fn base(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    now: SystemTime,
) -> Response<Bytes> {
    let length = body.len();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(DATE, date_value(now));
    headers.insert(SERVER, HeaderValue::from_static("EC2ws"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn date_value(time: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&clock::http_date(time))
        .expect("an HTTP date is letters, digits, spaces, commas and colons")
}
