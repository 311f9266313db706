//! Structured outputs at the edge: the request's constraint fields (`response_format`,
//! `structured_outputs`, `guided_*`) read into one [`ConstraintSpec`] naming the field it came
//! from, and compiled off the async runtime (and off the model's workers) against the model's
//! vocabulary; a constraint that does not compile is a 400 naming that field with the
//! compiler's reason.

use serde_json::Value;

use super::error::ApiError;
use super::request::{ResponseFormat, StructuredFields};
use super::state::AppState;
use crate::generate::constraint::{Constraint, ConstraintSpec};

/// A constraint as requested, and the field that asked for it (named in its errors).
#[derive(Debug, Clone)]
pub struct Requested {
    pub spec: ConstraintSpec,
    pub field: &'static str,
}

/// A schema given as an object (or a boolean) or as a JSON string.
fn schema(field: &'static str, value: Value) -> Result<Value, ApiError> {
    let value = match value {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| ApiError::param(field, format!("`{field}` is not valid JSON: {e}")))?,
        other => other,
    };
    match value {
        Value::Object(_) | Value::Bool(_) => Ok(value),
        _ => Err(ApiError::param(field, format!("`{field}` must be a JSON schema (an object)"))),
    }
}

fn response_format(format: ResponseFormat) -> Result<Option<ConstraintSpec>, ApiError> {
    const FIELD: &str = "response_format";
    match format.kind.as_deref() {
        None => Err(ApiError::param(FIELD, "`response_format.type` is required")),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ConstraintSpec::JsonObject)),
        Some("json_schema") => {
            let name = format.json_schema.as_ref().and_then(|j| j.name.as_deref()).unwrap_or("schema");
            let valid_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if name.is_empty() || name.len() > 64 || !name.chars().all(valid_name) {
                let message = "`response_format.json_schema.name` must be 1 to 64 letters, digits, `_` or `-`";
                return Err(ApiError::param(FIELD, message));
            }
            let given = format.json_schema.and_then(|j| j.schema);
            let Some(value) = given else {
                return Err(ApiError::param(FIELD, "`response_format.json_schema.schema` is required"));
            };
            Ok(Some(ConstraintSpec::JsonSchema(schema(FIELD, value)?)))
        }
        Some(other) => Err(ApiError::param(
            FIELD,
            format!("`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`"),
        )),
    }
}

fn choice(field: &'static str, options: Vec<String>) -> Result<ConstraintSpec, ApiError> {
    if options.is_empty() {
        return Err(ApiError::param(field, format!("`{field}` must list at least one string")));
    }
    Ok(ConstraintSpec::Choice(options))
}

/// The one constraint `fields` ask for, if any (two or more: a 400 naming the second).
pub fn requested(fields: StructuredFields, max_bytes: usize) -> Result<Option<Requested>, ApiError> {
    let StructuredFields {
        response_format: format,
        structured_outputs,
        guided_json,
        guided_regex,
        guided_choice,
        guided_grammar,
    } = fields;
    let mut found: Vec<Requested> = Vec::new();
    let mut add = |field: &'static str, spec: Option<ConstraintSpec>| {
        if let Some(spec) = spec {
            found.push(Requested { spec, field });
        }
    };
    if let Some(format) = format {
        add("response_format", response_format(format)?);
    }
    if let Some(outputs) = structured_outputs {
        const FIELD: &str = "structured_outputs";
        let given =
            [outputs.json.is_some(), outputs.regex.is_some(), outputs.choice.is_some(), outputs.grammar.is_some()];
        if given.iter().filter(|&&g| g).count() != 1 {
            let message = "`structured_outputs` must hold exactly one of `json`, `regex`, `choice`, `grammar`";
            return Err(ApiError::param(FIELD, message));
        }
        let spec = match outputs {
            o if o.json.is_some() => ConstraintSpec::JsonSchema(schema(FIELD, o.json.unwrap_or_default())?),
            o if o.regex.is_some() => ConstraintSpec::Regex(o.regex.unwrap_or_default()),
            o if o.choice.is_some() => choice(FIELD, o.choice.unwrap_or_default())?,
            o => ConstraintSpec::Grammar(o.grammar.unwrap_or_default()),
        };
        add(FIELD, Some(spec));
    }
    if let Some(value) = guided_json {
        add("guided_json", Some(ConstraintSpec::JsonSchema(schema("guided_json", value)?)));
    }
    add("guided_regex", guided_regex.map(ConstraintSpec::Regex));
    if let Some(options) = guided_choice {
        add("guided_choice", Some(choice("guided_choice", options)?));
    }
    add("guided_grammar", guided_grammar.map(ConstraintSpec::Grammar));
    if let Some(second) = found.get(1) {
        let message = format!("`{}` and `{}` both constrain the output: give one", found[0].field, second.field);
        return Err(ApiError::param(second.field, message));
    }
    let Some(requested) = found.pop() else { return Ok(None) };
    let size = match &requested.spec {
        ConstraintSpec::JsonObject => 0,
        ConstraintSpec::JsonSchema(v) => v.to_string().len(),
        ConstraintSpec::Regex(s) | ConstraintSpec::Grammar(s) => s.len(),
        ConstraintSpec::Choice(options) => options.iter().map(String::len).sum(),
    };
    if size > max_bytes {
        let field = requested.field;
        let message =
            format!("`{field}` is {size} bytes; at most {max_bytes} are allowed (limits.max_constraint_bytes)");
        return Err(ApiError::param(field, message));
    }
    Ok(Some(requested))
}

/// Compiles the requested constraint on a blocking thread.
pub async fn compile(state: &AppState, requested: Option<Requested>) -> Result<Option<Constraint>, ApiError> {
    let Some(Requested { spec, field }) = requested else { return Ok(None) };
    let vocab = match &state.constraints {
        Ok(vocab) => vocab.clone(),
        Err(reason) => {
            let message = format!("structured outputs are unavailable for this model's tokenizer: {reason}");
            return Err(ApiError::Unsupported { param: field.into(), message });
        }
    };
    let compiled = tokio::task::spawn_blocking(move || vocab.compile(&spec))
        .await
        .map_err(|e| ApiError::Internal(format!("constraint compiler task failed: {e}")))?;
    compiled.map(Some).map_err(|e| ApiError::param(field, format!("`{field}` does not compile: {e}")))
}
