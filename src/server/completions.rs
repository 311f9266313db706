//! `POST /v1/completions`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::handler;
use super::request::{self, CommonParams, CompletionRequest, Prompt, Request};
use super::respond::{Choice, ChunkWriter, Streamed, Usage, finish_name, waves_json};
use super::state::{AppState, unique_id, unix_time};
use crate::engine::{TokenLogprobs, WaveCounts};
use crate::generate::{FinishReason, ranges};

/// The prompts as text (to tokenize) or token ids.
fn prompts(prompt: Option<Prompt>) -> Result<Vec<Result<Vec<u32>, String>>, ApiError> {
    let prompts = match prompt.ok_or_else(|| ApiError::param("prompt", "`prompt` is required"))? {
        Prompt::Text(text) => vec![Err(text)],
        Prompt::Texts(texts) => texts.into_iter().map(Err).collect(),
        Prompt::Ids(ids) => vec![Ok(ids)],
        Prompt::IdLists(lists) => lists.into_iter().map(Ok).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::param("prompt", "`prompt` is empty"));
    }
    Ok(prompts)
}

pub async fn create(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (lease, parsed) = handler::begin::<CompletionRequest>(&state, &body)?;
    let Request { common, generation, tools, endpoint: completion } = parsed;
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
    let common: CommonParams = request::common(&common, &generation, &state, "max_tokens")?;
    let prompts = prompts(completion.prompt)?;
    handler::check_prompt_count(&state, prompts.len())?;
    // The texts as sent, kept only to echo them.
    let texts: Vec<Option<String>> =
        if echo { prompts.iter().map(|p| p.as_ref().err().cloned()).collect() } else { Vec::new() };
    let ids = handler::tokenize_blocking(&state, prompts).await?;
    let specs = ids
        .iter()
        .map(|prompt| request::job_spec(&state, prompt.clone(), &common, logprobs, echo && logprobs.is_some()))
        .collect::<Result<Vec<_>, _>>()?;
    // Echoing: each prompt's text (as sent, or decoded from its ids) and ids.
    let echoed = echo.then(|| {
        texts
            .into_iter()
            .zip(&ids)
            .map(|(text, ids)| (text.unwrap_or_else(|| state.tokenizer.decode(ids).unwrap_or_default()), ids.clone()))
            .collect()
    });
    let usage = Usage {
        prompt_tokens: ids.iter().map(|p| p.len() * common.n).sum(),
        speculative: specs.iter().any(|s| s.params.speculation().is_some()),
        parallel: specs.iter().any(|s| s.params.parallel().is_some()),
        ..Default::default()
    };
    let n = common.n;
    let choices = ids.len() * n;
    let writer = CompletionWriter {
        id: format!("cmpl-{}", unique_id()),
        created: unix_time(),
        model: state.model_name.to_string(),
        echo: echoed,
        n,
        with_logprobs: logprobs.is_some(),
        text_offsets: vec![0; choices],
        tokenizer: state.tokenizer.clone(),
    };
    handler::deliver(&state, lease, specs, &common, writer, usage, |writer, done, usage| writer.body(done, usage)).await
}

pub struct CompletionWriter {
    id: String,
    created: u64,
    model: String,
    /// Prompt text and ids per prompt when echoing (choice `c` is of prompt `c / n`).
    echo: Option<Vec<(String, Vec<u32>)>>,
    /// Choices per prompt.
    n: usize,
    with_logprobs: bool,
    /// Streaming with logprobs: each choice's `text_offset` so far (its tokens' texts before the
    /// next chunk), so that the chunks' offsets are those of the whole non-streamed answer.
    text_offsets: Vec<usize>,
    tokenizer: std::sync::Arc<crate::text::TextTokenizer>,
}

impl CompletionWriter {
    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices})
    }

    /// OpenAI's completion `logprobs` object for these positions (`None` entries: no log-probability,
    /// as for the first prompt token).
    /// `offset` is the first entry's `text_offset`; returns the object and the offset after the last.
    fn logprobs_json(&self, entries: &[(u32, Option<&TokenLogprobs>)], offset: usize) -> (Value, usize) {
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
        let body = json!({
            "tokens": tokens,
            "token_logprobs": entries.iter().map(|(_, lp)| lp.map(|l| json!(l.logprob)).unwrap_or(Value::Null)).collect::<Vec<_>>(),
            "top_logprobs": entries.iter().map(|(_, lp)| lp.map(top).unwrap_or(Value::Null)).collect::<Vec<_>>(),
            "text_offset": text_offset,
        });
        (body, position)
    }

    /// The echoed prompt's entries: its first token without a log-probability, then each
    /// following one with the engine's (`listed`, after the first).
    fn prompt_entries<'a>(ids: &[u32], listed: &'a [TokenLogprobs]) -> Vec<(u32, Option<&'a TokenLogprobs>)> {
        let logprobs = std::iter::once(None).chain(listed.iter().map(Some)).chain(std::iter::repeat(None));
        ids.iter().copied().zip(logprobs).collect()
    }

    /// The echoed prompt (text and ids) of choice `choice`, when echoing.
    fn echoed(&self, choice: usize) -> Option<&(String, Vec<u32>)> {
        self.echo.as_ref()?.get(choice / self.n)
    }

    fn body(&self, done: &[Choice], mut usage: Usage) -> Value {
        let choices: Vec<Value> = done
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let echoed = self.echoed(index);
                let text = match echoed {
                    Some((prompt, _)) => format!("{prompt}{}", c.text),
                    None => c.text.clone(),
                };
                let logprobs = self.with_logprobs.then(|| {
                    let mut entries: Vec<(u32, Option<&TokenLogprobs>)> = Vec::new();
                    if let Some((_, ids)) = echoed {
                        let listed = c.prompt_logprobs.as_deref().unwrap_or_default();
                        entries = Self::prompt_entries(ids, listed);
                    }
                    entries.extend(c.logprobs.iter().map(|lp| (lp.token, Some(lp))));
                    self.logprobs_json(&entries, 0).0
                });
                usage.add_choice(c);
                let mut choice = json!({
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_name(c.finish),
                    "steps_per_token": c.steps,
                });
                if usage.parallel {
                    choice["parallel"] = waves_json(&c.waves);
                }
                choice
            })
            .collect();
        let mut body = self.chunk(Value::Array(choices));
        body["usage"] = usage.json();
        body
    }
}

impl ChunkWriter for CompletionWriter {
    /// Echoing without logprobs: the prompt's text at once. With logprobs the echo waits for the
    /// prompt's log-probabilities and goes out with them ([`Self::prompt_logprobs`]), as one chunk
    /// whose entries and offsets are those of the non-streamed answer.
    fn opening(&mut self, choices: usize) -> Vec<Value> {
        if self.with_logprobs {
            return Vec::new();
        }
        (0..choices)
            .filter_map(|i| {
                let (text, _) = self.echoed(i)?;
                Some(self.chunk(json!([{"index": i, "text": text, "logprobs": null, "finish_reason": null}])))
            })
            .collect()
    }

    fn prompt_logprobs(&mut self, choice: usize, logprobs: &[TokenLogprobs]) -> Option<Value> {
        let (text, ids) = self.echoed(choice)?;
        let entries = Self::prompt_entries(ids, logprobs);
        let (body, end) = self.logprobs_json(&entries, 0);
        let chunk = self.chunk(json!([{"index": choice, "text": text, "logprobs": body, "finish_reason": null}]));
        self.text_offsets[choice] = end;
        Some(chunk)
    }

    fn token(&mut self, choice: usize, tokens: &[Streamed]) -> Value {
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let steps: Vec<usize> = tokens.iter().map(|t| t.steps).collect();
        let listed: Vec<(u32, Option<&TokenLogprobs>)> =
            tokens.iter().filter_map(|t| t.logprobs.as_ref()).map(|lp| (lp.token, Some(lp))).collect();
        let logprobs = (!listed.is_empty()).then(|| {
            let (body, end) = self.logprobs_json(&listed, self.text_offsets[choice]);
            self.text_offsets[choice] = end;
            body
        });
        self.chunk(json!([{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": null, "steps_per_token": steps}]))
    }

    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason, waves: Option<&WaveCounts>) -> Value {
        let mut entry = json!({"index": choice, "text": text, "logprobs": null, "finish_reason": finish_name(Some(reason)), "steps_per_token": []});
        if let Some(waves) = waves {
            entry["parallel"] = waves_json(waves);
        }
        self.chunk(json!([entry]))
    }

    fn usage(&mut self, usage: &Usage) -> Value {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = usage.json();
        chunk
    }
}
