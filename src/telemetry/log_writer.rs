//! The log's writer: every line, from tracing or from the request log, is
//! appended to one shared buffer under a mutex, and a thread of its own
//! writes the buffer out — at most `FLUSH_DELAY` after its first line, or at
//! once when `WAKE_AT` bytes are waiting. A request's thread pays a copy
//! into memory, not a system call, a channel message or a wake-up per line;
//! lines keep the order they were logged in.
//!
//! Nothing is dropped: past `MAX_BUFFERED` bytes a logging thread waits for
//! the writer. What is buffered is written when the guard is dropped.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the first line of a batch waits for company.
const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// Bytes that wake the writer at once.
const WAKE_AT: usize = 64 * 1024;
/// Bytes past which loggers wait for the writer.
const MAX_BUFFERED: usize = 4 * 1024 * 1024;

/// Appends lines to the log; cheap to clone.
#[derive(Clone)]
pub(crate) struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes what is buffered and stops the writer when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: a first line, `WAKE_AT` bytes, or closing.
    wake: Condvar,
    /// Wakes loggers waiting for room.
    room: Condvar,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    closed: bool,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LogWriter {
    /// Starts the writer thread, writing to `out`.
    pub(crate) fn start(
        mut out: impl Write + Send + 'static,
    ) -> std::io::Result<(LogWriter, LogGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("linkid-log".into())
                .spawn(move || write_out(&shared, &mut out))?
        };
        Ok((
            LogWriter {
                shared: shared.clone(),
            },
            LogGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Appends whole lines.
    pub(crate) fn append(&self, lines: &[u8]) {
        let mut state = lock(&self.shared);
        while state.buffer.len() + lines.len() > MAX_BUFFERED
            && !state.buffer.is_empty()
            && !state.closed
        {
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let was = state.buffer.len();
        state.buffer.extend_from_slice(lines);
        if was == 0 || (was < WAKE_AT && state.buffer.len() >= WAKE_AT) {
            self.shared.wake.notify_one();
        }
    }
}

/// The writer thread: waits for a first line, lets a batch gather, writes
/// it, until closed and empty.
fn write_out(shared: &Shared, out: &mut impl Write) {
    let mut batch = Vec::new();
    loop {
        {
            let mut state = lock(shared);
            while state.buffer.is_empty() && !state.closed {
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.buffer.len() < WAKE_AT && !state.closed {
                state = shared
                    .wake
                    .wait_timeout_while(state, FLUSH_DELAY, |s| {
                        s.buffer.len() < WAKE_AT && !s.closed
                    })
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if state.buffer.is_empty() && state.closed {
                return;
            }
            std::mem::swap(&mut state.buffer, &mut batch);
            shared.room.notify_all();
        }
        // A log that cannot be written has nowhere to say so.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > WAKE_AT * 4 {
            batch.shrink_to(WAKE_AT);
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared).closed = true;
        self.shared.wake.notify_one();
        self.shared.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(self)
    }
}

/// One tracing event's text, appended as it is written (the formatter
/// writes an event's line in one call).
pub(crate) struct LogLine<'a>(&'a LogWriter);

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` into memory the test can look at.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_are_all_written_whole_and_in_each_threads_order() {
        let sink = Sink::default();
        let (writer, guard) = LogWriter::start(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        writer.append(format!("thread {t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(guard);

        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            let (t, i): (usize, usize) = (words[1].parse().unwrap(), words[3].parse().unwrap());
            assert_eq!(i, next[t], "{line}");
            next[t] += 1;
        }
        assert_eq!(next, [20_000; 4]);
    }

    #[test]
    fn a_lone_line_is_written_soon_without_more_company() {
        let sink = Sink::default();
        let (writer, _guard) = LogWriter::start(sink.clone()).unwrap();
        writer.append(b"alone\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&sink.0.lock().unwrap()[..], b"alone\n");
    }
}
