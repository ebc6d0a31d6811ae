/*
 * Sluice: the chat page's own check that its answers arrive as they are written.
 *
 * Something between the browser and the server (a proxy that buffers responses,
 * compression, a CDN) can hold an event stream back and deliver it all at once at
 * the end. The page then shows nothing for seconds and the whole answer in one go.
 * This file notices that on the page's own streams and shows a warning that points
 * the operator at the stream doctor (python -m streaming.doctor) and
 * docs/DEPLOY.md ("Is something buffering my streams?").
 *
 * The rule, checked once per answer when its `done` event arrives over the same
 * connection that carried its tokens (an answer that was resumed after a dropped
 * connection is not judged: a replay after a reconnect is a burst by design):
 *
 *   the server spent at least MIN_SERVER_MS sending the tokens (done.metadata:
 *   elapsed_ms - ttft_ms, from the first token to the end), there were at least
 *   MIN_TOKENS token events, and they reached the page within less than
 *   BURST_SHARE of that time (from the first token's arrival to done's).
 *
 * A stream that flows arrives over about the time the server took; a buffered one
 * arrives in a few milliseconds. Both clocks are the browser's and the server's own
 * durations: no clock synchronisation is assumed.
 *
 * Hook (index.html): `const arrival = window.sluiceArrival && window.sluiceArrival.stream();`
 * then `arrival.event(ev)` for every parsed SSE event of the POST's body.
 */
"use strict";
(() => {
  const MIN_SERVER_MS = 1000;
  const MIN_TOKENS = 5;
  const BURST_SHARE = 0.25;
  const results = [];          // every judged answer, newest last (the tests read it)
  let dismissed = false;

  /** A tracker for one stream's events, in arrival order. */
  function stream() {
    let tokens = 0;
    let firstToken = null;
    let judged = false;
    return {
      event(ev) {
        if (judged || !ev) return;
        const now = performance.now();
        if (ev.event === "token") {
          tokens++;
          if (firstToken === null) firstToken = now;
        } else if (ev.event === "done") {
          judged = true;
          let data = null;
          try { data = JSON.parse(ev.data); } catch { return; }
          judge(tokens, firstToken === null ? 0 : now - firstToken, data);
        }
      },
    };
  }

  function judge(tokens, clientMs, done) {
    const meta = (done && done.metadata) || {};
    if (typeof meta.elapsed_ms !== "number" || typeof meta.ttft_ms !== "number") return;
    const serverMs = meta.elapsed_ms - meta.ttft_ms;
    const burst = tokens >= MIN_TOKENS && serverMs >= MIN_SERVER_MS && clientMs < serverMs * BURST_SHARE;
    results.push({ tokens, clientMs: Math.round(clientMs), serverMs: Math.round(serverMs), burst });
    if (burst) warn(clientMs, serverMs);
  }

  function warn(clientMs, serverMs) {
    if (dismissed || document.querySelector('[data-testid="buffering-warning"]')) return;
    const box = document.createElement("div");
    box.setAttribute("role", "alert");
    box.dataset.testid = "buffering-warning";
    box.style.cssText = "margin:8px max(16px, calc((100% - 820px) / 2));padding:10px 14px;"
      + "border:1px solid var(--warn, #8a5a00);border-radius:10px;background:var(--panel, #fff);"
      + "color:var(--text, #1d232b);font-size:13px;display:flex;gap:10px;align-items:flex-start";
    const text = document.createElement("div");
    const secs = (serverMs / 1000).toFixed(1);
    const took = Math.max(1, Math.round(clientMs));
    text.append(
      `This answer was written over ${secs} s but reached this page all at once (in ${took} ms): `
      + "something between your browser and the server (a proxy, a CDN, or compression) is "
      + "holding the stream back. If you run this server: ",
    );
    const cmd = document.createElement("code");
    cmd.textContent = `python -m streaming.doctor ${location.origin}`;
    text.append(cmd, " names the culprit; docs/DEPLOY.md, \u201cIs something buffering my streams?\u201d, has the fixes.");
    const close = document.createElement("button");
    close.type = "button";
    close.textContent = "\u00d7";
    close.setAttribute("aria-label", "Dismiss this warning");
    close.style.cssText = "border:0;background:none;color:inherit;font-size:18px;line-height:1;padding:0 4px";
    close.addEventListener("click", () => { dismissed = true; box.remove(); });
    box.append(text, close);
    const composer = document.getElementById("composer");
    if (composer && composer.parentNode) composer.parentNode.insertBefore(box, composer);
    else document.body.prepend(box);
  }

  window.sluiceArrival = { stream, results, rule: { MIN_SERVER_MS, MIN_TOKENS, BURST_SHARE } };
})();
