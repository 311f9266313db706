//! The response bodies and stream chunks, as types (OpenAI's shapes plus huginn's recurrence
//! fields). Endpoints fill them; serde writes them.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::engine::{StrategyCounts, WaveCounts};
use crate::generate::FinishReason;

/// A body or a chunk: the envelope every answer shares.
#[derive(Debug, Serialize)]
pub struct Envelope<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
}

/// `usage`: tokens, recurrence steps, and what the decoding strategy did.
#[derive(Debug, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub recurrence_steps: usize,
    pub mean_steps_per_token: f64,
    #[serde(flatten)]
    pub strategy: StrategyUsage,
    /// Elastic requests only: steps their tokens did not spend under a lowered cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elastic_steps_shed: Option<usize>,
}

/// `usage.prompt_tokens_details` (OpenAI's): prompt tokens the prefix cache supplied.
#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// The strategy's own usage figures (none for sequential decoding).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum StrategyUsage {
    Sequential {},
    Speculative { draft_tokens: usize, accepted_draft_tokens: usize },
    Parallel { sampler_steps: usize, tokens_per_sampler_step: f64, mean_wavefront: f64 },
}

impl From<StrategyCounts> for StrategyUsage {
    fn from(counts: StrategyCounts) -> Self {
        match counts {
            StrategyCounts::Sequential => Self::Sequential {},
            StrategyCounts::Speculative(d) => {
                Self::Speculative { draft_tokens: d.drafted, accepted_draft_tokens: d.accepted }
            }
            StrategyCounts::Parallel(w) => Self::Parallel {
                sampler_steps: w.steps,
                tokens_per_sampler_step: w.tokens_per_step(),
                mean_wavefront: w.mean_wavefront(),
            },
        }
    }
}

/// A parallel-sampler choice's `parallel` object.
#[derive(Debug, Clone, Serialize)]
pub struct ParallelFigures {
    pub sampler_steps: usize,
    pub tokens_per_step: f64,
    pub mean_wavefront: f64,
}

impl ParallelFigures {
    /// The figures of a choice whose strategy is the parallel sampler.
    pub fn of(counts: &StrategyCounts) -> Option<Self> {
        match counts {
            StrategyCounts::Parallel(w) => Some(Self::from(w)),
            _ => None,
        }
    }
}

impl From<&WaveCounts> for ParallelFigures {
    fn from(w: &WaveCounts) -> Self {
        Self { sampler_steps: w.steps, tokens_per_step: w.tokens_per_step(), mean_wavefront: w.mean_wavefront() }
    }
}

pub fn finish_name(reason: Option<FinishReason>) -> Option<&'static str> {
    reason.map(|r| match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    })
}

/// One choice of a completion (body or chunk).
#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_per_token: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelFigures>,
}

/// A completion's `logprobs` object.
#[derive(Debug, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f64>>,
    /// Per position, token text to log-probability (most likely first).
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

/// One choice of a chat completion: `message` in a body, `delta` in a chunk.
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatText>,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_per_token: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelFigures>,
}

/// A message, or the part of one a chunk carries.
#[derive(Debug, Default, Serialize)]
pub struct ChatText {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A tool call of a message, or the part of one a chunk carries (`index` in chunks only; `id`,
/// `type` and the name in a call's first chunk).
#[derive(Debug, Serialize)]
pub struct ToolCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCall,
}

#[derive(Debug, Serialize)]
pub struct FunctionCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The arguments as JSON text (a fragment of it in a chunk).
    pub arguments: String,
}

/// A chat choice's `logprobs` object.
#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<ChatTokenLogprob>>,
}

/// Serializes a response type (they hold no map with non-string keys, so this cannot fail).
pub fn to_value(value: impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// An error answer: OpenAI's `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// An internal error's id in the server's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

/// `/health` and `/ready`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub status: &'static str,
}

/// `POST /tokenize`.
#[derive(Debug, Serialize)]
pub struct Tokenized {
    pub count: usize,
    pub tokens: Vec<u32>,
    pub max_model_len: usize,
}

/// `POST /detokenize`.
#[derive(Debug, Serialize)]
pub struct Detokenized {
    pub prompt: String,
}
