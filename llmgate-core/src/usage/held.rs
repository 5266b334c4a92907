//! How much of a response the usage readers hold, and what they keep past that.

/// The most the usage readers hold of one server-sent event, or of one JSON answer, to
/// read its usage. The largest real events are well under it: a chat chunk is under
/// 1 KiB (a few KiB with 20 `top_logprobs`), and a Responses API `response.completed`
/// event, which repeats the whole response (its text — 128k output tokens are about
/// 0.5 MB — instructions and tools), rarely passes a few hundred KiB. Past it the bytes
/// go to the client as they came, and only the event's (or answer's) first
/// 4 KiB and last 64 KiB are kept: the usage of every OpenAI shape
/// sits at the end, so it is still counted from there; when it is not found there the
/// tokens are recorded as unknown. Without a bound, an upstream that sends one endless
/// line would have the gateway hold all of it (twice, while it grows).
pub const MAX_HELD_BYTES: usize = 1024 * 1024;

/// The most streamed text gathered for a token counter (upstreams that send no usage in
/// streams): 4 MiB, about a million tokens, more than any context window a local model
/// has. Past it the text is dropped and the stream's tokens are recorded as unknown: an
/// upstream that streams without end must not make the gateway keep all it said.
pub const MAX_GATHERED_TEXT_BYTES: usize = 4 * 1024 * 1024;

/// The start kept of something over [`MAX_HELD_BYTES`]: enough for the `type` (and
/// usually the `model`) that come first.
pub(crate) const HEAD_BYTES: usize = 4 * 1024;

/// The end kept of something over [`MAX_HELD_BYTES`]: the `usage` object and the few
/// members after it (a response's `user` and `metadata`, llama.cpp's `timings`).
pub(crate) const TAIL_BYTES: usize = 64 * 1024;

/// The first and last bytes of something too long to hold whole.
#[derive(Debug, Default)]
pub(crate) struct HeadAndTail {
    head: Vec<u8>,
    /// The last bytes seen: between [`TAIL_BYTES`] and twice that once that many came
    /// (trimmed in steps, so each byte is copied a bounded number of times).
    tail: Vec<u8>,
}

impl HeadAndTail {
    pub(crate) fn push(&mut self, data: &[u8]) {
        let room = HEAD_BYTES - self.head.len();
        self.head.extend_from_slice(&data[..room.min(data.len())]);
        if data.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&data[data.len() - TAIL_BYTES..]);
            return;
        }
        if self.tail.len() + data.len() > 2 * TAIL_BYTES {
            self.tail.drain(..self.tail.len() + data.len() - TAIL_BYTES);
        }
        self.tail.extend_from_slice(data);
    }

    pub(crate) fn head(&self) -> &[u8] {
        &self.head
    }

    /// The last [`TAIL_BYTES`] (or fewer, when fewer came).
    pub(crate) fn tail(&self) -> &[u8] {
        &self.tail[self.tail.len().saturating_sub(TAIL_BYTES)..]
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.head.len() + self.tail.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_and_last_bytes_of_any_length() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        for piece in [1, 1000, TAIL_BYTES - 1, TAIL_BYTES, 300_000] {
            let mut ends = HeadAndTail::default();
            for part in data.chunks(piece) {
                ends.push(part);
                assert!(ends.held() <= HEAD_BYTES + 2 * TAIL_BYTES);
            }
            assert_eq!(ends.head(), &data[..HEAD_BYTES]);
            assert_eq!(ends.tail(), &data[data.len() - TAIL_BYTES..], "{piece}");
        }
    }
}
