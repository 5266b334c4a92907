// The web console in real headless Chromium. Started by llmgate-server/tests/console.rs,
// which runs llmgate in front of a mock upstream and passes:
//   LLMGATE_URL        the gateway, e.g. http://127.0.0.1:41234
//   LLMGATE_ADMIN_KEY  its admin key
//   LLMGATE_UPSTREAM_URL  the mock upstream's URL (the Models page adds a model in front of it)
//   LLMGATE_MODEL_FILE    a 64 MiB stand-in model file, which fake-llama-server.mjs "loads"
//                         in 3 s (the gateway runs it as llama-server)
//   SCREENSHOT_DIR     where each page's screenshot goes (docs/screenshots)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

const base = process.env.LLMGATE_URL;
const adminKey = process.env.LLMGATE_ADMIN_KEY;
const shots = process.env.SCREENSHOT_DIR;
const upstreamUrl = process.env.LLMGATE_UPSTREAM_URL;
const modelFile = process.env.LLMGATE_MODEL_FILE;
assert.ok(base && adminKey && upstreamUrl && modelFile, 'LLMGATE_URL, LLMGATE_ADMIN_KEY, LLMGATE_UPSTREAM_URL and LLMGATE_MODEL_FILE are set by the Rust test');

let browser;
let page;
let userKey;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(15000);
});

after(async () => {
  await browser?.close();
});

async function shot(name) {
  if (!shots) return;
  mkdirSync(shots, { recursive: true });
  // From the top: a page scrolled by a click would draw the sticky bar mid-page.
  await page.evaluate(() => window.scrollTo(0, 0));
  // Bars drawn at their value, not halfway through their 0.4 s transition to it.
  await page.evaluate(() => Promise.all(document.getAnimations()
    .filter((a) => a.effect?.getComputedTiming().iterations !== Infinity)
    .map((a) => a.finished.catch(() => {}))));
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

const id = (testId) => page.getByTestId(testId);
const modelRow = (name) => page.locator(`[data-testid="model-row"][data-model="${name}"]`);

/** The gateway's own view of a model: its JSON, or null when it answers 404. */
async function modelOnServer(name) {
  const response = await fetch(`${base}/admin/models/${encodeURIComponent(name)}`, { headers: { authorization: `Bearer ${adminKey}` } });
  if (response.status === 404) return null;
  assert.equal(response.status, 200, `GET /admin/models/${name}`);
  return response.json();
}

/** Waits until the row of `name` shows `state` in its badge. */
async function waitForState(name, state) {
  await page.waitForFunction(
    ([n, s]) => document.querySelector(`[data-testid="model-row"][data-model="${n}"] [data-testid="model-state"]`)?.dataset.state === s,
    [name, state],
  );
}

/** A button a user cannot press: not there, hidden, or disabled. */
async function cannotPress(locator) {
  if ((await locator.count()) === 0) return true;
  return !(await locator.isVisible()) || (await locator.isDisabled());
}

test('a wrong key is refused in words, the admin key signs in', async () => {
  await page.goto(base + '/');
  await id('signin-key').fill('sk-lg-wrongwrongwrongwrongwrongwrongwrong1234');
  await id('signin-submit').click();
  await assert.doesNotReject(id('error-banner').waitFor());
  assert.match(await id('error-banner').innerText(), /not valid/i);
  await id('signin-key').fill(adminKey);
  await id('signin-submit').click();
  await id('nav-keys').waitFor();
  const url = page.url();
  assert.ok(!url.includes(adminKey), 'the key never goes into a URL');
});

test('create a key, see it listed with its prefix, and copy the secret', async () => {
  await id('nav-keys').click();
  await id('create-key-name').fill('browser-user');
  await id('create-key-submit').click();
  const secret = (await id('new-key-secret').innerText()).trim();
  assert.match(secret, /^sk-lg-[A-Za-z0-9]{32,}$/);
  userKey = secret;
  const row = page.locator('[data-testid="key-row"][data-key-name="browser-user"]');
  await row.waitFor();
  assert.ok((await row.innerText()).includes(secret.slice(0, 10)), 'the listing shows the prefix');
  assert.ok(!(await row.innerText()).includes(secret.slice(12)), 'the listing never shows the secret');
  // The Limits column is wide enough for a word: "defaults" on one line, not "default / s".
  const lines = await row.getByTestId('key-limits').locator('span').evaluate((span) => span.getClientRects().length);
  assert.equal(lines, 1, `the limits "${await row.getByTestId('key-limits').innerText()}" take ${lines} lines`);
  await shot('keys');
});

test('edit a key: its limits are listed and kept by the server; an empty field unsets one', async () => {
  const row = page.locator('[data-testid="key-row"][data-key-name="browser-user"]');
  assert.match(await row.getByTestId('key-limits').innerText(), /defaults/);
  await row.getByTestId('edit-key').click();
  await id('key-edit-limits-rpm').fill('600');
  await id('key-edit-limits-weight').fill('2');
  await id('key-edit-save').click();
  await page.waitForFunction(() =>
    /600 req\/min/.test(document.querySelector('[data-testid="key-row"][data-key-name="browser-user"] [data-testid="key-limits"]')?.innerText || ''));
  const listed = async () => {
    const response = await fetch(base + '/admin/keys', { headers: { authorization: `Bearer ${adminKey}` } });
    return (await response.json()).find((k) => k.name === 'browser-user');
  };
  let key = await listed();
  assert.equal(key.rpm, 600);
  assert.equal(key.weight, 2);
  await shot('keys-edit');
  // The dialog opens with the key's values; emptying one clears it.
  await row.getByTestId('edit-key').click();
  assert.equal(await id('key-edit-limits-rpm').inputValue(), '600');
  await id('key-edit-limits-weight').fill('');
  await id('key-edit-save').click();
  await page.waitForFunction(() =>
    !/weight/.test(document.querySelector('[data-testid="key-row"][data-key-name="browser-user"] [data-testid="key-limits"]')?.innerText || 'weight'));
  key = await listed();
  assert.equal(key.rpm, 600);
  assert.equal(key.weight, undefined);
  // A value the server refuses is shown in the dialog, which stays open.
  await row.getByTestId('edit-key').click();
  await id('key-edit-limits-rpm').fill('0');
  await id('key-edit-save').click();
  await page.waitForFunction(() => /rpm/.test(document.querySelector('[data-testid="key-edit-error"]')?.innerText || ''));
  await id('key-edit-cancel').click();
  assert.equal((await listed()).rpm, 600);
  // Enter in a field saves, as in the create form; Escape closes without saving.
  await row.getByTestId('edit-key').click();
  await id('key-edit-limits-rpm').fill('700');
  await id('key-edit-limits-rpm').press('Enter');
  await id('key-edit-dialog').waitFor({ state: 'hidden' });
  assert.equal((await listed()).rpm, 700, 'Enter in a field of the edit dialog saves it');
  await page.waitForFunction(() =>
    /700 req\/min/.test(document.querySelector('[data-testid="key-row"][data-key-name="browser-user"] [data-testid="key-limits"]')?.innerText || ''));
  await row.getByTestId('edit-key').click();
  await id('key-edit-limits-rpm').fill('800');
  await id('key-edit-limits-rpm').press('Escape');
  await id('key-edit-dialog').waitFor({ state: 'hidden' });
  assert.equal((await listed()).rpm, 700, 'Escape closes the edit dialog unsaved');
});

test('Enter in a field of any form or dialog does what its main button does, never Cancel', async () => {
  // A browser submits a form on Enter with its first submit button: in every form with
  // a text field, that must be the form's own action.
  const wrong = await page.evaluate(() =>
    [...document.querySelectorAll('form')]
      .filter((form) => form.querySelector('input:not([type="hidden"]):not([type="checkbox"]):not([type="radio"])'))
      .map((form) => {
        const first = form.querySelector('button:not([type]), button[type="submit"], input[type="submit"]');
        return { form: form.id || form.closest('dialog')?.id || '(unnamed)', first: first ? `${first.textContent.trim()} (${first.value || 'no value'})` : null };
      })
      .filter(({ first }) => first === null || /cancel/i.test(first)));
  assert.deepEqual(wrong, []);
});

test('create a key with limits, rotate it: the new secret is shown once and works, the old one stops', async () => {
  await page.locator('#create-key-limits-section summary').click();
  await id('create-key-name').fill('to-rotate');
  await id('create-key-limits-tpm').fill('5000');
  await id('create-key-submit').click();
  const old = (await id('new-key-secret').innerText()).trim();
  const row = page.locator('[data-testid="key-row"][data-key-name="to-rotate"]');
  await row.waitFor();
  assert.match(await row.getByTestId('key-limits').innerText(), /5000 tokens\/min/);
  await id('new-key-done').click();
  await row.getByTestId('rotate-key').click();
  await id('key-rotate-confirm').click();
  await id('new-key-secret').waitFor();
  const fresh = (await id('new-key-secret').innerText()).trim();
  assert.match(fresh, /^sk-lg-[A-Za-z0-9]{32,}$/);
  assert.notEqual(fresh, old);
  const me = (key) => fetch(base + '/v1/me', { headers: { authorization: `Bearer ${key}` } });
  assert.equal((await me(fresh)).status, 200);
  assert.equal((await me(old)).status, 401, 'rotated with no grace: the old secret stops at once');
  await id('new-key-done').click();
});

test('revoke a key after confirming', async () => {
  await id('create-key-name').fill('to-revoke');
  await id('create-key-submit').click();
  const row = page.locator('[data-testid="key-row"][data-key-name="to-revoke"]');
  await row.waitFor();
  await row.getByTestId('revoke-key').click();
  await id('confirm-revoke').click();
  await page.waitForFunction(() => {
    const r = document.querySelector('[data-testid="key-row"][data-key-name="to-revoke"]');
    return r && /revoked/i.test(r.innerText);
  });
  const response = await fetch(base + '/admin/keys', { headers: { authorization: `Bearer ${adminKey}` } });
  const keys = await response.json();
  assert.ok(keys.find((k) => k.name === 'to-revoke').revoked_at, 'the server has it revoked');
});

test('the playground streams an answer and shows the usage it was charged', async () => {
  await id('nav-playground').click();
  await id('playground-key').fill(userKey);
  // The one model there is, picked for the user.
  await page.waitForFunction(() => document.querySelector('[data-testid="playground-model"]')?.value === 'upstream');
  await id('playground-message').fill('Tell me about foxes');
  await id('playground-send').click();
  await page.waitForFunction(() =>
    document.querySelector('[data-testid="playground-answer"]')?.innerText.includes('The quick brown fox jumps'));
  await page.waitForFunction(() =>
    /request/i.test(document.querySelector('[data-testid="playground-usage"]')?.innerText || ''));
  const usage = await id('playground-usage').innerText();
  assert.match(usage, /\b1\b/, `one request charged: ${usage}`);
  await shot('playground');
});

test('the usage table shows the request and its tokens', async () => {
  await id('nav-usage').click();
  const row = page.locator('[data-testid="usage-row"][data-key-name="browser-user"]');
  await page.waitForFunction(() => {
    const r = document.querySelector('[data-testid="usage-row"][data-key-name="browser-user"] [data-testid="usage-requests"]');
    return r && r.innerText.trim() === '1';
  });
  const tokens = Number((await row.getByTestId('usage-total-tokens').innerText()).replace(/[^0-9]/g, ''));
  assert.ok(tokens > 0, `tokens were counted: ${tokens}`);
  // The playground's request, under the model it named.
  const model = await row.locator('[data-testid="usage-models"] li[data-model="upstream"]').innerText();
  assert.match(model, /× 1 · .+ tokens/, `the model's share: ${model}`);
  assert.equal(Number(model.split('·')[1].replace(/[^0-9]/g, '')), tokens, 'one model holds all the tokens');
  await shot('usage');
});

test('the system page shows CPU and memory', async () => {
  await id('nav-system').click();
  await page.waitForFunction(() => /%/.test(document.querySelector('[data-testid="system-cpu"]')?.innerText || ''));
  assert.match(await id('system-memory').innerText(), /[KMGT]i?B/);
  assert.match(await id('system-gpu').innerText(), /no GPU found|GPU/i);
  await shot('system');
});

test('the models page lists the upstream model as ready, with nothing to load or unload', async () => {
  await id('nav-models').click();
  await id('models-table').waitFor();
  await modelRow('upstream').waitFor();
  await waitForState('upstream', 'ready');
  const row = modelRow('upstream');
  assert.ok((await row.innerText()).includes(new URL(upstreamUrl).host), 'the row says where it forwards to');
  assert.ok(await cannotPress(row.getByTestId('model-load')), 'an upstream model has no Load button to press');
  assert.ok(await cannotPress(row.getByTestId('model-unload')), 'an upstream model has no Unload button to press');
  assert.ok(await row.getByTestId('model-remove').isEnabled(), 'it can be removed');
  assert.doesNotMatch(await id('models-table').innerText(), /\b(null|undefined|NaN)\b/, 'no placeholder leaks into the page');
  // The playground's request shows as its last use.
  assert.doesNotMatch(await row.getByTestId('model-last-used').innerText(), /never/);
});

test('adding a model without a source or an upstream shows the server\'s reason', async () => {
  await id('model-add-name').fill('nowhere');
  await id('model-add-submit').click();
  await id('model-add-error').waitFor();
  assert.match(await id('model-add-error').innerText(), /source.*upstream/i);
  assert.equal(await modelOnServer('nowhere'), null, 'nothing was added');
  assert.equal(await modelRow('nowhere').count(), 0);
});

test('add an upstream model through the form; it is listed, ready, and answers in the playground', async () => {
  await id('model-add-name').fill('added');
  await id('model-add-aliases').fill('added-alias, another');
  await id('model-add-kind').selectOption('upstream');
  await id('model-add-upstream').fill(upstreamUrl);
  await id('model-add-max-concurrency').fill('2');
  await id('model-add-submit').click();
  await modelRow('added').waitFor();
  await waitForState('added', 'ready');
  assert.ok(await id('model-add-error').isHidden(), 'no error after a good add');
  assert.equal(await id('model-add-name').inputValue(), '', 'the form is cleared for the next one');
  const text = await modelRow('added').innerText();
  assert.match(text, /added-alias, another/, 'the aliases are shown');
  assert.match(text, /2 at once/, 'its concurrency limit is shown');
  const stored = await modelOnServer('added');
  assert.equal(stored.upstream, upstreamUrl);
  assert.deepEqual(stored.aliases, ['added-alias', 'another']);
  assert.equal(stored.max_concurrency, 2);
  assert.ok(await cannotPress(modelRow('added').getByTestId('model-load')));

  // The playground offers both models and talks to the one picked.
  await id('nav-playground').click();
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="playground-model"] option')].some((o) => o.value === 'added'));
  await id('playground-model').selectOption('added');
  await id('playground-message').fill('Tell me about foxes again');
  await id('playground-send').click();
  await page.waitForFunction(() =>
    document.querySelector('[data-testid="playground-answer"]')?.innerText.includes('The quick brown fox jumps'));
  await page.waitForFunction(() => document.querySelector('[data-testid="playground-usage"]')?.dataset.requests === '1');
  await id('nav-models').click();
  await page.waitForFunction(() =>
    !/never/.test(document.querySelector('[data-testid="model-row"][data-model="added"] [data-testid="model-last-used"]')?.innerText ?? 'never'));
});

test('a local model loads with Load (shown loading, then ready with its memory and log) and stops with Unload', async () => {
  await id('model-add-name').fill('local');
  await id('model-add-kind').selectOption('local');
  await id('model-add-source').fill(modelFile);
  await id('model-add-runner').selectOption('llama-server');
  await id('model-add-ttl').fill('600');
  await id('model-add-submit').click();
  const row = modelRow('local');
  await row.waitFor();
  await waitForState('local', 'stopped');
  assert.match(await row.getByTestId('model-settings').innerText(), /unloads after 10 min idle/);
  assert.ok(await row.getByTestId('model-unload').isDisabled(), 'nothing to unload yet');

  await row.getByTestId('model-load').click();
  await page.waitForFunction(() =>
    ['setting_up', 'downloading', 'loading'].includes(document.querySelector('[data-testid="model-row"][data-model="local"] [data-testid="model-state"]')?.dataset.state));
  assert.ok(await row.getByTestId('model-progress').isVisible(), 'a load in progress shows a progress bar');
  assert.ok(await row.getByTestId('model-load').isDisabled(), 'a loading model cannot be loaded twice');

  await waitForState('local', 'ready');
  assert.equal(await row.getByTestId('model-progress').count(), 0, 'no progress bar once ready');
  assert.equal((await row.getByTestId('model-memory').innerText()).trim(), '64 MiB', 'the file\'s size, as the loader counts it');
  const server = await modelOnServer('local');
  assert.ok(server.pid > 0);
  assert.match(await row.innerText(), new RegExp(`process ${server.pid}`), 'the model server\'s process is shown');
  assert.ok(await row.getByTestId('model-unload').isEnabled());
  assert.ok(await row.getByTestId('model-load').isDisabled());
  // Its log is folded until asked for.
  const log = page.locator('tbody[data-model="local"] [data-testid="model-log"]');
  assert.ok(await log.isHidden(), 'a healthy model\'s log is folded');
  await page.locator('tbody[data-model="local"] details summary').click();
  await page.waitForFunction(() =>
    /fake llama-server .*model loaded/s.test(document.querySelector('tbody[data-model="local"] [data-testid="model-log"]')?.innerText || ''));
  await shot('models');

  await row.getByTestId('model-unload').click();
  await waitForState('local', 'stopped');
  assert.equal((await modelOnServer('local')).pid, null, 'the model server is gone');
  assert.ok(await row.getByTestId('model-load').isEnabled(), 'it can be loaded again');
  assert.ok(await log.isVisible(), 'the log the user opened stays open across refreshes');
});

test('a local model that cannot start can be loaded, fails with its log shown, and is removed', async () => {
  await id('model-add-name').fill('broken-local');
  await id('model-add-kind').selectOption('local');
  await id('model-add-source').fill('/nonexistent/llmgate-console-test.gguf');
  await id('model-add-runner').selectOption('llama-server');
  await id('model-add-submit').click();
  const row = modelRow('broken-local');
  await row.waitFor();
  await waitForState('broken-local', 'stopped');
  assert.ok(await row.getByTestId('model-load').isEnabled(), 'a stopped local model can be loaded');
  assert.ok(await row.getByTestId('model-unload').isDisabled(), 'a stopped model has nothing to unload');
  await row.getByTestId('model-load').click();
  await waitForState('broken-local', 'failed');
  const log = page.locator('tbody[data-model="broken-local"] [data-testid="model-log"]');
  await log.waitFor({ state: 'visible' });
  assert.ok((await row.getByTestId('model-message').innerText()).trim().length > 0, 'the failure says why');
  assert.ok(await row.getByTestId('model-load').isEnabled(), 'a failed model can be loaded again');
  assert.doesNotMatch(await id('models-table').innerText(), /\b(null|undefined|NaN)\b/);
  await shot('models-failed');

  page.once('dialog', () => assert.fail('removing asks in the page, not in a browser dialog'));
  await row.getByTestId('model-remove').click();
  await id('model-remove-confirm').click();
  await page.waitForFunction(() => !document.querySelector('[data-testid="model-row"][data-model="broken-local"]'));
  assert.equal(await modelOnServer('broken-local'), null);
});

test('remove the added model after confirming; cancelling keeps it', async () => {
  const row = modelRow('added');
  await row.getByTestId('model-remove').click();
  await id('model-remove-dialog').waitFor();
  assert.match(await id('model-remove-dialog').innerText(), /added/);
  await id('model-remove-cancel').click();
  await page.waitForTimeout(2500); // one poll later, it is still there
  assert.equal(await row.count(), 1, 'cancelling keeps the model');
  // The closed dialog hands focus back to the button, and a refresh keeps it there.
  assert.equal(
    await page.evaluate(() => `${document.activeElement?.dataset.testid} ${document.activeElement?.closest('tr')?.dataset.model}`),
    'model-remove added',
    'a keyboard user keeps their place across refreshes',
  );
  assert.ok(await modelOnServer('added'));

  await row.getByTestId('model-remove').click();
  await id('model-remove-confirm').click();
  await page.waitForFunction(() => !document.querySelector('[data-testid="model-row"][data-model="added"]'));
  assert.equal(await modelOnServer('added'), null, 'the server has it removed');
  assert.equal(await modelRow('upstream').count(), 1, 'the other model stays');
});

test('the console is readable on a phone', async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  await id('nav-keys').click();
  await page.locator('[data-testid="key-row"]').first().waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  assert.equal(overflow, false, 'no sideways scrolling on a phone');
  await shot('keys-phone');

  await id('nav-models').click();
  await modelRow('upstream').waitFor();
  await id('model-add-form').waitFor();
  const modelsOverflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  assert.equal(modelsOverflow, false, 'no sideways scrolling on the Models page either');
  await shot('models-phone');
});
