//! Where a request is checked, once: a parsed body (`request.rs`) becomes a typed, valid request
//! ([`ValidCompletion`], [`ValidChat`]) whose values need no further check, and, once its prompts
//! are tokenized, the engine's [`ValidJob`]s. Every 400 a generation request can get is raised
//! here or by the checks this calls (`generate::GenerationRequest::resolve`, `JobSpec::validate`);
//! the endpoint files keep only their OpenAI shapes.

use super::error::ApiError;
use super::handler::check_prompt_count;
use super::request::{ChatRequest, CommonRequest, CompletionRequest, Content, Message, Prompt, Request, Stop};
use super::state::AppState;
use super::structured::{self, Requested};
use super::tools::{self, ToolCalls, ToolRequest};
use crate::engine::{JobSpec, ValidJob};
use crate::generate::constraint::Constraint;
use crate::generate::{FieldError, GenerationParams, GenerationRequest, RequestContext, fit_context, ranges};
use crate::text::ChatMessage;

/// A prompt as sent: text to tokenize, or token ids.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// A valid `POST /v1/completions`.
pub struct ValidCompletion {
    pub common: CommonParams,
    pub prompts: Vec<PromptInput>,
    /// Top alternatives per token (`logprobs`).
    pub logprobs: Option<usize>,
    pub echo: bool,
}

/// A valid `POST /v1/chat/completions`: its messages rendered through the chat template.
pub struct ValidChat {
    pub common: CommonParams,
    pub prompt: String,
    /// `logprobs: true`, with `top_logprobs` alternatives.
    pub logprobs: Option<usize>,
    /// How the output becomes a tool call, when `tool_choice` asks for one.
    pub tool_calls: Option<ToolCalls>,
}

impl ValidCompletion {
    /// The job of each prompt (`ids`: the prompts tokenized, in order).
    pub fn jobs(&self, state: &AppState, ids: &[Vec<u32>]) -> Result<Vec<ValidJob>, ApiError> {
        let prompt_logprobs = self.echo && self.logprobs.is_some();
        ids.iter().map(|prompt| job(state, prompt.clone(), &self.common, self.logprobs, prompt_logprobs)).collect()
    }
}

impl ValidChat {
    /// The job of the rendered prompt (`ids`: it tokenized).
    pub fn job(&self, state: &AppState, ids: Vec<u32>) -> Result<ValidJob, ApiError> {
        job(state, ids, &self.common, self.logprobs, false)
    }
}

/// Checks a completion request.
pub fn completion(state: &AppState, request: Request<CompletionRequest>) -> Result<ValidCompletion, ApiError> {
    let Request { common, generation, tools, structured, endpoint: completion } = request;
    if let Some(name) = completion.suffix.is_some().then_some("suffix").or(tools.given()) {
        let message = format!("`{name}` is not supported by this server");
        return Err(ApiError::Unsupported { param: name.into(), message });
    }
    if completion.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::Unsupported {
            param: "best_of".into(),
            message: "`best_of` other than 1 is not supported".into(),
        });
    }
    let logprobs = completion
        .logprobs
        .map(|k| ranges::top_logprobs(k).map_err(|e| ApiError::param("logprobs", format!("`logprobs` {e}"))))
        .transpose()?;
    let echo = completion.echo.unwrap_or(false);
    let mut common = self::common(&common, &generation, state, "max_tokens")?;
    common.constraint = structured::requested(structured, state.settings.limits.max_constraint_bytes)?;
    let prompts = prompts(completion.prompt)?;
    check_prompt_count(state, prompts.len())?;
    Ok(ValidCompletion { common, prompts, logprobs, echo })
}

/// Checks a chat request and renders its messages.
pub fn chat(state: &AppState, request: Request<ChatRequest>) -> Result<ValidChat, ApiError> {
    let Request { common, mut generation, tools, structured, endpoint: chat } = request;
    let refused = [("audio", chat.audio.is_some()), ("prediction", chat.prediction.is_some())];
    if let Some(name) = refused.into_iter().find_map(|(name, given)| given.then_some(name)) {
        let message = format!("`{name}` is not supported by this server");
        return Err(ApiError::Unsupported { param: name.into(), message });
    }
    let max_constraint_bytes = state.settings.limits.max_constraint_bytes;
    let tools = tools::requested(tools, max_constraint_bytes)?;
    let with_logprobs = chat.logprobs.unwrap_or(false);
    let top = chat
        .top_logprobs
        .map(|k| ranges::top_logprobs(k).map_err(|e| ApiError::param("top_logprobs", format!("`top_logprobs` {e}"))))
        .transpose()?;
    if top.is_some() && !with_logprobs {
        return Err(ApiError::param("top_logprobs", "`top_logprobs` requires `logprobs` to be true"));
    }
    let logprobs = with_logprobs.then(|| top.unwrap_or(0));
    let max_tokens_field = if chat.max_completion_tokens.is_some() {
        generation.max_tokens = chat.max_completion_tokens;
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let mut common = self::common(&common, &generation, state, max_tokens_field)?;
    common.constraint = structured::requested(structured, max_constraint_bytes)?;
    let (tools, tool_calls) = match tools {
        None => (None, None),
        Some(ToolRequest { tools, calls: None }) => (Some(tools), None),
        Some(ToolRequest { tools, calls: Some((constraint, calls)) }) => {
            if let Some(other) = &common.constraint {
                let message = format!("`{}` and `tool_choice` both constrain the output: give one", other.field);
                return Err(ApiError::param("tool_choice", message));
            }
            common.constraint = Some(constraint);
            (Some(tools), Some(calls))
        }
    };
    let messages = messages(chat.messages)?;
    let prompt = state
        .tokenizer
        .apply_chat_template_with_tools(&messages, tools.as_deref(), true)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    Ok(ValidChat { common, prompt, logprobs, tool_calls })
}

/// The prompts as text (to tokenize) or token ids.
fn prompts(prompt: Option<Prompt>) -> Result<Vec<PromptInput>, ApiError> {
    let prompts = match prompt.ok_or_else(|| ApiError::param("prompt", "`prompt` is required"))? {
        Prompt::Text(text) => vec![PromptInput::Text(text)],
        Prompt::Texts(texts) => texts.into_iter().map(PromptInput::Text).collect(),
        Prompt::Ids(ids) => vec![PromptInput::Ids(ids)],
        Prompt::IdLists(lists) => lists.into_iter().map(PromptInput::Ids).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::param("prompt", "`prompt` is empty"));
    }
    Ok(prompts)
}

const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// The messages as the chat template takes them: known roles (`developer` is `system`), text
/// content only.
pub fn messages(items: Option<Vec<Message>>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = items.ok_or_else(|| ApiError::param("messages", "`messages` is required"))?;
    if items.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let param = format!("messages[{i}]");
            let role = message
                .role
                .ok_or_else(|| ApiError::param(&format!("{param}.role"), "each message needs a string `role`"))?;
            if !ROLES.contains(&role.as_str()) {
                return Err(ApiError::param(
                    &format!("{param}.role"),
                    format!("role `{role}` is not supported (use system, user or assistant)"),
                ));
            }
            let content = match message.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|part| match (part.kind.as_deref(), part.text) {
                        (Some("text"), Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::Unsupported {
                            param: format!("{param}.content"),
                            message: format!(
                                "content part of type `{}` is not supported: only text",
                                kind.unwrap_or("?")
                            ),
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            let role = if role == "developer" { "system" } else { role.as_str() };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOP_STRINGS: usize = 4;

/// What the completion and chat endpoints share: sampling, the compute budget, stops, `n`.
pub struct CommonParams {
    pub params: GenerationParams,
    pub n: usize,
    pub max_total_steps: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `max_tokens` was given explicitly (an over-long request is then an error, not clamped).
    pub max_tokens_explicit: bool,
    /// The structured-output constraint asked for, and once compiled (`structured::compile`), it.
    pub constraint: Option<Requested>,
    pub compiled: Option<Constraint>,
}

/// Resolves the generation fields against the settings and the model (`max_tokens` reported as
/// `max_tokens_field`, which chat may call `max_completion_tokens`) and checks the shared part.
fn common(
    common: &CommonRequest,
    generation: &GenerationRequest,
    state: &AppState,
    max_tokens_field: &str,
) -> Result<CommonParams, ApiError> {
    let cfg = state.model_config();
    let context = RequestContext {
        defaults: &state.settings.generation,
        limits: &state.settings.limits,
        mean_recurrence: cfg.mean_recurrence,
        vocab_size: cfg.vocab_size,
        stop_token_ids: &state.tokenizer.special().stop,
    };
    let resolved = generation.resolve(&context).map_err(|mut e: FieldError| {
        if e.field == "max_tokens" {
            e.message = e.message.replace("`max_tokens`", &format!("`{max_tokens_field}`"));
            e.field = max_tokens_field.to_string();
        }
        ApiError::from(e)
    })?;
    let max_n = state.settings.limits.max_n;
    let n = common.n.unwrap_or(1);
    let n = crate::generate::check::count("n", n, 1, max_n)?;
    let stop = match &common.stop {
        None => Vec::new(),
        Some(Stop::One(text)) => vec![text.clone()],
        Some(Stop::Many(texts)) if texts.len() > MAX_STOP_STRINGS => {
            let message = format!("`stop` may hold at most {MAX_STOP_STRINGS} sequences, got {}", texts.len());
            return Err(ApiError::param("stop", message));
        }
        Some(Stop::Many(texts)) => texts.clone(),
    };
    let stream = common.stream.unwrap_or(false);
    let include_usage = match &common.stream_options {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::param("stream_options", "`stream_options` is only allowed when `stream` is true"));
        }
        Some(options) => options.include_usage.unwrap_or(false),
    };
    Ok(CommonParams {
        params: resolved.params,
        n,
        max_total_steps: resolved.max_total_steps,
        stop,
        stream,
        include_usage,
        max_tokens_explicit: resolved.max_tokens_explicit,
        constraint: None,
        compiled: None,
    })
}

/// One prompt's job: `max_tokens` fitted into the context, then the engine's own check
/// ([`JobSpec::validate`]: the prompt against the context and the vocabulary).
fn job(
    state: &AppState,
    prompt: Vec<u32>,
    common: &CommonParams,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
) -> Result<ValidJob, ApiError> {
    let cfg = state.model_config();
    let mut params = common.params.clone();
    let limit = state.settings.limits.max_prompt_tokens;
    fit_context(prompt.len(), &mut params.max_tokens, common.max_tokens_explicit, cfg.block_size, limit)?;
    let spec = JobSpec {
        prompt,
        params,
        n: common.n,
        max_total_steps: common.max_total_steps,
        stop: common.stop.clone(),
        logprobs,
        prompt_logprobs,
        report_logits: false,
        constraint: common.compiled.clone(),
    };
    Ok(spec.validate(cfg)?)
}
