//! Splitting a byte stream, cut anywhere by the network and the proxy, back into SSE
//! `data:` payloads.

/// Collects the bytes of a stream and hands out each complete event's `data:` payload.
#[derive(Debug, Default)]
pub struct SseSplitter {
    buffer: Vec<u8>,
}

impl SseSplitter {
    /// A splitter with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` and calls `on_data` with the payload of each `data:` line of every
    /// event now complete (an event ends with a blank line, `\n\n` or `\r\n\r\n`).
    pub fn push(&mut self, bytes: &[u8], mut on_data: impl FnMut(&[u8])) {
        self.buffer.extend_from_slice(bytes);
        let mut consumed = 0;
        while let Some(end) = event_end(&self.buffer[consumed..]) {
            let event = &self.buffer[consumed..consumed + end.0];
            for line in event.split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(data) = line.strip_prefix(b"data:") {
                    on_data(data.strip_prefix(b" ").unwrap_or(data));
                }
            }
            consumed += end.1;
        }
        self.buffer.drain(..consumed);
    }

    /// Bytes of an event not complete yet.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }
}

/// The length of the first event in `buf` and where the next one starts.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pieces: &[&[u8]]) -> (Vec<String>, usize) {
        let mut splitter = SseSplitter::new();
        let mut out = Vec::new();
        for piece in pieces {
            splitter.push(piece, |d| out.push(String::from_utf8(d.to_vec()).unwrap()));
        }
        (out, splitter.pending())
    }

    #[test]
    fn events_cut_anywhere_come_out_whole_and_in_order() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
        let whole = split(&[stream]);
        assert_eq!(whole.0, ["{\"a\":1}", "{\"a\":2}", "[DONE]"]);
        assert_eq!(whole.1, 0);
        for cut in 1..stream.len() {
            let (first, second) = stream.split_at(cut);
            assert_eq!(split(&[first, second]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(split(&bytes), whole);
    }

    #[test]
    fn crlf_events_comments_and_other_fields_are_understood() {
        let (data, pending) =
            split(&[b": keep-alive\r\n\r\nevent: x\r\ndata:{\"b\":2}\r\n\r\ndata: tail"]);
        assert_eq!(data, ["{\"b\":2}"]);
        assert_eq!(
            pending,
            b"data: tail".len(),
            "an unfinished event waits for its end"
        );
    }
}
