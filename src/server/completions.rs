//! `POST /v1/completions`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::handler;
use super::params::{CommonParams, Fields, common, job_spec};
use super::respond::{Choice, ChunkWriter, Usage, finish_name};
use super::state::{AppState, unique_id, unix_time};
use crate::engine::TokenLogprobs;
use crate::generate::FinishReason;

/// The prompt forms OpenAI accepts: a string, strings, token ids, lists of token ids.
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

fn parse_prompts(f: &Fields) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| v.as_u64().filter(|id| *id <= u32::MAX as u64).map(|id| id as u32).ok_or_else(bad))
            .collect()
    };
    let prompts = match f.raw("prompt").ok_or_else(|| ApiError::param("prompt", "`prompt` is required"))? {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(items) if items.is_empty() => return Err(ApiError::param("prompt", "`prompt` is empty")),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().map(|v| Prompt::Text(v.as_str().unwrap_or_default().to_string())).collect()
        }
        Value::Array(items) if items.iter().all(Value::is_number) => vec![Prompt::Ids(ids(items)?)],
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|v| Ok(Prompt::Ids(ids(v.as_array().map(Vec::as_slice).unwrap_or_default())?)))
            .collect::<Result<_, ApiError>>()?,
        _ => return Err(bad()),
    };
    Ok(prompts)
}

pub async fn create(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (lease, body) = handler::begin(&state, &body)?;
    let f = Fields::parse(&body)?;
    f.reject_unsupported(&["suffix", "tools", "tool_choice", "functions", "function_call"])?;
    if f.get::<i64>("best_of", "an integer")?.is_some_and(|b| b != 1) {
        return Err(ApiError::Unsupported {
            param: "best_of".into(),
            message: "`best_of` other than 1 is not supported".into(),
        });
    }
    let logprobs = f.get::<i64>("logprobs", "an integer")?;
    if let Some(k) = logprobs
        && !(0..=20).contains(&k)
    {
        return Err(ApiError::param("logprobs", format!("`logprobs` must be between 0 and 20, got {k}")));
    }
    let logprobs = logprobs.map(|k| k as usize);
    let echo = f.get::<bool>("echo", "a boolean")?.unwrap_or(false);
    let common: CommonParams = common(&f, &state, &["max_tokens"])?;
    let prompts = parse_prompts(&f)?;
    let texts: Vec<Option<String>> = prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(t) => Some(t.clone()),
            Prompt::Ids(_) => None,
        })
        .collect();
    let ids = handler::tokenize_blocking(
        &state,
        prompts
            .into_iter()
            .map(|p| match p {
                Prompt::Text(t) => Err(t),
                Prompt::Ids(ids) => Ok(ids),
            })
            .collect(),
    )
    .await?;
    let specs = ids
        .iter()
        .map(|prompt| job_spec(&state, prompt.clone(), &common, logprobs, echo && logprobs.is_some()))
        .collect::<Result<Vec<_>, _>>()?;
    let prompt_texts: Vec<String> = texts
        .into_iter()
        .zip(&ids)
        .map(|(text, ids)| text.unwrap_or_else(|| state.tokenizer.decode(ids).unwrap_or_default()))
        .collect();
    let usage = Usage { prompt_tokens: ids.iter().map(|p| p.len() * common.n).sum(), ..Default::default() };
    let n = common.n;
    let choices = ids.len() * n;
    let writer = CompletionWriter {
        id: format!("cmpl-{}", unique_id()),
        created: unix_time(),
        model: state.model_name.to_string(),
        echo: echo.then(|| (0..choices).map(|c| prompt_texts[c / n].clone()).collect()),
        tokenizer: state.tokenizer.clone(),
    };
    handler::deliver(&state, lease, specs, &common, writer, usage, |writer, done, usage| {
        writer.body(done, &prompt_texts, &ids, n, logprobs.is_some(), usage)
    })
    .await
}

pub struct CompletionWriter {
    id: String,
    created: u64,
    model: String,
    /// Prompt text per choice when echoing.
    echo: Option<Vec<String>>,
    tokenizer: std::sync::Arc<crate::text::TextTokenizer>,
}

impl CompletionWriter {
    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices})
    }

    /// OpenAI's completion `logprobs` object for these positions (`None` entries: no log-probability,
    /// as for the first prompt token).
    fn logprobs_json(&self, entries: &[(u32, Option<&TokenLogprobs>)], offset: usize) -> Value {
        let mut text_offset = Vec::with_capacity(entries.len());
        let mut position = offset;
        let mut tokens = Vec::new();
        for (id, _) in entries {
            let text = self.tokenizer.token_text(*id);
            text_offset.push(position);
            position += text.len();
            tokens.push(text);
        }
        let top = |lp: &TokenLogprobs| -> Value {
            let map: Map<String, Value> =
                lp.top.iter().map(|(id, p)| (self.tokenizer.token_text(*id), json!(p))).collect();
            Value::Object(map)
        };
        json!({
            "tokens": tokens,
            "token_logprobs": entries.iter().map(|(_, lp)| lp.map(|l| json!(l.logprob)).unwrap_or(Value::Null)).collect::<Vec<_>>(),
            "top_logprobs": entries.iter().map(|(_, lp)| lp.map(top).unwrap_or(Value::Null)).collect::<Vec<_>>(),
            "text_offset": text_offset,
        })
    }

    fn body(
        &self,
        done: &[Choice],
        prompt_texts: &[String],
        prompt_ids: &[Vec<u32>],
        n: usize,
        with_logprobs: bool,
        mut usage: Usage,
    ) -> Value {
        let choices: Vec<Value> = done
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let prompt = index / n;
                let echo = self.echo.is_some();
                let text = if echo { format!("{}{}", prompt_texts[prompt], c.text) } else { c.text.clone() };
                let logprobs = with_logprobs.then(|| {
                    let mut entries: Vec<(u32, Option<&TokenLogprobs>)> = Vec::new();
                    if echo {
                        let ids = &prompt_ids[prompt];
                        entries.push((ids[0], None));
                        let listed = c.prompt_logprobs.as_deref().unwrap_or_default();
                        entries.extend(
                            ids[1..]
                                .iter()
                                .zip(listed.iter().map(Some).chain(std::iter::repeat(None)))
                                .map(|(id, lp)| (*id, lp)),
                        );
                    }
                    entries.extend(c.logprobs.iter().map(|lp| (lp.token, Some(lp))));
                    self.logprobs_json(&entries, 0)
                });
                usage.completion_tokens += c.token_ids.len();
                usage.recurrence_steps += c.steps.iter().sum::<usize>();
                json!({
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_name(c.finish),
                    "steps_per_token": c.steps,
                })
            })
            .collect();
        let mut body = self.chunk(Value::Array(choices));
        body["usage"] = usage.json();
        body
    }
}

impl ChunkWriter for CompletionWriter {
    fn opening(&mut self, choices: usize) -> Vec<Value> {
        match &self.echo {
            Some(texts) => (0..choices)
                .map(|i| self.chunk(json!([{"index": i, "text": texts[i], "logprobs": null, "finish_reason": null}])))
                .collect(),
            None => Vec::new(),
        }
    }

    fn prompt_logprobs(&mut self, choice: usize, logprobs: &[TokenLogprobs]) -> Option<Value> {
        let entries: Vec<(u32, Option<&TokenLogprobs>)> = logprobs.iter().map(|lp| (lp.token, Some(lp))).collect();
        Some(self.chunk(
            json!([{"index": choice, "text": "", "logprobs": self.logprobs_json(&entries, 0), "finish_reason": null}]),
        ))
    }

    fn token(&mut self, choice: usize, text: &str, steps: usize, logprobs: Option<&TokenLogprobs>) -> Value {
        let logprobs = logprobs.map(|lp| self.logprobs_json(&[(lp.token, Some(lp))], 0));
        self.chunk(json!([{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": null, "steps_per_token": [steps]}]))
    }

    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason) -> Value {
        self.chunk(json!([{"index": choice, "text": text, "logprobs": null, "finish_reason": finish_name(Some(reason)), "steps_per_token": []}]))
    }

    fn usage(&mut self, usage: &Usage) -> Value {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = usage.json();
        chunk
    }
}
