//! Time as IMDS prints it: HTTP dates for headers, RFC 3339 seconds for JSON documents.
//!
//! Both formatters panic or fail outside 1970..9999, and `now` comes from callers (tests pass
//! arbitrary times), so every time is clamped into that range before it is stored or printed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds from the epoch to 9999-12-31T23:59:59Z, the last instant both formatters accept.
const LAST_PRINTABLE_SECS: u64 = 253_402_300_799;

/// The latest instant the formatters can print.
fn last_printable() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(LAST_PRINTABLE_SECS)
}

/// `time` moved into the printable range.
pub(super) fn clamp(time: SystemTime) -> SystemTime {
    time.clamp(UNIX_EPOCH, last_printable())
}

/// `time + span`, saturating at the last printable instant instead of overflowing.
pub(super) fn add(time: SystemTime, span: Duration) -> SystemTime {
    time.checked_add(span).map_or_else(last_printable, clamp)
}

/// `time` truncated to whole seconds, so a stored time equals what its RFC 3339 text says.
pub(super) fn whole_seconds(time: SystemTime) -> SystemTime {
    let secs = clamp(time)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `Date` / `Last-Modified` header text.
pub(super) fn http_date(time: SystemTime) -> String {
    httpdate::fmt_http_date(clamp(time))
}

/// RFC 3339 UTC with seconds precision, as IMDS writes `LastUpdated` and `Expiration`.
pub(super) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(clamp(time)).to_string()
}
