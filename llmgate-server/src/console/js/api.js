// Calls to the gateway. Every call carries a key in the Authorization header: the admin
// key from the session unless the caller passes another.

import { adminKey } from "./session.js";

/** A failed call, its message in words a person can read. */
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

let adminKeyRefused = () => {};

/** What to do when the gateway stops accepting the admin key (the console signs out). */
export function onAdminKeyRefused(handler) {
  adminKeyRefused = handler;
}

async function errorFrom(response) {
  let message = null;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || null;
      code = body.error.code || null;
    }
  } catch (_) {
    // not JSON: fall back to the status line
  }
  return new ApiError(response.status, message || `The server answered ${response.status} ${response.statusText}.`.replace(" .", "."), code);
}

/** One request; throws ApiError with words a person can read. */
export async function request(method, path, options) {
  const opts = options || {};
  const headers = { Authorization: `Bearer ${opts.key || adminKey() || ""}` };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      signal: opts.signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "Could not reach llmgate. Check that the server is running and that this computer is online.");
  }
  if (opts.raw) {
    if (!response.ok) throw await errorFrom(response);
    return response;
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  try {
    return await response.json();
  } catch (_) {
    throw new ApiError(response.status, "The server sent an answer the console could not read.");
  }
}

/** An admin call: a key that stops working (revoked, expired) signs the user out. */
export async function admin(method, path, body) {
  try {
    return await request(method, path, { body });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      adminKeyRefused("Your admin key is no longer accepted (it may have been revoked or have expired). Sign in again.");
    } else if (err instanceof ApiError && err.status === 403) {
      adminKeyRefused("That key is not an admin key. Sign in with an admin key.");
    }
    throw err;
  }
}
