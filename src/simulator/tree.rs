//! The simulated instance's metadata: the fixed tree under `/<version>/`, the list of versions
//! at `/`, and how a request path selects a directory listing or a leaf.
//!
//! Values are fixed and consistent with each other (the identity document agrees with
//! `meta-data/`), so tests can assert them; only credentials change, and they are rendered by
//! the caller when a lookup lands on them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::credentials::InstanceProfile;
use super::json::{pretty_object, Value};
use super::{clock, SimulatorConfig};

/// Dated versions listed at `/`, a subset of what real IMDS lists. All of them serve the same
/// tree as `latest`: the simulator does not model what each old version lacked.
const VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
];

const ACCOUNT_ID: &str = "123456789012";
const AMI_ID: &str = "ami-0abcdef1234567890";
const INSTANCE_ID: &str = "i-0123456789abcdef0";
const INSTANCE_TYPE: &str = "t3.micro";
const PRIVATE_IP: &str = "172.31.16.25";
const HOSTNAME: &str = "ip-172-31-16-25.ec2.internal";
const MAC: &str = "0e:1f:2a:3b:4c:5d";
const REGION: &str = "us-east-1";
const AVAILABILITY_ZONE: &str = "us-east-1a";
const AVAILABILITY_ZONE_ID: &str = "use1-az4";
const INSTANCE_PROFILE_ID: &str = "AIPAZ5DEMO7EXAMPLE4QX";
/// When the simulated instance launched (2024-01-15T09:30:00Z): the identity document's
/// `pendingTime` and the `Last-Modified` of static metadata.
const LAUNCH_UNIX_SECS: u64 = 1_705_311_000;

/// A leaf of the tree: what a GET on it returns.
pub(super) enum Leaf {
    /// A fixed `text/plain` value (including the identity document).
    Text(Bytes),
    /// The configured user data, served as `application/octet-stream`.
    UserData(Bytes),
    /// The role's current credentials, rendered at request time.
    Credentials,
    /// `iam/info`, rendered at request time because its `LastUpdated` follows rotation.
    IamInfo,
}

enum Node {
    Dir(BTreeMap<String, Node>),
    Leaf(Leaf),
}

/// What a path resolved to.
pub(super) enum Found<'a> {
    /// A directory: its listing, one entry per line.
    Listing(String),
    /// A leaf, for the caller to serve.
    Leaf(&'a Leaf),
}

/// The whole simulated metadata space.
pub(super) struct Tree {
    /// The tree under `/latest/` (and every dated version).
    version_root: Node,
    profile: InstanceProfile,
}

impl Tree {
    /// The tree for an instance configured by `config`.
    pub(super) fn new(config: &SimulatorConfig) -> Self {
        let launched = clock::rfc3339(launch_time());
        let identity_document = pretty_object(&[
            ("accountId", Value::Str(ACCOUNT_ID)),
            ("architecture", Value::Str("x86_64")),
            ("availabilityZone", Value::Str(AVAILABILITY_ZONE)),
            ("billingProducts", Value::Null),
            ("devpayProductCodes", Value::Null),
            ("marketplaceProductCodes", Value::Null),
            ("imageId", Value::Str(AMI_ID)),
            ("instanceId", Value::Str(INSTANCE_ID)),
            ("instanceType", Value::Str(INSTANCE_TYPE)),
            ("kernelId", Value::Null),
            ("pendingTime", Value::Str(&launched)),
            ("privateIp", Value::Str(PRIVATE_IP)),
            ("ramdiskId", Value::Null),
            ("region", Value::Str(REGION)),
            ("version", Value::Str("2017-09-30")),
        ]);

        let meta_data = dir([
            ("ami-id", text(AMI_ID)),
            ("ami-launch-index", text("0")),
            ("hostname", text(HOSTNAME)),
            (
                "iam",
                dir([
                    ("info", Node::Leaf(Leaf::IamInfo)),
                    (
                        "security-credentials",
                        dir([(config.role.as_str(), Node::Leaf(Leaf::Credentials))]),
                    ),
                ]),
            ),
            ("instance-action", text("none")),
            ("instance-id", text(INSTANCE_ID)),
            ("instance-life-cycle", text("on-demand")),
            ("instance-type", text(INSTANCE_TYPE)),
            ("local-hostname", text(HOSTNAME)),
            ("local-ipv4", text(PRIVATE_IP)),
            ("mac", text(MAC)),
            (
                "placement",
                dir([
                    ("availability-zone", text(AVAILABILITY_ZONE)),
                    ("availability-zone-id", text(AVAILABILITY_ZONE_ID)),
                    ("region", text(REGION)),
                ]),
            ),
            ("reservation-id", text("r-0fedcba9876543210")),
            ("security-groups", text("default")),
            (
                "services",
                dir([
                    ("domain", text("amazonaws.com")),
                    ("partition", text("aws")),
                ]),
            ),
            (
                "tags",
                dir([(
                    "instance",
                    dir([
                        ("Environment", text("development")),
                        ("Name", text("imds-hop-proxy-demo")),
                    ]),
                )]),
            ),
        ]);

        let mut top = BTreeMap::from([
            (
                "dynamic".to_owned(),
                dir([(
                    "instance-identity",
                    dir([("document", text(&identity_document))]),
                )]),
            ),
            ("meta-data".to_owned(), meta_data),
        ]);
        if let Some(data) = &config.user_data {
            top.insert(
                "user-data".to_owned(),
                Node::Leaf(Leaf::UserData(data.clone())),
            );
        }

        Tree {
            version_root: Node::Dir(top),
            profile: InstanceProfile {
                arn: format!("arn:aws:iam::{ACCOUNT_ID}:instance-profile/{}", config.role),
                id: INSTANCE_PROFILE_ID,
            },
        }
    }

    /// When the instance launched; static metadata has not changed since.
    pub(super) fn launch_time(&self) -> SystemTime {
        launch_time()
    }

    /// The instance profile `iam/info` describes.
    pub(super) fn instance_profile(&self) -> &InstanceProfile {
        &self.profile
    }

    /// Resolves a request path (query already removed). One trailing slash is ignored, so
    /// leaves asked for with a slash (botocore's `placement/availability-zone/`) and directories
    /// asked for without one both resolve, as on EC2. Anything else unknown is `None` (404).
    pub(super) fn find(&self, path: &str) -> Option<Found<'_>> {
        let inner = path.strip_prefix('/')?;
        let inner = inner.strip_suffix('/').unwrap_or(inner);
        if inner.is_empty() {
            return Some(Found::Listing(versions_listing()));
        }
        let mut segments = inner.split('/');
        let version = segments.next()?;
        if version != "latest" && !VERSIONS.contains(&version) {
            return None;
        }
        let mut node = &self.version_root;
        let mut depth = 0;
        for segment in segments {
            let Node::Dir(children) = node else {
                return None;
            };
            node = children.get(segment)?;
            depth += 1;
        }
        match node {
            // Real IMDS lists `/latest/`'s entries without slashes, deeper directories with.
            Node::Dir(children) => Some(Found::Listing(listing(children, depth > 0))),
            Node::Leaf(leaf) => Some(Found::Leaf(leaf)),
        }
    }
}

fn launch_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(LAUNCH_UNIX_SECS)
}

fn versions_listing() -> String {
    let mut all = VERSIONS.to_vec();
    all.push("latest");
    all.join("\n")
}

/// One entry per line, subdirectories marked with `/` when `mark_dirs`, no trailing newline.
fn listing(children: &BTreeMap<String, Node>, mark_dirs: bool) -> String {
    children
        .iter()
        .map(|(name, node)| match node {
            Node::Dir(_) if mark_dirs => format!("{name}/"),
            _ => name.clone(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn text(value: &str) -> Node {
    Node::Leaf(Leaf::Text(Bytes::copy_from_slice(value.as_bytes())))
}

fn dir<const N: usize>(children: [(&str, Node); N]) -> Node {
    Node::Dir(
        children
            .into_iter()
            .map(|(name, node)| (name.to_owned(), node))
            .collect(),
    )
}
