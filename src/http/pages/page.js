// The OAuth pages' behaviour (src/http/pages.rs; README, "OAuth pages"): start a device flow
// through POST /v0/oauth/{provider}/start, show the user code and the verification link, poll
// GET /v0/oauth/{provider}/status every `interval` seconds, and end on success or on the
// reason it failed. Everything the server or the provider says reaches the page as text
// (textContent), links only when they are http(s). With a management key configured, the
// page asks for it once, keeps it in sessionStorage, sends it as Authorization: Bearer, and
// asks again when a call answers 401. A pending login is remembered in sessionStorage too, so
// a reload of the page resumes it. Calls time out; failed polls wait twice as long each time
// (up to a minute, or the server's Retry-After); an ended flow polls no more.
'use strict';
(function () {
  const provider = document.body.dataset.provider;
  const KEY_ITEM = 'cliproxyapi.management-key';
  const LOGIN_ITEM = 'cliproxyapi.login.' + provider;
  // How long a call may take before it counts as failed.
  const CALL_TIMEOUT_MS = 15000;
  // The longest wait between polls after failures, in seconds.
  const MAX_BACKOFF = 60;
  const byId = (id) => document.getElementById(id);
  const show = (id, on) => { byId(id).hidden = !on; };

  let memoryKey = '';
  let pending = null; // what to do again once a key is given
  let generation = 0; // a flow's number: answers for an earlier flow are dropped
  let session = '';
  let interval = 5;
  let expiresAt = 0;
  let pollTimer = 0;
  let tickTimer = 0;
  let failures = 0; // polls failed in a row

  function getKey() {
    try {
      return sessionStorage.getItem(KEY_ITEM) || memoryKey;
    } catch (e) {
      return memoryKey;
    }
  }

  // The pending login of this tab, to resume after a reload: {session, expiresAt}.
  function remembered() {
    try {
      const item = JSON.parse(sessionStorage.getItem(LOGIN_ITEM) || 'null');
      if (item && typeof item.session === 'string' && typeof item.expiresAt === 'number' && item.expiresAt > Date.now()) {
        return item;
      }
    } catch (e) {
      // Nothing usable stored.
    }
    return null;
  }

  function remember(item) {
    try {
      if (item) {
        sessionStorage.setItem(LOGIN_ITEM, JSON.stringify(item));
      } else {
        sessionStorage.removeItem(LOGIN_ITEM);
      }
    } catch (e) {
      // Storage refused: a reload starts afresh.
    }
  }

  function setKey(key) {
    memoryKey = key;
    try {
      if (key) {
        sessionStorage.setItem(KEY_ITEM, key);
      } else {
        sessionStorage.removeItem(KEY_ITEM);
      }
    } catch (e) {
      // Storage refused (a private window): the key stays in memory for this page.
    }
  }

  // A string from outside, bounded, or the fallback.
  function text(value, fallback) {
    return typeof value === 'string' && value.length > 0 ? value.slice(0, 500) : fallback;
  }

  // A number from outside, clamped, or the fallback.
  function num(value, lo, hi, fallback) {
    return typeof value === 'number' && isFinite(value) ? Math.min(hi, Math.max(lo, value)) : fallback;
  }

  async function call(method, path, payload) {
    const headers = { Accept: 'application/json' };
    const key = getKey();
    if (key) {
      headers.Authorization = 'Bearer ' + key;
    }
    const init = { method: method, headers: headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (payload !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(payload);
    }
    const abort = new AbortController();
    init.signal = abort.signal;
    const timer = setTimeout(() => abort.abort(), CALL_TIMEOUT_MS);
    try {
      const response = await fetch(path, init);
      let data = null;
      try {
        data = await response.json();
      } catch (e) {
        data = null;
      }
      const retryAfter = Number(response.headers.get('Retry-After'));
      return {
        status: response.status,
        data: data && typeof data === 'object' ? data : null,
        retryAfter: isFinite(retryAfter) && retryAfter > 0 ? Math.min(retryAfter, 3600) : 0,
      };
    } finally {
      clearTimeout(timer);
    }
  }

  function errorMessage(r) {
    const error = r.data && r.data.error;
    return text(error && error.message, 'The server answered ' + r.status + '.');
  }

  function stopTimers() {
    clearTimeout(pollTimer);
    clearInterval(tickTimer);
    pollTimer = 0;
    tickTimer = 0;
  }

  function setStatus(message) {
    byId('status').textContent = message;
  }

  // Ask for the management key; `then` runs once one is given.
  function askKey(message, then) {
    pending = then;
    byId('key-message').textContent = message;
    byId('key').value = '';
    show('key-form', true);
    show('begin', false);
    byId('key').focus();
  }

  function keyGiven(event) {
    event.preventDefault();
    // As typed: a key may begin or end with spaces.
    const key = byId('key').value;
    if (!key) {
      byId('key-message').textContent = 'Enter the management key.';
      return;
    }
    setKey(key);
    byId('key').value = '';
    byId('key-message').textContent = '';
    show('key-form', false);
    const then = pending;
    pending = null;
    if (then) {
      then();
    } else {
      show('begin', true);
    }
  }

  function unauthorized(r, then) {
    setKey('');
    const code = r.data && r.data.error && r.data.error.code;
    askKey(code === 'invalid_management_key' ? 'That key was refused; enter it again.' : 'This server needs its management key.', then);
  }

  function kiroBody() {
    if (!byId('method-idc').checked) {
      return { method: 'builder_id' };
    }
    const startUrl = byId('start-url').value.trim();
    const region = byId('region').value.trim();
    if (!/^https:\/\/\S+$/i.test(startUrl)) {
      byId('method-message').textContent = 'Enter your Identity Center start URL, starting with https.';
      return null;
    }
    const body = { method: 'idc', start_url: startUrl };
    if (region) {
      body.region = region;
    }
    return body;
  }

  async function start() {
    const gen = ++generation;
    stopTimers();
    show('result', false);
    show('flow', false);
    show('begin', true);
    let payload;
    if (provider === 'kiro') {
      byId('method-message').textContent = '';
      payload = kiroBody();
      if (!payload) {
        return;
      }
    }
    byId('start').disabled = true;
    let r;
    try {
      r = await call('POST', '/v0/oauth/' + provider + '/start', payload);
    } catch (e) {
      byId('start').disabled = false;
      return fail(gen, 'The login could not start.', 'The server could not be reached.');
    }
    byId('start').disabled = false;
    if (gen !== generation) {
      return;
    }
    if (r.status === 401) {
      return unauthorized(r, start);
    }
    if (r.status < 200 || r.status > 299 || !r.data || typeof r.data.session !== 'string') {
      const wait = r.retryAfter ? ' The provider asks to wait ' + r.retryAfter + ' s before trying again.' : '';
      return fail(gen, 'The login could not start.', errorMessage(r) + wait);
    }
    begin(gen, r.data);
  }

  // After a reload: the login this tab started, where it stands.
  async function resume(item) {
    const gen = ++generation;
    session = item.session;
    show('begin', false);
    let r;
    try {
      r = await call('GET', statusPath());
    } catch (e) {
      r = null;
    }
    if (gen !== generation) {
      return;
    }
    if (r && r.status === 401) {
      return unauthorized(r, () => resume(item));
    }
    const d = r && r.status === 200 ? r.data : null;
    if (!d) {
      // Gone (ended over an hour ago) or unreadable: start afresh.
      remember(null);
      show('begin', true);
      return;
    }
    if (d.status !== 'pending') {
      return settle(gen, d);
    }
    const until = Date.parse(typeof d.expires_at === 'string' ? d.expires_at : '');
    d.session = item.session;
    d.expires_in = isFinite(until) ? Math.round((until - Date.now()) / 1000) : 0;
    begin(gen, d);
  }

  function statusPath() {
    return '/v0/oauth/' + provider + '/status?session=' + encodeURIComponent(session);
  }

  // Point a link at a URL from outside, if it is http(s); hide it otherwise.
  function setLink(id, value) {
    const link = byId(id);
    let url = null;
    try {
      url = new URL(text(value, ''));
    } catch (e) {
      url = null;
    }
    if (!url || (url.protocol !== 'https:' && url.protocol !== 'http:')) {
      link.removeAttribute('href');
      return false;
    }
    link.href = url.href;
    return true;
  }

  function begin(gen, d) {
    session = d.session;
    interval = num(d.interval, 1, 60, 5);
    failures = 0;
    expiresAt = Date.now() + num(d.expires_in, 1, 3600, 900) * 1000;
    remember({ session: session, expiresAt: expiresAt });
    byId('user-code').textContent = text(d.user_code, '');
    byId('copy-state').textContent = '';
    const link = byId('verify-link');
    link.textContent = setLink('verify-link', d.verification_uri) ? link.href : text(d.verification_uri, '');
    show('verify-complete', setLink('verify-complete-link', d.verification_uri_complete));
    setStatus('Waiting for you to approve the login…');
    show('begin', false);
    show('flow', true);
    byId('user-code').focus();
    tick(gen);
    tickTimer = setInterval(() => tick(gen), 1000);
    later(gen);
  }

  function tick(gen) {
    if (gen !== generation) {
      return;
    }
    const left = Math.max(0, Math.round((expiresAt - Date.now()) / 1000));
    const minutes = Math.floor(left / 60);
    const seconds = String(left % 60).padStart(2, '0');
    byId('time-left').textContent = left > 0 ? '(' + minutes + ':' + seconds + ' left)' : '(the code has expired)';
    // The server says when a session expires; this only ends a page whose server went quiet.
    if (Date.now() > expiresAt + 60000) {
      fail(gen, 'The code expired.', 'The login was not approved in time.');
    }
  }

  // The next poll: one interval after an answer; after failures, twice the last wait each
  // time (up to MAX_BACKOFF), or the server's Retry-After when longer.
  function later(gen, retryAfter) {
    if (gen !== generation) {
      return;
    }
    let wait = interval;
    if (failures > 0) {
      wait = Math.min(MAX_BACKOFF, interval * Math.pow(2, Math.min(failures, 6)));
    }
    wait = Math.max(wait, retryAfter || 0);
    clearTimeout(pollTimer);
    pollTimer = setTimeout(() => poll(gen), wait * 1000);
  }

  async function poll(gen) {
    if (gen !== generation) {
      return;
    }
    let r;
    try {
      r = await call('GET', statusPath());
    } catch (e) {
      failures += 1;
      setStatus('The server cannot be reached; trying again…');
      return later(gen);
    }
    if (gen !== generation) {
      return;
    }
    if (r.status === 401) {
      clearTimeout(pollTimer);
      return unauthorized(r, () => {
        show('begin', false);
        poll(gen);
      });
    }
    if (r.status === 429 || r.status >= 500) {
      failures += 1;
      setStatus('The server is busy; trying again…');
      return later(gen, r.retryAfter);
    }
    if (r.status !== 200 || !r.data) {
      return fail(gen, 'The login failed.', errorMessage(r));
    }
    failures = 0;
    settle(gen, r.data);
  }

  // A status answer: wait on, or end the flow as it ended.
  function settle(gen, d) {
    interval = num(d.interval, 1, 60, interval);
    switch (d.status) {
      case 'pending':
        setStatus('Waiting for you to approve the login…');
        return later(gen);
      case 'success':
        return succeed(gen, d);
      case 'denied':
        return fail(gen, 'The login was denied.', text(d.message, 'The provider says the request was denied.'));
      case 'expired':
        return fail(gen, 'The code expired.', text(d.message, 'The login was not approved in time.'));
      default:
        return fail(gen, 'The login failed.', text(d.message, 'The server gave no reason.'));
    }
  }

  function end(gen, ok, headline, message) {
    if (gen !== generation) {
      return;
    }
    // Ended: no timer left, and answers still in flight are dropped.
    generation += 1;
    stopTimers();
    remember(null);
    show('flow', false);
    show('begin', false);
    const result = byId('result');
    result.className = ok ? 'success' : 'failure';
    byId('result-text').textContent = headline;
    byId('result-message').textContent = message;
    show('success-detail', ok);
    show('retry', !ok);
    show('result', true);
    byId('result-text').focus();
  }

  function succeed(gen, d) {
    byId('credential-id').textContent = text(d.credential_id, '(not given)');
    end(gen, true, 'Logged in: the credential is stored.', text(d.message, ''));
  }

  function fail(gen, headline, message) {
    end(gen, false, headline, message);
  }

  async function copy() {
    const code = byId('user-code').textContent;
    let ok = false;
    try {
      await navigator.clipboard.writeText(code);
      ok = true;
    } catch (e) {
      // No Clipboard API (plain http off loopback) or no permission: a selected textarea.
      const area = document.createElement('textarea');
      area.value = code;
      area.setAttribute('readonly', '');
      area.className = 'offscreen';
      document.body.appendChild(area);
      area.select();
      try {
        ok = document.execCommand('copy');
      } catch (e2) {
        ok = false;
      }
      area.remove();
    }
    if (!ok) {
      const range = document.createRange();
      range.selectNodeContents(byId('user-code'));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    }
    byId('copy-state').textContent = ok ? 'Copied.' : 'The code is selected: copy it.';
  }

  byId('key-form').addEventListener('submit', keyGiven);
  byId('start').addEventListener('click', start);
  byId('retry').addEventListener('click', start);
  byId('copy').addEventListener('click', copy);
  if (provider === 'kiro') {
    const method = () => show('idc-fields', byId('method-idc').checked);
    byId('method-builder-id').addEventListener('change', method);
    byId('method-idc').addEventListener('change', method);
    method();
  }
  const pendingLogin = remembered();
  if (document.body.dataset.key === 'required' && !getKey()) {
    askKey('This server needs its management key.', pendingLogin ? () => resume(pendingLogin) : null);
  } else if (pendingLogin) {
    resume(pendingLogin);
  } else {
    show('begin', true);
  }
})();
