// What the page says to the service, through its public API only (/v1/...): requests that
// carry the API key, the photo upload, and following a task until it ends.

const KEY_STORAGE = "m2fp-api-key";
const POLL_INTERVAL_MS = 500;

// The service sets `finished_at` when, and only when, a task ends (succeeded, failed or
// cancelled), so the page needs no list of terminal statuses.
export const isFinished = (task) => task.finished_at != null;

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The service's own `{error: {code, message}}`, or one made from the status when the answer
// is not that (a proxy's page, say).
export async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return { code: `http_${response.status}`, message: `The service answered ${response.status}.` };
}

export class Client {
  // onUnauthorized: called on every 401, so the page can ask for a key
  constructor({ onUnauthorized }) {
    this.apiKey = localStorage.getItem(KEY_STORAGE) || "";
    this.onUnauthorized = onUnauthorized;
  }

  useKey(key) {
    this.apiKey = key;
    localStorage.setItem(KEY_STORAGE, key);
  }

  async request(path, options = {}) {
    const headers = this.apiKey ? { "X-API-Key": this.apiKey } : {};
    const response = await fetch(path, { ...options, headers });
    if (response.status === 401) this.onUnauthorized();
    return response;
  }

  async blob(path) {
    return (await this.request(path)).blob();
  }

  cancel(taskId) {
    return this.request(`/v1/tasks/${taskId}`, { method: "DELETE" });
  }

  // Upload one photo (the page sends each photo on its own, so that each card follows its
  // own task). Resolves to `{task}` when accepted, else to `{error, retryAfter}` (seconds,
  // 0 when the service did not say). `maxBytes` refuses a photo over the service's upload
  // limit before sending it.
  // model: the id of the model to run on; null for the service's default
  async submitPhoto(file, maxBytes, model) {
    if (maxBytes && file.size > maxBytes) {
      return { error: { code: "payload_too_large", message:
        `${(file.size / 2 ** 20).toFixed(1)} MB is over the ${(maxBytes / 2 ** 20).toFixed(0)} MB limit.` } };
    }
    const form = new FormData();
    form.append("file", file, "upload");  // the file's own name stays on this page
    if (model) form.append("model", model);
    let response;
    try {
      response = await this.request("/v1/parse", { method: "POST", body: form });
    } catch (_) {
      return { error: { code: "network", message: "The upload failed: the service cannot be reached." } };
    }
    if (!response.ok) {
      return { error: await errorOf(response), retryAfter: parseInt(response.headers.get("Retry-After") || "0", 10) };
    }
    return { task: await response.json() };
  }

  // Follow a task until it ends: `onTask(task)` on every change, `onLost(error)` when the
  // service no longer knows it (expired, or deleted elsewhere). Server-sent events when the
  // browser has EventSource and no key is needed (EventSource cannot send the key header);
  // otherwise, or when the stream fails, polling. Returns a function that stops watching.
  watchTask(taskId, { onTask, onLost }) {
    let stopped = false;
    let source = null;
    const stop = () => {
      stopped = true;
      source?.close();
    };
    const seen = (task) => {
      if (stopped) return;
      if (isFinished(task)) stop();
      onTask(task);
    };
    const poll = async () => {
      while (!stopped) {
        await sleep(POLL_INTERVAL_MS);
        const response = await this.request(`/v1/tasks/${taskId}`).catch(() => null);
        if (stopped) return;
        if (response?.ok) {
          seen(await response.json());
        } else if (response?.status === 404) {
          stop();
          onLost(await errorOf(response));
        }
        // anything else (no connection, 503 from a store that is down) is tried again
      }
    };
    if (window.EventSource && !this.apiKey) {
      source = new EventSource(`/v1/tasks/${taskId}/events`);
      source.addEventListener("task", (event) => seen(JSON.parse(event.data)));
      // the stream ends after the task's last change (then `stopped` is set already);
      // before that, an error means no stream here: EventSource's own reconnecting is
      // replaced by polling, which also reports a task that is gone
      source.onerror = () => {
        source.close();
        if (!stopped) poll();
      };
    } else {
      poll();
    }
    return stop;
  }
}
