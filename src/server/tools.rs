//! Tool calls (chat): `tools` with `tool_choice: "required"` or a named function constrain the
//! output to a call of one of the functions, returned as OpenAI `tool_calls` with
//! `finish_reason: "tool_calls"`.
//!
//! The constraint is a JSON schema: for a named function its `parameters` (the output is the
//! call's arguments), for `"required"` one object `{"name": <a tool's name>, "parameters": <its
//! arguments>}` (vLLM's layout), which the constraint writes as `json.dumps` does, so the name is
//! known once its closing quote is out and the arguments stream from there. `"auto"` (OpenAI's
//! default when tools are given) is refused: no checkpoint of this architecture has a tool-call
//! format that would tell a call from text. `"none"` writes text. The tools reach the model only
//! through a chat template that uses them (`tools`, as Hugging Face's templates take them).

use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::request::ToolFields;
use super::structured::Requested;
use crate::generate::constraint::ConstraintSpec;

/// How the output becomes a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCalls {
    /// `tool_choice` named this function: the output is its arguments.
    Named(String),
    /// `tool_choice: "required"`: the output is `{"name": ..., "parameters": ...}`.
    AnyOf,
}

/// A chat request's tools, checked.
#[derive(Debug)]
pub struct ToolRequest {
    /// As sent, for the chat template.
    pub tools: Vec<Value>,
    /// The constraint and how its output is read, unless `tool_choice` is `"none"`.
    pub calls: Option<(Requested, ToolCalls)>,
}

const FIELD: &str = "tools";

fn is_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// One tool's name and parameter schema.
fn function(i: usize, tool: &Value) -> Result<(String, Value), ApiError> {
    let at = |key: &str| format!("tools[{i}].{key}");
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::param(&at("type"), format!("`{}` must be `function`", at("type"))));
    }
    let Some(function) = tool.get("function").and_then(Value::as_object) else {
        return Err(ApiError::param(&at("function"), format!("`{}` must be an object", at("function"))));
    };
    let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
    if !is_name(name) {
        let message = format!("`{}` must be 1 to 64 letters, digits, `_` or `-`", at("function.name"));
        return Err(ApiError::param(&at("function.name"), message));
    }
    if function.get("description").is_some_and(|d| !d.is_string()) {
        let field = at("function.description");
        return Err(ApiError::param(&field, format!("`{field}` must be a string")));
    }
    let parameters = match function.get("parameters") {
        // No parameters: a function of none.
        None => json!({"type": "object", "properties": {}, "additionalProperties": false}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            let field = at("function.parameters");
            return Err(ApiError::param(&field, format!("`{field}` must be a JSON schema (an object)")));
        }
    };
    Ok((name.to_string(), parameters))
}

/// The named function of an object `tool_choice`.
fn chosen(choice: &Map<String, Value>) -> Option<&str> {
    (choice.get("type")?.as_str()? == "function").then_some(())?;
    choice.get("function")?.get("name")?.as_str()
}

/// Checks the tool fields of a chat request (`max_bytes`: the constraint's size limit).
pub fn requested(fields: ToolFields, max_bytes: usize) -> Result<Option<ToolRequest>, ApiError> {
    let ToolFields { tools, tool_choice, parallel_tool_calls, functions, function_call } = fields;
    if let Some(name) = [("functions", functions.is_some()), ("function_call", function_call.is_some())]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    {
        let message = format!("`{name}` is not supported (it is deprecated): use `tools` and `tool_choice`");
        return Err(ApiError::Unsupported { param: name.into(), message });
    }
    let Some(tools) = tools else {
        for (name, given) in
            [("tool_choice", tool_choice.is_some()), ("parallel_tool_calls", parallel_tool_calls.is_some())]
        {
            if given {
                return Err(ApiError::param(name, format!("`{name}` is only allowed when `tools` are given")));
            }
        }
        return Ok(None);
    };
    if tools.is_empty() {
        return Err(ApiError::param(FIELD, "`tools` must list at least one function"));
    }
    let mut functions: Vec<(String, Value)> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let (name, parameters) = function(i, tool)?;
        if functions.iter().any(|(known, _)| *known == name) {
            let field = format!("tools[{i}].function.name");
            return Err(ApiError::param(&field, format!("`{field}`: `{name}` names two tools")));
        }
        functions.push((name, parameters));
    }
    let refuse_auto = || {
        let message = "`tool_choice` `auto` (the default when `tools` are given) is not supported: no checkpoint \
                       of this architecture has a tool-call format; send `required`, a named function or `none`";
        ApiError::Unsupported { param: "tool_choice".into(), message: message.into() }
    };
    let (calls, schema) = match &tool_choice {
        None => return Err(refuse_auto()),
        Some(Value::String(s)) if s == "auto" => return Err(refuse_auto()),
        Some(Value::String(s)) if s == "none" => return Ok(Some(ToolRequest { tools, calls: None })),
        Some(Value::String(s)) if s == "required" => {
            let shapes: Vec<Value> = functions
                .iter()
                .map(|(name, parameters)| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"const": name}, "parameters": parameters},
                        "required": ["name", "parameters"],
                        "additionalProperties": false
                    })
                })
                .collect();
            let schema = match <[Value; 1]>::try_from(shapes) {
                Ok([one]) => one,
                Err(shapes) => json!({"anyOf": shapes}),
            };
            (ToolCalls::AnyOf, schema)
        }
        Some(Value::Object(choice)) => {
            let Some(name) = chosen(choice) else {
                let message = "`tool_choice` must be `none`, `required` or {\"type\": \"function\", \"function\": {\"name\": ...}}";
                return Err(ApiError::param("tool_choice", message));
            };
            let Some((_, parameters)) = functions.iter().find(|(known, _)| known == name) else {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("`tool_choice` names `{name}`, which is not in `tools`"),
                ));
            };
            (ToolCalls::Named(name.to_string()), parameters.clone())
        }
        Some(_) => {
            let message = "`tool_choice` must be `none`, `auto`, `required` or a named function";
            return Err(ApiError::param("tool_choice", message));
        }
    };
    let size = schema.to_string().len();
    if size > max_bytes {
        let message =
            format!("the tools' schema is {size} bytes; at most {max_bytes} are allowed (limits.max_constraint_bytes)");
        return Err(ApiError::param(FIELD, message));
    }
    let requested = Requested { spec: ConstraintSpec::JsonSchema(schema), field: FIELD };
    Ok(Some(ToolRequest { tools, calls: Some((requested, calls)) }))
}

impl ToolCalls {
    /// Of a choice's text so far: the function's name and the text of its arguments so far, once
    /// the name is out.
    pub fn split<'a>(&'a self, text: &'a str) -> Option<(&'a str, &'a str)> {
        match self {
            ToolCalls::Named(name) => Some((name, text)),
            ToolCalls::AnyOf => {
                let rest = text.strip_prefix("{\"name\": \"")?;
                let (name, rest) = rest.split_at(rest.find('"')?);
                Some((name, rest.strip_prefix("\", \"parameters\": ")?))
            }
        }
    }

    /// A finished choice's call: its name and arguments, when the text is a complete call.
    pub fn complete<'a>(&'a self, text: &'a str) -> Option<(&'a str, &'a str)> {
        serde_json::from_str::<Value>(text).ok()?;
        let (name, arguments) = self.split(text)?;
        match self {
            ToolCalls::Named(_) => Some((name, arguments)),
            ToolCalls::AnyOf => Some((name, arguments.strip_suffix('}')?)),
        }
    }

    /// How much of `arguments` (a call under way) may be streamed: all of a named function's;
    /// with `"required"` all but the last character, which may be the wrapper's closing brace.
    pub fn streamable(&self, arguments: &str) -> usize {
        match self {
            ToolCalls::Named(_) => arguments.len(),
            ToolCalls::AnyOf => arguments.char_indices().last().map_or(0, |(i, _)| i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: Value) -> ToolFields {
        serde_json::from_value(body).unwrap()
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters":
            {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn refused(body: Value) -> (String, String) {
        let error = requested(fields(body), 65_536).unwrap_err();
        let body = error.body();
        (body["error"]["param"].as_str().unwrap_or_default().to_string(), body["error"]["message"].to_string())
    }

    #[test]
    fn bad_tool_fields_name_themselves() {
        let cases = [
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"parallel_tool_calls": false}), "parallel_tool_calls"),
            (json!({"tools": []}), "tools"),
            (json!({"tools": [weather()]}), "tool_choice"),
            (json!({"tools": [weather()], "tool_choice": "auto"}), "tool_choice"),
            (json!({"tools": [weather()], "tool_choice": "sometimes"}), "tool_choice"),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "other"}}}),
                "tool_choice",
            ),
            (json!({"tools": [{"type": "retrieval"}], "tool_choice": "required"}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"}),
                "tools[0].function.name",
            ),
            (json!({"tools": [weather(), weather()], "tool_choice": "required"}), "tools[1].function.name"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}], "tool_choice": "required"}),
                "tools[0].function.parameters",
            ),
            (json!({"functions": [], "tools": [weather()]}), "functions"),
        ];
        for (body, param) in cases {
            let (got, message) = refused(body.clone());
            assert_eq!(got, param, "{body}: {message}");
        }
        let big = json!({"type": "function", "function": {"name": "f", "parameters":
            {"type": "object", "description": "x".repeat(70_000)}}});
        assert_eq!(refused(json!({"tools": [big], "tool_choice": "required"})).0, "tools");
    }

    #[test]
    fn the_choice_decides_the_constraint() {
        let none = requested(fields(json!({"tools": [weather()], "tool_choice": "none"})), 65_536).unwrap().unwrap();
        assert!(none.calls.is_none());
        assert_eq!(none.tools.len(), 1);
        let named =
            json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
        let (req, calls) = requested(fields(named), 65_536).unwrap().unwrap().calls.unwrap();
        assert_eq!(calls, ToolCalls::Named("get_weather".into()));
        assert!(matches!(&req.spec, ConstraintSpec::JsonSchema(s) if s["required"] == json!(["city"])));
        let required =
            json!({"tools": [weather(), {"type": "function", "function": {"name": "now"}}], "tool_choice": "required"});
        let (req, calls) = requested(fields(required), 65_536).unwrap().unwrap().calls.unwrap();
        assert_eq!(calls, ToolCalls::AnyOf);
        let ConstraintSpec::JsonSchema(schema) = req.spec else { panic!("not a schema") };
        assert_eq!(schema["anyOf"][1]["properties"]["name"]["const"], "now");
        assert_eq!(requested(fields(json!({})), 65_536).unwrap().map(|r| r.tools.len()), None);
    }

    #[test]
    fn calls_are_read_back_from_the_text() {
        let any = ToolCalls::AnyOf;
        assert_eq!(any.split("{\"name\": \"get_w"), None);
        assert_eq!(any.split("{\"name\": \"get_weather\", \"parameters\": {\"ci"), Some(("get_weather", "{\"ci")));
        let done = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        assert_eq!(any.complete(done), Some(("get_weather", "{\"city\": \"Oslo\"}")));
        assert_eq!(any.complete(&done[..done.len() - 1]), None);
        assert_eq!(any.streamable("{\"city\": \"Oslo\"}}"), "{\"city\": \"Oslo\"}".len());
        let named = ToolCalls::Named("get_weather".into());
        assert_eq!(named.complete("{\"city\": \"Oslo\"}"), Some(("get_weather", "{\"city\": \"Oslo\"}")));
        assert_eq!(named.complete("{\"city\": "), None);
        assert_eq!(named.streamable("{\"ci"), 4);
    }
}
