//! The chunks the upstream sends, and reading back what they carry.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: the clock the upstream and the load generator share
/// (both run on one machine).
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the upstream writes into each chunk, under `"bench"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// 0 for the first chunk (the role), then 1, 2, … for the content chunks.
    pub seq: u32,
    /// When the upstream sent the chunk.
    pub sent_us: u64,
    /// How late the upstream sent it against its own schedule (it must keep up).
    pub late_us: u64,
    /// When the upstream received the request.
    pub request_us: u64,
}

/// Token counts of a usage chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `prompt_tokens`
    pub prompt: u64,
    /// `completion_tokens`
    pub completion: u64,
    /// `total_tokens`
    pub total: u64,
}

/// Tokens of every prompt, as the upstream counts them.
pub const PROMPT_TOKENS: u64 = 12;

/// The `data:` event of chunk `stamp.seq` (one token of content, or the role for seq 0);
/// `last` marks the end of the answer.
pub fn content_event(stamp: &Stamp, last: bool) -> String {
    let delta = if stamp.seq == 0 {
        r#"{"role":"assistant","content":""}"#
    } else {
        r#"{"content":" token"}"#
    };
    let finish = if last { r#""stop""# } else { "null" };
    format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"bench\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}],\
         \"bench\":{{\"seq\":{},\"sent\":{},\"late\":{},\"req\":{}}}}}\n\n",
        stamp.seq, stamp.sent_us, stamp.late_us, stamp.request_us
    )
}

/// The usage event after the last content chunk (sent when the request asks for
/// `stream_options.include_usage`, as OpenAI does), then `[DONE]`.
pub fn usage_and_done(completion_tokens: u64) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"bench\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{PROMPT_TOKENS},\
         \"completion_tokens\":{completion_tokens},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        PROMPT_TOKENS + completion_tokens
    )
}

/// The unsigned integer after `"name":` in `json`, if any. The chunks are read by hand
/// rather than parsed whole so that reading 100 000 chunks a second leaves the machine's
/// CPU to the proxy under test.
pub fn number_field(json: &[u8], name: &str) -> Option<u64> {
    let key = format!("\"{name}\":");
    let at = find(json, key.as_bytes())? + key.len();
    let digits = json[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for b in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The stamp of an event's JSON, if it carries one.
pub fn stamp_of(json: &[u8]) -> Option<Stamp> {
    let at = find(json, b"\"bench\":{")?;
    let bench = &json[at..];
    Some(Stamp {
        seq: u32::try_from(number_field(bench, "seq")?).ok()?,
        sent_us: number_field(bench, "sent")?,
        late_us: number_field(bench, "late")?,
        request_us: number_field(bench, "req")?,
    })
}

/// The token counts of an event's JSON, if it is a usage chunk.
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    let at = find(json, b"\"usage\":{")?;
    let usage = &json[at..];
    Some(Usage {
        prompt: number_field(usage, "prompt_tokens")?,
        completion: number_field(usage, "completion_tokens")?,
        total: number_field(usage, "total_tokens")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(event: &str) -> &str {
        event
            .lines()
            .next()
            .unwrap()
            .strip_prefix("data: ")
            .unwrap()
    }

    #[test]
    fn a_content_chunk_is_json_that_carries_its_stamp() {
        let stamp = Stamp {
            seq: 7,
            sent_us: 1_764_000_000_123_456,
            late_us: 42,
            request_us: 1_764_000_000_000_001,
        };
        let event = content_event(&stamp, false);
        assert!(event.ends_with("\n\n"));
        let value: serde_json::Value = serde_json::from_str(json_of(&event)).unwrap();
        assert_eq!(value["choices"][0]["delta"]["content"], " token");
        assert_eq!(stamp_of(json_of(&event).as_bytes()), Some(stamp));
        assert_eq!(usage_of(json_of(&event).as_bytes()), None);
    }

    #[test]
    fn the_first_chunk_has_the_role_and_the_last_one_stops() {
        let first = content_event(
            &Stamp {
                seq: 0,
                sent_us: 1,
                late_us: 0,
                request_us: 1,
            },
            false,
        );
        let value: serde_json::Value = serde_json::from_str(json_of(&first)).unwrap();
        assert_eq!(value["choices"][0]["delta"]["role"], "assistant");
        let last = content_event(
            &Stamp {
                seq: 3,
                sent_us: 1,
                late_us: 0,
                request_us: 1,
            },
            true,
        );
        let value: serde_json::Value = serde_json::from_str(json_of(&last)).unwrap();
        assert_eq!(value["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn the_usage_chunk_counts_the_prompt_and_every_content_chunk() {
        let events = usage_and_done(300);
        let usage = usage_of(json_of(&events).as_bytes()).unwrap();
        assert_eq!(
            usage,
            Usage {
                prompt: PROMPT_TOKENS,
                completion: 300,
                total: PROMPT_TOKENS + 300
            }
        );
        let value: serde_json::Value = serde_json::from_str(json_of(&events)).unwrap();
        assert_eq!(value["usage"]["total_tokens"], PROMPT_TOKENS + 300);
        assert!(events.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn numbers_are_read_whatever_the_spacing_and_refused_when_absent_or_too_big() {
        assert_eq!(number_field(br#"{"a": 12,"b":3}"#, "a"), Some(12));
        assert_eq!(number_field(br#"{"a":12,"b":3}"#, "b"), Some(3));
        assert_eq!(number_field(br#"{"a":"x"}"#, "a"), None);
        assert_eq!(number_field(br#"{"a":1}"#, "c"), None);
        assert_eq!(number_field(br#"{"a":99999999999999999999999}"#, "a"), None);
    }

    #[test]
    fn wall_clock_is_in_microseconds() {
        let now = wall_us();
        // After 2020-01-01 and before 2100 in µs.
        assert!(
            now > 1_577_836_800_000_000 && now < 4_102_444_800_000_000,
            "{now}"
        );
    }
}
