//! Structured outputs through the API: `response_format` (JSON object and schema),
//! `structured_outputs` and the `guided_*` fields constrain what the fixture model (random
//! weights: it never wants JSON) writes, whatever the seed and sampling; bad constraints are 400s
//! naming their field with the compiler's reason.

mod common;

use common::server::{eventually, post_json, start, stream_until_first_chunk};
use serde_json::{Value, json};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {"sum": {"type": "integer", "minimum": -5, "maximum": 999}, "word": {"type": "string", "maxLength": 5}},
        "required": ["sum", "word"],
        "additionalProperties": false
    })
}

fn text(body: &Value) -> &str {
    body["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_match_their_constraint_whatever_the_sampling() {
    let server = start().await;
    let base = &server.base;
    let format = json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema()}});
    let mut complete = 0;
    for (seed, temperature, top_p) in [(1, 1.0, 1.0), (2, 1.0, 0.9), (3, 0.7, 1.0), (4, 0.0, 1.0), (5, 1.5, 1.0)] {
        let body = json!({"prompt": "12+30=", "max_tokens": 40, "num_steps": 2, "seed": seed,
            "temperature": temperature, "top_p": top_p, "response_format": format});
        let (status, answer) = post_json(base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let finish = answer["choices"][0]["finish_reason"].as_str().unwrap();
        let out = text(&answer);
        if finish == "stop" {
            let value: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
            assert!(value["sum"].as_f64().is_some_and(|n| n.fract() == 0.0 && (-5.0..=999.0).contains(&n)), "{out}");
            complete += 1;
            assert!(value["word"].as_str().is_some_and(|w| w.chars().count() <= 5), "{out}");
        } else {
            // Out of tokens: what was produced is a beginning of such an object.
            assert_eq!(finish, "length");
            assert!(out.starts_with("{\"sum\": ") || "{\"sum\": ".starts_with(out), "{out}");
        }
    }
    assert!(complete > 0, "no output completed its object within 40 tokens");
    for seed in 0..4 {
        let body = json!({"prompt": "pick:", "max_tokens": 10, "seed": seed, "num_steps": 2,
            "guided_choice": ["red", "green", "blue"]});
        let (status, answer) = post_json(base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        assert!(["red", "green", "blue"].contains(&text(&answer)), "{answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        let body = json!({"prompt": "n:", "max_tokens": 10, "seed": seed, "num_steps": 2, "logprobs": 3,
            "structured_outputs": {"regex": "[0-9]{3}"}});
        let (status, answer) = post_json(base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let out = text(&answer);
        assert!(out.len() == 3 && out.bytes().all(|b| b.is_ascii_digit()), "{out:?}");
        // The reported distribution is the constrained one: every alternative is digits.
        for top in answer["choices"][0]["logprobs"]["top_logprobs"].as_array().unwrap() {
            for (token, logprob) in top.as_object().unwrap() {
                let allowed = (1..=3).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_digit());
                assert!(allowed || logprob.as_f64() == Some(f64::NEG_INFINITY) || logprob.is_null(), "{top}");
            }
        }
        // The parallel sampler keeps the same constraint.
        let parallel = json!({"prompt": "n:", "max_tokens": 10, "seed": seed, "num_steps": 4, "sampler": "parallel",
            "inner_steps": 2, "exit_threshold": 2.0, "guided_regex": "[0-9]{3}x"});
        let (status, answer) = post_json(base, "/v1/completions", &parallel).await;
        assert_eq!(status, 200, "{answer}");
        let out = text(&answer);
        assert!(out.len() == 4 && out[..3].bytes().all(|b| b.is_ascii_digit()) && out.ends_with('x'), "{out:?}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    }
    // Chat: any JSON object.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "num_steps": 2, "seed": 3,
        "response_format": {"type": "json_object"}});
    let (status, answer) = post_json(base, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    if answer["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(content).unwrap().is_object(), "{content}");
    } else {
        assert!(content.starts_with('{'), "{content}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_constraints_are_400s_naming_the_field() {
    let server = start().await;
    let base = &server.base;
    let big = "a".repeat(70_000);
    let cases = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}),
            "response_format",
        ),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}), "response_format"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}),
            "response_format",
        ),
        (json!({"response_format": {"type": "yaml"}}), "response_format"),
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_grammar": "start: missing_rule"}), "guided_grammar"),
        (json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}), "structured_outputs"),
        (json!({"guided_regex": "a+", "guided_choice": ["a"]}), "guided_choice"),
        (json!({"guided_regex": big}), "guided_regex"),
    ];
    for (fields, param) in cases {
        let mut body = json!({"prompt": "x", "max_tokens": 4});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let (status, answer) = post_json(base, "/v1/completions", &body).await;
        assert_eq!(status, 400, "{fields}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{fields}: {answer}");
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }
    // The server goes on serving.
    let (status, _) = post_json(base, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_constrained_stream_dropped_midway_frees_its_sequence() {
    let server = start().await;
    let body = json!({"prompt": "x", "max_tokens": 200, "num_steps": 64, "stream": true, "ignore_eos": true,
        "guided_regex": "[a-z]{150,300}"});
    let running = stream_until_first_chunk(&server.base, &body).await;
    assert_eq!(server.state.engine.in_flight(), 1);
    drop(running);
    assert!(eventually(10, || server.state.engine.in_flight() == 0).await, "the dropped request kept running");
    assert_eq!(server.state.engine.kv_bytes(), 0);
    let (status, answer) =
        post_json(&server.base, "/v1/completions", &json!({"prompt": "x", "max_tokens": 3, "guided_regex": "[0-9]+"}))
            .await;
    assert_eq!(status, 200, "{answer}");
    assert!(text(&answer).bytes().all(|b| b.is_ascii_digit()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_gets_json_of_its_schema() {
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs, ResponseFormat, ResponseFormatJsonSchema,
    };
    let server = start().await;
    let client = common::server::openai(&server);
    let format = ResponseFormat::JsonSchema {
        json_schema: ResponseFormatJsonSchema {
            description: Some("the answer".into()),
            name: "answer".into(),
            schema: schema(),
            strict: Some(true),
        },
    };
    let mut complete = 0;
    for seed in 0..4 {
        let message = ChatCompletionRequestUserMessageArgs::default().content("12+30=").build().unwrap();
        let request = CreateChatCompletionRequestArgs::default()
            .model("huginn-tiny-ref")
            .messages([message.into()])
            .max_completion_tokens(40u32)
            .seed(seed)
            .response_format(format.clone())
            .build()
            .unwrap();
        let response = client.chat().create(request).await.unwrap();
        let choice = &response.choices[0];
        let content = choice.message.content.clone().unwrap_or_default();
        if format!("{:?}", choice.finish_reason).contains("Stop") {
            let value: Value = serde_json::from_str(&content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
            assert!(value["word"].is_string() && value["sum"].is_number(), "{content}");
            complete += 1;
        } else {
            assert!(content.starts_with("{\"sum\": ") || "{\"sum\": ".starts_with(content.as_str()), "{content}");
        }
    }
    assert!(complete > 0, "no answer completed its object within 40 tokens");
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"], "additionalProperties": false}}})
}

/// The arguments of a call of `get_weather` or `get_time`, checked against its schema.
fn check_arguments(name: &str, arguments: &str) {
    let value: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments:?}: {e}"));
    match name {
        "get_weather" => {
            assert_eq!(value.as_object().map(|o| o.len()), Some(1), "{arguments}");
            assert!(value["city"].as_str().is_some_and(|c| c.chars().count() <= 8), "{arguments}");
        }
        "get_time" => assert_eq!(value, json!({}), "{arguments}"),
        other => panic!("a call of `{other}`"),
    }
}

/// A choice's call as the stream told it: id, name and the arguments' fragments joined.
#[derive(Debug, Default, PartialEq)]
struct StreamedCall {
    id: String,
    name: String,
    arguments: String,
    finish: String,
}

async fn stream_call(base: &str, body: &Value) -> StreamedCall {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let response = reqwest::Client::new().post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let mut call = StreamedCall::default();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).unwrap();
        let choice = &chunk["choices"][0];
        assert!(choice["delta"]["content"].is_null(), "a call streams no content: {chunk}");
        if let Some(reason) = choice["finish_reason"].as_str() {
            call.finish = reason.to_string();
        }
        for part in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(part["index"], 0);
            if let Some(id) = part["id"].as_str() {
                assert!(call.id.is_empty(), "the id comes once: {chunk}");
                call.id = id.to_string();
                assert_eq!(part["type"], "function");
                call.name = part["function"]["name"].as_str().unwrap().to_string();
            }
            call.arguments += part["function"]["arguments"].as_str().unwrap();
        }
    }
    call
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_choice_constrains_the_output_to_a_call() {
    let server = start().await;
    let base = &server.base;
    let time_tool = json!({"type": "function", "function": {"name": "get_time"}});
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let mut calls = 0;
    for (tool_choice, seed) in [("required", 1), ("required", 2), ("required", 3), ("named", 1), ("named", 4)] {
        let choice = if tool_choice == "named" { named.clone() } else { json!("required") };
        let body = json!({"messages": [{"role": "user", "content": "weather in Oslo?"}], "max_tokens": 40,
            "num_steps": 2, "seed": seed, "tools": [weather_tool(), time_tool], "tool_choice": choice});
        let (status, answer) = post_json(base, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let choice = &answer["choices"][0];
        let message = &choice["message"];
        let streamed = stream_call(base, &body).await;
        match choice["finish_reason"].as_str().unwrap() {
            "tool_calls" => {
                assert!(message["content"].is_null(), "{answer}");
                let call = &message["tool_calls"][0];
                assert_eq!(message["tool_calls"].as_array().unwrap().len(), 1);
                assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
                assert_eq!(call["type"], "function");
                let (name, arguments) =
                    (call["function"]["name"].as_str().unwrap(), call["function"]["arguments"].as_str().unwrap());
                if tool_choice == "named" {
                    assert_eq!(name, "get_weather");
                }
                check_arguments(name, arguments);
                // Streamed, the same call arrives in pieces.
                assert_eq!((streamed.name.as_str(), streamed.arguments.as_str()), (name, arguments));
                assert!(streamed.id.starts_with("call_"));
                calls += 1;
            }
            "length" => assert_eq!(streamed.finish, "length"),
            other => panic!("finish_reason {other}: {answer}"),
        }
        assert_eq!(streamed.finish, choice["finish_reason"].as_str().unwrap());
    }
    assert!(calls > 0, "no call completed within 40 tokens");
    // `none`: text, no call.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "num_steps": 2,
        "tools": [weather_tool()], "tool_choice": "none"});
    let (status, answer) = post_json(base, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["choices"][0]["message"]["content"].is_string());
    assert!(answer["choices"][0]["message"]["tool_calls"].is_null());
    // Refusals name their field, and the server goes on serving.
    let cases = [
        (json!({"tools": [weather_tool()]}), "tool_choice"),
        (json!({"tools": [weather_tool()], "tool_choice": "auto"}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": [weather_tool()], "tool_choice": "required", "guided_regex": "a"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
            "tool_choice": "required"}),
            "tools",
        ),
        (
            json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
            "tool_choice",
        ),
    ];
    for (fields, param) in cases {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let (status, answer) = post_json(base, "/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{fields}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{fields}: {answer}");
    }
    let (status, answer) = post_json(base, "/v1/completions", &json!({"prompt": "x", "tools": []})).await;
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("tools")), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_gets_tool_calls() {
    use async_openai::types::chat::{
        ChatCompletionMessageToolCalls, ChatCompletionNamedToolChoice, ChatCompletionRequestUserMessageArgs,
        ChatCompletionTool, ChatCompletionToolChoiceOption, ChatCompletionTools, CreateChatCompletionRequest,
        CreateChatCompletionRequestArgs, FinishReason, FunctionName, FunctionObject, ToolChoiceOptions,
    };
    use futures::StreamExt;
    let server = start().await;
    let client = common::server::openai(&server);
    let weather = weather_tool();
    let tools = vec![
        ChatCompletionTools::Function(ChatCompletionTool {
            function: FunctionObject {
                name: "get_weather".into(),
                description: Some("The weather in a city".into()),
                parameters: Some(weather["function"]["parameters"].clone()),
                strict: Some(true),
            },
        }),
        ChatCompletionTools::Function(ChatCompletionTool {
            function: FunctionObject { name: "get_time".into(), description: None, parameters: None, strict: None },
        }),
    ];
    let choices = [
        ChatCompletionToolChoiceOption::Mode(ToolChoiceOptions::Required),
        ChatCompletionToolChoiceOption::Function(ChatCompletionNamedToolChoice {
            function: FunctionName { name: "get_time".into() },
        }),
    ];
    let mut calls = 0;
    for (i, tool_choice) in choices.into_iter().enumerate() {
        for seed in 0..3 {
            let message = ChatCompletionRequestUserMessageArgs::default().content("what now?").build().unwrap();
            let request = CreateChatCompletionRequestArgs::default()
                .model("huginn-tiny-ref")
                .messages([message.into()])
                .max_completion_tokens(40u32)
                .seed(seed)
                .tools(tools.clone())
                .tool_choice(tool_choice.clone())
                .build()
                .unwrap();
            let response = client.chat().create(request.clone()).await.unwrap();
            let choice = &response.choices[0];
            let mut streamed = (String::new(), String::new());
            let mut stream = client
                .chat()
                .create_stream(CreateChatCompletionRequest { stream: Some(true), ..request })
                .await
                .unwrap();
            let mut finish = None;
            while let Some(chunk) = stream.next().await {
                for c in chunk.unwrap().choices {
                    finish = finish.or(c.finish_reason);
                    for part in c.delta.tool_calls.into_iter().flatten() {
                        let function = part.function.unwrap_or_default();
                        streamed.0 += function.name.as_deref().unwrap_or_default();
                        streamed.1 += function.arguments.as_deref().unwrap_or_default();
                    }
                }
            }
            assert_eq!(finish, choice.finish_reason);
            if choice.finish_reason != Some(FinishReason::ToolCalls) {
                assert_eq!(choice.finish_reason, Some(FinishReason::Length));
                continue;
            }
            let listed = choice.message.tool_calls.clone().unwrap_or_default();
            let [ChatCompletionMessageToolCalls::Function(call)] = listed.as_slice() else {
                panic!("not one function call: {listed:?}");
            };
            if i == 1 {
                assert_eq!(call.function.name, "get_time");
            }
            check_arguments(&call.function.name, &call.function.arguments);
            assert_eq!(streamed, (call.function.name.clone(), call.function.arguments.clone()));
            calls += 1;
        }
    }
    assert!(calls > 0, "no call completed within 40 tokens");
}
