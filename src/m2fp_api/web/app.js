// m2fp web page: vanilla JS, talks only to the public API (/v1/...).
"use strict";

const OUTPUTS = "mask,overlay,labels,parts";
const STAGE_NAMES = {
  queued: "Waiting", decoding: "Reading the photo", preprocessing: "Preparing",
  inference: "Finding people and parts", postprocessing: "Building the masks",
  rendering: "Drawing the results", done: "Done",
};
const FRIENDLY = {
  unsupported_media_type: "This file is not a photo the service can read. Use JPEG, PNG or WebP.",
  payload_too_large: "This file is too large to upload.",
  image_too_large: "This photo has too many pixels.",
  image_too_small: "This photo is too small, or too long and thin, to parse.",
  invalid_image: "This photo is damaged or incomplete.",
  queue_full: "The service is busy right now.",
  not_ready: "The service is not ready yet.",
  model_unavailable: "The service has no model loaded.",
  timeout: "This photo took too long and was stopped.",
  unauthorized: "This service needs an API key.",
};

const state = { labels: [], palette: [], model: null, apiKey: localStorage.getItem("m2fp-api-key") || "" };
const $ = (sel, root = document) => root.querySelector(sel);

function headers() {
  return state.apiKey ? { "X-API-Key": state.apiKey } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) $("#key-box").hidden = false;
  return response;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return { code: `http_${response.status}`, message: `The service answered ${response.status}.` };
}

function describeError(error) {
  const friendly = FRIENDLY[error.code];
  return friendly ? `${friendly} (${error.message})` : error.message;
}

// ---------------------------------------------------------------- service status

async function loadService() {
  const banner = $("#banner");
  for (;;) {
    let ready;
    try {
      ready = await api("/readyz");
    } catch (_) {
      ready = null;
    }
    if (ready && ready.ok) break;
    const error = ready ? await errorOf(ready) : { message: "The service cannot be reached." };
    banner.hidden = false;
    banner.textContent = `Not ready: ${error.message}`;
    await sleep(2000);
  }
  const [model, labels] = await Promise.all([api("/v1/model"), api("/v1/labels")]);
  if (!model.ok || !labels.ok) return;
  state.model = await model.json();
  state.labels = await labels.json();
  state.palette = state.labels.map((l) => l.color);
  const m = state.model;
  $("#model-info").textContent =
    `Model ${m.id} · ${m.single_human ? "one person" : "several people"} · ${m.backend} · ${m.threads} threads`;
  if (m.pretrained === false) {
    banner.hidden = false;
    banner.textContent = "Demo mode: this service runs a stand-in model with random weights " +
      "(pretrained: false). The masks below are not real parses.";
  } else {
    banner.hidden = true;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------- adding photos

function addFiles(files) {
  for (const file of files) {
    if (!file) continue;  // anything else goes to the service, which says what is wrong
    const card = new TaskCard(file);
    $("#tasks").prepend(card.el);
    card.submit();
  }
}

function setUpInputs() {
  const drop = $("#drop");
  const input = $("#file-input");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.items || [])]
      .filter((item) => item.kind === "file").map((item) => item.getAsFile());
    if (files.length) addFiles(files);
  });
  $("#api-key-save").addEventListener("click", () => {
    state.apiKey = $("#api-key").value.trim();
    localStorage.setItem("m2fp-api-key", state.apiKey);
    $("#key-box").hidden = true;
    loadService();
  });
}

// ---------------------------------------------------------------- one photo

class TaskCard {
  constructor(file) {
    this.file = file;
    this.el = $("#task-template").content.firstElementChild.cloneNode(true);
    $(".name", this.el).textContent = file.name || "pasted image";
    $(".remove", this.el).addEventListener("click", () => this.remove());
    $(".retry", this.el).addEventListener("click", () => this.submit());
    this.mode = "overlay";
    this.opacity = 0.55;
  }

  setStatus(status, text) {
    this.el.dataset.status = status;
    $(".status", this.el).textContent = text;
  }

  setProgress(fraction) {
    const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
    $(".bar", this.el).style.width = `${pct}%`;
    $(".progress", this.el).setAttribute("aria-valuenow", String(pct));
  }

  showError(error, retryAfter) {
    const box = $(".error", this.el);
    box.hidden = false;
    $(".message", box).textContent = describeError(error);
    const retry = $(".retry", box);
    retry.hidden = !(error.code === "queue_full" || error.code === "not_ready" || error.code === "timeout");
    if (!retry.hidden && retryAfter) {
      retry.textContent = `Retry (in ${retryAfter}s)`;
      this.retryTimer = setTimeout(() => this.submit(), retryAfter * 1000);
    } else {
      retry.textContent = "Retry";
    }
  }

  async submit() {
    clearTimeout(this.retryTimer);
    this.stopWatching();
    $(".error", this.el).hidden = true;
    $(".result", this.el).hidden = true;
    this.setStatus("uploading", "Uploading…");
    this.setProgress(0);
    this.startClock();
    const limit = state.model?.max_upload_bytes;
    if (limit && this.file.size > limit) {
      this.fail("refused", { code: "payload_too_large",
        message: `${(this.file.size / 2 ** 20).toFixed(1)} MB is over the ${(limit / 2 ** 20).toFixed(0)} MB limit.` });
      return;
    }
    const form = new FormData();
    form.append("file", this.file, "upload");
    form.append("outputs", OUTPUTS);
    let response;
    try {
      response = await api("/v1/parse", { method: "POST", body: form });
    } catch (_) {
      this.fail("refused", { code: "network", message: "The upload failed: the service cannot be reached." });
      return;
    }
    if (!response.ok) {
      const retryAfter = parseInt(response.headers.get("Retry-After") || "0", 10);
      this.fail("refused", await errorOf(response), retryAfter);
      return;
    }
    this.update(await response.json());
    if (!this.terminal) this.watch();
  }

  fail(status, error, retryAfter) {
    this.stopClock();
    this.setStatus(status, status === "refused" ? "Refused" : "Failed");
    this.setProgress(1);
    this.showError(error, retryAfter);
  }

  get terminal() {
    return ["succeeded", "failed", "cancelled"].includes(this.task?.status);
  }

  update(task) {
    this.task = task;
    const stage = STAGE_NAMES[task.stage] || task.stage;
    if (task.status === "queued") {
      const pos = task.queue_position;
      this.setStatus("queued", pos ? `In queue · position ${pos}` : "In queue");
    } else if (task.status === "running") {
      this.setStatus("running", `${stage} · ${Math.round(task.progress * 100)}%`);
    } else if (task.status === "succeeded") {
      this.setStatus("succeeded", task.cached ? "Done (from an earlier identical upload)" : "Done");
    } else {
      this.setStatus(task.status, task.status === "cancelled" ? "Cancelled" : "Failed");
    }
    this.setProgress(task.progress);
    if (task.status === "failed" && task.error) this.showError(task.error);
    if (this.terminal) {
      this.stopClock();
      this.stopWatching();
      if (task.status === "succeeded") this.showResult(task);
    }
  }

  watch() {
    // live progress from server-sent events, falling back to polling
    const url = `/v1/tasks/${this.task.id}/events`;
    if (window.EventSource && !state.apiKey) {
      this.source = new EventSource(url);
      this.source.addEventListener("task", (e) => this.update(JSON.parse(e.data)));
      this.source.onerror = () => {
        this.stopWatching();
        if (!this.terminal) this.poll();
      };
    } else {
      this.poll();
    }
  }

  async poll() {
    while (!this.terminal && this.el.isConnected) {
      await sleep(500);
      const r = await api(`/v1/tasks/${this.task.id}`).catch(() => null);
      if (r && r.ok) this.update(await r.json());
      else if (r && r.status === 404) {
        this.fail("failed", { code: "not_found", message: "The task has expired." });
        return;
      }
    }
  }

  stopWatching() {
    if (this.source) this.source.close();
    this.source = null;
  }

  startClock() {
    this.stopClock();
    const started = performance.now();
    const tick = () => {
      const seconds = (performance.now() - started) / 1000;
      $(".detail", this.el).textContent = `${seconds.toFixed(1)} s`;
    };
    tick();
    this.clock = setInterval(tick, 100);
  }

  stopClock() {
    clearInterval(this.clock);
  }

  remove() {
    this.stopWatching();
    this.stopClock();
    clearTimeout(this.retryTimer);
    if (this.task && !this.terminal) api(`/v1/tasks/${this.task.id}`, { method: "DELETE" });
    this.el.remove();
  }

  // ------------------------------------------------------------ result view

  async showResult(task) {
    const result = task.result;
    const { width, height } = result.image;
    const [photo, labels] = await Promise.all([
      loadPhoto(this.file, width, height),
      loadLabels(task.links.labels, width, height),
    ]);
    this.result = result;
    this.width = width;
    this.height = height;
    this.photo = photo;
    this.classMap = labels;
    this.layers = buildLayers(labels, width, height);
    const canvas = $(".view", this.el);
    canvas.width = width;
    canvas.height = height;
    this.render();
    this.fillLegend();
    this.fillPersons();
    this.bindViewer();
    for (const [cls, key] of [["mask", "mask"], ["overlay", "overlay"], ["labels", "labels"], ["parts", "parts"]]) {
      const a = $(`.dl-${cls}`, this.el);
      a.href = task.links[key];
      a.setAttribute("download", `${(this.file.name || "photo").replace(/\.[^.]*$/, "")}.${key}${key === "parts" ? ".json" : ".png"}`);
    }
    $(".result", this.el).hidden = false;
    $(".detail", this.el).textContent +=
      ` · ${result.parts.length} parts` + (result.persons.length ? `, ${result.persons.length} people` : "");
  }

  render() {
    const ctx = $(".view", this.el).getContext("2d");
    ctx.globalAlpha = 1;
    if (this.mode === "mask") {
      ctx.putImageData(this.layers.mask, 0, 0);
      return;
    }
    ctx.drawImage(this.photo, 0, 0, this.width, this.height);
    if (this.mode === "overlay") {
      ctx.globalAlpha = this.opacity;
      ctx.drawImage(this.layers.overlay, 0, 0);
      ctx.globalAlpha = 1;
    }
  }

  bindViewer() {
    const canvas = $(".view", this.el);
    const tip = $(".tip", this.el);
    for (const radio of this.el.querySelectorAll(".modes input")) {
      radio.name = `mode-${this.task.id}`;
      radio.addEventListener("change", () => {
        this.mode = radio.value;
        this.render();
      });
    }
    const slider = $(".opacity", this.el);
    slider.addEventListener("input", () => {
      this.opacity = slider.value / 100;
      $(".opacity-value", this.el).textContent = `${slider.value}%`;
      if (this.mode !== "overlay") {
        this.mode = "overlay";
        this.el.querySelector('.modes input[value="overlay"]').checked = true;
      }
      this.render();
    });
    const name = (event) => {
      const rect = canvas.getBoundingClientRect();
      const x = Math.floor((event.clientX - rect.left) * this.width / rect.width);
      const y = Math.floor((event.clientY - rect.top) * this.height / rect.height);
      if (x < 0 || y < 0 || x >= this.width || y >= this.height) return null;
      return { x, y, left: event.clientX - rect.left, top: event.clientY - rect.top, text: this.describe(x, y) };
    };
    const show = (event) => {
      const at = name(event);
      if (!at) {
        tip.hidden = true;
        return;
      }
      tip.textContent = at.text;
      tip.hidden = false;
      // keep the whole tip over the picture, also at its edges
      const half = tip.offsetWidth / 2;
      const left = Math.min(Math.max(at.left, half), canvas.clientWidth - half);
      tip.style.left = `${left}px`;
      tip.style.top = `${at.top}px`;
      tip.hidden = false;
    };
    canvas.addEventListener("pointermove", show);
    canvas.addEventListener("pointerdown", show);
    canvas.addEventListener("pointerleave", () => { tip.hidden = true; });
  }

  describe(x, y) {
    const cls = this.classMap[y * this.width + x];
    if (!cls) return "Background";
    const label = state.labels[cls]?.name || `class ${cls}`;
    // the person: one whose part of this class covers the point (best score first)
    const part = this.result.parts
      .filter((p) => p.label_id === cls && p.person_id !== null &&
        x >= p.bbox[0] && y >= p.bbox[1] && x < p.bbox[0] + p.bbox[2] && y < p.bbox[1] + p.bbox[3])
      .sort((a, b) => b.score - a.score)[0];
    return part ? `${label} · person ${part.person_id + 1}` : label;
  }

  fillLegend() {
    const counts = new Map();
    for (const v of this.classMap) if (v) counts.set(v, (counts.get(v) || 0) + 1);
    const total = this.classMap.length;
    const list = $(".legend ul", this.el);
    list.replaceChildren();
    const entries = [...counts.entries()].sort((a, b) => b[1] - a[1]);
    for (const [cls, n] of entries) {
      const li = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${(state.palette[cls] || [0, 0, 0]).join(",")})`;
      const label = document.createElement("span");
      label.textContent = state.labels[cls]?.name || `class ${cls}`;
      const share = document.createElement("span");
      share.className = "share";
      const pct = 100 * n / total;
      share.textContent = pct < 0.1 ? "<0.1%" : `${pct.toFixed(1)}%`;
      li.append(swatch, label, share);
      list.append(li);
    }
    if (!entries.length) list.innerHTML = "<li>No person found.</li>";
    const summary = entries.slice(0, 6).map(([c, n]) =>
      `${state.labels[c]?.name} ${(100 * n / total).toFixed(0)}%`).join(", ");
    $(".view", this.el).setAttribute("aria-label",
      `Parsed ${this.file.name || "photo"}: ${summary || "no person found"}`);
  }

  fillPersons() {
    const section = $(".persons", this.el);
    const persons = this.result.persons;
    section.hidden = !persons.length;
    const list = $("ul", section);
    list.replaceChildren();
    for (const person of persons) {
      const li = document.createElement("li");
      const parts = [...new Set(person.parts)].join(", ") || "no parts";
      li.textContent = `Person ${person.person_id + 1} (${Math.round(person.score * 100)}%): ${parts}`;
      list.append(li);
    }
  }
}

async function loadPhoto(file, width, height) {
  // the browser applies EXIF orientation, as the service did
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" }).catch(() => null);
  if (bitmap) return bitmap;
  const canvas = new OffscreenCanvas(width, height);
  canvas.getContext("2d").fillRect(0, 0, width, height);
  return canvas;
}

async function loadLabels(url, width, height) {
  const response = await api(url);
  const bitmap = await createImageBitmap(await response.blob(),
    { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const ids = new Uint8Array(width * height);
  for (let i = 0; i < ids.length; i++) ids[i] = rgba[4 * i];
  return ids;
}

function buildLayers(classMap, width, height) {
  // overlay: part colours, transparent background; mask: part colours on black
  const overlay = new ImageData(width, height);
  const mask = new ImageData(width, height);
  for (let i = 0; i < classMap.length; i++) {
    const cls = classMap[i];
    const colour = state.palette[cls] || [0, 0, 0];
    const o = 4 * i;
    mask.data[o] = colour[0]; mask.data[o + 1] = colour[1]; mask.data[o + 2] = colour[2]; mask.data[o + 3] = 255;
    if (cls) {
      overlay.data[o] = colour[0]; overlay.data[o + 1] = colour[1]; overlay.data[o + 2] = colour[2];
      overlay.data[o + 3] = 255;
    }
  }
  const canvas = new OffscreenCanvas(width, height);
  canvas.getContext("2d").putImageData(overlay, 0, 0);
  return { overlay: canvas, mask };
}

setUpInputs();
loadService();
