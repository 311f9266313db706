//! Every request body the server accepts, as types, and what they become: this file states what
//! is accepted. Unknown fields are ignored (as OpenAI-compatible servers do); `null` counts as
//! absent; a value of the wrong type or out of range is a 400 naming its field (`param`).
//!
//! The generation fields every endpoint shares are [`GenerationRequest`], resolved (request, else
//! settings, else model defaults, one set of ranges) by the code `huginn generate` uses too
//! (`generate::request`). What the values must be is checked in one place, `validate.rs`.

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

use super::error::ApiError;
use crate::generate::GenerationRequest;

/// What the completion and chat endpoints share besides the generation fields.
#[derive(Debug, Deserialize)]
pub struct CommonRequest {
    pub model: Option<String>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "`stop` must be a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions`'s own fields.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Prompt>,
    pub echo: Option<bool>,
    pub logprobs: Option<i64>,
    pub best_of: Option<i64>,
    /// OpenAI fields this server refuses (given at all: a 400 naming them).
    pub suffix: Option<IgnoredAny>,
}

/// The prompt forms OpenAI accepts.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// Tool calling (chat: `server::tools`; refused on completions). The tools are kept as sent: the
/// chat template receives them as they are.
#[derive(Debug, Deserialize)]
pub struct ToolFields {
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<IgnoredAny>,
    pub function_call: Option<IgnoredAny>,
}

impl ToolFields {
    /// The first field given, if any.
    pub fn given(&self) -> Option<&'static str> {
        [
            ("tools", self.tools.is_some()),
            ("tool_choice", self.tool_choice.is_some()),
            ("parallel_tool_calls", self.parallel_tool_calls.is_some()),
            ("functions", self.functions.is_some()),
            ("function_call", self.function_call.is_some()),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }
}

/// `POST /v1/chat/completions`'s own fields.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Vec<Message>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub audio: Option<IgnoredAny>,
    pub prediction: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: Option<String>,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "`content` must be a string or a list of text parts")]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub text: Option<String>,
}

/// The structured-output fields (both endpoints): OpenAI's `response_format`, vLLM's
/// `structured_outputs` and its older `guided_*` spellings.
#[derive(Debug, Deserialize)]
pub struct StructuredFields {
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputs>,
    /// A schema, as an object or a JSON string.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub json_schema: Option<JsonSchemaFormat>,
}

/// `response_format.json_schema`.
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    /// (`description` and `strict` are accepted and ignored: the constraint is always enforced.)
    pub schema: Option<Value>,
}

/// vLLM's `structured_outputs`: one of these.
#[derive(Debug, Deserialize)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
}

/// `POST /tokenize`: a prompt, or chat messages rendered with the template.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Option<Vec<u32>>,
}

/// A completion or chat body: the shared part, the generation fields, the tool fields (refused)
/// and the endpoint's own.
pub struct Request<E> {
    pub common: CommonRequest,
    pub generation: GenerationRequest,
    pub tools: ToolFields,
    pub structured: StructuredFields,
    pub endpoint: E,
}

impl<E: DeserializeOwned> Request<E> {
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        Ok(Self {
            common: parse(body)?,
            generation: parse(body)?,
            tools: parse(body)?,
            structured: parse(body)?,
            endpoint: parse(body)?,
        })
    }
}

/// The body as `T`; a wrong type is a 400 naming the field it is in.
pub fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    serde_path_to_error::deserialize(body).map_err(|e| {
        let message = e.inner().to_string();
        match param(e.path()) {
            Some(param) if message.starts_with('`') => ApiError::param(&param, message),
            Some(param) => ApiError::param(&param, format!("`{param}`: {message}")),
            None => ApiError::invalid(message),
        }
    })
}

/// The field an error is reported against: the top-level field, and within `messages` the
/// message and its field (`messages[2].role`).
fn param(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut segments = path.iter();
    let Some(Segment::Map { key }) = segments.next() else { return None };
    let mut param = key.clone();
    if param == "messages"
        && let Some(Segment::Seq { index }) = segments.next()
    {
        param.push_str(&format!("[{index}]"));
        if let Some(Segment::Map { key }) = segments.next() {
            param.push_str(&format!(".{key}"));
        }
    }
    Some(param)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn param_of<T: DeserializeOwned>(body: Value) -> Option<String> {
        match parse::<T>(&body) {
            Err(ApiError::InvalidParam { param, .. }) => param,
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("{body} parsed"),
        }
    }

    #[test]
    fn a_wrong_type_names_its_field_and_unknown_fields_are_ignored() {
        assert_eq!(param_of::<GenerationRequest>(json!({"temperature": "hot"})).as_deref(), Some("temperature"));
        assert_eq!(
            param_of::<GenerationRequest>(json!({"stop_token_ids": [1, "a"]})).as_deref(),
            Some("stop_token_ids")
        );
        assert_eq!(param_of::<GenerationRequest>(json!({"logit_bias": {"5": "x"}})).as_deref(), Some("logit_bias"));
        assert_eq!(
            param_of::<CommonRequest>(json!({"stream_options": {"include_usage": 1}})).as_deref(),
            Some("stream_options")
        );
        assert_eq!(
            param_of::<ChatRequest>(json!({"messages": [{"role": "user"}, {"role": 5}]})).as_deref(),
            Some("messages[1].role")
        );
        assert_eq!(param_of::<ChatRequest>(json!({"messages": ["hi"]})).as_deref(), Some("messages[0]"));
        let parsed: GenerationRequest =
            parse(&json!({"temperature": null, "future_field": {"a": 1}, "top_k": 3})).unwrap();
        assert_eq!((parsed.temperature, parsed.top_k), (None, Some(3)));
    }

    #[test]
    fn untagged_forms_and_their_messages() {
        let prompt = |v: Value| parse::<CompletionRequest>(&json!({"prompt": v})).map(|r| r.prompt);
        assert!(matches!(prompt(json!("a")), Ok(Some(Prompt::Text(_)))));
        assert!(matches!(prompt(json!(["a", "b"])), Ok(Some(Prompt::Texts(_)))));
        assert!(matches!(prompt(json!([1, 2])), Ok(Some(Prompt::Ids(_)))));
        assert!(matches!(prompt(json!([[1], [2, 3]])), Ok(Some(Prompt::IdLists(_)))));
        match prompt(json!([1, -3])) {
            Err(ApiError::InvalidParam { param, message }) => {
                assert_eq!(param.as_deref(), Some("prompt"));
                assert!(message.starts_with("`prompt` must be a string"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse::<CommonRequest>(&json!([1, 2])), Err(ApiError::InvalidParam { param: None, .. })));
    }
}
