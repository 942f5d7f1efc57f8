//! The smallest HTTP/1.1 a read-only endpoint needs (`/metrics`, the federation bundle
//! endpoint): one request per connection, its head read with a size and time limit (the body,
//! if any, is never read), one response, then the connection closes. It parses nothing it
//! does not need and must not grow into a general web server.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most a request head may take.
pub const MAX_HEAD: usize = 8 * 1024;

/// The request line's method and path, once the head has arrived within `limit`; `None` when
/// the peer is too slow, sends too much or closes first.
pub async fn request_line<S: AsyncRead + Unpin>(
    s: &mut S,
    limit: std::time::Duration,
) -> Option<(String, String)> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut got = 0;
    let done = tokio::time::timeout(limit, async {
        while got < buf.len() {
            let from = got.saturating_sub(3);
            match s.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got += n,
            }
            // Only the new bytes (and the three before them) can complete the blank line.
            if buf[from..got].windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(done, Ok(true)) {
        return None;
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    let mut parts = head.lines().next()?.split(' ');
    let (method, path) = (parts.next()?, parts.next()?);
    Some((method.to_string(), path.to_string()))
}

/// How long a peer has to take a response.
pub const WRITE_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes one response and flushes it within [`WRITE_TIME`] (errors are the peer's problem:
/// it went away or stopped reading).
pub async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    content_type: &str,
    body: &[u8],
    extra_headers: &str,
) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    let _ = tokio::time::timeout(WRITE_TIME, async {
        let _ = s.write_all(&out).await;
        let _ = s.flush().await;
        let _ = s.shutdown().await;
    })
    .await;
}

/// Answers a request whose method is not GET (405, `Allow: GET`).
pub async fn get_only<S: AsyncWrite + Unpin>(s: &mut S) {
    respond(
        s,
        "405 Method Not Allowed",
        "text/plain",
        b"method not allowed\n",
        "Allow: GET\r\n",
    )
    .await
}
