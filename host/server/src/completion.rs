//! The one completion path. A request's engine events fold into text through its
//! stop sequences, then into a sink: a JSON body (non-streaming) or server-sent
//! events (streaming). Both see the same pieces, the same finish and the same
//! usage, so the two modes cannot drift apart.

use crate::http::{engine_error, ApiError};
use crate::openai::{Reply, StopMatcher, UsageOut};
use bytes::Bytes;
use kframe_engine::{EngineError, Event, Stream, Usage};
use kframe_model::generate::FinishReason;
use serde_json::json;
use tokio::sync::mpsc;

/// Where a completion's output goes.
pub(crate) trait Sink {
    /// Text released by the stop matcher (may be empty). False when the client
    /// is gone: folding stops, and dropping the stream cancels the request.
    async fn text(&mut self, piece: &str) -> bool;
    /// The end: why it finished and what it used.
    async fn finish(&mut self, finish: &'static str, usage: UsageOut);
    /// The engine failed the request.
    async fn fail(&mut self, err: ApiError);
}

/// Folds `first` and then the rest of `events` into `sink`, cutting the text at
/// the first of `stops` (which ends the request).
pub(crate) async fn fold(
    first: Event,
    events: &mut Stream,
    stops: Vec<String>,
    prompt_len: usize,
    sink: &mut impl Sink,
) {
    let mut stop = StopMatcher::new(stops);
    let mut held = Some(first);
    let (mut completion_tokens, mut cached_tokens) = (0, 0);
    loop {
        let event = match held.take() {
            Some(e) => Some(e),
            None => events.next().await,
        };
        // A stop sequence ends the request before the engine's `Done`: its usage is
        // what the stream said so far.
        let stopped_here = |completion_tokens| Usage { prompt_tokens: prompt_len, completion_tokens, cached_tokens };
        let (piece, end) = match event {
            Some(Event::Started { cached_tokens: n }) => {
                cached_tokens = n;
                continue;
            }
            Some(Event::Token { text, .. }) => {
                completion_tokens += 1;
                let (piece, stopped) = stop.push(&text);
                (piece, stopped.then(|| ("stop", Some(stopped_here(completion_tokens)))))
            }
            Some(Event::Text(text)) => {
                let (piece, stopped) = stop.push(&text);
                (piece, stopped.then(|| ("stop", Some(stopped_here(completion_tokens)))))
            }
            Some(Event::Done { finish, usage, .. }) => (stop.finish(), Some((finish_reason(finish), Some(usage)))),
            Some(Event::Failed(e)) => return sink.fail(engine_error(e)).await,
            None => return sink.fail(engine_error(EngineError::ShutDown)).await,
        };
        if !sink.text(&piece).await {
            return;
        }
        if let Some((finish, engine_usage)) = end {
            return sink.finish(finish, UsageOut::new(prompt_len, completion_tokens, engine_usage)).await;
        }
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// A non-streaming completion: the whole text, then one JSON body.
#[derive(Default)]
pub(crate) struct JsonSink {
    text: String,
    pub(crate) end: Option<Result<(&'static str, UsageOut), ApiError>>,
}

impl JsonSink {
    /// The response body, or the error the request ended with.
    pub(crate) fn body(self, reply: &Reply<'_>) -> Result<serde_json::Value, ApiError> {
        let end = self.end.unwrap_or_else(|| Err(engine_error(EngineError::ShutDown)));
        end.map(|(finish, usage)| reply.full(&self.text, finish, usage))
    }
}

impl Sink for JsonSink {
    async fn text(&mut self, piece: &str) -> bool {
        self.text.push_str(piece);
        true
    }

    async fn finish(&mut self, finish: &'static str, usage: UsageOut) {
        self.end = Some(Ok((finish, usage)));
    }

    async fn fail(&mut self, err: ApiError) {
        self.end = Some(Err(err));
    }
}

/// A streaming completion: a chunk per released piece (chat streams open with the
/// role even before any text), a last chunk with the finish and usage, then
/// `[DONE]`. The status was already sent, so a failure is an error event.
pub(crate) struct SseSink<'a> {
    pub(crate) tx: mpsc::Sender<Bytes>,
    pub(crate) reply: Reply<'a>,
    /// Whether the first chunk went out.
    sent_first: bool,
}

impl<'a> SseSink<'a> {
    pub(crate) fn new(tx: mpsc::Sender<Bytes>, reply: Reply<'a>) -> Self {
        Self { tx, reply, sent_first: false }
    }

    async fn send(&self, v: serde_json::Value) -> bool {
        self.tx.send(Bytes::from(format!("data: {v}\n\n"))).await.is_ok()
    }

    async fn done(&self) {
        let _ = self.tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    }
}

impl Sink for SseSink<'_> {
    async fn text(&mut self, piece: &str) -> bool {
        let opens_chat = !self.sent_first && self.reply.endpoint == crate::openai::Endpoint::Chat;
        if piece.is_empty() && !opens_chat {
            return true;
        }
        if !self.send(self.reply.chunk(Some(piece), !self.sent_first, None)).await {
            return false;
        }
        self.sent_first = true;
        true
    }

    async fn finish(&mut self, finish: &'static str, usage: UsageOut) {
        let _ = self.send(self.reply.chunk(None, !self.sent_first, Some((finish, usage)))).await;
        self.done().await;
    }

    async fn fail(&mut self, err: ApiError) {
        let _ = self
            .send(json!({"error": {"message": err.message, "type": err.kind, "param": null, "code": err.code}}))
            .await;
        self.done().await;
    }
}
