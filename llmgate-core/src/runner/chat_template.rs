//! Rebuilding the prompt a chat format makes, to count its tokens the way the server
//! does.

use serde_json::Value;

/// The prompt text llama-cpp-python builds from `messages` with `chat_format`, or
/// `None` for a format not known here (the caller then approximates).
pub fn format_chat_prompt(chat_format: &str, messages: &[Value]) -> Option<String> {
    let turns = messages.iter().filter_map(|m| {
        let role = m["role"].as_str()?;
        Some((role, content_text(&m["content"])))
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
                if let Some(content) = content.filter(|c| !c.is_empty()) {
                    prompt.push_str(&content);
                    prompt.push_str("<end_of_turn>\n");
                }
            }
            prompt.push_str("<start_of_turn>model\n");
            Some(prompt)
        }
        // llama_chat_format.format_chatml.
        "chatml" => {
            let mut prompt = String::new();
            let mut system = String::new();
            let mut rest = Vec::new();
            for (role, content) in turns {
                match role {
                    "system" => system = content.unwrap_or_default(),
                    "user" | "assistant" => rest.push((role, content)),
                    _ => {}
                }
            }
            if !system.is_empty() {
                prompt.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
            }
            for (role, content) in rest {
                prompt.push_str(&format!("<|im_start|>{role}\n"));
                if let Some(content) = content.filter(|c| !c.is_empty()) {
                    prompt.push_str(&content);
                    prompt.push_str("<|im_end|>\n");
                }
            }
            prompt.push_str("<|im_start|>assistant\n");
            Some(prompt)
        }
        _ => None,
    }
}

/// A message's text: a string, or the text parts of a content array.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gemma_prompts_match_llama_cpp_python() {
        let messages = [
            json!({"role": "system", "content": "ignored by gemma"}),
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello!"}),
            json!({"role": "user", "content": [{"type": "text", "text": "Count to 3"}]}),
        ];
        assert_eq!(
            format_chat_prompt("gemma", &messages).unwrap(),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nCount to 3<end_of_turn>\n<start_of_turn>model\n"
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
}
