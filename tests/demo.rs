//! The README's first command: `imds-hop-proxy demo` (what `scripts/demo.sh` runs) shows the
//! failure and the fix, and leaves nothing behind. Needs root.

mod support;

use std::process::Command;

#[test]
fn the_demo_shows_the_failure_then_the_fix_and_cleans_up() {
    if support::bed::testbed_gate() {
        return;
    }
    let output = Command::new(support::binary())
        .arg("demo")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "A container asks the same, with no proxy\n    no answer within",
        "rules complete",
        "The container asks again, over IPv4, with the proxy running\n    200: a token",
        "The container asks again, over IPv6, with the proxy running\n    200: a token",
        "credentials of role imds-hop-proxy-demo: Code Success",
        "rules of ours left: 0",
        "the container's token request times out again",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !left.contains("ihp-demo-"),
        "namespaces left behind: {left}"
    );
}
