//! Behaviour of the simulator as a client sees it: status, headers, body, hop limiting.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::*;

const ROLE_PATH: &str = "/latest/meta-data/iam/security-credentials/imds-hop-proxy-demo";

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn sim(tokens: TokenMode) -> Simulator {
    Simulator::new(SimulatorConfig {
        tokens,
        ..SimulatorConfig::default()
    })
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            *name,
            HeaderValue::from_str(value).expect("test header value"),
        );
    }
    map
}

fn call(
    sim: &Simulator,
    method: Method,
    path: &str,
    pairs: &[(&'static str, &str)],
    now: SystemTime,
) -> SimResponse {
    sim.respond(&method, path, &headers(pairs), b"", now)
}

fn put_token(sim: &Simulator, ttl: Option<&str>, now: SystemTime) -> SimResponse {
    let pairs: Vec<(&'static str, &str)> = ttl.map(|t| (TOKEN_TTL_HEADER, t)).into_iter().collect();
    call(sim, Method::PUT, TOKEN_PATH, &pairs, now)
}

fn token(sim: &Simulator, ttl_secs: u64, now: SystemTime) -> String {
    let reply = put_token(sim, Some(&ttl_secs.to_string()), now);
    assert_eq!(reply.response.status(), StatusCode::OK);
    body(&reply).to_owned()
}

fn get(sim: &Simulator, path: &str, token: Option<&str>, now: SystemTime) -> SimResponse {
    let pairs: Vec<(&'static str, &str)> = token.map(|t| (TOKEN_HEADER, t)).into_iter().collect();
    call(sim, Method::GET, path, &pairs, now)
}

fn status(reply: &SimResponse) -> StatusCode {
    reply.response.status()
}

fn header<'a>(reply: &'a SimResponse, name: &str) -> Option<&'a str> {
    reply
        .response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header"))
}

fn body(reply: &SimResponse) -> &str {
    std::str::from_utf8(reply.response.body()).expect("UTF-8 body")
}

/// Serves `path` on an IMDSv1-allowed simulator, for tests about the tree itself.
fn open_get(sim: &Simulator, path: &str) -> SimResponse {
    assert_eq!(sim.config().tokens, TokenMode::Optional);
    get(sim, path, None, t0())
}

fn json_keys(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix('"'))
        .filter_map(|rest| rest.split_once("\" : ").map(|(key, _)| key.to_owned()))
        .collect()
}

// ---- token endpoint ----

#[test]
fn token_ttl_bounds() {
    let sim = sim(TokenMode::Required);
    let cases: &[(Option<&str>, StatusCode)] = &[
        (Some("0"), StatusCode::BAD_REQUEST),
        (Some("1"), StatusCode::OK),
        (Some("21600"), StatusCode::OK),
        (Some("21601"), StatusCode::BAD_REQUEST),
        (Some("abc"), StatusCode::BAD_REQUEST),
        (Some(""), StatusCode::BAD_REQUEST),
        (Some("-5"), StatusCode::BAD_REQUEST),
        (Some("+5"), StatusCode::BAD_REQUEST),
        (Some("1.5"), StatusCode::BAD_REQUEST),
        (Some("99999999999999999999999"), StatusCode::BAD_REQUEST),
        (None, StatusCode::BAD_REQUEST),
    ];
    for (ttl, expected) in cases {
        assert_eq!(
            status(&put_token(&sim, *ttl, t0())),
            *expected,
            "ttl {ttl:?}"
        );
    }
}

#[test]
fn token_answer_carries_token_ttl_and_plain_text() {
    let sim = sim(TokenMode::Required);
    let reply = put_token(&sim, Some("300"), t0());
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(header(&reply, TOKEN_TTL_HEADER), Some("300"));
    assert_eq!(header(&reply, "content-type"), Some("text/plain"));
    let token = body(&reply);
    assert_eq!(token.len(), 56);
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_ne!(
        token,
        body(&put_token(&sim, Some("300"), t0())),
        "tokens repeat"
    );
}

#[test]
fn token_put_with_x_forwarded_for_is_forbidden() {
    let sim = sim(TokenMode::Required);
    for ttl in ["21600", "0"] {
        let reply = call(
            &sim,
            Method::PUT,
            TOKEN_PATH,
            &[(TOKEN_TTL_HEADER, ttl), ("x-forwarded-for", "172.17.0.2")],
            t0(),
        );
        assert_eq!(status(&reply), StatusCode::FORBIDDEN, "ttl {ttl}");
    }
}

#[test]
fn versioned_token_put_is_forbidden() {
    let sim = sim(TokenMode::Required);
    for path in ["/2021-03-23/api/token", "/1.0/api/token"] {
        let reply = call(&sim, Method::PUT, path, &[(TOKEN_TTL_HEADER, "60")], t0());
        assert_eq!(status(&reply), StatusCode::FORBIDDEN, "{path}");
    }
}

#[test]
fn other_methods_on_token_path_are_405_with_allow() {
    let sim = sim(TokenMode::Optional);
    for method in [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::DELETE,
        Method::OPTIONS,
    ] {
        let reply = call(
            &sim,
            method.clone(),
            TOKEN_PATH,
            &[(TOKEN_TTL_HEADER, "60")],
            t0(),
        );
        assert_eq!(status(&reply), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(header(&reply, "allow"), Some("OPTIONS, PUT"), "{method}");
        assert!(!reply.hop_limited, "{method}");
        if method == Method::HEAD {
            assert!(reply.response.body().is_empty());
        }
    }
}

#[test]
fn put_on_a_metadata_path_is_405() {
    let sim = sim(TokenMode::Optional);
    for path in ["/latest/meta-data/", "/latest/api/token/", "/latest/api"] {
        let reply = call(&sim, Method::PUT, path, &[(TOKEN_TTL_HEADER, "60")], t0());
        assert_eq!(status(&reply), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(header(&reply, "allow"), Some("GET, HEAD"), "{path}");
        assert!(!reply.hop_limited, "{path}");
    }
}

#[test]
fn hop_limited_exactly_for_token_put_answers() {
    let sim = sim(TokenMode::Required);
    let put =
        |path: &str, pairs: &[(&'static str, &str)]| call(&sim, Method::PUT, path, pairs, t0());
    let limited = [
        put(TOKEN_PATH, &[(TOKEN_TTL_HEADER, "60")]),
        put(TOKEN_PATH, &[(TOKEN_TTL_HEADER, "0")]),
        put(TOKEN_PATH, &[]),
        put(
            TOKEN_PATH,
            &[(TOKEN_TTL_HEADER, "60"), ("x-forwarded-for", "1.2.3.4")],
        ),
        put("/2021-03-23/api/token", &[(TOKEN_TTL_HEADER, "60")]),
        put("/latest/api/token?x=1", &[(TOKEN_TTL_HEADER, "60")]),
    ];
    for reply in &limited {
        assert!(reply.hop_limited, "{reply:?}");
    }
    let good = token(&sim, 60, t0());
    let unlimited = [
        get(&sim, TOKEN_PATH, None, t0()),
        get(&sim, "/latest/meta-data/ami-id", Some(&good), t0()),
        get(&sim, "/latest/meta-data/ami-id", None, t0()),
        get(&sim, "/latest/nope", Some(&good), t0()),
        put("/latest/meta-data/", &[(TOKEN_TTL_HEADER, "60")]),
    ];
    for reply in &unlimited {
        assert!(!reply.hop_limited, "{reply:?}");
    }
}

// ---- authorisation ----

#[test]
fn required_mode_refuses_requests_without_token() {
    let sim = sim(TokenMode::Required);
    assert_eq!(
        status(&get(&sim, "/latest/meta-data/ami-id", None, t0())),
        StatusCode::UNAUTHORIZED
    );
    // Authorisation comes before the tree: unknown paths are 401 too.
    assert_eq!(
        status(&get(&sim, "/latest/no-such-thing", None, t0())),
        StatusCode::UNAUTHORIZED
    );
    let good = token(&sim, 60, t0());
    let reply = get(&sim, "/latest/meta-data/ami-id", Some(&good), t0());
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(body(&reply), "ami-0abcdef1234567890");
}

#[test]
fn optional_mode_serves_without_token_and_without_ttl_header() {
    let sim = sim(TokenMode::Optional);
    let reply = get(&sim, "/latest/meta-data/instance-type", None, t0());
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(body(&reply), "t3.micro");
    assert_eq!(header(&reply, TOKEN_TTL_HEADER), None);
}

#[test]
fn unknown_token_is_401_in_both_modes() {
    for mode in [TokenMode::Required, TokenMode::Optional] {
        let sim = sim(mode);
        for bad in ["not-a-token", ""] {
            let reply = get(&sim, "/latest/meta-data/ami-id", Some(bad), t0());
            assert_eq!(status(&reply), StatusCode::UNAUTHORIZED, "{mode} {bad:?}");
        }
    }
}

#[test]
fn expired_token_is_401() {
    for mode in [TokenMode::Required, TokenMode::Optional] {
        let sim = sim(mode);
        let tok = token(&sim, 10, t0());
        let path = "/latest/meta-data/ami-id";
        assert_eq!(
            status(&get(&sim, path, Some(&tok), t0() + secs(9))),
            StatusCode::OK
        );
        assert_eq!(
            status(&get(&sim, path, Some(&tok), t0() + secs(10))),
            StatusCode::UNAUTHORIZED,
            "{mode}"
        );
        assert_eq!(
            status(&get(&sim, path, Some(&tok), t0() + secs(3600))),
            StatusCode::UNAUTHORIZED,
            "{mode}"
        );
    }
}

#[test]
fn remaining_ttl_header_decreases_with_time() {
    let sim = sim(TokenMode::Required);
    let tok = token(&sim, 100, t0());
    let ttl_at = |offset: Duration| {
        let reply = get(&sim, "/latest/meta-data/ami-id", Some(&tok), t0() + offset);
        header(&reply, TOKEN_TTL_HEADER).map(str::to_owned)
    };
    assert_eq!(ttl_at(secs(0)).as_deref(), Some("100"));
    assert_eq!(ttl_at(secs(30)).as_deref(), Some("70"));
    // Rounded up: a token with 0.5 s left still says 1.
    assert_eq!(ttl_at(Duration::from_millis(99_500)).as_deref(), Some("1"));
}

#[test]
fn forwarded_get_with_token_is_403_but_imdsv1_get_is_served() {
    let sim = sim(TokenMode::Optional);
    let tok = token(&sim, 60, t0());
    let path = "/latest/meta-data/ami-id";
    let with_token = call(
        &sim,
        Method::GET,
        path,
        &[(TOKEN_HEADER, &tok), ("x-forwarded-for", "172.17.0.2")],
        t0(),
    );
    assert_eq!(status(&with_token), StatusCode::FORBIDDEN);
    let without = call(
        &sim,
        Method::GET,
        path,
        &[("x-forwarded-for", "172.17.0.2")],
        t0(),
    );
    assert_eq!(status(&without), StatusCode::OK);
}

#[test]
fn tokens_are_bounded_and_oldest_is_forgotten() {
    let sim = sim(TokenMode::Required);
    let first = token(&sim, 21600, t0());
    let second = token(&sim, 21600, t0());
    for _ in 0..MAX_SIM_LIVE_TOKENS - 1 {
        token(&sim, 21600, t0());
    }
    assert_eq!(lock(&sim.tokens).len(), MAX_SIM_LIVE_TOKENS);
    let path = "/latest/meta-data/ami-id";
    assert_eq!(
        status(&get(&sim, path, Some(&first), t0())),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(&get(&sim, path, Some(&second), t0())),
        StatusCode::OK
    );
}

// ---- response shape ----

#[test]
fn every_answer_has_imds_headers() {
    let sim = sim(TokenMode::Optional);
    let now = t0() + Duration::from_millis(250);
    for path in ["/latest/meta-data/ami-id", "/latest/nope"] {
        let reply = get(&sim, path, None, now);
        assert_eq!(header(&reply, "server"), Some("EC2ws"), "{path}");
        assert_eq!(header(&reply, "connection"), Some("close"), "{path}");
        assert_eq!(
            header(&reply, "date"),
            Some(httpdate::fmt_http_date(now).as_str()),
            "{path}"
        );
        let length = reply.response.body().len().to_string();
        assert_eq!(
            header(&reply, "content-length"),
            Some(length.as_str()),
            "{path}"
        );
    }
}

#[test]
fn ok_answers_have_accept_ranges_and_last_modified_errors_do_not() {
    let sim = sim(TokenMode::Optional);
    let ok = get(&sim, "/latest/meta-data/ami-id", None, t0());
    assert_eq!(header(&ok, "accept-ranges"), Some("none"));
    let modified = header(&ok, "last-modified").expect("Last-Modified on 200");
    let modified = httpdate::parse_http_date(modified).expect("HTTP date");
    assert!(modified <= t0());
    assert_eq!(header(&ok, "content-type"), Some("text/plain"));

    let missing = get(&sim, "/latest/nope", None, t0());
    assert_eq!(header(&missing, "accept-ranges"), None);
    assert_eq!(header(&missing, "last-modified"), None);
}

#[test]
fn not_found_body_is_the_xhtml_page() {
    let sim = sim(TokenMode::Optional);
    let reply = open_get(&sim, "/latest/meta-data/no-such-key");
    assert_eq!(status(&reply), StatusCode::NOT_FOUND);
    assert_eq!(header(&reply, "content-type"), Some("text/html"));
    let expected = "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>
<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"
\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">
<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">
 <head>
  <title>404 - Not Found</title>
 </head>
 <body>
  <h1>404 - Not Found</h1>
 </body>
</html>
";
    assert_eq!(body(&reply), expected);
}

#[test]
fn every_error_status_has_its_own_page() {
    let sim = sim(TokenMode::Required);
    let cases = [
        (put_token(&sim, None, t0()), "400 - Bad Request"),
        (
            get(&sim, "/latest/meta-data/", None, t0()),
            "401 - Unauthorized",
        ),
        (
            call(&sim, Method::PUT, "/2021-03-23/api/token", &[], t0()),
            "403 - Forbidden",
        ),
        (
            get(&sim, TOKEN_PATH, None, t0()),
            "405 - Method Not Allowed",
        ),
    ];
    for (reply, title) in &cases {
        assert_eq!(header(reply, "content-type"), Some("text/html"), "{title}");
        assert!(
            body(reply).contains(&format!("<title>{title}</title>")),
            "{title}"
        );
        assert!(
            body(reply).contains(&format!("<h1>{title}</h1>")),
            "{title}"
        );
    }
}

#[test]
fn head_has_get_status_and_headers_but_no_body() {
    let sim = sim(TokenMode::Required);
    let tok = token(&sim, 60, t0());
    for path in ["/latest/meta-data/instance-id", "/latest/nope", ROLE_PATH] {
        let get_reply = get(&sim, path, Some(&tok), t0());
        let head_reply = call(&sim, Method::HEAD, path, &[(TOKEN_HEADER, &tok)], t0());
        assert_eq!(status(&head_reply), status(&get_reply), "{path}");
        assert_eq!(
            head_reply.response.headers(),
            get_reply.response.headers(),
            "{path}"
        );
        assert!(head_reply.response.body().is_empty(), "{path}");
        assert!(!get_reply.response.body().is_empty(), "{path}");
    }
    let head_no_token = call(&sim, Method::HEAD, "/latest/meta-data/", &[], t0());
    assert_eq!(status(&head_no_token), StatusCode::UNAUTHORIZED);
    assert!(head_no_token.response.body().is_empty());
}

#[test]
fn times_outside_the_printable_range_do_not_panic() {
    let sim = sim(TokenMode::Optional);
    let before_epoch = UNIX_EPOCH - secs(1);
    let reply = get(&sim, ROLE_PATH, None, before_epoch);
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(
        header(&reply, "date"),
        Some("Thu, 01 Jan 1970 00:00:00 GMT")
    );
    let far = UNIX_EPOCH + secs(400_000_000_000);
    assert_eq!(status(&get(&sim, ROLE_PATH, None, far)), StatusCode::OK);
}

// ---- paths and the tree ----

#[test]
fn leaf_with_trailing_slash_is_served_as_leaf() {
    let sim = sim(TokenMode::Optional);
    for path in [
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/placement/availability-zone/",
    ] {
        let reply = open_get(&sim, path);
        assert_eq!(status(&reply), StatusCode::OK, "{path}");
        assert_eq!(body(&reply), "us-east-1a", "{path}");
    }
}

#[test]
fn directory_listing_format() {
    let sim = sim(TokenMode::Optional);
    for path in [
        "/latest/meta-data/placement/",
        "/latest/meta-data/placement",
    ] {
        let reply = open_get(&sim, path);
        assert_eq!(
            body(&reply),
            "availability-zone\navailability-zone-id\nregion",
            "{path}"
        );
    }
    let meta = open_get(&sim, "/latest/meta-data/");
    let entries: Vec<&str> = body(&meta).split('\n').collect();
    for expected in [
        "ami-id",
        "ami-launch-index",
        "hostname",
        "iam/",
        "instance-id",
        "instance-type",
        "local-hostname",
        "local-ipv4",
        "mac",
        "placement/",
        "services/",
        "tags/",
    ] {
        assert!(entries.contains(&expected), "meta-data/ lacks {expected}");
    }
    assert!(!body(&meta).ends_with('\n'));
    assert_eq!(
        body(&open_get(&sim, "/latest/meta-data/iam/")),
        "info\nsecurity-credentials/"
    );
    assert_eq!(
        body(&open_get(&sim, "/latest/meta-data/tags/instance")),
        "Environment\nName"
    );
    assert_eq!(
        body(&open_get(&sim, "/latest/meta-data/tags/instance/Name")),
        "imds-hop-proxy-demo"
    );
    assert_eq!(
        body(&open_get(&sim, "/latest/meta-data/services/domain")),
        "amazonaws.com"
    );
    assert_eq!(
        body(&open_get(&sim, "/latest/dynamic/")),
        "instance-identity/"
    );
    assert_eq!(
        body(&open_get(&sim, "/latest/dynamic/instance-identity/")),
        "document"
    );
}

#[test]
fn root_and_version_listings() {
    let sim = sim(TokenMode::Optional);
    let root = open_get(&sim, "/");
    let versions: Vec<&str> = body(&root).split('\n').collect();
    assert_eq!(versions.last(), Some(&"latest"));
    assert!(versions.contains(&"2021-03-23"));
    for path in ["/latest/", "/latest"] {
        assert_eq!(
            body(&open_get(&sim, path)),
            "dynamic\nmeta-data\nuser-data",
            "{path}"
        );
    }
    let no_user_data = Simulator::new(SimulatorConfig {
        tokens: TokenMode::Optional,
        user_data: None,
        ..SimulatorConfig::default()
    });
    assert_eq!(
        body(&open_get(&no_user_data, "/latest/")),
        "dynamic\nmeta-data"
    );
}

#[test]
fn query_string_is_ignored() {
    let sim = sim(TokenMode::Optional);
    let reply = open_get(&sim, "/latest/meta-data/instance-id?foo=bar&x=/y");
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(body(&reply), "i-0123456789abcdef0");
}

#[test]
fn dated_versions_alias_latest() {
    let sim = sim(TokenMode::Optional);
    let latest = open_get(&sim, "/latest/meta-data/placement/region");
    let dated = open_get(&sim, "/2021-03-23/meta-data/placement/region");
    assert_eq!(status(&dated), StatusCode::OK);
    assert_eq!(dated.response.body(), latest.response.body());
    assert_eq!(
        status(&open_get(&sim, "/2099-01-01/meta-data/")),
        StatusCode::NOT_FOUND
    );
    // Non-PUT on a versioned token path is just an unknown metadata path.
    assert_eq!(
        status(&open_get(&sim, "/2021-03-23/api/token")),
        StatusCode::NOT_FOUND
    );
}

#[test]
fn unknown_paths_are_404() {
    let sim = sim(TokenMode::Optional);
    for path in [
        "/latest/meta-data/nope",
        "/latest/meta-data/ami-id/deeper",
        "/latest//meta-data/",
        "/latest/meta-data//",
        "/nope/",
        "/latest/api",
        "latest/meta-data/",
    ] {
        assert_eq!(
            status(&open_get(&sim, path)),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
}

#[test]
fn identity_document_matches_metadata() {
    let sim = sim(TokenMode::Optional);
    let reply = open_get(&sim, "/latest/dynamic/instance-identity/document");
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(header(&reply, "content-type"), Some("text/plain"));
    let doc: serde_json::Value = serde_json::from_str(body(&reply)).expect("identity JSON");
    let meta = |leaf: &str| body(&open_get(&sim, &format!("/latest/meta-data/{leaf}"))).to_owned();
    assert_eq!(doc["instanceId"], meta("instance-id"));
    assert_eq!(doc["instanceType"], meta("instance-type"));
    assert_eq!(doc["imageId"], meta("ami-id"));
    assert_eq!(doc["privateIp"], meta("local-ipv4"));
    assert_eq!(doc["region"], meta("placement/region"));
    assert_eq!(doc["availabilityZone"], meta("placement/availability-zone"));
    assert_eq!(doc["version"], "2017-09-30");
    for null_key in [
        "billingProducts",
        "devpayProductCodes",
        "marketplaceProductCodes",
        "kernelId",
        "ramdiskId",
    ] {
        assert!(doc[null_key].is_null(), "{null_key}");
    }
    let instance_id = meta("instance-id");
    let hex = instance_id.strip_prefix("i-0").expect("i-0 prefix");
    assert_eq!(hex.len(), 16);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn user_data_served_as_octet_stream_or_404_when_none() {
    let sim = sim(TokenMode::Optional);
    let reply = open_get(&sim, "/latest/user-data");
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(
        header(&reply, "content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        reply.response.body(),
        &Bytes::from_static(DEFAULT_SIM_USER_DATA)
    );

    let none = Simulator::new(SimulatorConfig {
        tokens: TokenMode::Optional,
        user_data: None,
        ..SimulatorConfig::default()
    });
    assert_eq!(
        status(&open_get(&none, "/latest/user-data")),
        StatusCode::NOT_FOUND
    );
}

// ---- credentials ----

#[test]
fn credentials_listing_names_the_role_and_unknown_role_is_404() {
    let sim = sim(TokenMode::Optional);
    for path in [
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials",
    ] {
        assert_eq!(body(&open_get(&sim, path)), DEFAULT_SIM_ROLE, "{path}");
    }
    let unknown = open_get(
        &sim,
        "/latest/meta-data/iam/security-credentials/other-role",
    );
    assert_eq!(status(&unknown), StatusCode::NOT_FOUND);
    let with_slash = open_get(&sim, &format!("{ROLE_PATH}/"));
    assert_eq!(status(&with_slash), StatusCode::OK);
}

#[test]
fn credentials_document_keys_order_and_format() {
    let sim = sim(TokenMode::Optional);
    let now = t0() + Duration::from_millis(700);
    let reply = get(&sim, ROLE_PATH, None, now);
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(header(&reply, "content-type"), Some("text/plain"));
    let text = body(&reply);
    assert!(text.starts_with("{\n  \"Code\" : \"Success\",\n"), "{text}");
    assert_eq!(
        json_keys(text),
        [
            "Code",
            "LastUpdated",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration"
        ]
    );
    let doc: serde_json::Value = serde_json::from_str(text).expect("credentials JSON");
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    assert_eq!(doc["LastUpdated"], "2023-11-14T22:13:20Z");
    assert_eq!(doc["Expiration"], "2023-11-15T04:13:20Z");

    let key = doc["AccessKeyId"].as_str().expect("AccessKeyId string");
    assert_eq!(key.len(), 20);
    let random = key.strip_prefix("ASIA").expect("ASIA prefix");
    assert!(random
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
    assert_eq!(doc["SecretAccessKey"].as_str().map(str::len), Some(40));
    assert!(doc["Token"].as_str().map_or(0, str::len) >= 500);
}

#[test]
fn credentials_rotate_before_expiry() {
    let sim = sim(TokenMode::Optional);
    let fetch = |now: SystemTime| {
        let reply = get(&sim, ROLE_PATH, None, now);
        assert_eq!(status(&reply), StatusCode::OK);
        serde_json::from_str::<serde_json::Value>(body(&reply)).expect("credentials JSON")
    };
    let expiry = |doc: &serde_json::Value| {
        humantime::parse_rfc3339(doc["Expiration"].as_str().expect("Expiration")).expect("RFC 3339")
    };
    let lifetime = secs(DEFAULT_SIM_CREDENTIAL_LIFETIME_SECS);
    let margin = secs(300);

    let first = fetch(t0());
    assert_eq!(expiry(&first), t0() + lifetime);
    let just_before = fetch(t0() + lifetime - margin - secs(1));
    assert_eq!(just_before["AccessKeyId"], first["AccessKeyId"]);
    assert_eq!(just_before["Token"], first["Token"]);

    let rotated_at = t0() + lifetime - margin;
    let rotated = fetch(rotated_at);
    assert_ne!(rotated["AccessKeyId"], first["AccessKeyId"]);
    assert_ne!(rotated["SecretAccessKey"], first["SecretAccessKey"]);
    // The new set is out at least `margin` before the old one expires.
    assert!(rotated_at + margin <= expiry(&first));
    assert_eq!(expiry(&rotated), rotated_at + lifetime);
    assert_eq!(
        humantime::parse_rfc3339(rotated["LastUpdated"].as_str().expect("LastUpdated"))
            .expect("RFC 3339"),
        rotated_at
    );
    let later = fetch(rotated_at + secs(60));
    assert_eq!(later["AccessKeyId"], rotated["AccessKeyId"]);
}

#[test]
fn short_lifetimes_rotate_at_half_life() {
    let sim = Simulator::new(SimulatorConfig {
        tokens: TokenMode::Optional,
        credential_lifetime: secs(240),
        ..SimulatorConfig::default()
    });
    let key = |now: SystemTime| {
        let reply = get(&sim, ROLE_PATH, None, now);
        let doc: serde_json::Value = serde_json::from_str(body(&reply)).expect("JSON");
        doc["AccessKeyId"].as_str().expect("key").to_owned()
    };
    let first = key(t0());
    assert_eq!(key(t0() + secs(119)), first);
    assert_ne!(key(t0() + secs(120)), first);
}

#[test]
fn iam_info_follows_credentials() {
    let sim = sim(TokenMode::Optional);
    let reply = open_get(&sim, "/latest/meta-data/iam/info");
    assert_eq!(status(&reply), StatusCode::OK);
    assert_eq!(
        json_keys(body(&reply)),
        [
            "Code",
            "LastUpdated",
            "InstanceProfileArn",
            "InstanceProfileId"
        ]
    );
    let doc: serde_json::Value = serde_json::from_str(body(&reply)).expect("info JSON");
    assert_eq!(doc["Code"], "Success");
    assert_eq!(
        doc["InstanceProfileArn"],
        format!("arn:aws:iam::123456789012:instance-profile/{DEFAULT_SIM_ROLE}")
    );
    let creds = open_get(&sim, ROLE_PATH);
    let creds: serde_json::Value = serde_json::from_str(body(&creds)).expect("JSON");
    assert_eq!(doc["LastUpdated"], creds["LastUpdated"]);
}

// ---- configuration ----

#[test]
fn token_mode_parses_and_displays() {
    for mode in [TokenMode::Required, TokenMode::Optional] {
        assert_eq!(mode.to_string().parse::<TokenMode>(), Ok(mode));
    }
    assert_eq!("REQUIRED".parse::<TokenMode>(), Ok(TokenMode::Required));
    let err = "v2".parse::<TokenMode>().expect_err("v2 is not a mode");
    assert!(err.to_string().contains("\"v2\""), "{err}");
    assert_eq!(TokenMode::default(), TokenMode::Required);
}

#[test]
fn default_config_matches_the_documented_defaults() {
    let config = SimulatorConfig::default();
    assert_eq!(config.hop_limit, DEFAULT_SIM_HOP_LIMIT);
    assert_eq!(config.tokens, TokenMode::Required);
    assert_eq!(config.role, DEFAULT_SIM_ROLE);
    assert_eq!(
        config.credential_lifetime,
        secs(DEFAULT_SIM_CREDENTIAL_LIFETIME_SECS)
    );
    assert_eq!(config.user_data.as_deref(), Some(DEFAULT_SIM_USER_DATA));
    assert_eq!(config.validate(), Ok(()));
}

#[test]
fn validate_names_the_bad_field() {
    let with = |edit: fn(&mut SimulatorConfig)| {
        let mut config = SimulatorConfig::default();
        edit(&mut config);
        config.validate()
    };
    assert_eq!(
        with(|c| c.hop_limit = 0),
        Err(SimulatorConfigError::HopLimitOutOfRange { value: 0 })
    );
    assert_eq!(
        with(|c| c.hop_limit = 65),
        Err(SimulatorConfigError::HopLimitOutOfRange { value: 65 })
    );
    assert_eq!(with(|c| c.hop_limit = 64), Ok(()));
    for role in ["", "a/b", "has space", &"x".repeat(65)] {
        let config = SimulatorConfig {
            role: role.to_owned(),
            ..SimulatorConfig::default()
        };
        assert!(
            matches!(
                config.validate(),
                Err(SimulatorConfigError::InvalidRoleName { .. })
            ),
            "{role:?}"
        );
    }
    assert!(matches!(
        with(|c| c.credential_lifetime = Duration::ZERO),
        Err(SimulatorConfigError::CredentialLifetimeOutOfRange { .. })
    ));
    assert!(matches!(
        with(|c| c.user_data = Some(Bytes::from(vec![0; MAX_SIM_USER_DATA_BYTES + 1]))),
        Err(SimulatorConfigError::UserDataTooLarge { .. })
    ));
    let message = with(|c| c.hop_limit = 0).expect_err("invalid").to_string();
    assert!(
        message.contains("hop_limit") && message.contains("1..=64"),
        "{message}"
    );
}

#[test]
fn debug_output_hides_secrets() {
    let sim = sim(TokenMode::Optional);
    let tok = token(&sim, 60, t0());
    let reply = get(&sim, ROLE_PATH, Some(&tok), t0());
    let doc: serde_json::Value = serde_json::from_str(body(&reply)).expect("JSON");
    let secret = doc["SecretAccessKey"].as_str().expect("secret");
    let fresh = put_token(&sim, Some("60"), t0());
    let fresh_token = body(&fresh).to_owned();
    let printed = format!("{sim:?} {reply:?} {:?} {fresh:?}", sim.config());
    assert!(!printed.contains(secret));
    assert!(!printed.contains(&tok));
    assert!(!printed.contains(&fresh_token));
    assert!(!printed.contains("echo hello"));
}
