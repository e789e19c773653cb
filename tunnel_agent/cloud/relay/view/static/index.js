// The relay's index: the API key stays in sessionStorage (this tab only), never in a URL.
'use strict';

(() => {
  const KEY = 'tunnel-agent.apiKey';
  const $ = (id) => document.getElementById(id);

  function apiKey() { return sessionStorage.getItem(KEY); }

  function showError(text) { $('error').textContent = text || ''; }

  async function api(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${apiKey()}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!response.ok) {
      const reason = (data && (data.error || data.message)) || response.statusText;
      throw new Error(`${method} ${path}: ${response.status} ${reason}`);
    }
    return data;
  }

  function cell(row, text) {
    const td = document.createElement('td');
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  async function refresh() {
    showError(null);
    const body = $('sessions');
    try {
      const { sessions } = await api('GET', '/v1/sessions');
      body.replaceChildren();
      for (const session of sessions) {
        const row = document.createElement('tr');
        row.dataset.sessionId = session.id;
        cell(row, session.id);
        cell(row, session.deviceId);
        cell(row, String(session.localPort));
        cell(row, session.expiresAt ? new Date(session.expiresAt).toLocaleString() : '-');
        const view = cell(row, '');
        if (session.viewUrl) {
          const link = document.createElement('a');
          link.href = session.viewUrl;
          link.textContent = 'watch';
          view.appendChild(link);
        } else {
          view.textContent = '-';
        }
        body.appendChild(row);
      }
      $('sessions-section').hidden = false;
      $('key-state').textContent = `Key accepted; ${sessions.length} session(s).`;
    } catch (error) {
      showError(error.message);
    }
  }

  $('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $('api-key').value);
    $('api-key').value = '';
    refresh();
  });

  $('forget').addEventListener('click', () => {
    sessionStorage.removeItem(KEY);
    $('sessions').replaceChildren();
    $('sessions-section').hidden = true;
    $('key-state').textContent = 'Key forgotten.';
  });

  $('refresh').addEventListener('click', refresh);

  $('create-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    showError(null);
    const request = { deviceId: $('device-id').value, localPort: Number($('local-port').value) };
    if ($('ttl').value) request.ttl = Number($('ttl').value);
    if ($('rtsp-path').value) request.rtspPath = $('rtsp-path').value;
    try {
      const session = await api('POST', '/v1/sessions', request);
      if (session.viewUrl) location.assign(session.viewUrl);
      else await refresh();
    } catch (error) {
      showError(error.message);
    }
  });

  if (apiKey()) refresh();
})();
