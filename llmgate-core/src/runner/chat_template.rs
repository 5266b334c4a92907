//! Rebuilding the prompt a chat format makes, to count its tokens the way the server
//! does.

use serde_json::Value;

/// The prompt text llama-cpp-python (0.3.36) builds from `messages` with `chat_format`,
/// or `None` for a format not known here (the caller then approximates).
pub fn format_chat_prompt(chat_format: &str, messages: &[Value]) -> Option<String> {
    // llama_chat_format._map_roles: a content that is not a string (null, or an array of
    // parts) counts as none, and an empty one too: the role's header alone goes in.
    let turns = messages.iter().filter_map(|m| {
        let role = m["role"].as_str()?;
        Some((role, m["content"].as_str().filter(|c| !c.is_empty())))
    });
    match chat_format {
        // llama_chat_format.format_gemma: system messages are dropped.
        "gemma" => {
            let mut prompt = String::new();
            for (role, content) in turns {
                let header = match role {
                    "user" => "<start_of_turn>user\n",
                    "assistant" => "<start_of_turn>model\n",
                    _ => continue,
                };
                prompt.push_str(header);
                if let Some(content) = content {
                    prompt.push_str(content);
                    prompt.push_str("<end_of_turn>\n");
                }
            }
            prompt.push_str("<start_of_turn>model\n");
            Some(prompt)
        }
        // llama_chat_format.format_chatml: the first system message opens the prompt, and
        // an empty system block stands there when there is none.
        "chatml" => {
            let system = messages
                .iter()
                .find(|m| m["role"] == "system")
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default();
            let mut prompt = format!("<|im_start|>system\n{system}<|im_end|>\n");
            for (role, content) in turns {
                if role != "user" && role != "assistant" {
                    continue;
                }
                prompt.push_str(&format!("<|im_start|>{role}\n"));
                if let Some(content) = content {
                    prompt.push_str(content);
                    prompt.push_str("<|im_end|>\n");
                }
            }
            prompt.push_str("<|im_start|>assistant\n");
            Some(prompt)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gemma_prompts_match_llama_cpp_python() {
        // As llama_chat_format.format_gemma prints them (llama-cpp-python 0.3.36): a
        // content array is not a string, so only its header goes in.
        let messages = [
            json!({"role": "system", "content": "ignored by gemma"}),
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello!"}),
            json!({"role": "user", "content": [{"type": "text", "text": "Count to 3"}]}),
        ];
        assert_eq!(
            format_chat_prompt("gemma", &messages).unwrap(),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn chatml_prompts_keep_the_system_message() {
        let messages = [
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "Hi"}),
        ];
        assert_eq!(
            format_chat_prompt("chatml", &messages).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(format_chat_prompt("unknown-format", &messages), None);
    }

    #[test]
    fn chatml_prompts_match_llama_cpp_python() {
        // Each expected prompt is what llama_chat_format.format_chatml returns for the
        // same messages (llama-cpp-python 0.3.36).
        let cases = [
            (
                vec![json!({"role": "user", "content": "Hi"})],
                "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                vec![
                    json!({"role": "system", "content": "A"}),
                    json!({"role": "system", "content": "B"}),
                    json!({"role": "user", "content": "Hi"}),
                    json!({"role": "assistant", "content": ""}),
                    json!({"role": "user", "content": [{"type": "text", "text": "x"}]}),
                ],
                "<|im_start|>system\nA<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\n<|im_start|>assistant\n",
            ),
            (
                vec![
                    json!({"role": "system", "content": null}),
                    json!({"role": "user", "content": "Hi"}),
                ],
                "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            ),
        ];
        for (messages, prompt) in cases {
            assert_eq!(
                format_chat_prompt("chatml", &messages).unwrap(),
                prompt,
                "{messages:?}"
            );
        }
    }
}
