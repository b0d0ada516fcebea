// End-to-end test of the admin UI in headless Chromium: the real `llmgw`
// binary on a fresh PostgreSQL database, a local OpenAI-compatible upstream,
// and a new admin doing the docs' two steps (add a provider in the UI, then
// call the gateway), plus a member's view, axe-core and screenshots.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { createServer } from 'node:https';
import os from 'node:os';
import { createRequire } from 'node:module';
import net from 'node:net';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);
const AXE = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
const HERE = path.dirname(new URL(import.meta.url).pathname);
const ROOT = path.resolve(HERE, '../../../..');
const BIN = process.env.LLMGW_BIN || path.join(ROOT, 'target/debug/llmgw');
const SHOTS = process.env.LLMGW_UI_SCREENSHOTS || path.join(ROOT, 'target/ui-screenshots');
const PG = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres';
const PASSWORD = 'correct horse battery staple';
const UPSTREAM_TOKEN = 'sk-upstream-secret-9876';
const VIEWPORTS = { laptop: { width: 1280, height: 800 }, phone: { width: 390, height: 844 } };

let server, upstream, browser, api, gateway, dbName, dbUrl, tls, upstreamUrl;
// Redis on 127.0.0.1:6379 (required under CI): the counters /limits shows are shared there.
let redis = false;
const logs = [];

function redisUp() {
  return new Promise((resolve) => {
    const c = net.connect(6379, '127.0.0.1');
    c.setTimeout(300, () => { c.destroy(); resolve(false); });
    c.once('connect', () => { c.end(); resolve(true); });
    c.once('error', () => resolve(false));
  });
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

// A throwaway CA and a certificate for 127.0.0.1 signed by it; llmgw trusts
// the CA through LLMGW_UPSTREAM_CA_FILE, as an operator with an internal CA would.
function makeCerts() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'llmgw-ui-tls-'));
  const f = (n) => path.join(dir, n);
  const ssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  ssl('req', '-x509', ...ec, '-keyout', f('ca.key'), '-out', f('ca.pem'), '-days', '2', '-subj', '/CN=llmgw ui test CA');
  ssl('req', ...ec, '-keyout', f('leaf.key'), '-out', f('leaf.csr'), '-subj', '/CN=127.0.0.1');
  fs.writeFileSync(f('ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n');
  ssl('x509', '-req', '-in', f('leaf.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-out', f('leaf.pem'), '-days', '2', '-extfile', f('ext'));
  return { dir, ca: f('ca.pem'), key: fs.readFileSync(f('leaf.key')), cert: fs.readFileSync(f('leaf.pem')) };
}

// An OpenAI-compatible HTTPS upstream that checks it gets the provider's token.
function startUpstream(tls) {
  const srv = createServer({ key: tls.key, cert: tls.cert }, (req, res) => {
    let body = '';
    req.on('data', (c) => { body += c; if (body.length > 1e6) req.destroy(); });
    req.on('end', () => {
      const send = (status, obj) => { res.writeHead(status, { 'content-type': 'application/json' }); res.end(JSON.stringify(obj)); };
      if (req.headers.authorization !== `Bearer ${UPSTREAM_TOKEN}`) return send(401, { error: { message: 'bad token' } });
      if (req.method === 'GET' && req.url === '/v1/models') return send(200, { object: 'list', data: [{ id: 'llama', object: 'model' }, { id: 'qwen', object: 'model' }] });
      if (req.method === 'POST' && req.url === '/v1/chat/completions') {
        const model = JSON.parse(body).model;
        return send(200, { id: 'c1', object: 'chat.completion', model, choices: [{ index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'stop' }], usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 } });
      }
      send(404, { error: { message: 'no route' } });
    });
  });
  return new Promise((resolve) => srv.listen(0, '127.0.0.1', () => resolve(srv)));
}

async function waitFor(fn, what, ms = 15000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try { const v = await fn(); if (v) return v; } catch (e) { last = e; }
    await new Promise((r) => setTimeout(r, 150));
  }
  throw new Error(`timed out waiting for ${what}${last ? ': ' + last.message : ''}\n${logs.join('').slice(-3000)}`);
}

before(async () => {
  assert.ok(fs.existsSync(BIN), `${BIN} not built (cargo build -p server)`);
  const chrome = process.env.CHROMIUM || execFileSync('sh', ['-c', 'command -v chromium'], { encoding: 'utf8' }).trim();
  dbName = `llmgw_ui_${process.pid}_${Date.now()}`;
  execFileSync('psql', [PG, '-q', '-c', `CREATE DATABASE ${dbName}`]);
  const u = new URL(PG); u.pathname = '/' + dbName; dbUrl = u.toString();
  const key = execFileSync(BIN, ['keys', 'generate'], { encoding: 'utf8' }).trim();
  tls = makeCerts();
  upstream = await startUpstream(tls);
  upstreamUrl = `https://127.0.0.1:${upstream.address().port}`;
  const [apiPort, gwPort] = [await freePort(), await freePort()];
  api = `http://127.0.0.1:${apiPort}`;
  gateway = `http://127.0.0.1:${gwPort}`;
  redis = await redisUp();
  if (!redis && process.env.CI === 'true') throw new Error('Redis at 127.0.0.1:6379 is required under CI');
  if (!redis) console.log('Redis is not running: usage against limits shows as unknown');
  server = spawn(BIN, ['serve'], {
    env: {
      PATH: process.env.PATH, DATABASE_URL: dbUrl,
      LLMGW_ENCRYPTION_KEYS: key.includes(':') ? key : `1:${key}`,
      LLMGW_API_ADDR: `127.0.0.1:${apiPort}`, LLMGW_GATEWAY_ADDR: `127.0.0.1:${gwPort}`,
      LLMGW_GATEWAY_PUBLIC_URL: gateway,
      LLMGW_UPSTREAM_ALLOW_PRIVATE: 'true', LLMGW_UPSTREAM_ALLOW_HTTP: 'true', LLMGW_UPSTREAM_CA_FILE: tls.ca,
      LLMGW_LOG_FORMAT: 'pretty', RUST_LOG: 'warn',
      // The limits dialog is read right after the requests: with every
      // request asking Redis (no grants held ahead), "used" is exact at once.
      ...(redis ? { LLMGW_REDIS_URL: 'redis://127.0.0.1:6379', LLMGW_LIMITS_HOLD_MS: '0' } : {}),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  server.stdout.on('data', (d) => logs.push(d.toString()));
  server.stderr.on('data', (d) => logs.push(d.toString()));
  await waitFor(async () => (await fetch(`${api}/readyz`)).ok && (await fetch(`${gateway}/healthz`)).ok, 'llmgw to start');
  browser = await chromium.launch({
    executablePath: chrome,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
  fs.mkdirSync(SHOTS, { recursive: true });
});

after(async () => {
  if (browser) await browser.close();
  if (server) { server.kill('SIGTERM'); await new Promise((r) => { server.once('exit', r); setTimeout(r, 5000); }); }
  if (upstream) upstream.close();
  if (tls) fs.rmSync(tls.dir, { recursive: true, force: true });
  if (dbName) { try { execFileSync('psql', [PG, '-q', '-c', `DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`]); } catch (e) { /* best effort */ } }
});

async function newPage(viewport = VIEWPORTS.laptop) {
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  page.on('dialog', (d) => d.accept());
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // Refusals the test provokes (401 before sign-in, 409 duplicate) are logged by the browser as failed loads.
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text()); });
  page.errors = errors;
  return page;
}

// Navigates inside the app and waits until the page has rendered; returns the render time.
async function open(page, route, heading) {
  await page.evaluate((r) => { window.__t0 = performance.now(); location.hash = '#' + r; }, route);
  await page.waitForFunction((r) => document.body.dataset.page === r && !document.body.dataset.busy, route);
  await page.locator('main h1', { hasText: heading }).waitFor();
  // From the hash change to the page rendered with its data, as the app measures it.
  return Number(await page.evaluate(() => document.body.dataset.renderMs));
}

async function axeCheck(page, name) {
  await page.evaluate(AXE); // runs through the debugging protocol: the page's CSP does not apply
  const res = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
  const bad = res.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  assert.deepEqual(bad.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).join(', ')})`), [], `${name}: accessibility violations`);
}

// `tall` makes the window as tall as a modal dialog's content, so the picture shows all of it.
async function shoot(page, name, tall) {
  for (const [label, size] of Object.entries(VIEWPORTS)) {
    const vp = tall ? { width: size.width, height: tall[label] } : size;
    await page.setViewportSize(vp);
    await page.screenshot({ path: path.join(SHOTS, `${name}-${label}.png`), fullPage: true });
  }
  await page.setViewportSize(VIEWPORTS.laptop);
}

async function chat(key) {
  return fetch(`${gateway}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'mycompany/llama', messages: [{ role: 'user', content: 'hello' }] }),
  });
}

const OWNER = 'owner@ui.example.com';
const MEMBER = 'member@ui.example.com';
const timings = {};

test('a new admin adds a provider in the UI, then calls the gateway with a key made there', async () => {
  const page = await newPage();
  await page.goto(api + '/');
  await page.locator('main h1', { hasText: 'Sign in' }).waitFor();
  timings.first_load = await page.evaluate(() => { const n = performance.getEntriesByType('navigation')[0]; return n.domInteractive; });
  await shoot(page, 'signin');
  await axeCheck(page, 'sign in');

  // Sign up, then the empty-account page asks for an organization.
  await page.getByRole('link', { name: 'Create an account' }).click();
  await page.getByLabel('Email').fill(OWNER);
  await page.getByLabel('Password').fill(PASSWORD);
  await page.getByRole('button', { name: 'Create account' }).click();
  await page.locator('main h1', { hasText: 'Organization' }).waitFor();
  await page.getByLabel('Organization name').fill('Acme');
  await page.getByRole('button', { name: 'Create organization' }).click();
  await page.locator('main h1', { hasText: 'Providers' }).waitFor();
  assert.match(await page.locator('#org-switch').innerText(), /Acme \(owner\)/);

  // The cookie is HttpOnly: the page's script cannot read it.
  assert.equal(await page.evaluate(() => document.cookie), '');
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === 'llmgw_session');
  assert.ok(session && session.httpOnly && session.sameSite === 'Strict', JSON.stringify(cookies));

  // A name that breaks the rule is refused with the rule itself, before anything is sent.
  await page.getByLabel('Name', { exact: true }).fill('MyCompany');
  await page.getByLabel('Base URL').fill(upstreamUrl);
  await page.getByLabel('API token').fill(UPSTREAM_TOKEN);
  await page.getByRole('button', { name: 'Add provider' }).click();
  const nameField = page.locator('.field', { has: page.getByLabel('Name', { exact: true }) });
  await assert.doesNotReject(nameField.locator('.err', { hasText: 'Lowercase letters a–z only' }).waitFor());
  assert.equal(await page.getByLabel('Name', { exact: true }).getAttribute('aria-invalid'), 'true');
  // A /v1 suffix is refused with its hint.
  await page.getByLabel('Name', { exact: true }).fill('mycompany');
  await page.getByLabel('Base URL').fill(`${upstreamUrl}/v1`);
  await page.getByRole('button', { name: 'Add provider' }).click();
  await page.locator('.err', { hasText: 'Leave out the /v1 suffix' }).waitFor();
  await page.getByLabel('Base URL').fill(upstreamUrl);
  // A price for every model; an amount that is not a plain decimal is refused before sending.
  const add = page.locator('section', { has: page.locator('#add-h') });
  await add.getByRole('button', { name: 'Add a price' }).click();
  await add.getByLabel('Model', { exact: true }).fill('*');
  await add.getByLabel('Input USD / 1M tokens').fill('1,50');
  await add.getByLabel('Output USD / 1M tokens').fill('3');
  await page.getByRole('button', { name: 'Add provider' }).click();
  await add.locator('.price-row .err', { hasText: 'A decimal amount in USD' }).waitFor();
  await add.getByLabel('Input USD / 1M tokens').fill('1.50');
  await page.getByRole('button', { name: 'Add provider' }).click();
  const row = page.locator('tr[data-provider="mycompany"]');
  await row.waitFor();
  assert.match(await row.innerText(), /mycompany[\s\S]*https:\/\/127\.0\.0\.1[\s\S]*••••9876[\s\S]*active/);
  assert.ok(!(await page.content()).includes(UPSTREAM_TOKEN), 'the token came back to the page');

  // The server's own refusal (a duplicate name) is shown inline.
  await page.getByLabel('Name', { exact: true }).fill('mycompany');
  await page.getByLabel('Base URL').fill(upstreamUrl);
  await page.getByLabel('API token').fill(UPSTREAM_TOKEN);
  await page.getByRole('button', { name: 'Add provider' }).click();
  await page.locator('form .form-err', { hasText: 'already exists' }).waitFor();

  // Test connection: reachable, latency, model count.
  await row.getByRole('button', { name: 'Test connection' }).click();
  await row.locator('td.test', { hasText: 'Reachable' }).waitFor();
  assert.match(await row.locator('td.test').innerText(), /Reachable · \d+ ms · 2 models \(llama, qwen\)/);
  await shoot(page, 'providers');
  await axeCheck(page, 'providers');

  // Endpoints: the provider's own first; another added with its weight, edited, removed.
  await row.getByRole('button', { name: '1 endpoint of mycompany' }).click();
  const eps = page.locator('section.endpoints');
  await eps.locator('tr[data-endpoint]').first().waitFor();
  const own = eps.locator(`tr[data-endpoint="${upstreamUrl}"]`);
  assert.match(await own.innerText(), /the provider’s own[\s\S]*••••9876[\s\S]*1[\s\S]*unknown/);
  assert.equal(await own.getByRole('button', { name: /^Remove/ }).count(), 0, 'the provider’s own endpoint cannot be removed');
  const second = `${upstreamUrl}/second`;
  const secondToken = 'sk-second-endpoint-5150';
  await eps.getByLabel('Endpoint base URL').fill(`${upstreamUrl}/v1`);
  await eps.getByLabel('Endpoint API token').fill(secondToken);
  await eps.getByLabel('Weight').fill('0');
  await eps.getByRole('button', { name: 'Add endpoint' }).click();
  await eps.locator('.err', { hasText: 'Leave out the /v1 suffix' }).waitFor();
  await eps.locator('.err', { hasText: 'from 1 to 1000' }).waitFor();
  await eps.getByLabel('Endpoint base URL').fill(second);
  await eps.getByLabel('Weight').fill('3');
  await eps.getByRole('button', { name: 'Add endpoint' }).click();
  const added = page.locator(`section.endpoints tr[data-endpoint="${second}"]`);
  await added.waitFor();
  assert.match(await added.innerText(), /••••5150[\s\S]*3[\s\S]*unknown/);
  assert.match(await page.locator('tr[data-provider="mycompany"] td.endpoints').innerText(), /2 endpoints/);
  assert.ok(!(await page.content()).includes(secondToken), 'the endpoint token came back to the page');
  await shoot(page, 'endpoints');
  await axeCheck(page, 'endpoints');
  await added.getByRole('button', { name: `Edit endpoint ${second}` }).click();
  const epEdit = page.locator('section.endpoints .edit-endpoint');
  await epEdit.getByLabel('Base URL').fill(`${upstreamUrl}/third`);
  await epEdit.getByRole('button', { name: 'Save endpoint' }).click();
  await epEdit.locator('.err', { hasText: 'Enter the token again' }).waitFor();
  await epEdit.getByLabel('Base URL').fill(second);
  await epEdit.getByLabel('Weight').fill('5');
  await epEdit.getByRole('button', { name: 'Save endpoint' }).click();
  await page.locator(`section.endpoints tr[data-endpoint="${second}"] td.weight`, { hasText: /^5$/ }).waitFor();
  await page.locator(`section.endpoints tr[data-endpoint="${second}"]`).getByRole('button', { name: `Remove endpoint ${second}` }).click();
  await page.locator(`section.endpoints tr[data-endpoint="${second}"]`).waitFor({ state: 'detached' });
  assert.match(await page.locator('tr[data-provider="mycompany"] td.endpoints').innerText(), /1 endpoint\b/);
  await page.locator('section.endpoints').getByRole('button', { name: 'Close' }).click();

  // Editing the base URL asks for the token again; disable and enable flip the status.
  await row.getByRole('button', { name: 'Edit' }).click();
  const edit = page.locator('section.edit');
  assert.equal(await edit.getByLabel('Model', { exact: true }).inputValue(), '*');
  assert.match(await edit.getByLabel('Input USD / 1M tokens').inputValue(), /^1\.50?$/);
  assert.equal(await edit.getByLabel('Output USD / 1M tokens').inputValue(), '3');
  await edit.getByLabel('Base URL').fill(`${upstreamUrl}/other`);
  await edit.getByRole('button', { name: 'Save changes' }).click();
  await edit.locator('.err', { hasText: 'Enter the token again' }).waitFor();
  await axeCheck(page, 'provider edit');
  await edit.getByRole('button', { name: 'Cancel' }).click();
  // Static headers: a reserved name is refused by the server, named under the field; values never come back.
  await row.getByRole('button', { name: 'Edit' }).click();
  await edit.getByLabel('Static headers (optional)').fill('Authorization: Bearer sk-header-attempt');
  await edit.getByRole('button', { name: 'Save changes' }).click();
  await edit.locator('.err', { hasText: 'Authorization cannot be a static header' }).waitFor();
  await edit.getByLabel('Static headers (optional)').fill('X-Tenant: acme-header-value-31');
  await edit.getByLabel('Total (ms)').fill('60000');
  await edit.getByRole('button', { name: 'Save changes' }).click();
  await edit.waitFor({ state: 'detached' });
  await page.locator('tr[data-provider="mycompany"]').getByRole('button', { name: 'Edit' }).click();
  assert.match(await edit.locator('.field', { has: page.getByLabel('Static headers (optional)') }).innerText(), /Now: X-Tenant \(values are never shown\)/);
  assert.equal(await edit.getByLabel('Total (ms)').inputValue(), '60000');
  assert.ok(!(await page.content()).includes('acme-header-value-31'), 'a header value came back to the page');
  await edit.getByRole('button', { name: 'Cancel' }).click();
  await row.getByRole('button', { name: 'Disable' }).click();
  await page.locator('tr[data-provider="mycompany"] .badge', { hasText: 'inactive' }).waitFor();
  await page.locator('tr[data-provider="mycompany"]').getByRole('button', { name: 'Enable' }).click();
  await page.locator('tr[data-provider="mycompany"] .badge', { hasText: /^active$/ }).waitFor();

  // An API key is shown once.
  timings.keys = await open(page, '/keys', 'API keys');
  await page.getByLabel('Name', { exact: true }).fill('backend');
  await page.getByRole('button', { name: 'Create key' }).click();
  const keyBox = page.locator('#new-key');
  await keyBox.waitFor();
  const key = await keyBox.inputValue();
  assert.match(key, /^llmgw_/);
  assert.ok(await page.getByText('shown only once').isVisible());
  await shoot(page, 'keys');
  await axeCheck(page, 'api keys');
  await page.reload();
  await page.locator('tr[data-key="backend"]').waitFor();
  assert.equal(await page.locator('#new-key').count(), 0);
  assert.ok(!(await page.content()).includes(key), 'the key was shown again');

  // The docs' second step: a request through the gateway with that key.
  const res = await chat(key);
  assert.equal(res.status, 200, await res.clone().text());
  assert.equal((await res.json()).choices[0].message.content, 'hi');

  // Usage: the chart and the logs show the request.
  timings.usage = await open(page, '/usage', 'Usage');
  await waitFor(async () => {
    await page.getByRole('button', { name: 'Apply' }).click();
    await page.waitForFunction(() => !!document.querySelector('.summary') || !!document.querySelector('.charts .form-err'));
    return (await page.locator('.summary').innerText()).startsWith('1 requests');
  }, 'the usage chart to count the request');
  assert.equal(await page.locator('svg.c-req rect.bar[data-value="1"]').count(), 1);
  assert.equal(await page.locator('svg.c-tok rect.bar[data-value="7"]').count(), 1);
  // 5 prompt tokens at $1.50 and 2 completion tokens at $3 per million: $0.0000135, exactly.
  const costBars = page.locator('svg.c-cost rect.bar:not([data-value="0"])');
  assert.equal(await costBars.count(), 1);
  assert.match(await costBars.getAttribute('data-value'), /^0\.00001350*$/);
  assert.match(await page.locator('.summary').innerText(), /cost \$0\.00001350*[^\d]/);
  assert.match(await page.locator('figure.chart-box', { hasText: 'Cost per day' }).locator('table.sr td').innerText(), /^\$0\.00001350*$/);
  const logRow = page.locator('section', { has: page.locator('#logs-h') }).locator('tbody tr').first();
  assert.match(await logRow.innerText(), /mycompany\/llama[\s\S]*mycompany[\s\S]*backend[\s\S]*200[\s\S]*7/);
  // The row's own cost, as priced when the gateway logged it.
  assert.match(await logRow.locator('td[data-label="Cost"]').innerText(), /^\$0\.0000135$/);
  assert.match(await page.locator('section', { has: page.locator('#audit-h') }).innerText(), /provider_key|api_key/);
  await shoot(page, 'usage');
  await axeCheck(page, 'usage');

  timings.quickstart = await open(page, '/quickstart', 'Quick start');
  const snippet = await page.locator('main pre').first().innerText();
  assert.ok(snippet.includes(`curl ${gateway}/v1/chat/completions`) && snippet.includes('mycompany/'), snippet);
  assert.ok((await page.locator('main pre').nth(1).innerText()).includes(`base_url="${gateway}/v1"`));
  await shoot(page, 'quickstart');
  await axeCheck(page, 'quick start');

  // Revoke the key; the gateway refuses it (within the cache's second).
  await open(page, '/keys', 'API keys');
  await page.locator('tr[data-key="backend"]').getByRole('button', { name: 'Revoke' }).click();
  await page.locator('tr[data-key="backend"]', { hasText: 'revoked' }).waitFor();
  await waitFor(async () => (await chat(key)).status === 401, 'the gateway to refuse the revoked key', 5000);

  timings.org = await open(page, '/org', 'Organization');
  await page.getByLabel('Name', { exact: true }).fill('Acme Inc');
  await page.getByRole('button', { name: 'Rename' }).click();
  await page.waitForFunction(() => document.querySelector('#org-switch').textContent.includes('Acme Inc'));
  await shoot(page, 'org');
  await axeCheck(page, 'organization');
  timings.providers = await open(page, '/providers', 'Providers');
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

async function signIn(page, email) {
  await page.goto(api + '/#/signin');
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill(PASSWORD);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('main h1', { hasText: 'Quick start' }).waitFor();
  // Its data too: a page still loading would finish on top of the next one.
  await page.waitForFunction(() => document.body.dataset.page === '/quickstart' && !document.body.dataset.busy);
}

test('an admin sets the limits and allowed models of a key and an owner the organization\'s; they are there after a reload', async () => {
  const page = await newPage();
  await signIn(page, OWNER);

  // Organization limits (owners only).
  await open(page, '/org', 'Organization');
  const orgLimits = page.locator('section', { has: page.locator('#olim-h') });
  await orgLimits.getByLabel('Requests per minute').fill('1000');
  await orgLimits.getByLabel('Budget per month, USD').fill('5.5.0');
  await orgLimits.getByRole('button', { name: 'Save organization limits' }).click();
  await orgLimits.locator('.err', { hasText: 'A decimal amount in USD' }).waitFor();
  await orgLimits.getByLabel('Budget per month, USD').fill('');
  // A soft threshold is a percentage from 1 to 100.
  await orgLimits.getByLabel('Warn at, % of each limit').fill('150');
  await orgLimits.getByRole('button', { name: 'Save organization limits' }).click();
  await orgLimits.locator('.err', { hasText: 'A whole percentage from 1 to 100' }).waitFor();
  await orgLimits.getByLabel('Warn at, % of each limit').fill('80');
  await orgLimits.getByRole('button', { name: 'Save organization limits' }).click();
  await page.locator('#toast', { hasText: 'Organization limits saved' }).waitFor();
  await shoot(page, 'org-limits');
  await axeCheck(page, 'organization limits');
  await page.reload();
  await page.waitForFunction(() => document.body.dataset.page === '/org');
  const reloaded = page.locator('section', { has: page.locator('#olim-h') });
  assert.equal(await reloaded.getByLabel('Requests per minute').inputValue(), '1000');
  assert.equal(await reloaded.getByLabel('Warn at, % of each limit').inputValue(), '80');

  // A key created with one limit, then edited in the dialog.
  await open(page, '/keys', 'API keys');
  const create = page.locator('section', { has: page.locator('#newkey-h') });
  await create.getByLabel('Name', { exact: true }).fill('scoped');
  await create.getByLabel('Requests per minute').fill('120');
  await create.getByLabel('Warn at, % of each limit').fill('90');
  await create.getByRole('button', { name: 'Create key' }).click();
  await page.locator('#new-key').waitFor();
  // Two calls through the gateway count against the key's limit.
  const scopedKey = await page.locator('#new-key').inputValue();
  for (let i = 0; i < 2; i++) assert.equal((await chat(scopedKey)).status, 200);
  const row = page.locator('tr[data-key="scoped"]');
  assert.match(await row.locator('td.limits').innerText(), /120 req\/min · warn at 90 %[\s\S]*Models: all models/);
  await row.getByRole('button', { name: 'Edit limits' }).click();
  const dlg = page.locator('dialog[open]');
  const own = dlg.locator('tr[data-limit="api_key.requests_per_minute"]');
  await own.waitFor();
  // Max, used (of max), remaining, the soft threshold (90 % of 120), resets.
  if (redis) {
    assert.match(await own.innerText(), /Requests per minute[\s\S]*this key[\s\S]*120[\s\S]*2 of 120[\s\S]*118[\s\S]*108[\s\S]*—/);
    const meter = own.locator('meter');
    assert.deepEqual([await meter.getAttribute('value'), await meter.getAttribute('max'), await meter.getAttribute('high')], ['2', '120', '108']);
  } else {
    assert.match(await own.innerText(), /Requests per minute[\s\S]*this key[\s\S]*120[\s\S]*—[\s\S]*—[\s\S]*108/);
  }
  assert.match(await dlg.locator('tr[data-limit="organization.requests_per_minute"]').innerText(), /organization[\s\S]*1,?000[\s\S]*800/);
  assert.equal(await dlg.getByLabel('Requests per minute').inputValue(), '120');
  assert.equal(await dlg.getByLabel('Warn at, % of each limit').inputValue(), '90');
  await dlg.getByLabel('Warn at, % of each limit').fill('75');
  await dlg.getByLabel('Budget per month, USD').fill('25.50');
  await dlg.getByLabel('Tokens per day (UTC)').fill('100000');
  // The server's refusal of a pattern is shown at the field.
  await dlg.getByLabel('Allowed models').fill('MyCompany/*');
  await dlg.getByRole('button', { name: 'Save limits' }).click();
  const models = dlg.locator('.field', { has: page.getByLabel('Allowed models') });
  await models.locator('.err', { hasText: 'patterns like' }).waitFor();
  assert.equal(await dlg.getByLabel('Allowed models').getAttribute('aria-invalid'), 'true');
  await dlg.getByLabel('Allowed models').fill('mycompany/*\n*/qwen');
  await shoot(page, 'key-limits-dialog', { laptop: 1150, phone: 2000 });
  await axeCheck(page, 'key limits dialog');
  await dlg.getByRole('button', { name: 'Save limits' }).click();
  await page.locator('dialog').waitFor({ state: 'detached' });

  await page.reload();
  await page.locator('tr[data-key="scoped"]').waitFor();
  const cell = await page.locator('tr[data-key="scoped"] td.limits').innerText();
  assert.match(cell, /120 req\/min · 100,?000 tokens\/day · \$25\.50?\/month · warn at 75 %/);
  assert.match(cell, /Models: mycompany\/\*, \*\/qwen/);
  await page.locator('tr[data-key="scoped"]').getByRole('button', { name: 'Edit limits' }).click();
  await dlg.locator('tr[data-limit="api_key.tokens_per_day"]').waitFor();
  // Counted from when the limit was set: nothing yet. Warn at 75 % of it.
  const day = await dlg.locator('tr[data-limit="api_key.tokens_per_day"]').innerText();
  assert.match(day, redis ? /100,?000[\s\S]*0 of 100,?000[\s\S]*100,?000[\s\S]*75,?000[\s\S]*\d/ : /100,?000[\s\S]*—[\s\S]*—[\s\S]*75,?000[\s\S]*\d/);
  assert.match(await dlg.locator('tr[data-limit="api_key.budget_per_month_usd"]').innerText(), /\$25\.50[\s\S]*\$19\.125/);
  assert.equal(await dlg.getByLabel('Warn at, % of each limit').inputValue(), '75');
  assert.equal(await dlg.getByLabel('Allowed models').inputValue(), 'mycompany/*\n*/qwen');
  assert.equal(await dlg.getByLabel('Tokens per day (UTC)').inputValue(), '100000');
  // Escape closes the dialog.
  await page.keyboard.press('Escape');
  await page.locator('dialog').waitFor({ state: 'detached' });
  await shoot(page, 'keys-limits');
  await axeCheck(page, 'api keys with limits');
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('a member sees no create or delete controls, and the API refuses them anyway', async () => {
  // The member has an account; the owner invites them in the UI.
  const signup = await fetch(`${api}/api/v1/auth/signup`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ email: MEMBER, password: PASSWORD }) });
  assert.equal(signup.status, 201);
  const memberToken = (await signup.json()).token;

  const owner = await newPage();
  await owner.goto(api + '/#/signin');
  await owner.getByLabel('Email').fill(OWNER);
  await owner.getByLabel('Password').fill(PASSWORD);
  await owner.getByRole('button', { name: 'Sign in' }).click();
  await owner.locator('main h1', { hasText: 'Quick start' }).waitFor();
  timings.members = await open(owner, '/members', 'Members');
  await owner.getByLabel('Email').fill(MEMBER);
  await owner.getByLabel('Role', { exact: true }).selectOption('member');
  await owner.getByRole('button', { name: 'Send invitation' }).click();
  // The owner gets a one-time invitation token to pass on.
  await owner.locator('#invite-token').waitFor();
  const inviteToken = await owner.locator('#invite-token').inputValue();
  assert.match(inviteToken, /^llmgwi_/);
  await shoot(owner, 'members');
  await axeCheck(owner, 'members');

  const member = await newPage(VIEWPORTS.phone);
  await member.goto(api + '/');
  await member.getByLabel('Email').fill(MEMBER);
  await member.getByLabel('Password').fill(PASSWORD);
  await member.getByRole('button', { name: 'Sign in' }).click();
  await member.locator('main h1', { hasText: 'Organization' }).waitFor();
  await open(member, '/invitations', 'My invitations');
  await member.getByLabel('Invitation token').fill(inviteToken);
  await member.getByRole('button', { name: 'Accept' }).click();
  await member.locator('main h1', { hasText: 'Quick start' }).waitFor();
  await member.setViewportSize(VIEWPORTS.laptop);
  await open(member, '/invitations', 'My invitations');
  await shoot(member, 'invitations');
  await axeCheck(member, 'my invitations');
  await open(member, '/providers', 'Providers');
  await member.locator('tr[data-provider="mycompany"]').waitFor();
  for (const name of ['Add provider', 'Delete', 'Edit', 'Disable', 'Test connection']) {
    assert.equal(await member.getByRole('button', { name }).count(), 0, `member sees ${name}`);
  }
  await open(member, '/keys', 'API keys');
  assert.equal(await member.getByRole('button', { name: 'Create key' }).count(), 0);
  assert.equal(await member.getByRole('button', { name: 'Revoke' }).count(), 0);
  assert.equal(await member.getByRole('button', { name: 'Edit limits' }).count(), 0);
  // A member may look at a key's limits, without a way to change them.
  await member.locator('tr[data-key="scoped"]').getByRole('button', { name: 'View limits' }).click();
  const view = member.locator('dialog[open]');
  await view.locator('tr[data-limit="api_key.tokens_per_day"]').waitFor();
  assert.equal(await view.getByRole('textbox').count(), 0);
  assert.equal(await view.getByRole('button', { name: 'Save limits' }).count(), 0);
  await axeCheck(member, 'member key limits');
  await view.getByRole('button', { name: 'Close' }).click();
  await member.locator('dialog').waitFor({ state: 'detached' });
  await open(member, '/org', 'Organization');
  assert.equal(await member.getByRole('button', { name: 'Save organization limits' }).count(), 0);
  assert.match(await member.locator('.org-limits').innerText(), /1,?000 req\/min/);
  await open(member, '/members', 'Members');
  assert.equal(await member.getByRole('button', { name: 'Send invitation' }).count(), 0);
  assert.equal(await member.getByRole('button', { name: 'Remove' }).count(), 0);
  await shoot(member, 'member-members');

  // The API refuses the member too, and a cross-site POST with the member's cookie is refused.
  const orgs = await (await fetch(`${api}/api/v1/orgs`, { headers: { authorization: `Bearer ${memberToken}` } })).json();
  const orgId = orgs.data[0].id;
  const forbidden = await fetch(`${api}/api/v1/orgs/${orgId}/provider-keys`, {
    method: 'POST', headers: { authorization: `Bearer ${memberToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ name: 'sneaky', base_url: 'https://example.com', token: 'x' }),
  });
  assert.equal(forbidden.status, 403);
  const cookie = (await member.context().cookies()).find((c) => c.name === 'llmgw_session');
  const forged = await fetch(`${api}/api/v1/orgs`, {
    method: 'POST', headers: { cookie: `llmgw_session=${cookie.value}`, origin: 'https://evil.example', 'content-type': 'application/json' },
    body: JSON.stringify({ name: 'Forged' }),
  });
  assert.equal(forged.status, 403);
  assert.equal((await forged.json()).error.code, 'csrf_failed');
  assert.deepEqual(member.errors, []);
  await owner.context().close();
  await member.context().close();
});

test('the first page is small and each page renders within 300 ms', async () => {
  let total = 0;
  for (const p of ['/', '/ui/app.js', '/ui/app.css']) {
    const body = Buffer.from(await (await fetch(api + p)).arrayBuffer());
    total += zlib.gzipSync(body, { level: 9 }).length;
  }
  console.log(`first page scripts+styles+html, gzip: ${(total / 1024).toFixed(1)} KiB; render ms: ${JSON.stringify(Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, Math.round(v)])))}; screenshots: ${SHOTS}`);
  assert.ok(total <= 150 * 1024, `${total} bytes compressed`);
  for (const [name, ms] of Object.entries(timings)) assert.ok(ms < 300, `${name} took ${ms} ms`);
});
