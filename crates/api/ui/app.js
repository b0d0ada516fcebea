// llmgw admin UI: a small client of the settings API (/api/v1), no build step.
// Every value from the server is put in the page as text (never as HTML), and
// the session lives in the HttpOnly `llmgw_session` cookie, out of this script's reach.
'use strict';

const S = { cfg: null, user: null, orgs: [], org: null, lastTests: {}, openEndpoints: null };
const $ = (sel, root) => (root || document).querySelector(sel);
const ROLES = ['member', 'admin', 'owner'];
const NAME_RULE = 'Lowercase letters a–z only, at most 64 (e.g. mycompany). Not MyCompany, my-company, my_company or 123test.';

// h('tag.class#id', {attrs, on*: handlers}, ...children): builds elements; strings become text nodes.
function h(spec, attrs, ...kids) {
  const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/);
  const el = document.createElement(tag);
  for (const m of rest.matchAll(/([.#])([\w-]+)/g)) {
    if (m[1] === '.') el.classList.add(m[2]); else el.id = m[2];
  }
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) { kids.unshift(attrs); attrs = null; }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `request failed (${status})`);
    this.status = status; this.code = e.code || ''; this.details = e.details || [];
  }
}

// GETs started ahead (while a page waits for another answer), each used once.
const prefetched = new Map();
function prefetch(path) { if (!prefetched.has(path)) prefetched.set(path, api('GET', path).then((v) => ({ v }), (e) => ({ e }))); }

async function api(method, path, body) {
  if (method === 'GET' && prefetched.has(path)) {
    const r = await prefetched.get(path); prefetched.delete(path);
    if (r.e) throw r.e; return r.v;
  }
  const opt = { method, headers: { accept: 'application/json' }, credentials: 'same-origin' };
  if (body !== undefined) { opt.headers['content-type'] = 'application/json'; opt.body = JSON.stringify(body); }
  let res;
  try { res = await fetch('/api/v1' + path, opt); } catch (e) { throw new ApiError(0, { error: { message: 'The server cannot be reached.' } }); }
  let data = null;
  if (res.status !== 204) { try { data = await res.json(); } catch (e) { data = null; } }
  if (!res.ok) {
    const err = new ApiError(res.status, data);
    if (res.status === 401 && S.user && !path.startsWith('/auth/')) { S.user = null; go('/signin'); }
    throw err;
  }
  return data;
}
const orgPath = (p) => `/orgs/${S.org.id}${p}`;
const qs = (o) => { const u = new URLSearchParams(); for (const [k, v] of Object.entries(o)) if (v !== '' && v !== null && v !== undefined) u.set(k, v); const s = u.toString(); return s ? '?' + s : ''; };

function toast(msg) { const t = $('#toast'); t.textContent = msg; t.classList.add('on'); clearTimeout(toast.t); toast.t = setTimeout(() => t.classList.remove('on'), 4000); }
const fmtTime = (t) => (t ? new Date(t).toLocaleString() : '—');
const fmtNum = (n) => (n === null || n === undefined ? '—' : Number(n).toLocaleString());
const canAdmin = () => S.org && (S.org.role === 'admin' || S.org.role === 'owner');
const isOwner = () => S.org && S.org.role === 'owner';

// A labelled input with its hint and error line, tied together for screen readers.
let fieldSeq = 0;
function field(label, attrs, hint) {
  const id = 'f' + (++fieldSeq);
  const tag = attrs.type === 'select' || attrs.type === 'textarea' ? attrs.type : 'input';
  const a = Object.assign({}, attrs, { id, options: null, type: tag === 'input' ? attrs.type : null, 'aria-describedby': `${id}-h ${id}-e` });
  if (tag === 'textarea') a.value = null; // a textarea's value is its text
  const input = h(tag, a, attrs.options || [], tag === 'textarea' ? attrs.value || '' : null);
  const wrap = h('div.field', h('label', { for: id }, label), input, h('small.hint', { id: id + '-h' }, hint || ''), h('small.err', { id: id + '-e', 'aria-live': 'polite' }));
  wrap.input = input;
  wrap.setError = (msg) => { wrap.querySelector('.err').textContent = msg || ''; if (msg) input.setAttribute('aria-invalid', 'true'); else input.removeAttribute('aria-invalid'); };
  input.addEventListener('input', () => { if (input.hasAttribute('aria-invalid')) wrap.setError(''); }); // the message was about the old value
  return wrap;
}
const opt = (value, label, selected) => h('option', { value, selected: !!selected }, label);

// A form whose submit runs `fn`; the server's refusal appears next to the fields it names, or above the button.
// Fields marked `grouped` are placed by the caller (inside a fieldset in `extra`).
function form(fields, submitLabel, fn, extra) {
  const err = h('p.form-err', { role: 'alert' });
  const btn = h('button.primary', { type: 'submit' }, submitLabel);
  const f = h('form', { novalidate: true }, Object.values(fields).filter((x) => !x.grouped), extra || null, err, btn);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    err.textContent = '';
    Object.values(fields).forEach((x) => x.setError(''));
    btn.disabled = true;
    try { await fn(); } catch (e) {
      let named = false;
      for (const d of e.details || []) {
        if (fields[d.field]) { fields[d.field].setError(d.message); named = true; }
      }
      err.textContent = named ? 'The server refused some fields; see the messages above.' : e.message;
      const bad = f.querySelector('[aria-invalid]');
      if (bad) bad.focus();
    } finally { btn.disabled = false; }
  });
  return f;
}
const val = (f) => f.input.value.trim();

function table(headers, rows, caption, empty) {
  // Each cell carries its column's name, shown beside it when the phone layout stacks the rows.
  for (const r of rows) [...r.children].forEach((c, i) => c.setAttribute('data-label', headers[i] || ''));
  return h('div.table-wrap', { role: 'region', 'aria-label': caption, tabindex: '0' },
    h('table', h('caption.sr', caption), h('thead', h('tr', headers.map((x) => h('th', { scope: 'col' }, x)))),
      h('tbody', rows.length ? rows : h('tr', h('td', { colspan: headers.length }, empty || 'Nothing yet.')))));
}

// ---------- routing ----------
const PAGES = {
  '/signin': { title: 'Sign in', render: signIn, public: true },
  '/signup': { title: 'Sign up', render: signUp, public: true },
  '/quickstart': { title: 'Quick start', render: quickStart },
  '/providers': { title: 'Providers', render: providers },
  '/keys': { title: 'API keys', render: apiKeys },
  '/usage': { title: 'Usage', render: usage },
  '/members': { title: 'Members', render: members },
  '/org': { title: 'Organization', render: orgSettings },
  '/invitations': { title: 'My invitations', render: myInvitations, noOrg: true },
};
const NAV = ['/quickstart', '/providers', '/keys', '/usage', '/members', '/org', '/invitations'];
function go(path) { if (location.hash !== '#' + path) location.hash = '#' + path; else render(); }
function currentPath() { const p = location.hash.slice(1); return PAGES[p] ? p : null; }

async function render() {
  if (location.hash && !location.hash.startsWith('#/')) return; // the skip link
  let path = currentPath();
  if (!S.user) { if (!path || !PAGES[path].public) path = '/signin'; } else if (!path || PAGES[path].public) path = S.org ? '/quickstart' : '/org';
  if ('#' + path !== location.hash) { history.replaceState(null, '', '#' + path); }
  const page = PAGES[path];
  if (S.user && !S.org && !page.noOrg && path !== '/org') return go('/org');
  document.title = `${page.title} · llmgw`;
  renderChrome(path);
  // A fresh <main> per render: a page still loading when the next one starts
  // finishes into its own detached element, never on top of the new page.
  const main = $('#main').cloneNode(false);
  $('#main').replaceWith(main);
  const t0 = performance.now();
  document.body.dataset.busy = path;
  main.replaceChildren(h('h1', page.title));
  try { await page.render(main); } catch (e) { main.append(h('p.form-err', { role: 'alert' }, e.message)); }
  if (!main.isConnected) return;
  // For the browser test: which page is on screen and how long it took to render.
  document.body.dataset.page = path;
  document.body.dataset.renderMs = String(Math.round(performance.now() - t0));
  if (document.body.dataset.busy === path) delete document.body.dataset.busy;
  if (render.moved) main.focus(); // after navigation, not on first load
  render.moved = true;
}

function renderChrome(path) {
  const top = $('#top'); const nav = $('#nav');
  const kids = [h('a.brand', { href: '#/quickstart' }, 'llmgw')];
  if (S.user) {
    const sel = h('select#org-switch', { 'aria-label': 'Organization', onchange: (e) => { selectOrg(e.target.value); render(); } },
      S.orgs.map((o) => opt(o.id, `${o.name} (${o.role})`, S.org && o.id === S.org.id)),
      S.orgs.length ? null : opt('', 'No organization'));
    kids.push(h('div.who', sel, h('span.email', S.user.email), h('button.link', { type: 'button', onclick: signOut }, 'Sign out')));
  }
  top.replaceChildren(...kids);
  nav.hidden = !S.user;
  nav.replaceChildren(h('ul', NAV.map((p) => h('li', h('a', { href: '#' + p, 'aria-current': p === path ? 'page' : null }, PAGES[p].title)))));
}

function selectOrg(id) {
  S.org = S.orgs.find((o) => o.id === id) || S.orgs[0] || null;
  if (S.org) localStorage.setItem('llmgw.org', S.org.id);
}
async function loadOrgs() {
  S.orgs = (await api('GET', '/orgs?limit=100')).data;
  selectOrg((S.org && S.org.id) || localStorage.getItem('llmgw.org'));
}

// ---------- sign in / up / out ----------
function authForm(main, signup) {
  const c = S.cfg || {};
  if (c.password_login !== false) {
    const f = {
      email: field('Email', { type: 'email', name: 'email', autocomplete: 'email', required: true }),
      password: field('Password', { type: 'password', name: 'password', autocomplete: signup ? 'new-password' : 'current-password', required: true }, signup ? 'At least 12 characters.' : ''),
    };
    main.append(form(f, signup ? 'Create account' : 'Sign in', async () => {
      const r = await api('POST', signup ? '/auth/signup' : '/auth/login', { email: val(f.email), password: f.password.input.value });
      S.user = r.user; S.org = null;
      await loadOrgs();
      go(S.org ? '/quickstart' : '/org');
    }));
  }
  if (c.sso) main.append(h('p', h('a.button', { href: '/api/v1/auth/oidc/start' }, 'Sign in with SSO')));
  if (signup) main.append(h('p', 'Have an account? ', h('a', { href: '#/signin' }, 'Sign in')));
  else if (c.signup && c.password_login !== false) main.append(h('p', 'New here? ', h('a', { href: '#/signup' }, 'Create an account')));
}
function signIn(main) { authForm(main, false); }
function signUp(main) { if (S.cfg && !S.cfg.signup) { main.append(h('p', 'Sign-up is disabled on this server; ask an administrator for an account.')); return; } authForm(main, true); }
async function signOut() {
  try { await api('POST', '/auth/logout'); } catch (e) { /* the session is gone either way */ }
  S.user = null; S.org = null; S.orgs = [];
  go('/signin');
}

// ---------- organization ----------
function orgSettings(main) {
  if (S.org) {
    const f = { name: field('Name', { name: 'name', value: S.org.name, required: true, readonly: !canAdmin() }) };
    main.append(h('section', { 'aria-labelledby': 'rename-h' }, h('h2#rename-h', `Current: ${S.org.name}`),
      h('p', `Your role: ${S.org.role}.`),
      canAdmin() ? form(f, 'Rename', async () => {
        const o = await api('PATCH', orgPath(''), { name: val(f.name) });
        Object.assign(S.org, { name: o.name }); toast('Organization renamed.'); render();
      }) : null));
    const lim = h('section', { 'aria-labelledby': 'olim-h' }, h('h2#olim-h', 'Organization limits'),
      h('p.hint', 'Shared by all the organization’s keys together, on top of each key’s own limits: the tighter one applies.'));
    if (isOwner()) {
      const lf = {};
      const box = limitsFieldset(lf, S.org.limits, 'Limits for the whole organization');
      lim.append(form(lf, 'Save organization limits', async () => {
        const errs = {}; const limits = readLimits(lf, errs); showRules(lf, errs);
        const o = await api('PATCH', orgPath(''), { limits });
        S.org.limits = o.limits; toast('Organization limits saved.'); render();
      }, box));
    } else lim.append(h('p.org-limits', limitsText(S.org.limits)), h('p.note', 'Owners set these limits.'));
    main.append(lim);
  } else main.append(h('p', 'You are not in any organization yet. Create one, or accept an invitation under ', h('a', { href: '#/invitations' }, 'My invitations'), '.'));
  const f = { name: field('Organization name', { name: 'name', required: true }) };
  main.append(h('section', { 'aria-labelledby': 'create-h' }, h('h2#create-h', 'Create an organization'),
    form(f, 'Create organization', async () => {
      const o = await api('POST', '/orgs', { name: val(f.name) });
      await loadOrgs(); selectOrg(o.id); toast(`Created ${o.name}.`); go('/providers');
    })));
}

// ---------- providers ----------
// The base URL rule of providers and endpoints alike ('' when it holds).
function baseUrlError(url) {
  let u = null;
  try { u = new URL(url); } catch (e) { u = null; }
  const http = S.cfg && S.cfg.allow_http;
  if (!u || !u.host) return 'Enter a full URL, e.g. https://llm.example.com';
  if (u.protocol !== 'https:' && !(http && u.protocol === 'http:')) return http ? 'Use an https:// or http:// URL.' : 'Use an https:// URL (plain http is off on this server).';
  if (u.username || u.password || u.search || u.hash) return 'No user, query string or fragment.';
  if (/\/v1\/?$/.test(u.pathname)) return 'Leave out the /v1 suffix: the gateway appends /v1/chat/completions itself.';
  return '';
}
function providerRules(f, editing) {
  const errs = {};
  const name = val(f.name);
  if (!editing || name) {
    if (!/^[a-z]+$/.test(name) || name.length > 64) errs.name = NAME_RULE;
  }
  const url = val(f.base_url);
  if ((!editing || url) && baseUrlError(url)) errs.base_url = baseUrlError(url);
  if (f.token && !editing && !f.token.input.value.trim()) errs.token = 'The provider’s API token is required.';
  return errs;
}
const BASE_URL_HINT = () => `${S.cfg && S.cfg.allow_http ? 'https:// (or http://, allowed on this server)' : 'https:// only'}; no /v1 at the end — https://api.example.com is called as https://api.example.com/v1/chat/completions.`;
const WEIGHT_HINT = 'From 1 to 1000: the endpoint’s share of the provider’s requests, relative to the others’.';
function weightError(s) { return /^\d+$/.test(s) && Number(s) >= 1 && Number(s) <= 1000 ? '' : 'A whole number from 1 to 1000.'; }

// Static upstream headers, typed one per line as `Name: value`. Values are write-only.
function headersField(current) {
  const now = current && current.length ? ` Now: ${current.join(', ')} (values are never shown); leave empty to keep them, or enter the whole set again to replace them.` : '';
  return field('Static headers (optional)', { type: 'textarea', name: 'headers', rows: '3', spellcheck: 'false', autocomplete: 'off', placeholder: 'X-Tenant: acme' },
    'One per line, Name: value, sent with every request to each of the provider’s endpoints and stored encrypted. Not Authorization (that is the token), Host, hop-by-hop headers, x-request-id or traceparent.' + now);
}
function readHeaders(f, errs) {
  const out = {};
  for (const line of f.headers.input.value.split('\n').map((l) => l.trim()).filter(Boolean)) {
    const i = line.indexOf(':');
    const name = i > 0 ? line.slice(0, i).trim() : '';
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$/.test(name) || !line.slice(i + 1).trim()) { errs.headers = 'Each line is Name: value, the name without spaces.'; continue; }
    if (Object.keys(out).some((k) => k.toLowerCase() === name.toLowerCase())) { errs.headers = `${name} is given twice.`; continue; }
    out[name] = line.slice(i + 1).trim();
  }
  return out;
}
// Per-provider timeouts in milliseconds; empty: the gateway's setting.
const TIMEOUTS = [['connect_ms', 'Connect'], ['first_byte_ms', 'First byte'], ['total_ms', 'Total']];
function timeoutsFieldset(fields, current) {
  const parts = TIMEOUTS.map(([k, label]) => {
    const f = field(`${label} (ms)`, { type: 'number', min: '1', max: '600000', step: '1', inputmode: 'numeric', value: current && current[k] !== null ? current[k] : null });
    f.grouped = true; fields['timeouts.' + k] = f;
    return f;
  });
  return h('fieldset', h('legend', 'Timeouts (optional)'),
    h('p.hint', 'Milliseconds, 1 to 600000; empty uses the gateway’s setting. Connect: TCP and TLS. First byte: until the answer starts. Total: the whole exchange.'),
    h('div.grid', parts));
}
function readTimeouts(fields, errs) {
  const out = {};
  for (const [k] of TIMEOUTS) {
    const s = val(fields['timeouts.' + k]);
    if (!s) { out[k] = null; continue; }
    if (!/^\d+$/.test(s) || Number(s) < 1 || Number(s) > 600000) errs['timeouts.' + k] = 'A whole number of milliseconds from 1 to 600000.';
    else out[k] = Number(s);
  }
  return out;
}
const sameTimeouts = (a, b) => TIMEOUTS.every(([k]) => (a[k] ?? null) === ((b || {})[k] ?? null));
function showRules(f, errs) {
  for (const k of Object.keys(f)) f[k].setError(errs[k] || '');
  const first = Object.keys(errs)[0];
  if (first) { f[first].input.focus(); const e = new Error('Fix the highlighted fields.'); e.details = []; throw e; }
}

async function providers(main) {
  const list = (await api('GET', orgPath('/provider-keys?limit=100'))).data;
  S.lastTests = JSON.parse(sessionStorage.getItem('llmgw.tests') || '{}');
  const rows = list.map((p) => {
    const t = S.lastTests[p.id];
    const testCell = h('td.test', t ? testText(t) : 'Not tested');
    const actions = canAdmin() ? h('div.actions',
      h('button', { type: 'button', onclick: () => testProvider(p, testCell) }, 'Test connection'),
      h('button', { type: 'button', onclick: () => editProvider(main, p) }, 'Edit'),
      h('button', { type: 'button', onclick: async () => { await api('PATCH', orgPath(`/provider-keys/${p.id}`), { status: p.status === 'active' ? 'inactive' : 'active' }); toast(`${p.name} ${p.status === 'active' ? 'disabled' : 'enabled'}.`); render(); } }, p.status === 'active' ? 'Disable' : 'Enable'),
      h('button.danger', { type: 'button', onclick: async () => { if (!confirm(`Delete provider ${p.name}? Requests for ${p.name}/… will fail.`)) return; await api('DELETE', orgPath(`/provider-keys/${p.id}`)); toast(`Deleted ${p.name}.`); render(); } }, 'Delete')) : null;
    const eps = p.endpoints || [];
    const count = `${eps.length} endpoint${eps.length === 1 ? '' : 's'}`;
    const epCell = h('td.endpoints', h('button', { type: 'button', 'aria-label': `${count} of ${p.name}`, onclick: () => showEndpoints(main, p) }, count),
      h('span.hint', ' ' + eps.map((e) => e.health).filter((x, i, a) => a.indexOf(x) === i).join(', ')));
    return h('tr', { 'data-provider': p.name }, h('th', { scope: 'row' }, p.name), h('td.url', p.base_url), h('td', '••••' + p.token_hint),
      epCell, h('td', h('span.badge.' + p.status, p.status)), testCell, canAdmin() ? h('td', actions) : null);
  });
  const headers = ['Name', 'Base URL', 'Token', 'Endpoints', 'Status', 'Last test'].concat(canAdmin() ? ['Actions'] : []);
  main.append(table(headers, rows, 'Providers'));
  const open = list.find((p) => p.id === S.openEndpoints);
  if (open) await showEndpoints(main, open); else S.openEndpoints = null;
  if (!canAdmin()) { main.append(h('p.note', 'Your role (member) can read providers; admins add and change them.')); return; }
  const f = {
    name: field('Name', { name: 'name', autocomplete: 'off', required: true, pattern: '[a-z]+', maxlength: '64', spellcheck: 'false' }, NAME_RULE + ' Clients call models as name/model.'),
    base_url: field('Base URL', { name: 'base_url', type: 'url', required: true, placeholder: 'https://llm.example.com', spellcheck: 'false' }, BASE_URL_HINT()),
    token: field('API token', { name: 'token', type: 'password', autocomplete: 'off', required: true }, 'Write-only: stored encrypted, never shown again (only its last 4 characters).'),
    headers: headersField(null),
  };
  const prices = pricesEditor(f, []);
  const timeouts = timeoutsFieldset(f, null);
  main.append(h('section', { 'aria-labelledby': 'add-h' }, h('h2#add-h', 'Add a provider'),
    form(f, 'Add provider', async () => {
      const errs = providerRules(f, false);
      const list = prices.read(errs);
      const hdrs = readHeaders(f, errs);
      const tos = readTimeouts(f, errs);
      showRules(f, errs);
      const body = { name: val(f.name), base_url: val(f.base_url), token: f.token.input.value.trim() };
      if (list.length) body.prices = list;
      if (Object.keys(hdrs).length) body.headers = hdrs;
      if (!sameTimeouts(tos, {})) body.timeouts = tos;
      const p = await api('POST', orgPath('/provider-keys'), body);
      toast(`Added ${p.name}. More endpoints can be added under its Endpoints.`); render();
    }, [prices, timeouts])));
}

// A provider's endpoints: its own (its base URL and token) first, each with
// its weight and health; admins add, edit and remove them (tokens write-only).
async function showEndpoints(main, p) {
  S.openEndpoints = p.id;
  const list = (await api('GET', orgPath(`/provider-keys/${p.id}/endpoints`))).data;
  const done = (msg) => { toast(msg); render(); };
  const sec = h('section.endpoints.card', { 'aria-labelledby': 'ep-h' });
  const rows = list.map((e) => {
    const own = e.id === p.id;
    const actions = canAdmin() ? h('div.actions',
      h('button', { type: 'button', 'aria-label': `Edit endpoint ${e.base_url}`, onclick: () => editEndpoint(sec, p, e, done) }, 'Edit'),
      own ? null : h('button.danger', { type: 'button', 'aria-label': `Remove endpoint ${e.base_url}`, onclick: async () => {
        if (!confirm(`Remove endpoint ${e.base_url} from ${p.name}?`)) return;
        await api('DELETE', orgPath(`/provider-keys/${p.id}/endpoints/${e.id}`)); done(`Removed ${e.base_url}.`);
      } }, 'Remove')) : null;
    return h('tr', { 'data-endpoint': e.base_url }, h('td.url', e.base_url, own ? h('span.hint', ' (the provider’s own)') : null), h('td', '••••' + e.token_hint),
      h('td.weight', String(e.weight)), h('td', h('span.badge.' + e.health, e.health)), canAdmin() ? h('td', actions) : null);
  });
  const close = h('button', { type: 'button', onclick: () => { S.openEndpoints = null; sec.remove(); } }, 'Close');
  sec.append(h('h2#ep-h', `Endpoints of ${p.name}`),
    h('p.hint', 'Requests for this provider are spread over its endpoints by weight. Health is what the gateways report; unknown until they do. The first endpoint is the provider’s own base URL and token: it can be edited, not removed.'),
    table(['Base URL', 'Token', 'Weight', 'Health'].concat(canAdmin() ? ['Actions'] : []), rows, `Endpoints of ${p.name}`), h('p', close));
  if (canAdmin()) {
    const f = {
      base_url: field('Endpoint base URL', { name: 'base_url', type: 'url', required: true, placeholder: 'https://gpu2.example.com', spellcheck: 'false' }, BASE_URL_HINT()),
      token: field('Endpoint API token', { name: 'token', type: 'password', autocomplete: 'off', required: true }, 'Write-only: stored encrypted, sent only to this endpoint’s base URL.'),
      weight: field('Weight', { name: 'weight', type: 'number', min: '1', max: '1000', step: '1', value: '1', inputmode: 'numeric' }, WEIGHT_HINT),
    };
    sec.append(h('h3', 'Add an endpoint'), form(f, 'Add endpoint', async () => {
      const errs = {};
      if (baseUrlError(val(f.base_url))) errs.base_url = baseUrlError(val(f.base_url));
      if (!f.token.input.value.trim()) errs.token = 'The endpoint’s API token is required.';
      if (weightError(val(f.weight))) errs.weight = weightError(val(f.weight));
      showRules(f, errs);
      const e = await api('POST', orgPath(`/provider-keys/${p.id}/endpoints`), { base_url: val(f.base_url), token: f.token.input.value.trim(), weight: Number(val(f.weight)) });
      done(`Added endpoint ${e.base_url} to ${p.name}.`);
    }));
  }
  const old = $('section.endpoints', main); if (old) old.replaceWith(sec); else main.querySelector('.table-wrap').after(sec);
}

function editEndpoint(sec, p, e, done) {
  const f = {
    base_url: field('Base URL', { name: 'base_url', type: 'url', value: e.base_url, spellcheck: 'false' }, 'Changing it needs the token again.'),
    token: field('New API token', { name: 'token', type: 'password', autocomplete: 'off' }, 'Leave empty to keep the current token (unless the base URL changes).'),
    weight: field('Weight', { name: 'weight', type: 'number', min: '1', max: '1000', step: '1', value: String(e.weight), inputmode: 'numeric' }, WEIGHT_HINT),
  };
  const box = h('div.edit-endpoint', h('h3', `Edit endpoint ${e.base_url}`),
    form(f, 'Save endpoint', async () => {
      const body = {}; const errs = {};
      if (val(f.base_url) !== e.base_url) { body.base_url = val(f.base_url); if (baseUrlError(body.base_url)) errs.base_url = baseUrlError(body.base_url); }
      if (f.token.input.value.trim()) body.token = f.token.input.value.trim();
      if (body.base_url && !body.token) errs.token = 'Enter the token again: the base URL changed.';
      if (weightError(val(f.weight))) errs.weight = weightError(val(f.weight));
      else if (Number(val(f.weight)) !== e.weight) body.weight = Number(val(f.weight));
      showRules(f, errs);
      if (!Object.keys(body).length) { toast('Nothing changed.'); return; }
      await api('PATCH', orgPath(`/provider-keys/${p.id}/endpoints/${e.id}`), body);
      done(`Saved endpoint ${body.base_url || e.base_url}.`);
    }, h('button', { type: 'button', onclick: () => box.remove() }, 'Cancel')));
  const old = $('.edit-endpoint', sec); if (old) old.remove();
  sec.querySelector('.table-wrap').after(box);
  f.weight.input.focus();
}

function testText(t) {
  if (!t.reachable) return `Unreachable${t.status ? ` (HTTP ${t.status})` : ''}${t.error ? ': ' + t.error : ''} · ${fmtTime(t.at)}`;
  const names = (t.models || []).slice(0, 5).join(', ');
  const more = (t.model_count || 0) > 5 ? ', …' : '';
  return `Reachable · ${t.latency_ms} ms · ${t.model_count ?? '?'} models${names ? ` (${names}${more})` : ''} · ${fmtTime(t.at)}`;
}
async function testProvider(p, cell) {
  cell.textContent = 'Testing…';
  try {
    const t = await api('POST', orgPath(`/provider-keys/${p.id}/test`));
    t.at = new Date().toISOString();
    S.lastTests[p.id] = t; sessionStorage.setItem('llmgw.tests', JSON.stringify(S.lastTests));
    cell.textContent = testText(t);
    toast(`${p.name}: ${testText(t)}`);
  } catch (e) { cell.textContent = 'Test failed: ' + e.message; }
}

function editProvider(main, p) {
  const f = {
    name: field('Name', { name: 'name', value: p.name, required: true, spellcheck: 'false' }, NAME_RULE),
    base_url: field('Base URL', { name: 'base_url', type: 'url', value: p.base_url, spellcheck: 'false' }, 'Changing the host, scheme or port needs the token again.'),
    token: field('New API token', { name: 'token', type: 'password', autocomplete: 'off' }, 'Leave empty to keep the current token (unless the base URL changes).'),
  };
  f.headers = headersField(p.headers);
  if ((p.headers || []).length) f.clear_headers = field('Remove all static headers', { type: 'checkbox', name: 'clear_headers' }, `Removes ${p.headers.join(', ')}.`);
  const prices = pricesEditor(f, p.prices);
  const timeouts = timeoutsFieldset(f, p.timeouts);
  f.base_url.input.addEventListener('input', () => {
    const changed = val(f.base_url) !== p.base_url;
    f.token.input.required = changed;
    f.token.querySelector('.hint').textContent = changed ? 'Required: the stored token is only ever sent to the URL it was saved with.' : 'Leave empty to keep the current token.';
  });
  const dlg = h('section.edit', { 'aria-labelledby': 'edit-h' }, h('h2#edit-h', `Edit ${p.name}`),
    form(f, 'Save changes', async () => {
      const body = {};
      if (val(f.name) !== p.name) body.name = val(f.name);
      if (val(f.base_url) !== p.base_url) body.base_url = val(f.base_url);
      if (f.token.input.value.trim()) body.token = f.token.input.value.trim();
      const errs = providerRules(f, true);
      if (!('name' in body)) delete errs.name;
      if (!('base_url' in body)) delete errs.base_url;
      if (body.base_url && !body.token) errs.token = 'Enter the token again: the base URL changed.';
      const list = prices.read(errs);
      if (JSON.stringify(list) !== JSON.stringify(p.prices || [])) body.prices = list;
      const hdrs = readHeaders(f, errs);
      if (f.clear_headers && f.clear_headers.input.checked) body.headers = null;
      else if (Object.keys(hdrs).length) body.headers = hdrs;
      const tos = readTimeouts(f, errs);
      if (!sameTimeouts(tos, p.timeouts)) body.timeouts = tos;
      showRules(f, errs);
      if (!Object.keys(body).length) { toast('Nothing changed.'); return; }
      await api('PATCH', orgPath(`/provider-keys/${p.id}`), body);
      toast(`Saved ${body.name || p.name}.`); render();
    }, [prices, timeouts, h('button', { type: 'button', onclick: () => dlg.remove() }, 'Cancel')]));
  const old = $('section.edit', main); if (old) old.remove();
  main.insertBefore(dlg, main.children[1]);
  f.name.input.focus();
}

// ---------- spend controls (DESIGN.md, "Spend controls") ----------
// [field, label, unit as the key list shows it]
const LIMITS = [
  ['requests_per_minute', 'Requests per minute', 'req/min'],
  ['tokens_per_minute', 'Tokens per minute', 'tokens/min'],
  ['max_concurrent_requests', 'Concurrent requests', 'concurrent'],
  ['tokens_per_day', 'Tokens per day (UTC)', 'tokens/day'],
  ['tokens_per_month', 'Tokens per month (UTC)', 'tokens/month'],
  ['budget_per_month_usd', 'Budget per month, USD', ''],
];
const LIMIT_LABEL = Object.fromEntries(LIMITS.map(([k, l]) => [k, l]));
// Money stays the decimal string typed or received: checked by pattern, never sent as a float.
const DECIMAL = /^\d+(\.\d+)?$/;
function usdError(s, places) {
  if (!DECIMAL.test(s)) return 'A decimal amount in USD such as 12.50: digits, at most one dot.';
  if ((s.split('.')[1] || '').replace(/0+$/, '').length > places) return `At most ${places} decimal places.`;
  return '';
}
const fmtUsd = (s) => (s === null || s === undefined ? '—' : '$' + s);
// Sums decimal strings exactly: addDecimal("0.1", "0.2") === "0.3".
function addDecimal(a, b) {
  const [ai, af = ''] = a.split('.'); const [bi, bf = ''] = b.split('.');
  const n = Math.max(af.length, bf.length);
  const s = (BigInt(ai + af.padEnd(n, '0')) + BigInt(bi + bf.padEnd(n, '0'))).toString().padStart(n + 1, '0');
  const frac = s.slice(s.length - n).replace(/0+$/, '');
  return s.slice(0, s.length - n) + (frac ? '.' + frac : '');
}
function limitsText(l) {
  const set = LIMITS.filter(([k]) => l && l[k] !== null && l[k] !== undefined);
  const soft = l && l.soft_limit_percent ? ` · warn at ${l.soft_limit_percent} %` : '';
  return set.length ? set.map(([k, , u]) => (u ? `${fmtNum(l[k])} ${u}` : `$${l[k]}/month`)).join(' · ') + soft : 'No limits' + soft;
}
const modelsText = (m) => (!m ? 'all models' : m.length ? m.join(', ') : 'no model (every request refused)');

// The six limit inputs and the soft threshold in a fieldset; their fields join `fields` as `limits.<name>`, the names the server's refusals use.
function limitsFieldset(fields, current, legend) {
  const cur = current || {};
  const inputs = LIMITS.map(([k, label]) => {
    const money = k === 'budget_per_month_usd';
    const f = field(label, { name: k, inputmode: money ? 'decimal' : 'numeric', autocomplete: 'off', value: cur[k] ?? null, placeholder: 'no limit' }, money ? 'e.g. 50 or 12.50' : '');
    f.grouped = true; fields['limits.' + k] = f;
    return f;
  });
  const soft = field('Warn at, % of each limit', { name: 'soft_limit_percent', inputmode: 'numeric', autocomplete: 'off', value: cur.soft_limit_percent ?? null, placeholder: 'no warning' },
    '1–100, e.g. 80. Shown against usage; day and month budgets alert the operator’s webhook once per period.');
  soft.grouped = true; fields['limits.soft_limit_percent'] = soft;
  return h('fieldset', h('legend', legend), h('p.hint', 'Empty: no limit. 0 refuses every request. Day and month limits reset at 00:00 UTC.'), h('div.grid', inputs, soft));
}
// The limits as the API takes them (every field, null for none); refusals go into `errs`.
function readLimits(fields, errs) {
  const out = {};
  for (const [k] of LIMITS) {
    const s = val(fields['limits.' + k]);
    out[k] = null;
    if (!s) continue;
    if (k === 'budget_per_month_usd') { const e = usdError(s, 6); if (e) errs['limits.' + k] = e; else out[k] = s; }
    else if (!/^\d{1,16}$/.test(s) || BigInt(s) > 10n ** 15n) errs['limits.' + k] = 'A whole number (0 or more), or empty for no limit.';
    else out[k] = Number(s); // an integer up to 10^15: exact as a JSON number
  }
  const soft = val(fields['limits.soft_limit_percent']);
  out.soft_limit_percent = null;
  if (soft && (!/^\d{1,3}$/.test(soft) || Number(soft) < 1 || Number(soft) > 100)) errs['limits.soft_limit_percent'] = 'A whole percentage from 1 to 100, or empty for no warning.';
  else if (soft) out.soft_limit_percent = Number(soft);
  return out;
}
const LIMIT_FIELDS = LIMITS.map(([k]) => k).concat('soft_limit_percent');
const sameLimits = (a, b) => LIMIT_FIELDS.every((k) => String((a || {})[k] ?? '') === String((b || {})[k] ?? ''));
function modelsField(current) {
  return field('Allowed models', { type: 'textarea', name: 'allowed_models', rows: '3', spellcheck: 'false', autocomplete: 'off', value: (current || []).join('\n'), placeholder: 'mycompany/*' },
    `One pattern per line, matched against the model clients ask for ({customName}/{modelName}). * matches any characters, / included: mycompany/* is every model of mycompany, */llama* any provider's llama models. Empty: every model.${current && !current.length ? ' Now: no model at all.' : ''}`);
}
const readModels = (f) => f.input.value.split('\n').map((x) => x.trim()).filter(Boolean);

// Rows of prices: a model name, a pattern with * or * itself, and USD per million input and output tokens.
function pricesEditor(fields, current) {
  const rows = h('div.price-rows');
  const err = h('small.err', { 'aria-live': 'polite' });
  const addBtn = h('button', { type: 'button', onclick: () => add().input.focus() }, 'Add a price');
  function add(p) {
    const m = field('Model', { value: p && p.model, placeholder: 'llama-3-8b or *', spellcheck: 'false', autocomplete: 'off' });
    const i = field('Input USD / 1M tokens', { value: p && p.input_per_million_usd, inputmode: 'decimal', autocomplete: 'off', placeholder: '0.50' });
    const o = field('Output USD / 1M tokens', { value: p && p.output_per_million_usd, inputmode: 'decimal', autocomplete: 'off', placeholder: '1.50' });
    const row = h('div.price-row', { role: 'group', 'aria-label': 'Price' }, m, i, o,
      h('button', { type: 'button', onclick: () => { row.remove(); addBtn.focus(); } }, 'Remove'));
    row.parts = [m, i, o];
    rows.append(row);
    return m;
  }
  (current || []).forEach(add);
  // The server names the whole list when it refuses a price: its message goes under the list.
  fields.prices = { grouped: true, input: addBtn, setError: (msg) => { err.textContent = msg || ''; } };
  const box = h('fieldset', h('legend', 'Prices (optional)'),
    h('p.hint', 'For the cost in Usage. The upstream model name, or a pattern where * matches anything (* alone: every other model); the most specific match wins. USD per million tokens, e.g. 0.50.'),
    rows, h('div', addBtn), err);
  box.read = (errs) => {
    let first = null;
    const list = [...rows.children].map((r) => {
      const [m, i, o] = r.parts;
      const e = [[m, /^\S{1,256}$/.test(val(m)) ? '' : 'A model name or pattern, no spaces.'], [i, usdError(val(i), 12)], [o, usdError(val(o), 12)]];
      for (const [x, msg] of e) { x.setError(msg); if (msg && !first) first = x.input; }
      return { model: val(m), input_per_million_usd: val(i), output_per_million_usd: val(o) };
    });
    if (first) { errs.prices = 'Fix the highlighted prices.'; fields.prices.input = first; } else fields.prices.input = addBtn;
    return list;
  };
  return box;
}

// ---------- API keys ----------
async function apiKeys(main) {
  const list = (await api('GET', orgPath('/api-keys?limit=100'))).data;
  const rows = list.map((k) => h('tr', { 'data-key': k.name }, h('th', { scope: 'row' }, k.name), h('td', h('code', k.prefix + '…')),
    h('td', fmtTime(k.created_at)), h('td', fmtTime(k.last_used_at)), h('td', k.expires_at ? fmtTime(k.expires_at) : 'Never'),
    h('td', k.revoked_at ? h('span.badge.inactive', 'revoked') : h('span.badge.active', 'active')),
    h('td.limits', h('span.lim', limitsText(k.limits)), h('span.hint.models', 'Models: ' + modelsText(k.allowed_models)),
      canAdmin() && !k.revoked_at ? null : h('button.link', { type: 'button', onclick: () => keyDialog(k) }, 'View limits')),
    canAdmin() ? h('td', k.revoked_at ? '' : h('div.actions',
      h('button', { type: 'button', onclick: () => keyDialog(k) }, 'Edit limits'),
      h('button.danger', { type: 'button', onclick: async () => {
        if (!confirm(`Revoke the key ${k.name}? Clients using it stop working within a second.`)) return;
        await api('DELETE', orgPath(`/api-keys/${k.id}`)); toast(`Revoked ${k.name}.`); render();
      } }, 'Revoke'))) : null));
  const heads = ['Name', 'Key', 'Created', 'Last used', 'Expires', 'Status', 'Limits'].concat(canAdmin() ? ['Actions'] : []);
  const slot = h('div');
  main.append(slot, table(heads, rows, 'API keys'));
  if (!canAdmin()) { main.append(h('p.note', 'Admins create and revoke API keys and set their limits.')); return; }
  const f = {
    name: field('Name', { name: 'name', required: true, autocomplete: 'off' }, 'What it is for, e.g. "backend prod".'),
    expires_at: field('Expires on (optional)', { name: 'expires_at', type: 'date' }),
  };
  const limits = limitsFieldset(f, null, 'Limits (optional)');
  f.allowed_models = modelsField(null); f.allowed_models.grouped = true;
  main.append(h('section', { 'aria-labelledby': 'newkey-h' }, h('h2#newkey-h', 'Create an API key'),
    form(f, 'Create key', async () => {
      const body = { name: val(f.name) };
      if (val(f.expires_at)) body.expires_at = new Date(val(f.expires_at) + 'T23:59:59Z').toISOString();
      const errs = {}; const l = readLimits(f, errs); showRules(f, errs);
      if (Object.values(l).some((x) => x !== null)) body.limits = l;
      const models = readModels(f.allowed_models);
      if (models.length) body.allowed_models = models;
      const k = await api('POST', orgPath('/api-keys'), body);
      await render();
      const out = h('input#new-key.mono', { readonly: true, value: k.key, 'aria-label': 'New API key', size: '60' });
      const box = h('div.secret', { role: 'alert' }, h('h2', `Key “${k.name}” created`),
        h('p.warn', 'Copy it now: it is shown only once and cannot be recovered.'),
        h('div.row', out, h('button', { type: 'button', onclick: async () => { try { await navigator.clipboard.writeText(k.key); toast('Copied.'); } catch (e) { out.select(); toast('Press Ctrl+C to copy.'); } } }, 'Copy')));
      $('#main').insertBefore(box, $('#main').children[1]);
      out.focus(); out.select();
    }, [limits, f.allowed_models])));
}

// A modal dialog with the limits in force on a key (its own and its organization's) and, for admins, the form to change the key's.
function keyDialog(k) {
  const edit = canAdmin() && !k.revoked_at;
  const state = h('div', h('p', 'Loading…'));
  const dlg = h('dialog.modal', { 'aria-labelledby': 'dlg-h' }, h('h2#dlg-h', `Limits of “${k.name}”`),
    h('section', { 'aria-labelledby': 'dlg-now-h' }, h('h3#dlg-now-h', 'In force now'), state));
  dlg.addEventListener('close', () => dlg.remove());
  const close = h('button', { type: 'button', onclick: () => dlg.close() }, edit ? 'Cancel' : 'Close');
  if (edit) {
    const f = {};
    const box = limitsFieldset(f, k.limits, 'Limits of this key');
    f.allowed_models = modelsField(k.allowed_models); f.allowed_models.grouped = true;
    dlg.append(h('section', { 'aria-labelledby': 'dlg-edit-h' }, h('h3#dlg-edit-h', 'Change'),
      form(f, 'Save limits', async () => {
        const errs = {}; const limits = readLimits(f, errs); showRules(f, errs);
        const body = {};
        if (!sameLimits(limits, k.limits)) body.limits = limits;
        const models = readModels(f.allowed_models);
        if (models.join('\n') !== (k.allowed_models || []).join('\n')) body.allowed_models = models.length ? models : null;
        if (!Object.keys(body).length) { toast('Nothing changed.'); dlg.close(); return; }
        await api('PATCH', orgPath(`/api-keys/${k.id}`), body);
        toast(`Saved the limits of ${k.name}.`); dlg.close(); render();
      }, [box, f.allowed_models, close])));
  } else dlg.append(h('p', close));
  document.body.append(dlg);
  dlg.showModal();
  api('GET', orgPath(`/api-keys/${k.id}/limits`)).then((r) => {
    const rows = r.data.map((x) => {
      const money = x.limit === 'budget_per_month_usd';
      const known = (v) => v !== null && v !== undefined;
      const show = (v) => (!known(v) ? '—' : money ? '$' + v : fmtNum(v));
      const label = LIMIT_LABEL[x.limit] || x.limit;
      // The bar is a picture of the numbers beside it (money as a float only here, for drawing).
      const bar = known(x.used) ? h('meter', { min: '0', max: String(Number(x.max) || 1), value: String(Number(x.used)), high: known(x.soft) ? String(Number(x.soft)) : null, optimum: '0', 'aria-label': 'share of the limit used' }) : null;
      const used = h('td.used', h('span', known(x.used) ? `${show(x.used)} of ${show(x.max)}` : '—'), bar);
      const soft = h('td', known(x.soft) ? show(x.soft) : '—', x.soft_reached ? h('span.badge.warn', 'reached') : null);
      return h('tr', { 'data-limit': `${x.scope}.${x.limit}` }, h('th', { scope: 'row' }, label), h('td', x.scope === 'api_key' ? 'this key' : 'organization'),
        h('td', show(x.max)), used, h('td', show(x.remaining)), soft, h('td', x.resets_at ? fmtTime(x.resets_at) : '—'));
    });
    state.replaceChildren(table(['Limit', 'Set on', 'Max', 'Used', 'Remaining', 'Warn at', 'Resets'], rows, 'Limits in force', 'No limits: neither the key nor the organization has any.'),
      h('p.hint', `Models: ${modelsText(k.allowed_models)}. Used counts requests still running at their reservation. “—”: not known to the API (no shared counters without Redis).`));
  }, (e) => state.replaceChildren(h('p.form-err', { role: 'alert' }, e.message)));
}

// ---------- usage ----------
function dayIso(d) { return d.toISOString().slice(0, 10); }
async function usage(main) {
  const now = new Date();
  const st = usage.state || (usage.state = { from: dayIso(new Date(now - 13 * 864e5)), to: dayIso(now), model: '', provider: '', api_key_id: '', endpoint: '' });
  const range = () => ({ from: new Date(st.from + 'T00:00:00Z').toISOString(), to: new Date(st.to + 'T23:59:59Z').toISOString() });
  const usagePath = () => orgPath('/usage' + qs(Object.assign({ group_by: 'day' }, range(), { model: st.model, provider: st.provider, api_key_id: st.api_key_id, endpoint: st.endpoint })));
  const logsPath = (cursor) => orgPath('/logs' + qs(Object.assign({ limit: 20, cursor, provider: st.provider, api_key_id: st.api_key_id }, range())));
  const auditPath = (cursor) => orgPath('/audit-log' + qs({ limit: 20, cursor }));
  // The page's data arrives in one round trip, not two.
  prefetch(usagePath()); prefetch(logsPath(undefined)); if (canAdmin()) prefetch(auditPath(undefined));
  const [keys, provs] = (await Promise.all([api('GET', orgPath('/api-keys?limit=100')), api('GET', orgPath('/provider-keys?limit=100'))])).map((r) => r.data);
  const keyName = Object.fromEntries(keys.map((k) => [k.id, k.name]));
  const f = {
    from: field('From', { type: 'date', value: st.from }),
    to: field('To', { type: 'date', value: st.to }),
    provider: field('Provider', { type: 'select', options: [opt('', 'All')].concat(provs.map((p) => opt(p.name, p.name, p.name === st.provider))) }),
    api_key_id: field('API key', { type: 'select', options: [opt('', 'All')].concat(keys.map((k) => opt(k.id, k.name, k.id === st.api_key_id))) }),
    model: field('Model', { value: st.model, placeholder: 'mycompany/llama' }),
    endpoint: field('Endpoint', { value: st.endpoint, placeholder: 'chat/completions' }),
  };
  const charts = h('div.charts');
  const filters = form(f, 'Apply', async () => { for (const k of Object.keys(f)) st[k] = val(f[k]); await draw(); });
  filters.classList.add('filters');
  main.append(h('section', { 'aria-label': 'Filters' }, filters), charts);
  const logsSec = h('section', { 'aria-labelledby': 'logs-h' }, h('h2#logs-h', 'Request logs'));
  const auditSec = canAdmin() ? h('section', { 'aria-labelledby': 'audit-h' }, h('h2#audit-h', 'Audit log')) : null;
  main.append(logsSec, auditSec);
  async function draw() {
    const win = range();
    charts.replaceChildren(h('p', 'Loading…'));
    const chart = (async () => { try {
      const rows = (await api('GET', usagePath())).data;
      const by = Object.fromEntries(rows.map((r) => [r.key, r]));
      const days = [];
      for (let d = new Date(win.from); d <= new Date(win.to); d = new Date(+d + 864e5)) days.push(dayIso(d));
      const pick = (k) => days.map((d) => [d, by[d] ? by[d][k] : 0]);
      const total = rows.reduce((a, r) => a + r.requests, 0);
      // Cost is a decimal string: its bar height is the only place it becomes a number.
      const costs = rows.map((r) => r.cost_usd).filter((c) => typeof c === 'string' && DECIMAL.test(c));
      const cost = costs.length ? costs.reduce(addDecimal, '0') : null;
      const costPts = days.map((d) => { const c = by[d] && DECIMAL.test(by[d].cost_usd || '') ? by[d].cost_usd : '0'; return [d, Number(c), c]; });
      charts.replaceChildren(
        h('p.summary', `${fmtNum(total)} requests, ${fmtNum(rows.reduce((a, r) => a + r.errors, 0))} errors, ${fmtNum(rows.reduce((a, r) => a + r.total_tokens, 0))} tokens, cost ${fmtUsd(cost)} in this window.`),
        barChart('Requests per day', pick('requests'), 'c-req'), barChart('Errors per day', pick('errors'), 'c-err'), barChart('Tokens per day', pick('total_tokens'), 'c-tok'),
        barChart('Cost per day (USD)', costPts, 'c-cost', '$'));
    } catch (e) { charts.replaceChildren(h('p.form-err', { role: 'alert' }, e.message)); } })();
    await Promise.all([chart, pageList(logsSec, logsPath,
      ['Time', 'Model', 'Provider', 'Key', 'Status', 'Tokens', 'Cost', 'Latency'], (l) => h('tr', h('td', fmtTime(l.created_at)), h('td', l.requested_model || '—'), h('td', l.provider_name || '—'),
        h('td', keyName[l.api_key_id] || '—'), h('td', h('span.badge.' + (l.status_code < 400 ? 'active' : 'inactive'), String(l.status_code))), h('td', fmtNum(l.total_tokens)), h('td', fmtUsd(l.cost_usd)), h('td', `${l.latency_ms} ms`)), 'Request logs'),
      auditSec && pageList(auditSec, auditPath, ['Time', 'Action', 'Target', 'Details'],
        (a) => h('tr', h('td', fmtTime(a.created_at)), h('td', a.action), h('td', a.target_type), h('td', h('code.details', JSON.stringify(a.details)))), 'Audit log')]);
  }
  await draw();
}

// A cursor-paginated table: "Newer" goes back through the cursors seen.
async function pageList(sec, pathFor, heads, row, caption) {
  const stack = [null];
  const body = h('div');
  const heading = sec.firstChild;
  sec.replaceChildren(heading, body);
  async function show() {
    const page = await api('GET', pathFor(stack[stack.length - 1]));
    const prev = h('button', { type: 'button', disabled: stack.length < 2, onclick: () => { stack.pop(); show(); } }, 'Newer');
    const next = h('button', { type: 'button', disabled: !page.next_cursor, onclick: () => { stack.push(page.next_cursor); show(); } }, 'Older');
    body.replaceChildren(table(heads, page.data.map(row), caption), h('div.pager', prev, h('span', `Page ${stack.length}`), next));
  }
  try { await show(); } catch (e) { body.replaceChildren(h('p.form-err', { role: 'alert' }, e.message)); }
}

// A bar chart drawn as SVG, with the numbers also in a visually hidden table. A point is
// [day, value] or [day, value for the bar's height, exact text of the value]; `unit` prefixes the text.
function barChart(title, points, cls, unit = '') {
  const W = 400, H = 130, pad = 26;
  const text = (p) => unit + (p[2] !== undefined ? p[2] : fmtNum(p[1]));
  const top = points.reduce((a, p) => (p[1] > a[1] ? p : a), ['', 0]);
  const max = top[1] || 1;
  const bw = (W - pad) / Math.max(points.length, 1);
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', `0 0 ${W} ${H + 20}`); svg.setAttribute('class', 'chart ' + cls); svg.setAttribute('aria-hidden', 'true');
  const add = (tag, attrs, text) => { const e = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== undefined) e.textContent = text; svg.append(e); return e; };
  add('line', { x1: pad, y1: H, x2: W, y2: H, class: 'axis' });
  add('text', { x: 0, y: 12, class: 'lbl' }, top[1] ? text(top) : unit + '1');
  add('text', { x: 0, y: H, class: 'lbl' }, unit + '0');
  points.forEach((p, i) => {
    const [d, v] = p;
    const bh = (v / max) * (H - 10);
    const r = add('rect', { x: pad + i * bw + 1, y: H - bh, width: Math.max(bw - 2, 1), height: bh, class: 'bar', 'data-day': d, 'data-value': p[2] !== undefined ? p[2] : v });
    const t = document.createElementNS(NS, 'title'); t.textContent = `${d}: ${text(p)}`; r.append(t);
    if (i % Math.ceil(points.length / 5) === 0) add('text', { x: pad + i * bw + bw / 2, y: H + 14, class: 'lbl', 'text-anchor': 'middle' }, d.slice(5));
  });
  const data = h('table.sr', h('caption', title), h('tbody', points.filter((p) => p[1]).map((p) => h('tr', h('th', p[0]), h('td', text(p))))));
  return h('figure.chart-box', h('figcaption', title), svg, data);
}

// ---------- members & invitations ----------
async function members(main) {
  if (isOwner()) prefetch(orgPath('/invitations'));
  const list = (await api('GET', orgPath('/members?limit=100'))).data;
  const pend = h('section', { 'aria-labelledby': 'pend-h' }, h('h2#pend-h', 'Pending invitations'));
  const rows = list.map((m) => {
    const me = m.user_id === S.user.id;
    const role = isOwner() ? h('select', { 'aria-label': `Role of ${m.email}`, onchange: async (e) => {
      try { await api('PATCH', orgPath(`/members/${m.user_id}`), { role: e.target.value }); toast(`${m.email} is now ${e.target.value}.`); } catch (err) { toast(err.message); e.target.value = m.role; }
    } }, ROLES.map((r) => opt(r, r, r === m.role))) : m.role;
    const remove = (isOwner() || me) ? h('button.danger', { type: 'button', onclick: async () => {
      if (!confirm(me ? `Leave ${S.org.name}? Your API keys in it are revoked.` : `Remove ${m.email}? Their API keys in ${S.org.name} are revoked.`)) return;
      const r = await api('DELETE', orgPath(`/members/${m.user_id}`));
      toast(`${me ? 'Left' : 'Removed ' + m.email}${r && r.revoked_api_keys !== undefined ? `; ${r.revoked_api_keys} API keys revoked` : ''}.`);
      if (me) { await loadOrgs(); go('/org'); } else render();
    } }, me ? 'Leave' : 'Remove') : null;
    return h('tr', h('th', { scope: 'row' }, m.email + (me ? ' (you)' : '')), h('td', role), h('td', fmtTime(m.created_at)), h('td', remove));
  });
  main.append(table(['Email', 'Role', 'Member since', ''], rows, 'Members'));
  if (!isOwner()) { main.append(h('p.note', 'Owners invite members and change roles.')); return; }
  const slot = h('div');
  const f = {
    email: field('Email', { type: 'email', name: 'email', required: true, autocomplete: 'off' }),
    role: field('Role', { type: 'select', name: 'role', options: ROLES.map((r) => opt(r, r, r === 'member')) }, 'member: reads; admin: manages providers and keys; owner: also members.'),
  };
  main.append(h('section', { 'aria-labelledby': 'inv-h' }, h('h2#inv-h', 'Invite someone'), slot,
    form(f, 'Send invitation', async () => {
      const inv = await api('POST', orgPath('/members'), { email: val(f.email), role: f.role.input.value });
      if (inv && inv.token) {
        slot.replaceChildren(h('div.secret', { role: 'alert' }, h('p', `Invitation for ${inv.email} (${inv.role}). Pass this one-time token on; it is shown only now:`),
          h('input#invite-token.mono', { readonly: true, value: inv.token, 'aria-label': 'Invitation token', size: '50' }),
          h('p.hint', 'They sign in as that email, open “My invitations” and paste it.')));
        $('#invite-token').select();
        await pending();
      } else { toast(`${val(f.email)} added.`); render(); }
    })));
  main.append(pend);
  async function pending() {
    await pageList(pend, (c) => orgPath('/invitations' + qs({ cursor: c })), ['Email', 'Role', 'Expires', ''],
      (i) => h('tr', h('td', i.email), h('td', i.role), h('td', fmtTime(i.expires_at)), h('td', h('button.danger', { type: 'button', onclick: async () => {
        if (!confirm(`Cancel the invitation for ${i.email}?`)) return; await api('DELETE', orgPath(`/invitations/${i.id}`)); pending();
      } }, 'Cancel'))), 'Pending invitations');
  }
  await pending();
}

async function myInvitations(main) {
  let list = [];
  try { list = (await api('GET', '/me/invitations')).data; } catch (e) { main.append(h('p.form-err', { role: 'alert' }, e.message)); }
  main.append(h('p', `Invitations for ${S.user.email}. Paste the token the inviter gave you.`));
  if (!list.length) main.append(h('p', 'No pending invitations.'));
  for (const inv of list) {
    const f = { token: field('Invitation token', { name: 'token', autocomplete: 'off', required: true, spellcheck: 'false' }) };
    main.append(h('section.card', { 'aria-label': `Invitation to ${inv.org_name || inv.org_id}` }, h('h2', `Join ${inv.org_name || 'an organization'} as ${inv.role}`),
      h('p.hint', `Expires ${fmtTime(inv.expires_at)}`),
      form(f, 'Accept', async () => {
        const org = await api('POST', `/me/invitations/${inv.id}/accept`, { token: val(f.token) });
        await loadOrgs(); selectOrg(org.id); toast(`You joined ${org.name}.`); go('/quickstart');
      })));
  }
}

// ---------- quick start ----------
async function quickStart(main) {
  const provs = (await api('GET', orgPath('/provider-keys?limit=100'))).data.filter((p) => p.status === 'active');
  const gw = (S.cfg && S.cfg.gateway_public_url) || `${location.protocol}//${location.hostname}:8080`;
  const name = provs.length ? provs[0].name : 'mycompany';
  const model = `${name}/MODEL_NAME`;
  main.append(h('ol.steps',
    h('li', provs.length ? ['Providers: ', h('strong', provs.map((p) => p.name).join(', ')), ' ready. '] : ['Add a provider under ', h('a', { href: '#/providers' }, 'Providers'), ' (a name like mycompany, its base URL and token).']),
    h('li', 'Create a gateway key under ', h('a', { href: '#/keys' }, 'API keys'), ' and export it as LLMGW_API_KEY.'),
    h('li', `Call the gateway with "model": "${name}/<model>". Replace MODEL_NAME with a model your provider serves.`)));
  if (!(S.cfg && S.cfg.gateway_public_url)) main.append(h('p.note', `Gateway URL guessed as ${gw}; the operator sets LLMGW_GATEWAY_PUBLIC_URL to show the real one.`));
  const curl = `curl ${gw}/v1/chat/completions \\\n  -H "Authorization: Bearer $LLMGW_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '{"model": "${model}", "messages": [{"role": "user", "content": "Hello"}]}'`;
  const py = `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${gw}/v1", api_key=os.environ["LLMGW_API_KEY"])\nresp = client.chat.completions.create(\n    model="${model}",\n    messages=[{"role": "user", "content": "Hello"}],\n)\nprint(resp.choices[0].message.content)`;
  for (const [title, code] of [['curl', curl], ['OpenAI Python SDK', py]]) {
    main.append(h('section', { 'aria-label': title }, h('h2', title), h('pre', h('code', code)),
      h('button', { type: 'button', onclick: () => navigator.clipboard.writeText(code).then(() => toast('Copied.'), () => toast('Select the text to copy.')) }, `Copy ${title}`)));
  }
}

// ---------- start ----------
async function start() {
  try { S.cfg = await api('GET', '/auth/config'); } catch (e) { S.cfg = { password_login: true, sso: false, signup: true }; }
  try { S.user = await api('GET', '/me'); await loadOrgs(); } catch (e) { S.user = null; }
  window.addEventListener('hashchange', render);
  await render();
  document.body.dataset.ready = 'true';
}
start();
