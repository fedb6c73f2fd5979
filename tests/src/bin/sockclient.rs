//! `lab-sockclient MODE ADDR:PORT COUNT`: a host process for the socket-level
//! load-balancing tests. The test starts it inside a cgroup and a network
//! namespace (cgroup membership is per process, so it cannot be a thread);
//! it reports what the application saw, one line per request:
//! `ok <backend name> <peer or source address>` or `err <kind> <message>`.
//!
//! MODE: `tcp` (connect, getpeername, request, reply), `udp-sendto`
//! (unconnected sendto/recvfrom), `udp-connect` (connect, getpeername,
//! send, recv); `tcp-whoami` and `udp-whoami` ask the server who it saw
//! instead and print `ok <backend name> <source the server saw> <peer>`.
//! An optional fifth argument binds every socket to that local port (UDP
//! clients that keep one source port, as Kubernetes' conntrack tests do).
//! ADDR is of either family (`[fd00::1]:80` for IPv6).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused",
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout",
        _ if e.raw_os_error() == Some(libc::ENETUNREACH) => "unreachable",
        _ => "other",
    }
}

/// What one request sends and how the socket is bound.
#[derive(Clone, Copy)]
struct Ask {
    request: &'static [u8],
    src_port: u16,
}

fn tcp(target: SocketAddr, ask: Ask) -> std::io::Result<(String, SocketAddr)> {
    let mut s = if ask.src_port == 0 {
        TcpStream::connect_timeout(&target, TIMEOUT)?
    } else {
        bound_tcp(target, ask.src_port)?
    };
    s.set_read_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    s.write_all(ask.request)?;
    let mut reader = BufReader::new(&s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Close in order and wait for the server's FIN: a socket dropped here
    // would sit in FIN_WAIT2 until it came, and the next request from the
    // same fixed source port would fail with EADDRNOTAVAIL (a TIME_WAIT
    // socket, with timestamps, may be reused by a bound connect).
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest)?;
    Ok((line.trim().to_string(), peer))
}

/// A TCP connection from local port `port` (std has no bind-then-connect).
fn bound_tcp(target: SocketAddr, port: u16) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&any_addr(target, port).into())?;
    s.connect(&target.into())?;
    Ok(s.into())
}

/// The unspecified address of `target`'s family with `port`.
fn any_addr(target: SocketAddr, port: u16) -> SocketAddr {
    SocketAddr::new(lab::addr::IpFamily::of(target.ip()).unspecified(), port)
}

fn udp_socket(target: SocketAddr, ask: Ask) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(any_addr(target, ask.src_port))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn udp_sendto(target: SocketAddr, ask: Ask) -> std::io::Result<(String, SocketAddr)> {
    let s = udp_socket(target, ask)?;
    s.send_to(ask.request, target)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

fn udp_connect(target: SocketAddr, ask: Ask) -> std::io::Result<(String, SocketAddr)> {
    let s = udp_socket(target, ask)?;
    s.connect(target)?;
    let peer = s.peer_addr()?;
    s.send(ask.request)?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), peer))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, target, count, src_port) = match args.as_slice() {
        [_, mode, target, count] => (mode, target, count, 0),
        [_, mode, target, count, port] => (mode, target, count, port.parse().expect("SRC_PORT")),
        _ => {
            eprintln!(
                "usage: lab-sockclient tcp|udp-sendto|udp-connect|tcp-whoami|udp-whoami \
                 ADDR:PORT COUNT [SRC_PORT]"
            );
            std::process::exit(2);
        }
    };
    let target: SocketAddr = target.parse().expect("ADDR:PORT");
    let count: usize = count.parse().expect("COUNT");
    type Request = fn(SocketAddr, Ask) -> std::io::Result<(String, SocketAddr)>;
    let (request, body): (Request, &'static [u8]) = match mode.as_str() {
        "tcp" => (tcp, b"hello\n"),
        "udp-sendto" => (udp_sendto, b"hello\n"),
        "udp-connect" => (udp_connect, b"hello\n"),
        "tcp-whoami" => (tcp, b"whoami\n"),
        "udp-whoami" => (udp_sendto, b"whoami"),
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    };
    let ask = Ask {
        request: body,
        src_port,
    };
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        let line = match request(target, ask) {
            Ok((name, addr)) => format!("ok {name} {addr}"),
            Err(e) => format!("err {} {e}", kind(&e)),
        };
        let _ = writeln!(out, "{line}");
    }
}
