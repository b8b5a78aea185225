//! PROXY protocol v1/v2 (HAProxy, AWS NLB): the real client address arrives in a header
//! before the first byte of HTTP or TLS.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest header accepted (v1 is at most 107 bytes; v2 with TLVs rarely exceeds 1 KiB).
const MAX_HEADER: usize = 4096;

/// A stream that first yields bytes already read past a header.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner` with nothing read ahead.
    pub fn new(inner: S) -> Self {
        Prefixed {
            prefix: Bytes::new(),
            inner,
        }
    }

    /// `inner` with `prefix` read ahead of it.
    pub fn with_prefix(inner: S, prefix: Bytes) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Outcome of parsing what has been read so far.
enum Parsed {
    Incomplete,
    /// Header length and the client address (`None` for LOCAL/UNKNOWN: use the peer).
    Done(usize, Option<SocketAddr>),
}

fn parse(buf: &[u8]) -> Result<Parsed, String> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Ok(Parsed::Incomplete);
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let addr = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok(Parsed::Done(h.header.len(), addr))
        }
        HeaderResult::V2(Ok(h)) => {
            let addr = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, _) => None,
            };
            Ok(Parsed::Done(h.len(), addr))
        }
        HeaderResult::V1(Err(e)) => Err(format!("bad PROXY v1 header: {e}")),
        HeaderResult::V2(Err(e)) => Err(format!("bad PROXY v2 header: {e}")),
    }
}

/// Reads a PROXY header from `stream`. Returns the stream (with any bytes read past the
/// header kept) and the client address (`None` means use the TCP peer).
pub async fn accept<S: AsyncRead + Unpin>(
    mut stream: S,
) -> Result<(Prefixed<S>, Option<SocketAddr>), String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err("connection closed before a PROXY header".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf)? {
            Parsed::Incomplete if buf.len() < MAX_HEADER => continue,
            Parsed::Incomplete => return Err("PROXY header too long".into()),
            Parsed::Done(len, addr) => {
                let rest = Bytes::from(buf).slice(len..);
                return Ok((
                    Prefixed {
                        prefix: rest,
                        inner: stream,
                    },
                    addr,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_headers_give_the_client_address() {
        let v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        match parse(v1).unwrap() {
            Parsed::Done(len, Some(addr)) => {
                assert_eq!(addr.to_string(), "203.0.113.9:51234");
                assert_eq!(&v1[len..len + 3], b"GET");
            }
            _ => panic!("v1 not parsed"),
        }
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 7, 10, 0, 0, 1, 0x1f, 0x90, 0x01, 0xbb,
        ]);
        match parse(&v2).unwrap() {
            Parsed::Done(len, Some(addr)) => {
                assert_eq!(len, v2.len());
                assert_eq!(addr.to_string(), "198.51.100.7:8080");
            }
            _ => panic!("v2 not parsed"),
        }
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4"),
            Ok(Parsed::Incomplete)
        ));
        assert!(parse(b"GET / HTTP/1.1\r\n\r\n").is_err());
    }
}
