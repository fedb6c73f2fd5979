//! conntrack.go's "should drop INVALID conntrack entries" (kubernetes#74839):
//! upstream's boom-server answers a client of its Service with a spurious,
//! out-of-window segment; if the proxy lets it reach the client without
//! reverse NAT, the client's kernel sees a segment for a connection it does
//! not have and answers RST, killing the real connection. The lab's
//! endpoint does the same with a raw socket, watches for that RST, and the
//! connection must still work afterwards.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::env::{Env, REQUEST_TIMEOUT};
use crate::yaml::{Slice, Svc, SvcPort};

const SERVICE_PORT: u16 = 9000;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH_ACK: u8 = 0x18;
const ACK: u8 = 0x10;

pub(super) fn drop_invalid(env: &Env<'_>) -> Result<()> {
    let cip = Ipv4Addr::new(10, 96, 0, 100);
    // Server on node 1, client on node 0, as upstream.
    let (k, j) = (1, 0);
    let backend = env.pod_ip(k, j);
    let svc = Svc::cluster_ip(
        "boom-server",
        cip,
        vec![SvcPort::new("tcp", SERVICE_PORT, "TCP", "8080")],
    );
    let slice = Slice {
        name: "boom-server-1".into(),
        service: "boom-server".into(),
        ports: vec![("tcp".into(), 8080, "TCP".into())],
        endpoints: vec![env.endpoint(k, j)],
        labels: vec![],
    };
    env.apply(
        "boom-server.yaml",
        &format!("{}---\n{}", svc.render(), slice.render()),
    )?;

    let sniffer = env.cluster.backend(k, j).netns.try_run(raw_tcp_socket)??;
    let target = SocketAddrV4::new(cip, SERVICE_PORT);
    let mut conn = env
        .cluster
        .client(0)
        .netns
        .try_run(move || TcpStream::connect_timeout(&target.into(), REQUEST_TIMEOUT))?
        .context("client connects to the Service")?;
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let client = match conn.local_addr()? {
        std::net::SocketAddr::V4(a) => a,
        other => bail!("client address {other}"),
    };
    request(&mut conn).context("first request")?;

    // The client's last segment says where both sequence spaces are.
    let seen = wait_segment(&sniffer, client, |s| {
        s.flags & ACK != 0 && s.flags & (SYN | RST) == 0
    })?
    .context("the endpoint never saw the client's request")?;
    let spurious = Segment {
        src: SocketAddrV4::new(backend, 8080),
        dst: client,
        // Long-gone data: far behind what the client has acknowledged.
        seq: seen.ack.wrapping_sub(100_000),
        ack: seen.seq,
        flags: PSH_ACK,
        payload: b"boom\n".to_vec(),
    };
    send_segment(&sniffer, &spurious)?;
    if let Some(rst) = wait_segment(&sniffer, client, |s| s.flags & RST != 0)? {
        bail!(
            "the client answered the spurious segment with RST (seq {}): it reached the client without reverse NAT",
            rst.seq
        );
    }
    request(&mut conn).context("the connection after the spurious segment")
}

fn request(conn: &mut TcpStream) -> Result<()> {
    conn.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    ensure!(line.ends_with('\n'), "connection closed after {line:?}");
    Ok(())
}

/// A raw IPPROTO_TCP socket: receives a copy of every TCP packet the
/// namespace receives, and sends TCP segments the kernel wraps in IP.
fn raw_tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid descriptor and option value.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

#[derive(Debug, Clone)]
struct Segment {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

/// Reads packets for up to a second; the first from `from` that `want`
/// accepts.
fn wait_segment(
    fd: &OwnedFd,
    from: SocketAddrV4,
    want: impl Fn(&Segment) -> bool,
) -> Result<Option<Segment>> {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(e.into());
        }
        if let Some(s) = parse(&buf[..n as usize])
            && s.src == from
            && want(&s)
        {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

fn parse(p: &[u8]) -> Option<Segment> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    let t = p.get(ihl..)?;
    if t.len() < 20 || p[9] != libc::IPPROTO_TCP as u8 {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let u16at = |o: usize| u16::from_be_bytes([t[o], t[o + 1]]);
    let u32at = |o: usize| u32::from_be_bytes([t[o], t[o + 1], t[o + 2], t[o + 3]]);
    Some(Segment {
        src: SocketAddrV4::new(ip(12), u16at(0)),
        dst: SocketAddrV4::new(ip(16), u16at(2)),
        seq: u32at(4),
        ack: u32at(8),
        flags: t[13],
        payload: t.get(usize::from(t[12] >> 4) * 4..)?.to_vec(),
    })
}

fn send_segment(fd: &OwnedFd, s: &Segment) -> Result<()> {
    let mut t = Vec::with_capacity(20 + s.payload.len());
    t.extend_from_slice(&s.src.port().to_be_bytes());
    t.extend_from_slice(&s.dst.port().to_be_bytes());
    t.extend_from_slice(&s.seq.to_be_bytes());
    t.extend_from_slice(&s.ack.to_be_bytes());
    t.push(5 << 4);
    t.push(s.flags);
    t.extend_from_slice(&502u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&s.payload);
    let sum = checksum(s.src.ip(), s.dst.ip(), &t);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*s.dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sending a buffer of the given length to a valid address.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            t.as_ptr().cast(),
            t.len(),
            0,
            (&dst as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("send the spurious segment");
    }
    Ok(())
}

/// The TCP checksum over the IPv4 pseudo-header and `segment`.
fn checksum(src: &Ipv4Addr, dst: &Ipv4Addr, segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, libc::IPPROTO_TCP as u8]);
    add(&(segment.len() as u16).to_be_bytes());
    add(segment);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
