//! Moving bytes: reading heads and pumping bodies through fixed buffers,
//! with an idle timeout on every read and write (never a total timeout: a
//! ten-minute SSE stream that keeps sending must survive).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant, Sleep};

use crate::body::{BodyError, Reframer};
use crate::error::Refusal;
use crate::head::{HeadScan, Scan, Side};

/// Bytes read per call while relaying a body: one TLS record's plaintext
/// (RFC 8446 §5.1), so a read takes what one decryption gives. Memory under
/// load is these buffers, about one per exchange in flight: at 64 KiB, a
/// thousand exchanges took four times the memory for no gain in throughput
/// or CPU per byte (BENCHMARKS.md, "Memory under load").
pub(crate) const BUF_SIZE: usize = 16 * 1024;
/// Below this much free space a read would be too small to be worth it.
const MIN_READ: usize = 4 * 1024;

/// Bytes read from a peer and not yet consumed. Holds no memory while empty
/// and released, so idle keep-alive connections cost almost nothing.
#[derive(Debug, Default)]
pub(crate) struct InBuf {
    buf: PooledBuf,
    pos: usize,
}

impl InBuf {
    /// The unconsumed bytes.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Is nothing left to consume?
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Marks `n` leading bytes consumed.
    pub(crate) fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Gives the buffer up if nothing is pending (before an idle wait).
    pub(crate) fn release(&mut self) {
        // `consume` has set the position back to 0 already.
        if self.is_empty() {
            self.buf = PooledBuf::empty();
        }
    }

    /// Reads once from `src`, appending; returns 0 at end of stream.
    pub(crate) async fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        src: &mut R,
    ) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf = PooledBuf::take();
        }
        let buf = &mut self.buf.0;
        if buf.capacity() - buf.len() < MIN_READ {
            buf.drain(..std::mem::take(&mut self.pos));
            if buf.capacity() - buf.len() < MIN_READ {
                buf.reserve(BUF_SIZE.max(buf.len()));
            }
        }
        src.read_buf(buf).await
    }
}

/// A buffer from the per-thread pool (`SPARE`), returned to it when
/// dropped: for reading, for the response head and the body bytes that
/// leave with it, which are too large for the allocator's fast path.
#[derive(Debug, Default)]
pub(crate) struct PooledBuf(Vec<u8>);

/// Read buffers kept per thread for reuse. Allocating and freeing a buffer per
/// request makes the allocator grow and trim the heap each time: two
/// syscalls and a run of fresh zeroed pages per request.
const SPARE_BUFFERS: usize = 64;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl PooledBuf {
    /// An empty buffer with `BUF_SIZE` capacity, from the pool if one is spare.
    pub(crate) fn take() -> PooledBuf {
        let spare = SPARE.with_borrow_mut(Vec::pop);
        PooledBuf(spare.unwrap_or_else(|| Vec::with_capacity(BUF_SIZE)))
    }

    /// A buffer without memory, for a body that needs none.
    pub(crate) fn empty() -> PooledBuf {
        PooledBuf(Vec::new())
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        // Only standard buffers: one grown for a large head is let go.
        if self.0.capacity() == BUF_SIZE {
            self.0.clear();
            SPARE.with_borrow_mut(|spare| {
                if spare.len() < SPARE_BUFFERS {
                    spare.push(std::mem::take(&mut self.0));
                }
            });
        }
    }
}

/// Why reading a head stopped without one.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The bytes break a rule; answer with this.
    Invalid(Refusal),
    /// The peer closed before a complete head.
    Closed,
    /// The socket failed.
    Io,
}

/// Reads until `input` starts with a complete head; returns its length.
/// The caller bounds the wait with its own timeout.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    src: &mut R,
    input: &mut InBuf,
    side: Side,
    max_bytes: usize,
    max_lines: usize,
) -> Result<usize, HeadError> {
    let mut scan = HeadScan::new(side);
    loop {
        let scanned = scan.scan(input.data(), max_bytes, max_lines);
        if let Scan::Complete(n) = scanned.map_err(HeadError::Invalid)? {
            return Ok(n);
        }
        if input.read_from(src).await.map_err(|_| HeadError::Io)? == 0 {
            return Err(HeadError::Closed);
        }
    }
}

/// Awaits `future` for at most `limit` from `start`, arming `timer` for at
/// most `step` at a time. tokio wakes its driver through an eventfd whenever
/// a timer is set before every pending one; when every long wait uses the
/// same step, timers always fall after existing ones and that costs nothing.
/// `timer` is the connection's own: moving a registered timer later is a
/// compare-and-swap, where a fresh timer per wait took the timer wheel's
/// lock to insert and again to remove it.
pub(crate) async fn timeout_in_steps<F: Future>(
    mut timer: Pin<&mut Sleep>,
    start: Instant,
    limit: Duration,
    step: Duration,
    future: F,
) -> Option<F::Output> {
    let deadline = start + limit;
    let mut future = pin!(future);
    let mut now = start;
    while now < deadline {
        timer.as_mut().reset(deadline.min(now + step));
        tokio::select! {
            biased;
            output = &mut future => return Some(output),
            () = timer.as_mut() => {}
        }
        now = Instant::now();
    }
    None
}

/// Awaits `future` for at most `idle`, reading the clock and arming a timer
/// only if it does not complete at once. Most writes, flushes and reads of
/// bytes already waiting do, and on a virtual machine a clock read costs
/// about as much as the rest of such a call.
pub(crate) async fn within<F: Future>(idle: Duration, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let first = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(output) => Some(output),
        Poll::Pending => timeout(idle, future).await.ok(),
    }
}

/// Why a body pump stopped early. `Source` is the side bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PumpError {
    /// The source closed before the body was complete.
    SourceClosed,
    /// Reading the source failed.
    SourceIo,
    /// The source sent nothing for the idle timeout.
    SourceTimeout,
    /// Writing the destination failed.
    SinkIo,
    /// The destination accepted nothing for the idle timeout.
    SinkTimeout,
    /// The body's framing broke a rule.
    Framing(BodyError),
    /// The body grew past the configured limit.
    TooLarge,
}

/// Writes all of `bytes` under the idle timeout.
pub(crate) async fn write_all<W: AsyncWrite + Unpin>(
    dst: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), PumpError> {
    sink(within(idle, dst.write_all(bytes)).await)
}

/// A write's outcome under the idle timeout, as a pump error.
fn sink<T>(outcome: Option<io::Result<T>>) -> Result<T, PumpError> {
    match outcome {
        Some(Ok(value)) => Ok(value),
        Some(Err(_)) => Err(PumpError::SinkIo),
        None => Err(PumpError::SinkTimeout),
    }
}

/// Writes all of `first` then `second` under the idle timeout, with
/// vectored writes, so that the two leave together without being copied
/// into one buffer (`first` may hold a secret and must not be copied).
pub(crate) async fn write_pair<W: AsyncWrite + Unpin>(
    dst: &mut W,
    first: &[u8],
    second: &[u8],
    idle: Duration,
) -> Result<(), PumpError> {
    let mut slices = [io::IoSlice::new(first), io::IoSlice::new(second)];
    let mut rest = &mut slices[..];
    // An empty pair writes nothing.
    while rest.iter().any(|slice| !slice.is_empty()) {
        match sink(within(idle, dst.write_vectored(rest)).await)? {
            0 => return Err(PumpError::SinkIo),
            n => io::IoSlice::advance_slices(&mut rest, n),
        }
    }
    Ok(())
}

/// Flushes `dst` under the idle timeout.
pub(crate) async fn flush<W: AsyncWrite + Unpin>(
    dst: &mut W,
    idle: Duration,
) -> Result<(), PumpError> {
    sink(within(idle, dst.flush()).await)
}

/// Relays one body from `src` (bytes already read wait in `input`) to `dst`.
/// `out` may already hold bytes to send first (a head): they leave in the
/// same write as the first body bytes. Payload passes through unchanged;
/// chunked framing is validated and re-emitted canonically by `body`.
/// Stops exactly at the end of the body, leaving later bytes in `input`.
pub(crate) async fn pump<R, W>(
    src: &mut R,
    input: &mut InBuf,
    dst: &mut W,
    body: &mut Reframer,
    out: &mut Vec<u8>,
    idle: Duration,
    max_payload: Option<u64>,
) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Plain bodies go straight from the read buffer to the socket. With
        // no input, or once the body is done, nothing is taken and nothing
        // written (an empty write is no write at all).
        if out.is_empty() {
            if let Some(n) = body.passthrough(input.data()) {
                write_all(dst, &input.data()[..n], idle).await?;
                input.consume(n);
            }
        }
        // What is left (none of a plain body) is re-framed into `out`.
        let n = body.feed(input.data(), out).map_err(PumpError::Framing)?;
        input.consume(n);
        if max_payload.is_some_and(|max| body.payload() > max) {
            return Err(PumpError::TooLarge);
        }
        write_all(dst, out, idle).await?;
        out.clear();
        flush(dst, idle).await?;
        if body.is_done() {
            return Ok(());
        }
        match within(idle, input.read_from(src)).await {
            None => return Err(PumpError::SourceTimeout),
            Some(Err(_)) => return Err(PumpError::SourceIo),
            // A clean close may complete the body: its last bytes leave,
            // and the pump returns, on the next turn.
            Some(Ok(0)) if !body.finish_at_close(out) => return Err(PumpError::SourceClosed),
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::Framing;

    /// A reader that yields its chunks one read at a time.
    struct Chunks(Vec<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if !self.0.is_empty() {
                let chunk = self.0.remove(0);
                buf.put_slice(&chunk);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn pump_chunked_at_every_split_keeps_pipelined_bytes() {
        let wire = b"3\r\nabc\r\n0\r\n\r\nGET /next";
        for split in 1..wire.len() {
            let mut src = Chunks(vec![wire[..split].to_vec(), wire[split..].to_vec()]);
            let mut input = InBuf::default();
            let mut dst = Vec::new();
            let mut out = b"HEAD\r\n".to_vec();
            let mut body = Reframer::new(Framing::Chunked);
            pump(
                &mut src,
                &mut input,
                &mut dst,
                &mut body,
                &mut out,
                Duration::from_secs(5),
                None,
            )
            .await
            .unwrap();
            assert_eq!(dst, b"HEAD\r\n3\r\nabc\r\n0\r\n\r\n", "split {split}");
            let mut rest = input.data().to_vec();
            while let Ok(n) = input.read_from(&mut src).await {
                if n == 0 {
                    break;
                }
                rest = input.data().to_vec();
            }
            assert_eq!(rest, b"GET /next", "split {split}");
        }
    }

    #[tokio::test]
    async fn pump_length_stops_and_detects_truncation() {
        let mut src = Chunks(vec![b"hello wor".to_vec()]);
        let mut input = InBuf::default();
        let mut dst = Vec::new();
        let mut body = Reframer::new(Framing::Length(20));
        let err = pump(
            &mut src,
            &mut input,
            &mut dst,
            &mut body,
            &mut Vec::new(),
            Duration::from_secs(5),
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(err, PumpError::SourceClosed);
        assert_eq!(dst, b"hello wor");
    }

    #[tokio::test]
    async fn read_head_reports_close_mid_head() {
        let mut src = Chunks(vec![b"GET / HT".to_vec()]);
        let mut input = InBuf::default();
        assert!(matches!(
            read_head(&mut src, &mut input, Side::Request, 1024, 10).await,
            Err(HeadError::Closed)
        ));
    }
}
