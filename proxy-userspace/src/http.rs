//! The agent's two small HTTP/1.1 servers (metrics and probes; service
//! health checks) share this: one request per connection, a bounded number
//! of connections at once, a bounded request head, no HTTP dependency.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long a client may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Serves `listener` until the task is dropped: each connection's request
/// head goes to `answer`, which returns the whole response. At most
/// `max_connections` are open at once; `what` names the server in logs.
pub async fn serve<F>(listener: TcpListener, what: &'static str, max_connections: usize, answer: F)
where
    F: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, answer.as_ref()).await {
                tracing::debug!(error = %e, "{what}: connection");
            }
            drop(permit);
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    answer: &(dyn Fn(&str) -> Vec<u8> + Send + Sync),
) -> io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match head {
        Some(head) => answer(&head),
        None => response(400, "text/plain", &[], "bad request\n", false),
    };
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// The request head (up to the blank line), or `None` if it is too long
/// or the client stopped early.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

/// A complete `Connection: close` response; `headers` come after the
/// content type. `with_body` false (a HEAD request) keeps the length but
/// drops the body.
pub fn response(
    status: u16,
    content_type: &str,
    headers: &[(&str, String)],
    body: &str,
    with_body: bool,
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    if with_body {
        out.push_str(body);
    }
    out.into_bytes()
}
