//! `lab-sockclient MODE ADDR:PORT COUNT`: a host process for the socket-level
//! load-balancing tests. The test starts it inside a cgroup and a network
//! namespace (cgroup membership is per process, so it cannot be a thread);
//! it reports what the application saw, one line per request:
//! `ok <backend name> <peer or source address>` or `err <kind> <message>`.
//!
//! MODE: `tcp` (connect, getpeername, request, reply), `udp-sendto`
//! (unconnected sendto/recvfrom), `udp-connect` (connect, getpeername,
//! send, recv).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
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

fn tcp(target: SocketAddrV4) -> std::io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&target.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok((line.trim().to_string(), peer))
}

fn udp_sendto(target: SocketAddrV4) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.send_to(b"hello\n", target)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

fn udp_connect(target: SocketAddrV4) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(target)?;
    let peer = s.peer_addr()?;
    s.send(b"hello\n")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), peer))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, target, count] = args.as_slice() else {
        eprintln!("usage: lab-sockclient tcp|udp-sendto|udp-connect ADDR:PORT COUNT");
        std::process::exit(2);
    };
    let target: SocketAddrV4 = target.parse().expect("ADDR:PORT");
    let count: usize = count.parse().expect("COUNT");
    let request = match mode.as_str() {
        "tcp" => tcp,
        "udp-sendto" => udp_sendto,
        "udp-connect" => udp_connect,
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    };
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        let line = match request(target) {
            Ok((name, addr)) => format!("ok {name} {addr}"),
            Err(e) => format!("err {} {e}", kind(&e)),
        };
        let _ = writeln!(out, "{line}");
    }
}
