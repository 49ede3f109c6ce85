//! The OpenAI wire format: request bodies, responses, stream chunks, and the two
//! pieces of text handling the API adds on top of the engine (chat templates and
//! stop sequences).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A prompt: a string, a list holding one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The sampling fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub n: Option<u64>,
    /// kframe's extension: continue this session (also `X-Kframe-Session`).
    pub session: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

/// Message content: a string, or the list-of-parts form (text parts only).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

impl Content {
    /// The text, or which part kind kframe cannot take.
    pub fn text(&self) -> Result<String, String> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(format!("content part of type `{kind}` is not supported; use text")),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptDetails {
    /// Prompt tokens served from the session's cache (or a shared prefix).
    pub cached_tokens: usize,
}

impl UsageOut {
    /// `engine` is the engine's count when the request ran to its end; a request
    /// cut short by a stop sequence has only what the server counted.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, engine: Option<kframe_engine::Usage>) -> Self {
        let (prompt_tokens, cached_tokens) = engine.map_or((prompt_tokens, 0), |u| (u.prompt_tokens, u.cached_tokens));
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptDetails { cached_tokens },
        }
    }
}

/// What both endpoints' responses are built from.
pub struct Reply<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub session: Option<&'a str>,
}

impl Reply<'_> {
    /// The whole (non-streamed) response.
    pub fn full(&self, text: &str, finish: &str, usage: UsageOut) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": null,
            }),
        };
        let mut v = json!({
            "id": self.id,
            "object": if self.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        });
        if let Some(s) = self.session {
            v["session"] = json!(s);
        }
        v
    }

    /// One stream chunk: a piece of text, the role (chat's first chunk), or the
    /// finish reason with usage (the last).
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<(&str, UsageOut)>) -> Value {
        let reason = finish.map(|(r, _)| r);
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": reason, "logprobs": null})
            }
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": null})
            }
        };
        let mut v = json!({
            "id": self.id,
            "object": if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some((_, usage)) = finish {
            v["usage"] = json!(usage);
        }
        if let Some(s) = self.session {
            v["session"] = json!(s);
        }
        v
    }
}

/// Qwen2.5's ChatML layout without a default system prompt, for model
/// directories whose tokenizer_config.json has no `chat_template`.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A model's chat template, compiled once.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, String> {
        let mut env = minijinja::Environment::new();
        // Hugging Face templates call this to refuse a conversation.
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_owned()).map_err(|e| format!("chat template: {e}"))?;
        Ok(Self { env })
    }

    /// The prompt text for `messages`, ending where the assistant's reply starts.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String, String> {
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|(role, content)| {
                let m: std::collections::BTreeMap<String, String> =
                    [("role".to_owned(), role.clone()), ("content".to_owned(), content.clone())].into();
                minijinja::Value::from(m)
            })
            .collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .map_err(|e| format!("chat template: {e}"))
    }
}

/// Cuts generated text at the first stop sequence. While streaming it holds back
/// any tail that could still become one, so a client never sees part of a stop.
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already released.
    sent: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, text: String::new(), sent: 0 }
    }

    /// Adds generated text; returns what may be released now and whether a stop
    /// sequence ended the text.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        if let Some(cut) = self.stops.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            let out = self.text[self.sent.min(cut)..cut].to_owned();
            self.text.truncate(cut);
            self.sent = cut;
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of a stop sequence.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n) && self.text.ends_with(&s[..n])))
            .max()
            .unwrap_or(0);
        let release = self.text.len() - hold;
        let out = self.text[self.sent..release.max(self.sent)].to_owned();
        self.sent = release.max(self.sent);
        (out, false)
    }

    /// Whatever was held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.sent..].to_owned();
        self.sent = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_sequence_split_across_pieces_is_never_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let mut out = String::new();
        for piece in ["hello E", "N", "D and more"] {
            let (text, stopped) = m.push(piece);
            out += &text;
            if stopped {
                break;
            }
        }
        assert_eq!(out, "hello ");
        assert_eq!(m.text(), "hello ");
    }

    #[test]
    fn held_back_text_that_was_not_a_stop_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let (a, _) = m.push("say E");
        assert_eq!(a, "say ");
        let (b, stopped) = m.push("ND?");
        assert!(stopped);
        assert_eq!(b, "");
        let mut m = StopMatcher::new(vec!["END".into()]);
        m.push("say E");
        let (c, stopped) = m.push("gg");
        assert!(!stopped);
        assert_eq!(c, "Egg");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn the_default_chat_template_renders_chatml() {
        let t = ChatTemplate::new(DEFAULT_CHAT_TEMPLATE).unwrap();
        let text = t.render(&[("system".into(), "be brief".into()), ("user".into(), "hi".into())]).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
