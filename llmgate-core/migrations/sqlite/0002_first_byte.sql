-- Time from arrival to the upstream's response headers (for streams: time to first token).
ALTER TABLE usage_requests ADD COLUMN first_byte_ms INTEGER;
