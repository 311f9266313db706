//! `POST /v1/completions`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::handler;
use super::request::CompletionRequest;
use super::respond::{Choice, ChunkWriter, Streamed, Usage};
use super::state::{AppState, unique_id, unix_time};
use super::structured;
use super::validate::{self, PromptInput};
use super::wire::{CompletionChoice, CompletionLogprobs, Envelope, ParallelFigures, UsageBody, finish_name, to_value};
use crate::engine::{StrategyCounts, TokenLogprobs};
use crate::generate::FinishReason;

pub async fn create(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (lease, parsed) = handler::begin::<CompletionRequest>(&state, &body)?;
    let mut valid = validate::completion(&state, parsed)?;
    // The texts as sent, kept only to echo them.
    let texts: Vec<Option<String>> = if valid.echo {
        valid.prompts.iter().map(|p| if let PromptInput::Text(t) = p { Some(t.clone()) } else { None }).collect()
    } else {
        Vec::new()
    };
    let ids = handler::tokenize_blocking(&state, std::mem::take(&mut valid.prompts)).await?;
    valid.common.compiled = structured::compile(&state, valid.common.constraint.take()).await?;
    let jobs = valid.jobs(&state, &ids)?;
    // Echoing: each prompt's text (as sent, or decoded from its ids) and ids.
    let echoed = valid.echo.then(|| {
        texts
            .into_iter()
            .zip(&ids)
            .map(|(text, ids)| (text.unwrap_or_else(|| state.tokenizer.decode(ids).unwrap_or_default()), ids.clone()))
            .collect()
    });
    let common = &valid.common;
    let usage = Usage::new(ids.iter().map(|p| p.len() * common.n).sum(), &common.params);
    let writer = CompletionWriter {
        id: format!("cmpl-{}", unique_id()),
        created: unix_time(),
        model: state.model_name.to_string(),
        echo: echoed,
        n: common.n,
        with_logprobs: valid.logprobs.is_some(),
        text_offsets: vec![0; ids.len() * common.n],
        tokenizer: state.tokenizer.clone(),
    };
    handler::deliver(&state, lease, jobs, common, writer, usage, |writer, done, usage| writer.body(done, usage)).await
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
    fn envelope(&self, choices: Vec<CompletionChoice>, usage: Option<UsageBody>) -> Value {
        let (id, model) = (&self.id, &self.model);
        to_value(Envelope { id, object: "text_completion", created: self.created, model, choices, usage })
    }

    fn chunk(&self, choice: CompletionChoice) -> Value {
        self.envelope(vec![choice], None)
    }

    /// OpenAI's completion `logprobs` object for these positions (`None` entries: no log-probability,
    /// as for the first prompt token).
    /// `offset` is the first entry's `text_offset`; returns the object and the offset after the last.
    fn logprobs(&self, entries: &[(u32, Option<&TokenLogprobs>)], offset: usize) -> (CompletionLogprobs, usize) {
        let mut text_offset = Vec::with_capacity(entries.len());
        let mut position = offset;
        let mut tokens = Vec::new();
        for (id, _) in entries {
            let text = self.tokenizer.token_text(*id);
            text_offset.push(position);
            position += text.len();
            tokens.push(text);
        }
        let top = |lp: &TokenLogprobs| -> Map<String, Value> {
            lp.top.iter().map(|(id, p)| (self.tokenizer.token_text(*id), Value::from(*p))).collect()
        };
        let body = CompletionLogprobs {
            tokens,
            token_logprobs: entries.iter().map(|(_, lp)| lp.map(|l| f64::from(l.logprob))).collect(),
            top_logprobs: entries.iter().map(|(_, lp)| lp.map(top)).collect(),
            text_offset,
        };
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
        let choices: Vec<CompletionChoice> = done
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
                    self.logprobs(&entries, 0).0
                });
                usage.add_choice(c);
                CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: finish_name(c.finish),
                    steps_per_token: Some(c.steps.clone()),
                    parallel: ParallelFigures::of(&c.counts),
                }
            })
            .collect();
        self.envelope(choices, Some(usage.body()))
    }
}

/// A choice of a chunk: its text so far, nothing else yet.
fn text_choice(index: usize, text: String) -> CompletionChoice {
    CompletionChoice { index, text, logprobs: None, finish_reason: None, steps_per_token: None, parallel: None }
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
                Some(self.chunk(text_choice(i, text.clone())))
            })
            .collect()
    }

    fn prompt_logprobs(&mut self, choice: usize, logprobs: &[TokenLogprobs]) -> Option<Value> {
        let (text, ids) = self.echoed(choice)?;
        let entries = Self::prompt_entries(ids, logprobs);
        let (body, end) = self.logprobs(&entries, 0);
        let chunk = self.chunk(CompletionChoice { logprobs: Some(body), ..text_choice(choice, text.clone()) });
        self.text_offsets[choice] = end;
        Some(chunk)
    }

    fn token(&mut self, choice: usize, tokens: &[Streamed]) -> Value {
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let steps: Vec<usize> = tokens.iter().map(|t| t.steps).collect();
        let listed: Vec<(u32, Option<&TokenLogprobs>)> =
            tokens.iter().filter_map(|t| t.logprobs.as_ref()).map(|lp| (lp.token, Some(lp))).collect();
        let logprobs = (!listed.is_empty()).then(|| {
            let (body, end) = self.logprobs(&listed, self.text_offsets[choice]);
            self.text_offsets[choice] = end;
            body
        });
        self.chunk(CompletionChoice { logprobs, steps_per_token: Some(steps), ..text_choice(choice, text) })
    }

    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason, counts: &StrategyCounts) -> Value {
        self.chunk(CompletionChoice {
            finish_reason: finish_name(Some(reason)),
            steps_per_token: Some(Vec::new()),
            parallel: ParallelFigures::of(counts),
            ..text_choice(choice, text.to_string())
        })
    }

    fn usage(&mut self, usage: &Usage) -> Value {
        self.envelope(Vec::new(), Some(usage.body()))
    }
}
