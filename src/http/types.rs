//! OpenAI request and response shapes for `/v1/completions`.

use serde::{Deserialize, Serialize};

/// `prompt`: one string, or one list of token ids.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    /// Batches of prompts are refused with a clear error rather than half-served.
    Batch(Vec<serde_json::Value>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StopParam {
    One(String),
    Many(Vec<String>),
}

/// The body of `POST /v1/completions`. Unknown fields are refused (400 naming the field), never
/// silently ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM: sample only among the `top_k` most likely tokens (-1 or 0: all).
    pub top_k: Option<i64>,
    /// vLLM: drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f64>,
    /// OpenAI: subtracted once from the logit of every token already generated.
    pub presence_penalty: Option<f64>,
    /// OpenAI: subtracted from a token's logit per time it was generated.
    pub frequency_penalty: Option<f64>,
    /// transformers/vLLM: divides positive (multiplies negative) logits of tokens in the prompt or output.
    pub repetition_penalty: Option<f64>,
    /// OpenAI: token id (as a string) → bias added to its logit, in [-100, 100].
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// Streaming options; only allowed with `stream: true`.
    pub stream_options: Option<StreamOptions>,
    pub seed: Option<i64>,
    pub stop: Option<StopParam>,
    /// vLLM: token ids that end the sequence (reported as `stop_reason`).
    pub stop_token_ids: Option<Vec<i64>>,
    /// vLLM: keep generating past the model's EOS token.
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM: tokens generated before any stop may end the sequence.
    pub min_tokens: Option<i64>,
    /// vLLM: keep the matched stop string (or stop token's text) in the output.
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    #[serde(default)]
    pub stream: bool,
    pub n: Option<i64>,
    /// Who the request counts against for fair sharing when no API key is sent.
    pub user: Option<String>,
    /// vLLM: lower is served sooner, among the same client's waiting requests (default 0).
    pub priority: Option<i64>,
    /// Completions: the log probability of each generated token and of this many alternatives (0..=20).
    pub logprobs: Option<i64>,
    /// Completions: the answer's text starts with the prompt.
    #[serde(default)]
    pub echo: bool,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and empty `choices`) before `data: [DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Breakdown of the prompt tokens, as OpenAI reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose K/V came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
}

/// Completions' `logprobs`, in OpenAI's legacy shape: parallel lists, one entry per token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token: the alternatives asked for plus the chosen token, text → logprob.
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Per token: its offset in characters into the choice's text (which starts with the
    /// prompt under `echo`).
    pub text_offset: Vec<usize>,
}

/// Chat's `logprobs`: one entry per token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    /// The most likely tokens, most likely first (`top_logprobs` of them).
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    /// The stop string or token id that ended the sequence (vLLM's `stop_reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// A whole response (`stream: false`) or one SSE chunk (`stream: true`); both are
/// `object: "text_completion"` in OpenAI's API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// `content` of a chat message: a string, or OpenAI's list of parts (only `text` parts are
/// accepted; they are joined with newlines, as vLLM does for string templates).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ChatContent {
    Text(String),
    Parts(Vec<ChatContentPart>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    /// Any other key; refused with a message naming it (kept here rather than denied by serde,
    /// whose error inside an untagged enum would not name the field).
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    /// `null` is allowed (an assistant turn that only called tools); it renders as "".
    pub content: Option<ChatContent>,
    pub name: Option<String>,
}

/// The body of `POST /v1/chat/completions`: OpenAI's fields plus the vLLM extensions that
/// `/v1/completions` takes. Unknown fields are refused (400 naming the field).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; either works.
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM: sample only among the `top_k` most likely tokens (-1 or 0: all).
    pub top_k: Option<i64>,
    /// vLLM: drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f64>,
    /// OpenAI: subtracted once from the logit of every token already generated.
    pub presence_penalty: Option<f64>,
    /// OpenAI: subtracted from a token's logit per time it was generated.
    pub frequency_penalty: Option<f64>,
    /// transformers/vLLM: divides positive (multiplies negative) logits of tokens in the prompt or output.
    pub repetition_penalty: Option<f64>,
    /// OpenAI: token id (as a string) → bias added to its logit, in [-100, 100].
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// Streaming options; only allowed with `stream: true`.
    pub stream_options: Option<StreamOptions>,
    pub seed: Option<i64>,
    pub stop: Option<StopParam>,
    pub stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub min_tokens: Option<i64>,
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    #[serde(default)]
    pub stream: bool,
    pub n: Option<i64>,
    pub user: Option<String>,
    pub priority: Option<i64>,
    /// vLLM: end the prompt where the assistant's answer starts (default true).
    pub add_generation_prompt: Option<bool>,
    /// Return the log probability of each generated token.
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`: this many alternatives per token (0..=20).
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessageOut {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// `object: "chat.completion"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// What a stream chunk adds to the assistant message.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// `object: "chat.completion.chunk"`: one SSE event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only on the last chunk, with `stream_options.include_usage` (and empty `choices`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}
