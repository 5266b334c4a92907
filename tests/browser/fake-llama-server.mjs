#!/usr/bin/env node
// A stand-in for llama.cpp's `llama-server` for the console's browser tests (the Rust
// tests use tests/fixtures/fake_llama_server.rs, which this package cannot build): a
// real process that takes the real server's flags, says it is loading for
// FAKE_LOAD_MS milliseconds (from its environment), then answers the OpenAI API.
import { createServer } from 'node:http';

const args = process.argv.slice(2);
const flag = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const port = Number(flag('--port'));
const host = flag('--host') || '127.0.0.1';
const alias = flag('--alias') || 'fake';
const loadMs = Number(process.env.FAKE_LOAD_MS || 0);
let ready = false;
setTimeout(() => {
  ready = true;
  console.log(`fake llama-server ${alias}: model loaded`);
}, loadMs);
console.log(`fake llama-server pid ${process.pid} alias ${alias}: loading ${flag('--model')}`);

const json = (response, status, body) => {
  response.writeHead(status, { 'content-type': 'application/json' });
  response.end(JSON.stringify(body));
};

createServer((request, response) => {
  const path = request.url.split('?')[0];
  request.resume();
  request.on('end', () => {
    if (path === '/health') {
      if (ready) json(response, 200, { status: 'ok' });
      else json(response, 503, { error: { message: 'Loading model' } });
    } else if (path === '/v1/models') {
      json(response, 200, { object: 'list', data: [{ id: alias, object: 'model' }] });
    } else if (path === '/v1/chat/completions' && request.method === 'POST') {
      json(response, 200, {
        id: 'chatcmpl-fake',
        object: 'chat.completion',
        model: alias,
        choices: [{ index: 0, finish_reason: 'stop', message: { role: 'assistant', content: `${alias} pid ${process.pid}` } }],
        usage: { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 },
      });
    } else if (path === '/tokenize' && request.method === 'POST') {
      json(response, 200, { tokens: [1, 1, 1] });
    } else {
      json(response, 404, { error: { message: 'not found' } });
    }
  });
}).listen(port, host);
