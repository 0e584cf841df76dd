// Server-sent events over fetch() (EventSource cannot send an Authorization header).

const RECONNECT_MS = 2000;

/** Wait `ms`, or less if `signal` aborts (its listener is removed either way). */
const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });

/**
 * Follow `url` until a `done` event, an error answer, or `signal` aborts.
 * onEvent(name, data, id) gets each event (data parsed as JSON when it is JSON);
 * onStatus(text) hears about reconnects. A dropped connection is resumed after
 * 2 s with `Last-Event-ID`. Resolves when the stream ends for good; rejects with
 * the error answer (e.g. 401/404) that stopped it. `lastEventId` resumes an
 * earlier stream.
 */
export async function followEvents(
  url,
  { headers = () => ({}), onEvent, onStatus = () => {}, signal, makeError, lastEventId = null },
) {
  let lastId = lastEventId;
  let done = false;
  while (!done && !signal?.aborted) {
    try {
      const h = { Accept: "text/event-stream", ...headers() };
      if (lastId !== null) h["Last-Event-ID"] = lastId;
      const response = await fetch(url, { headers: h, signal, cache: "no-store" });
      if (response.status === 204) return; // the server says: nothing more, ever
      if (!response.ok) {
        const text = await response.text();
        throw makeError ? makeError(response.status, text) : new Error(`HTTP ${response.status}`);
      }
      onStatus("");
      done = await readStream(response.body, (name, data, id) => {
        if (signal?.aborted) return true; // a chunk read just before the abort
        if (id !== null) lastId = id;
        onEvent(name, data, id);
        return name === "done";
      });
    } catch (err) {
      if (signal?.aborted || err.name === "AbortError") return;
      if (err.status) throw err; // an error answer: reconnecting would not help
    }
    if (!done && !signal?.aborted) {
      onStatus("connection lost, reconnecting in 2 s…");
      await sleep(RECONNECT_MS, signal);
    }
  }
}

/** Parse an event stream; `dispatch` returns true to stop. Returns whether it stopped. */
async function readStream(body, dispatch) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { name: "", data: [], id: null };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") {
          // a blank line ends the event
          if (event.data.length || event.name) {
            const text = event.data.join("\n");
            let data = text;
            try {
              data = JSON.parse(text);
            } catch {
              /* plain text */
            }
            if (dispatch(event.name || "message", data, event.id)) return true;
          }
          event = { name: "", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue; // comment (keep-alive)
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event.name = value;
        else if (field === "data") event.data.push(value);
        else if (field === "id") event.id = value;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
