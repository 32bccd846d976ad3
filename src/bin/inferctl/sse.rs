//! Streams of OpenAI SSE chunks, live from the server or replayed from a dump: the text of one
//! choice to stdout as it arrives, the raw bytes to the dump untouched, and the spinner until the
//! first text.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::Value;

use crate::error::{chain, CliError, Result};
use crate::spinner::Spinner;

/// How one stream ended.
#[derive(Debug, Default)]
pub struct StreamEnd {
    pub text: String,
    pub finish_reason: Option<String>,
    /// `data: [DONE]` arrived.
    pub done: bool,
}

/// Prints the text of one choice from chunk after chunk (completion `choices[].text` or chat
/// `choices[].delta.content`), stopping the spinner before the first text.
pub struct Printer<'a, W: Write> {
    out: W,
    choice: u64,
    spinner: Option<&'a mut Spinner>,
    current: StreamEnd,
}

/// What an event meant for the stream it belongs to.
enum Step {
    More,
    Done,
}

/// Why an event could not be printed.
enum Bad {
    /// Not a JSON chunk: the server's fault live, the file's in a replay.
    Malformed(String),
    /// An error event, a writing failure.
    Fail(CliError),
}

impl From<CliError> for Bad {
    fn from(e: CliError) -> Self {
        Bad::Fail(e)
    }
}

impl<'a, W: Write> Printer<'a, W> {
    pub fn new(out: W, choice: u64, spinner: Option<&'a mut Spinner>) -> Self {
        Self {
            out,
            choice,
            spinner,
            current: StreamEnd::default(),
        }
    }

    fn on_event(&mut self, data: &str) -> std::result::Result<Step, Bad> {
        if data == "[DONE]" {
            self.current.done = true;
            return Ok(Step::Done);
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| Bad::Malformed(format!("an SSE chunk is not JSON ({e}): {data}")))?;
        if let Some(err) = v.get("error") {
            let message = err["message"]
                .as_str()
                .map_or_else(|| err.to_string(), str::to_string);
            return Err(CliError::server(format!("error event mid-stream: {message}")).into());
        }
        let (text, finish) = choice_delta(&v, self.choice);
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            if let Some(s) = self.spinner.as_deref_mut() {
                s.stop();
            }
            self.out
                .write_all(text.as_bytes())
                .and_then(|()| self.out.flush())
                .map_err(|e| CliError::io("writing stdout", e))?;
            self.current.text.push_str(text);
        }
        if let Some(f) = finish {
            self.current.finish_reason = Some(f.to_string());
        }
        Ok(Step::More)
    }

    /// Ends the printed line of a stream (also after an error, so that the shell's prompt or the
    /// next turn starts on a new line).
    fn end_line(&mut self) -> Result<()> {
        if let Some(s) = self.spinner.as_deref_mut() {
            s.stop();
        }
        writeln!(self.out).map_err(|e| CliError::io("writing stdout", e))
    }

    /// After an error: ends the line only if some text of it was printed.
    fn end_partial(&mut self) -> Result<()> {
        if let Some(s) = self.spinner.as_deref_mut() {
            s.stop();
        }
        if self.current.text.is_empty() {
            return Ok(());
        }
        self.end_line()
    }

    fn take(&mut self) -> StreamEnd {
        std::mem::take(&mut self.current)
    }

    /// Ends a replayed stream: the newline, and the finish reason on stderr.
    fn finish_replayed(&mut self) -> Result<()> {
        self.end_line()?;
        let end = self.take();
        eprintln!("finish_reason={}", end.finish_reason.as_deref().unwrap_or("none"));
        Ok(())
    }
}

/// The text and finish reason that one chunk carries for choice `index` (matched by each choice's
/// `index` field, as the choices of `n > 1` arrive in separate chunks).
pub fn choice_delta(v: &Value, index: u64) -> (Option<&str>, Option<&str>) {
    let Some(choices) = v["choices"].as_array() else {
        return (None, None);
    };
    choices
        .iter()
        .enumerate()
        .find(|(pos, c)| c["index"].as_u64().unwrap_or(*pos as u64) == index)
        .map_or((None, None), |(_, c)| {
            let text = c["text"].as_str().or_else(|| c["delta"]["content"].as_str());
            (text, c["finish_reason"].as_str())
        })
}

/// Why the bytes of a live stream stopped coming.
#[derive(Debug, thiserror::Error)]
enum ByteError {
    #[error("the stream broke off: {}", chain(.0))]
    Net(reqwest::Error),
    #[error("writing the SSE dump: {0}")]
    Dump(std::io::Error),
}

/// Prints a live SSE answer; every byte goes to `dump` first, exactly as received.
pub async fn stream_live<W: Write>(
    resp: reqwest::Response,
    mut dump: Option<&mut File>,
    printer: &mut Printer<'_, W>,
) -> Result<StreamEnd> {
    let bytes = resp.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(ByteError::Net)?;
        if let Some(f) = dump.as_deref_mut() {
            f.write_all(&chunk).map_err(ByteError::Dump)?;
        }
        Ok::<_, ByteError>(chunk)
    });
    let one = match read_one(bytes, printer).await {
        Ok(one) => one,
        Err(e) => {
            printer.end_partial()?;
            return Err(e);
        }
    };
    printer.end_line()?;
    if !one.done {
        return Err(CliError::server("the stream ended without `data: [DONE]`"));
    }
    Ok(one)
}

/// Reads events up to `[DONE]` or the end of the bytes.
async fn read_one<S, W: Write>(bytes: S, printer: &mut Printer<'_, W>) -> Result<StreamEnd>
where
    S: Stream<Item = std::result::Result<bytes::Bytes, ByteError>> + Unpin,
{
    let mut events = bytes.eventsource();
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| match e {
            EventStreamError::Transport(ByteError::Dump(e)) => CliError::io("writing the SSE dump", e),
            EventStreamError::Transport(e) => CliError::server(e.to_string()),
            EventStreamError::Utf8(e) => CliError::server(format!("the stream is not UTF-8: {e}")),
            EventStreamError::Parser(e) => CliError::server(format!("the stream is not SSE: {e}")),
        })?;
        match printer.on_event(&event.data) {
            Ok(Step::More) => {}
            Ok(Step::Done) => break,
            Err(Bad::Malformed(m)) => return Err(CliError::server(m)),
            Err(Bad::Fail(e)) => return Err(e),
        }
    }
    Ok(printer.take())
}

/// Prints a dump back as it streamed: each stream's text then a newline, and its finish reason on
/// stderr. A dump may hold several streams (a chat session's turns).
pub async fn replay(path: &Path, choice: u64) -> Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut printer = Printer::new(std::io::stdout().lock(), choice, None);
    let mut events = futures::stream::iter([Ok::<_, std::convert::Infallible>(data)]).eventsource();
    let (mut streams, mut open) = (0, false);
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| anyhow::anyhow!("{} is not an SSE dump: {e}", path.display()))?;
        match printer.on_event(&event.data) {
            Ok(Step::More) => open = true,
            Ok(Step::Done) => {
                printer.finish_replayed()?;
                streams += 1;
                open = false;
            }
            Err(bad) => {
                printer.end_partial()?;
                return Err(match bad {
                    Bad::Malformed(m) => anyhow::anyhow!("{}: {m}", path.display()).into(),
                    Bad::Fail(e) => e,
                });
            }
        }
    }
    if open {
        // A dump cut off before `[DONE]` (the client stopped): print what there is.
        printer.finish_replayed()?;
        streams += 1;
    }
    if streams == 0 {
        return Err(anyhow::anyhow!("{} holds no SSE events", path.display()).into());
    }
    Ok(())
}
