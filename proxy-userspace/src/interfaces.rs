//! Which of the node's interfaces the TC program belongs on: names or glob
//! patterns (`veth*`, `lxc?0`) as an operator writes them for kube-proxy's
//! peers.

use std::{ffi::CStr, io};

/// Splits `veth*,eth0` into patterns, ignoring empty items.
pub fn parse_patterns(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Glob match with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    // Position after the last `*` and the name position it was tried at, so
    // a mismatch can retry with the star eating one more character.
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi + 1, ni));
            pi += 1;
        } else if let Some((bp, bn)) = backtrack {
            pi = bp;
            ni = bn + 1;
            backtrack = Some((bp, bn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

pub fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, name))
}

/// Interface names and indexes of the current network namespace.
/// `if_nameindex` asks the kernel through a socket, so it is right even where
/// /sys belongs to another namespace. The index tells a re-created interface
/// (a new pod's veth under a reused name) from the one it replaced.
pub fn list() -> io::Result<Vec<(String, u32)>> {
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut cur = head;
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = CStr::from_ptr((*cur).if_name)
                .to_string_lossy()
                .into_owned();
            names.push((name, (*cur).if_index));
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(names)
}

/// Addresses of both families of this network namespace's interfaces, as
/// (interface name, address), in the kernel's order.
pub fn ip_addresses() -> io::Result<Vec<(String, std::net::IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: getifaddrs returned a valid list, freed below.
        let ifa = unsafe { &*cur };
        let family = match ifa.ifa_addr.is_null() {
            true => None,
            false => Some(i32::from(unsafe { (*ifa.ifa_addr).sa_family })),
        };
        let addr = match family {
            Some(libc::AF_INET) => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
            }
            Some(libc::AF_INET6) => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                Some(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
            }
            _ => None,
        };
        if let Some(addr) = addr {
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            out.push((name, addr));
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// An interface's driver name and bus address, from `ETHTOOL_GDRVINFO` on a
/// socket of the calling thread's network namespace (sysfs would show the
/// namespace it was mounted in, which need not be this one). Software
/// devices (veth, bridge, tunnels) have no bus address.
pub fn driver_info(iface: &str) -> io::Result<(String, String)> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: all-zero is valid for these plain C structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket only to carry the ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `req` points at `info`, both live for the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    let text = |b: &[u8]| {
        CStr::from_bytes_until_nul(b)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Ok((text(&info.driver), text(&info.bus_info)))
}

/// rtnetlink's multicast groups (`RTMGRP_*`, the bit of each `RTNLGRP_*`):
/// links appearing, going or changing, and IPv4 addresses.
const RTMGRP_LINK: u32 = 1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// The kernel's word that interfaces or addresses changed in this network
/// namespace (rtnetlink's link and IPv4 address groups), so they are read
/// again when they change and not polled: a node with 300 pod interfaces
/// spent 5.8 % of a core listing them every 200 ms.
pub struct LinkEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl LinkEvents {
    /// Joins the groups on a socket of the calling thread's network
    /// namespace (events of other namespaces never arrive).
    pub fn subscribe() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscalls; the fd is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        let rc = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the
        // same for as long as it lives.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits until something changed, and reads every queued event (a
    /// burst, such as a pod's veth pair and its addresses, is one wake-up).
    /// A queue that overflowed (ENOBUFS: events were lost) counts as a
    /// change: the caller reads everything again. Cancel-safe.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| drain_netlink(fd.get_ref())) {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) | Err(_) => continue,
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}

/// Reads every queued message; whether there was any (or an overflow).
/// The messages themselves are not needed: the caller lists what is there.
fn drain_netlink(fd: &std::os::fd::OwnedFd) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 16384];
    let mut any = false;
    loop {
        // SAFETY: reading into a buffer we own, of its size.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOBUFS) => Ok(true),
                _ if e.kind() == io::ErrorKind::WouldBlock && any => Ok(true),
                _ => Err(e),
            };
        }
        any = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth-b0"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
        assert!(glob_match("l?c*0", "lxc1230"));
        assert!(!glob_match("l?c*0", "lxc1231"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*-b*", "veth-b12"));
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_patterns(" veth*, ,eth0,"), vec!["veth*", "eth0"]);
        assert!(matches_any(&parse_patterns("cali*,veth-*"), "veth-c0"));
        assert!(!matches_any(&parse_patterns("cali*"), "veth-c0"));
    }

    #[test]
    fn lists_loopback() {
        assert!(list().unwrap().iter().any(|(n, i)| n == "lo" && *i > 0));
    }
}
