//! Makes a Unix-socket gRPC server (the agent's Workload API, the server's admin socket) accept
//! clients built on gRPC C-core (py-spiffe, and any grpcio client) unmodified. Over a Unix socket C-core sends the socket path, percent-encoded,
//! as the HTTP/2 `:authority`; the HTTP/2 server under tonic rejects such a value and resets the
//! stream, where Go's server (SPIRE's) accepts it. This adapter sits between the socket and the
//! HTTP/2 server, HPACK-decodes each client header block and re-encodes it with
//! `:authority: localhost` (the authority means nothing on a Unix socket). Only HEADERS and
//! CONTINUATION frames from the client are touched; everything else passes byte for byte. Input
//! it cannot decode is passed on unchanged, for the HTTP/2 server to refuse. A header block
//! that decodes to more than [`MAX_HEADER_LIST`] (the HTTP/2 server's own header-list limit,
//! counted as RFC 7541 §4.1 counts it) ends the connection: HPACK lets a few bytes stand for a
//! whole table entry, so the decoded size is checked as it grows, never after.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The HTTP/2 server's SETTINGS_MAX_FRAME_SIZE and SETTINGS_HEADER_TABLE_SIZE (defaults).
const MAX_FRAME: usize = 16_384;
const TABLE_SIZE: usize = 4096;
/// A header block larger than this is not ours to rewrite.
const MAX_BLOCK: usize = 256 * 1024;
/// The largest decoded header list accepted: name + value + 32 per field (RFC 7541 §4.1),
/// as SETTINGS_MAX_HEADER_LIST_SIZE counts it; 16 KiB as the HTTP/2 server's default.
pub const MAX_HEADER_LIST: usize = 16 * 1024;

enum Mode {
    Preface,
    Frames,
    /// Something we do not understand: pass everything on unchanged.
    Raw,
    /// A header list over [`MAX_HEADER_LIST`]: the connection ends.
    Refused,
}

/// A header block being collected across HEADERS + CONTINUATION frames.
struct Pending {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received, for passing on if the block cannot be decoded.
    raw: Vec<u8>,
}

/// Rewrites the client's `:authority` on an HTTP/2 connection (see the module docs).
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    input: Vec<u8>,
    output: Vec<u8>,
    out_pos: usize,
    pending: Option<Pending>,
    decoder: fluke_hpack::Decoder<'static>,
    encoder: fluke_hpack::Encoder<'static>,
}

/// The connection's peer facts are the wrapped stream's (for a Unix socket, tonic's
/// `UdsConnectInfo` with the peer's credentials).
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthorityFix")
    }
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = fluke_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        AuthorityFix {
            inner,
            mode: Mode::Preface,
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            pending: None,
            decoder,
            encoder: fluke_hpack::Encoder::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Wraps each connection a listener stream yields.
    pub fn wrap<E>(r: Result<S, E>) -> Result<Self, E> {
        r.map(Self::new)
    }

    fn go_raw(&mut self) {
        if let Some(p) = self.pending.take() {
            self.output.extend_from_slice(&p.raw);
        }
        self.output.append(&mut self.input);
        self.mode = Mode::Raw;
    }

    /// Moves what can be processed from `input` to `output`.
    fn process(&mut self) {
        loop {
            match self.mode {
                Mode::Refused => {
                    self.input.clear();
                    return;
                }
                Mode::Raw => {
                    self.output.append(&mut self.input);
                    return;
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.go_raw();
                        return;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    self.output.extend(self.input.drain(..PREFACE.len()));
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    if self.input.len() < 9 {
                        return;
                    }
                    let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]])
                        as usize;
                    if self.input.len() < 9 + len {
                        if len > MAX_BLOCK {
                            self.go_raw();
                        }
                        return;
                    }
                    let frame: Vec<u8> = self.input.drain(..9 + len).collect();
                    self.frame(frame);
                }
            }
        }
    }

    fn frame(&mut self, frame: Vec<u8>) {
        let (ty, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[9..];
        match (ty, self.pending.is_some()) {
            (FRAME_HEADERS, false) => {
                let mut p = payload;
                let mut pad = 0usize;
                if flags & FLAG_PADDED != 0 {
                    let Some((&n, rest)) = p.split_first() else {
                        return self.bad(frame);
                    };
                    pad = n as usize;
                    p = rest;
                }
                let mut priority = None;
                if flags & FLAG_PRIORITY != 0 {
                    if p.len() < 5 {
                        return self.bad(frame);
                    }
                    let mut pr = [0u8; 5];
                    pr.copy_from_slice(&p[..5]);
                    priority = Some(pr);
                    p = &p[5..];
                }
                if pad > p.len() {
                    return self.bad(frame);
                }
                let block = p[..p.len() - pad].to_vec();
                self.pending = Some(Pending {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    priority,
                    block,
                    raw: frame.clone(),
                });
                if flags & FLAG_END_HEADERS != 0 {
                    self.finish_block();
                }
            }
            (FRAME_CONTINUATION, true) => {
                let Some(p) = self.pending.as_mut() else {
                    return self.bad(frame);
                };
                if p.stream_id != stream_id || p.block.len() + payload.len() > MAX_BLOCK {
                    return self.bad(frame);
                }
                p.block.extend_from_slice(payload);
                p.raw.extend_from_slice(&frame);
                if flags & FLAG_END_HEADERS != 0 {
                    self.finish_block();
                }
            }
            (_, true) => self.bad(frame),
            _ => self.output.extend_from_slice(&frame),
        }
    }

    fn bad(&mut self, frame: Vec<u8>) {
        if let Some(p) = self.pending.take() {
            self.output.extend_from_slice(&p.raw);
        }
        self.output.extend_from_slice(&frame);
        self.go_raw();
    }

    fn finish_block(&mut self) {
        let Some(p) = self.pending.take() else { return };
        let decoder = &mut self.decoder;
        // Fields are copied out only while the list is within the limit: past it, decoding
        // still runs to its end (the dynamic table must stay in step) but keeps nothing.
        let mut size = 0usize;
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = vec![];
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_with_cb(&p.block, |n, v| {
                size = size.saturating_add(n.len() + v.len() + 32);
                if size <= MAX_HEADER_LIST {
                    headers.push((n.into_owned(), v.into_owned()));
                }
            })
        }));
        if size > MAX_HEADER_LIST {
            tracing::info!(
                decoded_bytes = size,
                limit = MAX_HEADER_LIST,
                "Workload API connection refused: header list too large"
            );
            self.pending = None;
            self.output.clear();
            self.out_pos = 0;
            self.mode = Mode::Refused;
            return;
        }
        if !matches!(decoded, Ok(Ok(()))) {
            self.output.extend_from_slice(&p.raw);
            self.go_raw();
            return;
        }
        let headers: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n, b"localhost".to_vec())
                } else {
                    (n, v)
                }
            })
            .collect();
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        // Emit HEADERS (+ CONTINUATION) frames within the server's frame size.
        let first_room = MAX_FRAME - if p.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = block.split_at(block.len().min(first_room));
        let mut flags = if p.end_stream { FLAG_END_STREAM } else { 0 };
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        let mut payload = vec![];
        if let Some(pr) = p.priority {
            flags |= FLAG_PRIORITY;
            payload.extend_from_slice(&pr);
        }
        payload.extend_from_slice(first);
        self.emit(FRAME_HEADERS, flags, p.stream_id, &payload);
        while !rest.is_empty() {
            let (chunk, r) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = r;
            let f = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
            self.emit(FRAME_CONTINUATION, f, p.stream_id, chunk);
        }
    }

    fn emit(&mut self, ty: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = (payload.len() as u32).to_be_bytes();
        self.output
            .extend_from_slice(&[len[1], len[2], len[3], ty, flags]);
        self.output.extend_from_slice(&stream_id.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if matches!(this.mode, Mode::Refused) {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "HTTP/2 header list larger than 16 KiB",
                )));
            }
            if this.out_pos < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.out_pos);
                buf.put_slice(&this.output[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.output.len() {
                    this.output.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        // EOF: hand over whatever is left unprocessed.
                        if let Some(p) = this.pending.take() {
                            this.output.extend_from_slice(&p.raw);
                        }
                        this.output.append(&mut this.input);
                        if this.output.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    this.input.extend_from_slice(got);
                    this.process();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(ty: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], ty, flags];
        f.extend_from_slice(&sid.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
        let mut out = vec![];
        fix.read_to_end(&mut out).await.unwrap();
        out
    }

    fn headers_of(out: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut d = fluke_hpack::Decoder::new();
        let mut rest = &out[PREFACE.len()..];
        let mut block = vec![];
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (ty, flags) = (rest[3], rest[4]);
            let mut p = &rest[9..9 + len];
            if ty == FRAME_HEADERS && flags & FLAG_PRIORITY != 0 {
                p = &p[5..];
            }
            if ty == FRAME_HEADERS || ty == FRAME_CONTINUATION {
                block.extend_from_slice(p);
            }
            rest = &rest[9 + len..];
        }
        d.decode(&block).unwrap()
    }

    #[tokio::test]
    async fn h2fix_rewrites_a_percent_encoded_unix_authority_across_continuations() {
        let mut enc = fluke_hpack::Encoder::new();
        let block = enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"tmp%2Fx%2Fapi.sock"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ]);
        let (a, b) = block.split_at(5);
        // HEADERS (padded, with priority) + CONTINUATION, then a DATA frame.
        let mut payload = vec![2u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            1,
            &payload,
        ));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, b));
        let data = frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0");
        input.extend(&data);
        let out = run(input).await;
        assert!(out.starts_with(PREFACE));
        assert!(out.ends_with(&data), "other frames pass unchanged");
        let h = headers_of(&out[..out.len() - data.len()]);
        assert!(
            h.contains(&(b":authority".to_vec(), b"localhost".to_vec())),
            "{h:?}"
        );
        assert!(h.contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
        assert!(h.contains(&(
            b":path".to_vec(),
            b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()
        )));
    }

    /// The connection preface, then `block` as HEADERS and CONTINUATION frames on stream 1.
    fn preface_and_block(block: &[u8]) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
        for (i, c) in chunks.iter().enumerate() {
            let ty = if i == 0 {
                FRAME_HEADERS
            } else {
                FRAME_CONTINUATION
            };
            let flags = if i + 1 == chunks.len() {
                FLAG_END_HEADERS
            } else {
                0
            };
            input.extend(frame(ty, flags, 1, c));
        }
        input
    }

    /// One 4 KiB table entry referenced 100,000 times: 400 MiB decoded from a 100 KiB
    /// block. Refused, with no more than the limit ever held.
    #[tokio::test]
    async fn h2fix_hpack_bomb_ends_the_connection() {
        let mut block = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e]; // value length 4000
        block.extend(std::iter::repeat_n(b'a', 4000));
        block.extend(std::iter::repeat_n(0x80 | 62, 100_000));
        let input = preface_and_block(&block);
        let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
        let mut out = vec![];
        let e = fix.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        // A list just within the limit still passes, rewritten.
        let mut enc = fluke_hpack::Encoder::new();
        let big = vec![b'v'; MAX_HEADER_LIST - 200];
        let block = enc.encode(vec![
            (&b":authority"[..], &b"x"[..]),
            (b"big", big.as_slice()),
        ]);
        let input = preface_and_block(&block);
        let out = run(input).await;
        assert!(headers_of(&out).contains(&(b":authority".to_vec(), b"localhost".to_vec())));
    }

    #[tokio::test]
    async fn h2fix_passes_garbage_and_non_http2_input_unchanged() {
        let junk = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(run(junk.clone()).await, junk);
        // A header block that is not HPACK: passed on for the server to refuse.
        let mut input = PREFACE.to_vec();
        let bad = frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff],
        );
        input.extend(&bad);
        input.extend(b"trailing");
        let out = run(input.clone()).await;
        assert_eq!(out, input);
    }
}
