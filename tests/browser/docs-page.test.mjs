// The /docs page in a real browser: headless Chromium from Debian's
// `chromium` package, driven by playwright-core, against the real linkid
// binary on a real port.
//
// Run with tests/browser/run.sh (installs Chromium and playwright-core), or,
// once installed: node --test tests/browser/
//
// Environment:
//   LINKID_BIN          the linkid binary (default: target/debug/linkid)
//   CHROMIUM_BIN        the browser (default: /usr/bin/chromium)
//   LINKID_SCREENSHOT   if set, a PNG of the page after the 200 is written there

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const linkidBin = path.resolve(repoRoot, process.env.LINKID_BIN || 'target/debug/linkid');
const chromiumBin = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const API_PREFIX = '/api/admin/users/v4';

// What Swagger UI shows for each operation: method, path and summary, from
// the OpenAPI document the server generates.
const OPERATIONS = [
  {
    id: 'listIdentityProviders',
    method: 'GET',
    path: `${API_PREFIX}/users/identity-providers`,
    summary: 'List linkable identity providers.',
  },
  {
    id: 'listLinkedIdentities',
    method: 'GET',
    path: `${API_PREFIX}/users/{user_id}/linked-identities`,
    summary: 'List linked identities for user.',
  },
  {
    id: 'linkIdentity',
    method: 'POST',
    path: `${API_PREFIX}/users/{user_id}/linked-identities`,
    summary: 'Link identity to user.',
  },
  {
    id: 'getLinkedIdentity',
    method: 'GET',
    path: `${API_PREFIX}/users/{user_id}/linked-identities/{provider_id}`,
    summary: 'Get linked identity.',
  },
  {
    id: 'deleteLinkedIdentity',
    method: 'DELETE',
    path: `${API_PREFIX}/users/{user_id}/linked-identities/{provider_id}`,
    summary: 'Delete linked identity.',
  },
  {
    id: 'searchLinkedIdentities',
    method: 'GET',
    path: `${API_PREFIX}/linked-identities`,
    summary: 'Search linked identities.',
  },
  {
    id: 'listEvents',
    method: 'GET',
    path: `${API_PREFIX}/linked-identities/events`,
    summary: 'List changes (the change feed).',
  },
];

// The built-in defaults' identity providers: the linkable ones are listed,
// the one with linkable = false is not.
const LINKABLE = ['azure-ad', 'okta', 'corporate-saml'];
const NOT_LINKABLE = ['legacy-ldap-bridge'];

const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);

/** The environment for linkid: ours, without any LINKID_* from the caller. */
function linkidEnv(extra) {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('LINKID_') && key !== 'RUST_LOG') env[key] = value;
  }
  return { ...env, NO_COLOR: '1', ...extra };
}

/**
 * Starts `linkid serve` on 127.0.0.1 port 0 in `workDir` and resolves with
 * the address it logged (`listening ... addr=127.0.0.1:PORT`).
 */
function startServer(workDir, log) {
  const child = spawn(linkidBin, ['serve'], {
    cwd: workDir,
    env: linkidEnv({ LINKID_SERVER__ADDR: '127.0.0.1:0' }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`linkid did not log its address within 30 s:\n${log.join('')}`)),
      30_000,
    );
    let buffer = '';
    const onData = (chunk) => {
      const text = chunk.toString();
      log.push(text);
      buffer += text;
      const match = buffer.match(/listening.*\baddr=(127\.0\.0\.1:\d+)/);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    };
    child.stdout.on('data', (chunk) => log.push(chunk.toString()));
    child.stderr.on('data', onData);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${linkidBin}: ${error.message} (build it with cargo build)`));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`linkid exited early (code ${code}, signal ${signal}):\n${log.join('')}`));
    });
  });
  return { child, ready };
}

/**
 * Starts `linkid dev --print-token ARGS` on 127.0.0.1 port 0 in `workDir`,
 * its temporary directory under `tmpDir`, and resolves with what it printed
 * on stdout: the API's base URL, the admin token and the data directory.
 */
function startDev(workDir, tmpDir, args, log) {
  const child = spawn(linkidBin, ['dev', '--print-token', ...args], {
    cwd: workDir,
    env: linkidEnv({ LINKID_SERVER__ADDR: '127.0.0.1:0', TMPDIR: tmpDir }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`linkid dev did not print its token within 30 s:\n${log.join('')}`)),
      30_000,
    );
    let stdout = '';
    child.stdout.on('data', (chunk) => {
      stdout += chunk.toString();
      const api = stdout.match(/^API=(\S+)$/m);
      const token = stdout.match(/^TOKEN=(\S+)$/m);
      const data = stdout.match(/^data: (\S+) \(/m);
      if (api && token && data) {
        clearTimeout(timer);
        resolve({ api: api[1], token: token[1], data: data[1], stdout });
      }
    });
    child.stderr.on('data', (chunk) => log.push(chunk.toString()));
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${linkidBin}: ${error.message} (build it with cargo build)`));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`linkid dev exited early (code ${code}, signal ${signal}):\n${stdout}${log.join('')}`));
    });
  });
  return { child, ready };
}

/** SIGTERM, then SIGKILL if it has not exited after 10 s. */
async function stopServer(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

/** Whether a URL the page requested stays on this machine. */
function isLocal(url) {
  const parsed = new URL(url);
  if (['data:', 'blob:', 'about:'].includes(parsed.protocol)) return true;
  if (!['http:', 'https:', 'ws:', 'wss:'].includes(parsed.protocol)) return false;
  return LOOPBACK_HOSTS.has(parsed.hostname);
}

describe('the /docs page in headless Chromium', { timeout: 120_000 }, () => {
  let workDir;
  let server;
  const serverLog = [];
  let baseUrl;
  let token;
  let browser;
  let context;
  let page;
  const requests = [];
  const pageErrors = [];

  // Make sure the server never outlives this process, whatever happens.
  const killOnExit = () => server?.child.kill('SIGKILL');
  process.on('exit', killOnExit);

  before(async () => {
    assert.ok(fs.existsSync(linkidBin), `${linkidBin} does not exist: run cargo build (or set LINKID_BIN)`);
    assert.ok(fs.existsSync(chromiumBin), `${chromiumBin} does not exist: apt-get install chromium`);

    workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'linkid-browser-'));
    server = startServer(workDir, serverLog);
    const addr = await server.ready;
    baseUrl = `http://${addr}`;

    // The same working directory, so the same ./data/root.key as the server.
    token = execFileSync(linkidBin, ['token', 'mint', '--admin'], {
      cwd: workDir,
      env: linkidEnv({}),
      encoding: 'utf8',
      timeout: 30_000,
    }).trim();
    assert.match(token, /^[A-Za-z0-9_=-]+$/, 'token mint prints only the token');

    browser = await chromium.launch({
      executablePath: chromiumBin,
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 60_000,
    });
    // A new context is a fresh profile: no stored authorization, no cache.
    context = await browser.newContext({ viewport: { width: 1280, height: 1600 } });
    context.setDefaultTimeout(20_000);
    context.on('request', (request) => requests.push(request.url()));
    page = await context.newPage();
    page.on('pageerror', (error) => pageErrors.push(String(error)));
  });

  after(async () => {
    process.off('exit', killOnExit);
    await browser?.close().catch(() => {});
    await stopServer(server?.child);
    if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
  });

  it('shows every operation', async () => {
    const response = await page.goto(`${baseUrl}/docs/`);
    assert.equal(response.status(), 200);
    await page.locator('.swagger-ui .info .title').waitFor();
    assert.match(await page.locator('.swagger-ui .info .title').innerText(), /linkid/);

    for (const op of OPERATIONS) {
      // Swagger UI gives each operation block the id operations-<tag>-<operationId>.
      const block = page.locator(`.opblock[id$="-${op.id}"]`);
      await block.waitFor({ state: 'visible' });
      const summary = block.locator('.opblock-summary');
      assert.equal(
        (await summary.locator('.opblock-summary-method').innerText()).trim(),
        op.method,
        `${op.id}: method`,
      );
      const shownPath = (await summary.locator('.opblock-summary-path').innerText())
        .replace(/\u200b/g, '') // Swagger UI puts zero-width spaces after slashes
        .trim();
      assert.equal(shownPath, op.path, `${op.id}: path`);
      assert.equal(
        (await summary.locator('.opblock-summary-description').innerText()).trim(),
        op.summary,
        `${op.id}: summary`,
      );
    }
    // Every operation of the served document, and nothing else.
    const documented = await (await fetch(`${baseUrl}/openapi.json`)).json();
    const operations = Object.values(documented.paths).flatMap((item) => Object.keys(item));
    assert.equal(operations.length, OPERATIONS.length, 'the page lists the operations the document has');
    assert.equal(await page.locator('.opblock').count(), OPERATIONS.length, 'exactly these operations');
  });

  it('authorizes with a bearer token and lists the identity providers: 200', async () => {
    // Authorize: the modal takes the bearer token for the `bearer` scheme.
    await page.locator('.swagger-ui .auth-wrapper button.authorize').click();
    const modal = page.locator('.swagger-ui .dialog-ux .modal-ux');
    await modal.waitFor({ state: 'visible' });
    await modal.locator('input').first().fill(token);
    await modal.locator('.auth-btn-wrapper button.authorize').click();
    // Authorized: the modal now offers Logout instead of Authorize.
    await modal.locator('.auth-btn-wrapper button', { hasText: 'Logout' }).waitFor();
    await modal.locator('.auth-btn-wrapper button.btn-done', { hasText: 'Close' }).click();
    await modal.waitFor({ state: 'detached' });

    // Open "List linkable identity providers." and run it.
    const block = page.locator('.opblock[id$="-listIdentityProviders"]');
    await block.locator('.opblock-summary').first().click();
    const tryItOut = block.locator('button.try-out__btn', { hasText: 'Try it out' });
    if (await tryItOut.isVisible()) await tryItOut.click();

    const apiUrl = `${baseUrl}${API_PREFIX}/users/identity-providers`;
    const [apiResponse] = await Promise.all([
      page.waitForResponse((r) => r.url() === apiUrl && r.request().method() === 'GET'),
      block.locator('button.execute').click(),
    ]);
    assert.equal(apiResponse.status(), 200, 'the API answered 200');
    assert.equal(
      apiResponse.request().headers().authorization,
      `Bearer ${token}`,
      'the page sent the token it was given',
    );

    // What the page shows: the live response with status 200 and the list.
    const live = block.locator('.live-responses-table .response');
    await live.first().waitFor({ state: 'visible' });
    assert.equal((await live.locator('.response-col_status').first().innerText()).trim(), '200');
    const bodyText = await live.locator('.response-col_description pre').first().innerText();
    const body = JSON.parse(bodyText);
    assert.deepEqual(
      body.identity_providers.map((p) => p.provider_id).sort(),
      [...LINKABLE].sort(),
      'the page shows the linkable providers',
    );
    for (const hidden of NOT_LINKABLE) assert.ok(!bodyText.includes(hidden), `${hidden} is not linkable`);
    for (const provider of body.identity_providers) {
      assert.deepEqual(Object.keys(provider).sort(), ['display_name', 'protocol', 'provider_id']);
    }

    if (process.env.LINKID_SCREENSHOT) {
      await page.screenshot({ path: process.env.LINKID_SCREENSHOT, fullPage: true });
    }
  });

  it('made no request to a non-loopback host and raised no script error', () => {
    assert.ok(requests.length > 0, 'requests were observed');
    assert.ok(
      requests.some((url) => url.endsWith('/openapi.json')),
      `the page fetched /openapi.json; saw ${requests.join(', ')}`,
    );
    const external = requests.filter((url) => !isLocal(url));
    assert.deepEqual(external, [], 'requests that left the machine');
    assert.deepEqual(pageErrors, [], 'uncaught errors on the page');
  });
});

describe('linkid dev on the /docs page', { timeout: 120_000 }, () => {
  let workDir;
  let tmpDir;
  let dev;
  let started;
  const devLog = [];
  let browser;
  let page;
  const requests = [];
  const pageErrors = [];

  const killOnExit = () => dev?.child.kill('SIGKILL');
  process.on('exit', killOnExit);

  before(async () => {
    assert.ok(fs.existsSync(linkidBin), `${linkidBin} does not exist: run cargo build (or set LINKID_BIN)`);
    assert.ok(fs.existsSync(chromiumBin), `${chromiumBin} does not exist: apt-get install chromium`);

    workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'linkid-browser-dev-'));
    tmpDir = path.join(workDir, 'tmp');
    fs.mkdirSync(tmpDir);
    // One link, in the format `linkid export` writes, loaded at start.
    fs.writeFileSync(
      path.join(workDir, 'links.jsonl'),
      `${JSON.stringify({
        user_id: 'u-42',
        provider_id: 'okta',
        linked_user_id: '00u1a2b3c4',
        linked_username: 'ada@example.com',
        created_at: '2026-01-02T03:04:05Z',
        updated_at: '2026-01-02T03:04:05Z',
      })}\n`,
    );
    dev = startDev(workDir, tmpDir, ['--fixtures', 'links.jsonl'], devLog);
    started = await dev.ready;
    assert.match(started.token, /^[A-Za-z0-9_=-]+$/, 'the printed token is one base64 word');

    browser = await chromium.launch({
      executablePath: chromiumBin,
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 60_000,
    });
    const context = await browser.newContext({ viewport: { width: 1280, height: 1600 } });
    context.setDefaultTimeout(20_000);
    context.on('request', (request) => requests.push(request.url()));
    page = await context.newPage();
    page.on('pageerror', (error) => pageErrors.push(String(error)));
  });

  after(async () => {
    process.off('exit', killOnExit);
    await browser?.close().catch(() => {});
    await stopServer(dev?.child);
    if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
  });

  it("shows `linkid dev`'s token working on /docs (authorize, try list)", async () => {
    const baseUrl = new URL(started.api).origin;
    const response = await page.goto(`${baseUrl}/docs/`);
    assert.equal(response.status(), 200);

    await page.locator('.swagger-ui .auth-wrapper button.authorize').click();
    const modal = page.locator('.swagger-ui .dialog-ux .modal-ux');
    await modal.waitFor({ state: 'visible' });
    await modal.locator('input').first().fill(started.token);
    await modal.locator('.auth-btn-wrapper button.authorize').click();
    await modal.locator('.auth-btn-wrapper button', { hasText: 'Logout' }).waitFor();
    await modal.locator('.auth-btn-wrapper button.btn-done', { hasText: 'Close' }).click();
    await modal.waitFor({ state: 'detached' });

    // "List linked identities for user." for the user the fixtures linked.
    const block = page.locator('.opblock[id$="-listLinkedIdentities"]');
    await block.locator('.opblock-summary').first().click();
    const tryItOut = block.locator('button.try-out__btn', { hasText: 'Try it out' });
    if (await tryItOut.isVisible()) await tryItOut.click();
    await block.locator('tr[data-param-name="user_id"] input').fill('u-42');

    const apiUrl = `${started.api}/users/u-42/linked-identities`;
    const [apiResponse] = await Promise.all([
      page.waitForResponse((r) => r.url() === apiUrl && r.request().method() === 'GET'),
      block.locator('button.execute').click(),
    ]);
    assert.equal(apiResponse.status(), 200, 'the API answered 200');
    assert.equal(apiResponse.request().headers().authorization, `Bearer ${started.token}`);

    const live = block.locator('.live-responses-table .response');
    await live.first().waitFor({ state: 'visible' });
    assert.equal((await live.locator('.response-col_status').first().innerText()).trim(), '200');
    const body = JSON.parse(await live.locator('.response-col_description pre').first().innerText());
    assert.deepEqual(
      body.linked_identities.map((l) => [l.provider_id, l.linked_user_id]),
      [['okta', '00u1a2b3c4']],
      'the page shows the link the fixtures loaded',
    );
    assert.deepEqual(requests.filter((url) => !isLocal(url)), [], 'requests that left the machine');
    assert.deepEqual(pageErrors, [], 'uncaught errors on the page');
  });

  it('stops on Ctrl-C, exits 0 and removes its temporary data, never logging the token', async () => {
    assert.ok(started.data.startsWith(tmpDir), `${started.data} is under TMPDIR`);
    assert.ok(fs.existsSync(started.data), 'the data exists while it runs');
    const exited = new Promise((resolve) => dev.child.once('exit', (code, signal) => resolve({ code, signal })));
    dev.child.kill('SIGINT');
    const { code, signal } = await exited;
    assert.equal(code, 0, `exit code (signal ${signal}):\n${devLog.join('')}`);
    assert.ok(!fs.existsSync(started.data), 'the temporary data is removed');
    assert.ok(!devLog.join('').includes(started.token), 'the token is not in the log');
  });
});
