//! Chat templates: the checkpoint's Jinja `chat_template` (rendered with minijinja), or the
//! built-in Huginn format when the checkpoint has none.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Huginn-0125's chat format: the assistant is rendered as `Huginn`.
pub const HUGINN_CHAT_TEMPLATE: &str = "<|begin_text|>{% for message in messages %}<|begin_header|>\
{{ 'Huginn' if message.role == 'assistant' else message.role }}<|end_header|>\n\n{{ message.content }}<|end_turn|>\
{% endfor %}{% if add_generation_prompt %}<|begin_header|>Huginn<|end_header|>\n\n{% endif %}";

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    builtin: bool,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn builtin() -> Self {
        Self {
            source: HUGINN_CHAT_TEMPLATE.into(),
            builtin: true,
            bos_token: "<|begin_text|>".into(),
            eos_token: "<|end_text|>".into(),
        }
    }

    /// The `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is used), else the built-in format.
    pub fn from_tokenizer_config(config: Option<&Value>) -> Result<Self> {
        let Some(config) = config else { return Ok(Self::builtin()) };
        let token = |key: &str, fallback: &str| -> String {
            match config.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.get("content").and_then(Value::as_str).unwrap_or(fallback).to_string(),
                None => fallback.to_string(),
            }
        };
        let source = match config.get("chat_template") {
            None | Some(Value::Null) => return Ok(Self::builtin()),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| items.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ModelError::ChatTemplate("tokenizer_config.json: `chat_template` list has no template".into())
                })?
                .to_string(),
            Some(_) => {
                return Err(ModelError::ChatTemplate("tokenizer_config.json: `chat_template` must be a string".into()));
            }
        };
        let template =
            Self { source, builtin: false, bos_token: token("bos_token", ""), eos_token: token("eos_token", "") };
        // Fail at load time, not on the first request.
        template.environment()?;
        Ok(template)
    }

    pub fn is_builtin(&self) -> bool {
        self.builtin
    }

    fn environment(&self) -> Result<Environment<'static>> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", self.source.clone()).map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        Ok(env)
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders with the request's `tools` (OpenAI's list of `{"type": "function", "function":
    /// {...}}`) passed to the template as `tools`, as Hugging Face's `apply_chat_template` does;
    /// a template that does not use them ignores them.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = self.environment()?;
        let template = env.get_template("chat").map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        template
            .render(context! {
                messages => messages.iter().map(|m| context! { role => &m.role, content => &m.content }).collect::<Vec<_>>(),
                add_generation_prompt => add_generation_prompt,
                tools => tools.map(|t| minijinja::Value::from(minijinja::value::Serde(t))),
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_format_matches_huginn() {
        let text = ChatTemplate::builtin()
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "1+1="),
                    ChatMessage::new("assistant", "2"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>\
             <|begin_header|>user<|end_header|>\n\n1+1=<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n2<|end_turn|>\
             <|begin_header|>Huginn<|end_header|>\n\n"
        );
    }

    #[test]
    fn checkpoint_template_is_rendered_with_pycompat_methods() {
        let config = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role|upper }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[A] {% endif %}"
        });
        let t = ChatTemplate::from_tokenizer_config(Some(&config)).unwrap();
        assert!(!t.is_builtin());
        assert_eq!(t.render(&[ChatMessage::new("user", "  hi ")], true).unwrap(), "<s>[USER] hi\n[A] ");
    }

    #[test]
    fn a_template_that_uses_tools_sees_them() {
        let config = serde_json::json!({
            "chat_template": "{% if tools %}{% for t in tools %}<tool>{{ t.function.name }} {{ t.function.parameters | tojson }}</tool>{% endfor %}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
        });
        let t = ChatTemplate::from_tokenizer_config(Some(&config)).unwrap();
        let tools = [
            serde_json::json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}),
        ];
        let messages = [ChatMessage::new("user", "now?")];
        assert_eq!(
            t.render_with_tools(&messages, Some(&tools), true).unwrap(),
            "<tool>get_time {\"type\": \"object\"}</tool>now?"
        );
        assert_eq!(t.render(&messages, true).unwrap(), "now?");
    }

    #[test]
    fn broken_template_fails_at_load_with_a_message() {
        let config = serde_json::json!({"chat_template": "{% for m in messages %}"});
        let err = ChatTemplate::from_tokenizer_config(Some(&config)).unwrap_err().to_string();
        assert!(err.starts_with("chat template:"), "{err}");
    }

    #[test]
    fn raise_exception_surfaces_as_error() {
        let config = serde_json::json!({"chat_template": "{{ raise_exception('roles must alternate') }}"});
        let t = ChatTemplate::from_tokenizer_config(Some(&config)).unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}
