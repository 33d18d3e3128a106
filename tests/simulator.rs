//! The simulator as a developer uses it on a laptop: the real binary on loopback.

mod support;

use support::*;

#[test]
fn tokens_required_refuses_imdsv1_and_serves_imdsv2() {
    let sim = simulator(&[]);
    assert_eq!(
        request(sim.addr(), "GET", "/latest/meta-data/instance-id", &[]).status,
        401
    );
    let token = token(sim.addr());
    let id = request(
        sim.addr(),
        "GET",
        "/latest/meta-data/instance-id",
        &[("X-aws-ec2-metadata-token", &token)],
    );
    assert_eq!(id.status, 200);
    assert!(id.text().starts_with("i-0"));
    assert_eq!(id.header("server"), Some("EC2ws"));
    assert_eq!(id.header("connection"), Some("close"));
}

#[test]
fn tokens_optional_serves_imdsv1() {
    let sim = simulator(&["--tokens", "optional"]);
    let az = request(
        sim.addr(),
        "GET",
        "/latest/meta-data/placement/availability-zone/",
        &[],
    );
    assert_eq!(az.status, 200, "{az:?}");
    assert!(az.text().starts_with("us-"), "{az:?}");
}

#[test]
fn the_token_put_rules_hold() {
    let sim = simulator(&[]);
    let put =
        |headers: &[(&str, &str)]| request(sim.addr(), "PUT", "/latest/api/token", headers).status;
    assert_eq!(put(&[]), 400);
    assert_eq!(put(&[("X-aws-ec2-metadata-token-ttl-seconds", "0")]), 400);
    assert_eq!(
        put(&[
            ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
            ("X-Forwarded-For", "1.2.3.4")
        ]),
        403
    );
    let answer = request(sim.addr(), "GET", "/latest/api/token", &[]);
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("allow"), Some("OPTIONS, PUT"));
}

#[test]
fn user_data_comes_from_a_file_or_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("user-data");
    std::fs::write(&file, b"#cloud-config\nruncmd: []\n").unwrap();
    let file = file.display().to_string();
    let sim = simulator(&["--tokens", "optional", "--user-data", &file]);
    let data = request(sim.addr(), "GET", "/latest/user-data", &[]);
    assert_eq!(data.status, 200);
    assert_eq!(data.body, b"#cloud-config\nruncmd: []\n");
    assert_eq!(
        data.header("content-type"),
        Some("application/octet-stream")
    );

    let none = simulator(&["--tokens", "optional", "--no-user-data"]);
    assert_eq!(
        request(none.addr(), "GET", "/latest/user-data", &[]).status,
        404
    );
}
