// The live page: MSE fed with fragmented MP4 from the relay's WebSocket.
// The token arrives in the URL fragment (never sent to any server), moves to sessionStorage, and
// goes to the relay only inside the first WebSocket message.
'use strict';

(() => {
  const LIVE_EDGE_S = 0.2;       // where the playhead goes when it jumps
  const MAX_BEHIND_S = 1.0;      // further behind the live edge than this: jump
  const CATCH_UP_ABOVE_S = 0.5;  // behind by more: play 10 % faster until back near the edge
  const CAUGHT_UP_BELOW_S = 0.3;
  const CATCH_UP_RATE = 1.1;
  const KEEP_BUFFER_S = 10;      // media kept behind the playhead
  const RETRY_FIRST_MS = 1000;
  const RETRY_MAX_MS = 15000;
  const FATAL = new Set(['refused', 'expired', 'revoked', 'forbidden', 'blocked', 'origin', 'full']);
  const CODEC_NAMES = { h264: 'H.264', hevc: 'H.265 (HEVC)' };

  const $ = (id) => document.getElementById(id);
  const video = $('video');
  const sessionId = decodeURIComponent(location.pathname.split('/')[3] || '');
  const storageKey = `tunnel-agent.view.${sessionId}`;

  const fromFragment = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromFragment) {
    sessionStorage.setItem(storageKey, fromFragment);
    history.replaceState(null, '', location.pathname + location.search);
  }
  const token = sessionStorage.getItem(storageKey);

  // Read by people (the page) and by tests (window.tunnelView).
  const view = {
    state: 'connecting', error: null, message: null, stream: null, viewers: null,
    connects: 0, bytes: 0, framesShown: 0, firstFrameMs: null, jumps: 0,
  };
  window.tunnelView = view;

  let socket = null;
  let mediaSource = null;
  let sourceBuffer = null;
  let pending = [];
  let retries = 0;
  let retryTimer = null;
  let stopped = false;
  let startAtEdge = false;      // a new stream: go to its live edge once it has data
  const received = [];  // [time ms, bytes] over the last 2 s, for the bitrate

  function show(text, kind = 'error') {
    const box = $('message');
    view.message = text;
    box.textContent = text || '';
    box.className = `message ${kind}`;
    box.hidden = !text;
  }

  function setState(state, text) {
    view.state = state;
    $('state').textContent = text || state;
  }

  function fail(code, text) {
    view.error = code;
    stopped = true;
    setState('error', code);
    show(text);
    closeMedia();
    if (socket) { const old = socket; socket = null; old.close(); }
    $('snapshot').disabled = !['full', 'unsupported'].includes(code);  // the relay can still decode
  }

  function closeMedia() {
    pending = [];
    sourceBuffer = null;
    if (mediaSource && mediaSource.readyState === 'open') {
      try { mediaSource.endOfStream(); } catch (e) { /* already ending */ }
    }
    mediaSource = null;
    video.removeAttribute('src');
    video.load();
  }

  function startStream(info) {
    closeMedia();
    view.stream = info;
    view.error = null;
    const name = CODEC_NAMES[info.videoCodec] || info.videoCodec;
    $('codec').textContent = `${name} (${info.codecs.join(', ')})`;
    if (!('MediaSource' in window)) {
      fail('unsupported', 'This browser has no Media Source Extensions, which live view needs.');
      return;
    }
    if (!MediaSource.isTypeSupported(info.mimeType)) {
      const audioOnlyProblem = info.audio &&
        MediaSource.isTypeSupported(`video/mp4; codecs="${info.codecs[0]}"`);
      fail('unsupported', audioOnlyProblem
        ? `This browser cannot play the camera's audio (${info.codecs.slice(1).join(', ')}).`
        : `This camera sends ${name} video (${info.codecs[0]}), which this browser cannot play ` +
          '(MediaSource.isTypeSupported says no). Use a browser that plays it, or set the ' +
          'camera to H.264.');
      return;
    }
    show(null);
    startAtEdge = true;
    const ms = new MediaSource();
    mediaSource = ms;
    video.src = URL.createObjectURL(ms);
    ms.addEventListener('sourceopen', () => {
      if (mediaSource !== ms) return;
      URL.revokeObjectURL(video.src);
      sourceBuffer = ms.addSourceBuffer(info.mimeType);
      sourceBuffer.mode = 'segments';
      sourceBuffer.addEventListener('updateend', append);
      append();
    }, { once: true });
  }

  function append() {
    if (!sourceBuffer || sourceBuffer.updating || pending.length === 0) return;
    const chunk = pending.shift();
    try {
      sourceBuffer.appendBuffer(chunk);
    } catch (error) {
      if (error.name === 'QuotaExceededError' && video.buffered.length) {
        pending.unshift(chunk);
        sourceBuffer.remove(0, Math.max(0, video.currentTime - 1));
      } else {
        reconnectSoon('the browser could not play the stream');
      }
    }
  }

  function onText(text) {
    let message;
    try { message = JSON.parse(text); } catch (e) { return; }
    if (message.type === 'stream') {
      retries = 0;
      startStream(message);
    } else if (message.type === 'status') {
      view.viewers = message.viewers;
      $('viewers').textContent = String(message.viewers);
      if (message.state === 'live') {
        setState('live');
        if (!view.error) show(null);
      } else if (message.state === 'retrying') {
        setState('camera unavailable');
        show(`Cannot show the camera: ${message.reason}. Retrying...`);
      } else {
        setState(message.state);
      }
    } else if (message.type === 'error') {
      if (FATAL.has(message.code)) fail(message.code, message.message);
      else show(message.message, 'info');
    }
  }

  function onBinary(data) {
    if (view.error) return;
    view.bytes += data.byteLength;
    received.push([performance.now(), data.byteLength]);
    pending.push(data);
    append();
  }

  function connect() {
    retryTimer = null;
    if (stopped) return;
    if (!token) {
      fail('refused', 'This link has no token. Open the full view link (it ends in #token=...).');
      return;
    }
    view.connects += 1;
    setState('connecting');
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const ws = new WebSocket(`${scheme}://${location.host}/v1/sessions/${encodeURIComponent(sessionId)}/live`);
    ws.binaryType = 'arraybuffer';
    socket = ws;
    ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', token }));
    ws.onmessage = (event) => {
      if (typeof event.data === 'string') onText(event.data);
      else onBinary(event.data);
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      socket = null;
      if (!stopped) reconnectSoon('the connection to the relay dropped');
    };
  }

  function reconnectSoon(why) {
    if (stopped || retryTimer) return;
    if (socket) { const old = socket; socket = null; old.close(); }
    const cap = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** retries);
    const delay = cap / 2 + Math.random() * cap / 2;
    retries += 1;
    setState('reconnecting', `reconnecting in ${(delay / 1000).toFixed(1)} s`);
    show(`Stream interrupted (${why}). Reconnecting...`, 'info');
    retryTimer = setTimeout(connect, delay);
  }

  function keepLive() {
    const ranges = video.buffered;
    if (sourceBuffer && ranges.length) {
      const last = ranges.length - 1;
      const start = ranges.start(last);
      const end = ranges.end(last);
      const behind = end - video.currentTime;
      if (startAtEdge || video.currentTime < start || behind > MAX_BEHIND_S) {
        // A late joiner starts at the cached keyframe, up to a GOP behind: go to the edge.
        video.currentTime = Math.max(start, end - LIVE_EDGE_S);
        video.playbackRate = 1;
        startAtEdge = false;
        view.jumps += 1;
      } else if (behind > CATCH_UP_ABOVE_S) {
        video.playbackRate = CATCH_UP_RATE;
      } else if (behind < CAUGHT_UP_BELOW_S) {
        video.playbackRate = 1;
      }
      if (video.paused) video.play().catch(() => {});
      if (!sourceBuffer.updating && video.currentTime - ranges.start(0) > 3 * KEEP_BUFFER_S) {
        sourceBuffer.remove(0, video.currentTime - KEEP_BUFFER_S);
      }
    }
    const now = performance.now();
    while (received.length && now - received[0][0] > 2000) received.shift();
    const bits = received.reduce((sum, [, size]) => sum + size, 0) * 8 / 2;
    $('bitrate').textContent = received.length ? `${(bits / 1000).toFixed(0)} kbit/s` : '-';
    if (video.videoWidth) {
      $('resolution').textContent = `${video.videoWidth} x ${video.videoHeight}`;
    }
  }

  function countFrames() {
    const onFrame = () => {
      view.framesShown += 1;
      if (view.firstFrameMs === null) view.firstFrameMs = performance.now();
      video.requestVideoFrameCallback(onFrame);
    };
    if ('requestVideoFrameCallback' in HTMLVideoElement.prototype) {
      video.requestVideoFrameCallback(onFrame);
    } else {
      video.addEventListener('playing', () => {
        if (view.firstFrameMs === null) view.firstFrameMs = performance.now();
      });
    }
  }

  async function snapshot() {
    const button = $('snapshot');
    button.disabled = true;
    try {
      const response = await fetch(`/v1/sessions/${encodeURIComponent(sessionId)}/snapshot.jpg`, {
        headers: { Authorization: `Bearer ${token}` }, cache: 'no-store',
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        show(`Snapshot failed: ${body.message || response.status}`, 'info');
        return;
      }
      const url = URL.createObjectURL(await response.blob());
      const link = document.createElement('a');
      link.href = url;
      link.download = `snapshot-${sessionId}-${new Date().toISOString().replace(/[:.]/g, '-')}.jpg`;
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } finally {
      button.disabled = false;
    }
  }

  $('snapshot').addEventListener('click', snapshot);
  $('snapshot').disabled = !token;
  setInterval(keepLive, 250);
  countFrames();
  connect();
})();
