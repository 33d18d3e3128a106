//! The address and name plan of the model: which namespace holds which interface and address.
//! Pure data and naming rules, no I/O, so the plan can be read (and tested) in one place.
//!
//! ```text
//!  ihp-<tag>-imds: IMDS + VPC router            ihp-<tag>-lan: LAN neighbour
//!   lo 169.254.169.254, fd00:ec2::254            eth0 10.99.0.20, fd00:99::20
//!   vpc0 (bridge) 10.99.0.1/24, fd00:99::1/64 ---- vpc-lan
//!      \-- vpc-host
//!           |
//!  ihp-<tag>-host: the EC2 instance
//!   eth0 10.99.0.10/24, fd00:99::10/64 (the ENI; default route via the VPC router)
//!   docker0 172.17.0.1/16, fd00:17::1/64 -- veth… -- ihp-<tag>-c0: eth0 172.17.0.2, fd00:17::2
//!   br-<12 hex> 172.18.0.1/16, fd00:18::1/64 -- veth… -- ihp-<tag>-c1: eth0 172.18.0.2, fd00:18::2
//!   vpn0 10.8.0.1/24, fd00:8::1/64 -- ihp-<tag>-vpn: eth0 10.8.0.2, fd00:8::2
//! ```

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// IMDS's addresses and port, as the proxy knows them.
pub use crate::policy::{IMDS_IPV4 as IMDS_V4, IMDS_IPV6 as IMDS_V6, IMDS_PORT};

/// The VPC subnet's router (the IMDS namespace plays it), IPv4.
pub const VPC_ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The VPC subnet's router, IPv6.
pub const VPC_ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
/// Prefix length of the VPC subnet, IPv4.
pub const VPC_PREFIX_V4: u8 = 24;
/// Prefix length of the VPC subnet, IPv6.
pub const VPC_PREFIX_V6: u8 = 64;
/// The instance's ENI address: the only source IMDS answers, IPv4.
pub const HOST_ENI_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
/// The instance's ENI address, IPv6.
pub const HOST_ENI_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10);
/// Another instance on the same subnet, IPv4.
pub const LAN_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 20);
/// Another instance on the same subnet, IPv6.
pub const LAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x20);

/// Docker's default bridge network, IPv4.
pub const DOCKER0_V4: Ipv4Subnet = Ipv4Subnet::new_unchecked(Ipv4Addr::new(172, 17, 0, 0), 16);
/// Docker's default bridge network, IPv6 (a ULA, as `fixed-cidr-v6` would set it).
pub const DOCKER0_V6: Ipv6Subnet =
    Ipv6Subnet::new_unchecked(Ipv6Addr::new(0xfd00, 0x17, 0, 0, 0, 0, 0, 0), 64);
/// The user-defined bridge network created at start, IPv4.
pub const USER_BRIDGE_V4: Ipv4Subnet = Ipv4Subnet::new_unchecked(Ipv4Addr::new(172, 18, 0, 0), 16);
/// The user-defined bridge network created at start, IPv6.
pub const USER_BRIDGE_V6: Ipv6Subnet =
    Ipv6Subnet::new_unchecked(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0), 64);
/// The VPN the host routes for its peers (not a Docker network, not on any allowlist), IPv4.
pub const VPN_V4: Ipv4Subnet = Ipv4Subnet::new_unchecked(Ipv4Addr::new(10, 8, 0, 0), 24);
/// The VPN, IPv6.
pub const VPN_V6: Ipv6Subnet =
    Ipv6Subnet::new_unchecked(Ipv6Addr::new(0xfd00, 0x8, 0, 0, 0, 0, 0, 0), 64);

/// Docker's default bridge.
pub const DOCKER0: &str = "docker0";
/// The host's VPC interface, as the ENI shows up on Nitro instances with predictable names off.
pub const HOST_ENI: &str = "eth0";
/// The host's interface towards the VPN peer.
pub const VPN_IFACE: &str = "vpn0";
/// The bridge in the IMDS namespace that plays the VPC's L2 segment.
pub const VPC_BRIDGE: &str = "vpc0";
/// Name of the single interface inside a container, VPN client or LAN neighbour.
pub const GUEST_IFACE: &str = "eth0";
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFACE_NAME_LEN: usize = 15;
/// Prefix of every namespace a testbed creates.
pub const NAMESPACE_PREFIX: &str = "ihp-";
/// Longest tag accepted: namespace names stay readable in `ip netns list`.
pub const MAX_TAG_LEN: usize = 32;

/// IP version, for choosing the IMDS endpoint and addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// `http://169.254.169.254`.
    V4,
    /// `http://[fd00:ec2::254]`.
    V6,
}

impl IpFamily {
    /// Both families, in the order tests report them.
    pub const BOTH: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The IMDS base URL for this family, without a trailing slash.
    pub fn imds_url(self) -> &'static str {
        match self {
            IpFamily::V4 => "http://169.254.169.254",
            IpFamily::V6 => "http://[fd00:ec2::254]",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// An IPv4 network: the bridge takes host 1, its container host 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// An IPv6 network: the bridge takes host 1, its container host 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Subnet {
    network: Ipv6Addr,
    prefix_len: u8,
}

/// Why a subnet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subnet {text:?}: {reason}")]
pub struct SubnetError {
    text: String,
    reason: &'static str,
}

impl Ipv4Subnet {
    /// Largest prefix that still leaves room for a gateway and a container.
    pub const MAX_PREFIX_LEN: u8 = 30;

    const fn new_unchecked(network: Ipv4Addr, prefix_len: u8) -> Ipv4Subnet {
        Ipv4Subnet {
            network,
            prefix_len,
        }
    }

    /// A subnet whose host bits are zero and that has room for hosts 1 and 2.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Ipv4Subnet, SubnetError> {
        let text = format!("{network}/{prefix_len}");
        if prefix_len > Self::MAX_PREFIX_LEN {
            return Err(SubnetError {
                text,
                reason: "the prefix must be /30 or shorter to hold a gateway and a container",
            });
        }
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        if u32::from(network) & !mask != 0 {
            return Err(SubnetError {
                text,
                reason: "host bits must be zero",
            });
        }
        Ok(Ipv4Subnet::new_unchecked(network, prefix_len))
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Host number `n` of the network (1 = gateway, 2 = first container).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }
}

impl Ipv6Subnet {
    /// Largest prefix that still leaves room for a gateway and a container.
    pub const MAX_PREFIX_LEN: u8 = 126;

    const fn new_unchecked(network: Ipv6Addr, prefix_len: u8) -> Ipv6Subnet {
        Ipv6Subnet {
            network,
            prefix_len,
        }
    }

    /// A subnet whose host bits are zero and that has room for hosts 1 and 2.
    pub fn new(network: Ipv6Addr, prefix_len: u8) -> Result<Ipv6Subnet, SubnetError> {
        let text = format!("{network}/{prefix_len}");
        if prefix_len > Self::MAX_PREFIX_LEN {
            return Err(SubnetError {
                text,
                reason: "the prefix must be /126 or shorter to hold a gateway and a container",
            });
        }
        let mask = u128::MAX
            .checked_shl(128 - u32::from(prefix_len))
            .unwrap_or(0);
        if u128::from(network) & !mask != 0 {
            return Err(SubnetError {
                text,
                reason: "host bits must be zero",
            });
        }
        Ok(Ipv6Subnet::new_unchecked(network, prefix_len))
    }

    /// The network address.
    pub fn network(&self) -> Ipv6Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Host number `n` of the network (1 = gateway, 2 = first container).
    pub fn host(&self, n: u32) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) + u128::from(n))
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl fmt::Display for Ipv6Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

fn split_prefix(text: &str) -> Result<(&str, u8), SubnetError> {
    let (addr, len) = text.split_once('/').ok_or_else(|| SubnetError {
        text: text.to_owned(),
        reason: "expected ADDRESS/PREFIX_LEN",
    })?;
    let len = len.parse().map_err(|_| SubnetError {
        text: text.to_owned(),
        reason: "the prefix length is not a number",
    })?;
    Ok((addr, len))
}

impl FromStr for Ipv4Subnet {
    type Err = SubnetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, len) = split_prefix(text)?;
        let network = addr.parse().map_err(|_| SubnetError {
            text: text.to_owned(),
            reason: "not an IPv4 address",
        })?;
        Ipv4Subnet::new(network, len)
    }
}

impl FromStr for Ipv6Subnet {
    type Err = SubnetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, len) = split_prefix(text)?;
        let network = addr.parse().map_err(|_| SubnetError {
            text: text.to_owned(),
            reason: "not an IPv6 address",
        })?;
        Ipv6Subnet::new(network, len)
    }
}

/// Why a tag or interface name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The tag cannot build namespace names.
    #[error("invalid testbed tag {0:?}: use 1 to {MAX_TAG_LEN} characters from a-z, 0-9 and '-'")]
    Tag(String),
    /// The interface name is not one the kernel accepts.
    #[error(
        "invalid interface name {0:?}: use 1 to {MAX_IFACE_NAME_LEN} characters from a-z, A-Z, \
         0-9, '-', '_' and '.'"
    )]
    Interface(String),
}

/// Checks a testbed tag: it becomes part of every namespace name.
pub fn check_tag(tag: &str) -> Result<(), NameError> {
    let valid = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(NameError::Tag(tag.to_owned()))
    }
}

/// Checks an interface name against what the kernel (and `ip`) accept.
pub fn check_interface(name: &str) -> Result<(), NameError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IFACE_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(NameError::Interface(name.to_owned()))
    }
}

/// The namespace name for one role of a testbed: `ihp-<tag>-<role>`.
pub fn namespace(tag: &str, role: &str) -> String {
    format!("{NAMESPACE_PREFIX}{tag}-{role}")
}

/// The user-defined bridge's name, `br-` and 12 hex digits like Docker's (which takes them from
/// the network id); derived from the tag so it is stable for one testbed.
pub fn user_bridge_name(tag: &str) -> String {
    format!("br-{:012x}", fnv1a(tag.as_bytes()) & 0xffff_ffff_ffff)
}

/// The host end of a container's veth pair, `veth` and 7 hex digits like Docker's.
pub fn container_veth_name(container_namespace: &str) -> String {
    format!(
        "veth{:07x}",
        fnv1a(container_namespace.as_bytes()) & 0x0fff_ffff
    )
}

/// FNV-1a: a tiny stable hash, so names do not depend on the std hasher's seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_name_their_hosts() {
        let v4: Ipv4Subnet = "172.19.0.0/16".parse().unwrap();
        assert_eq!(v4.host(1), Ipv4Addr::new(172, 19, 0, 1));
        assert_eq!(v4.host(2), Ipv4Addr::new(172, 19, 0, 2));
        assert_eq!(v4.to_string(), "172.19.0.0/16");
        let v6: Ipv6Subnet = "fd00:19::/64".parse().unwrap();
        assert_eq!(v6.host(2), "fd00:19::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.to_string(), "fd00:19::/64");
        assert_eq!(DOCKER0_V4.host(2), Ipv4Addr::new(172, 17, 0, 2));
        assert_eq!(VPN_V6.host(1), "fd00:8::1".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn subnets_with_host_bits_or_no_room_are_refused() {
        assert!("172.19.0.1/16".parse::<Ipv4Subnet>().is_err());
        assert!("172.19.0.0/31".parse::<Ipv4Subnet>().is_err());
        assert!("172.19.0.0".parse::<Ipv4Subnet>().is_err());
        assert!("fd00:19::/64".parse::<Ipv4Subnet>().is_err());
        assert!("fd00:19::1/64".parse::<Ipv6Subnet>().is_err());
        assert!("fd00:19::/127".parse::<Ipv6Subnet>().is_err());
        assert!("0.0.0.0/0".parse::<Ipv4Subnet>().is_ok());
        assert!("::/0".parse::<Ipv6Subnet>().is_ok());
    }

    #[test]
    fn generated_names_fit_the_kernel_limit() {
        for tag in ["a", "t3a", "model-host-123456", &"x".repeat(MAX_TAG_LEN)] {
            check_tag(tag).unwrap();
            let bridge = user_bridge_name(tag);
            assert_eq!(bridge.len(), 15, "{bridge}");
            check_interface(&bridge).unwrap();
            let veth = container_veth_name(&namespace(tag, "c0"));
            assert_eq!(veth.len(), 11, "{veth}");
            check_interface(&veth).unwrap();
        }
        assert_ne!(user_bridge_name("a"), user_bridge_name("b"));
    }

    #[test]
    fn bad_tags_and_interface_names_are_refused() {
        for tag in ["", "Upper", "a b", "a/b", &"x".repeat(MAX_TAG_LEN + 1)] {
            assert!(check_tag(tag).is_err(), "{tag:?}");
        }
        for name in ["", "sixteen-chars-xx", "a b", "a/b", ".."] {
            assert!(check_interface(name).is_err(), "{name:?}");
        }
        assert_eq!(namespace("t3a", "host"), "ihp-t3a-host");
    }
}
