// The web console in real headless Chromium. Started by llmgate-server/tests/console.rs,
// which runs llmgate in front of a mock upstream and passes:
//   LLMGATE_URL        the gateway, e.g. http://127.0.0.1:41234
//   LLMGATE_ADMIN_KEY  its admin key
//   SCREENSHOT_DIR     where each page's screenshot goes (docs/screenshots)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

const base = process.env.LLMGATE_URL;
const adminKey = process.env.LLMGATE_ADMIN_KEY;
const shots = process.env.SCREENSHOT_DIR;
assert.ok(base && adminKey, 'LLMGATE_URL and LLMGATE_ADMIN_KEY are set by the Rust test');

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
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

const id = (testId) => page.getByTestId(testId);

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
  await shot('keys');
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
  const model = await row.locator('[data-testid="usage-models"] li[data-model="any"]').innerText();
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

test('the models page shows the state of the model', async () => {
  await id('nav-models').click();
  await id('model-run').waitFor();
  await shot('models');
});

test('the console is readable on a phone', async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  await id('nav-keys').click();
  await page.locator('[data-testid="key-row"]').first().waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  assert.equal(overflow, false, 'no sideways scrolling on a phone');
  await shot('keys-phone');
});
