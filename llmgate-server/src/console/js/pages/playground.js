// The Playground page: a chat message sent through the gateway with a user key, the
// streamed answer, and what that key was charged for it.

import { $, h } from "../dom.js";
import { ApiError, admin, request } from "../api.js";
import { playgroundKey, rememberPlaygroundKey } from "../session.js";
import { clearError, messageOf, showError } from "../banner.js";
import { fmtInt } from "../format.js";

let playgroundAbort = null;

export function init() {
  $("playground-form").addEventListener("submit", sendPlayground);
  $("playground-stop").addEventListener("click", () => playgroundAbort && playgroundAbort.abort());
  $("playground-message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("playground-form").requestSubmit();
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function enter() {
  const saved = playgroundKey();
  if (saved && !$("playground-key").value) $("playground-key").value = saved;
  listModels().catch((err) => showError(`Could not list the models: ${messageOf(err)}`, "playground"));
}

/**
 * Fills the model picker from the gateway's list, keeping the user's pick while it still
 * exists; the default model comes first. No pick sends no `model`, so the gateway's
 * default answers.
 */
async function listModels() {
  const view = await admin("GET", "/admin/models");
  const select = $("playground-model");
  const previous = select.value;
  const names = view.models.map((model) => model.name);
  const first = view.default_model && names.includes(view.default_model) ? view.default_model : names[0];
  const ordered = first ? [first, ...names.filter((name) => name !== first)] : names;
  select.replaceChildren(
    ...(ordered.length ? [] : [h("option", { value: "" }, "No model is configured")]),
    ...ordered.map((name) => h("option", { value: name }, name === view.default_model ? `${name} (default)` : name)),
  );
  if (previous && names.includes(previous)) select.value = previous;
}

function playgroundError(err) {
  if (err instanceof ApiError) {
    if (err.status === 401) return "That key is not valid (unknown, revoked or expired). Create a user key on the Keys page and paste it here.";
    if (err.status === 404 && err.code === "model_not_found") return `${err.message} See the Models page for the models there are.`;
    if (err.status === 503 && err.code === "model_not_running") return "That model is not running. Load it on the Models page, then send again.";
    if (err.status === 503) return `The model is not available right now: ${err.message}`;
    if (err.status === 502) return `The model server could not be reached. (${err.message})`;
    if (err.status === 504) return `The model server took too long to answer. (${err.message})`;
    if (err.status === 429) return `Too many requests right now; try again shortly. (${err.message})`;
  }
  return messageOf(err);
}

async function sendPlayground(event) {
  event.preventDefault();
  if (playgroundAbort) return;
  const key = $("playground-key").value.trim();
  const message = $("playground-message").value.trim();
  if (!key) {
    showError("Paste a key into the User key field first. You can create one on the Keys page.", "playground");
    $("playground-key").focus();
    return;
  }
  if (!message) {
    showError("Type a message for the model first.", "playground");
    $("playground-message").focus();
    return;
  }
  rememberPlaygroundKey(key);
  clearError();

  const answer = $("playground-answer");
  const charged = $("playground-usage");
  const status = $("playground-status");
  answer.textContent = "";
  charged.hidden = true;
  const controller = new AbortController();
  playgroundAbort = controller;
  $("playground-send").disabled = true;
  $("playground-stop").hidden = false;
  status.textContent = "Sending…";

  let before = null;
  let finished = false;
  try {
    before = await request("GET", "/v1/me/usage", { key, signal: controller.signal });
    const response = await request("POST", "/v1/chat/completions", {
      key,
      raw: true,
      signal: controller.signal,
      body: { model: $("playground-model").value || undefined, messages: [{ role: "user", content: message }], stream: true },
    });
    status.textContent = "The model is answering…";
    answer.classList.add("streaming");
    await readAnswer(response, answer);
    finished = true;
    status.textContent = "";
  } catch (err) {
    if (err && err.name === "AbortError") {
      status.textContent = "Stopped.";
    } else {
      status.textContent = "";
      showError(playgroundError(err), "playground");
    }
  } finally {
    answer.classList.remove("streaming");
    playgroundAbort = null;
    $("playground-send").disabled = false;
    $("playground-stop").hidden = true;
  }
  if (before) await showCharged(key, before, finished);
}

/** Reads a streamed (SSE) or plain JSON chat answer into the page as it arrives. */
async function readAnswer(response, answer) {
  const type = response.headers.get("content-type") || "";
  if (!type.includes("text/event-stream")) {
    const body = await response.json().catch(() => null);
    const text = body && body.choices && body.choices[0] && body.choices[0].message ? body.choices[0].message.content : null;
    answer.textContent = text || "(The model sent no text.)";
    return;
  }
  if (!response.body) {
    throw new ApiError(0, "This browser cannot read streamed answers.");
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let done = false;
  while (!done) {
    const chunk = await reader.read();
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let boundary;
    while ((boundary = buffer.search(/\r?\n\r?\n/)) !== -1) {
      const rawEvent = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
      const data = rawEvent
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") {
        done = true;
        break;
      }
      let event;
      try {
        event = JSON.parse(data);
      } catch (_) {
        continue;
      }
      if (event.error) {
        throw new ApiError(0, `The model stopped with an error: ${event.error.message || "unknown error"}`);
      }
      const choice = event.choices && event.choices[0];
      const piece = choice && choice.delta ? choice.delta.content : null;
      if (piece) answer.append(piece);
    }
  }
  if (done) reader.cancel().catch(() => {});
  if (!answer.textContent) answer.textContent = "(The model sent no text.)";
}

/** The key's totals after minus before; usage is written in the background, so retry briefly. */
async function showCharged(key, before, finished) {
  const charged = $("playground-usage");
  let after = null;
  for (let attempt = 0; attempt < 8; attempt += 1) {
    try {
      after = await request("GET", "/v1/me/usage", { key });
    } catch (_) {
      after = null;
    }
    if (after && after.requests > before.requests) break;
    await sleep(250);
  }
  if (!after) return;
  const diff = {
    requests: after.requests - before.requests,
    prompt: after.prompt_tokens - before.prompt_tokens,
    completion: after.completion_tokens - before.completion_tokens,
    total: after.total_tokens - before.total_tokens,
    unknown: (after.requests_without_usage || 0) - (before.requests_without_usage || 0),
  };
  charged.dataset.requests = diff.requests;
  charged.dataset.promptTokens = diff.prompt;
  charged.dataset.completionTokens = diff.completion;
  charged.dataset.totalTokens = diff.total;
  const parts = [
    "Charged to this key: ",
    h("strong", {}, `+${fmtInt(diff.requests)} request${diff.requests === 1 ? "" : "s"}`),
    " · ",
    h("strong", {}, `${fmtInt(diff.prompt)} prompt`),
    " + ",
    h("strong", {}, `${fmtInt(diff.completion)} completion`),
    " = ",
    h("strong", {}, `${fmtInt(diff.total)} tokens`),
  ];
  if (diff.unknown > 0) parts.push(" (the model server did not report tokens for this request; it is counted without them)");
  if (!finished && diff.requests > 0) parts.push(" (the answer was cut short, but the request still counts)");
  if (diff.requests === 0) parts.splice(0, parts.length, "Nothing was charged to this key yet; the usage may appear on the Usage page in a moment.");
  charged.replaceChildren(...parts);
  charged.hidden = false;
}
