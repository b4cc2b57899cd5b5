// One photo's card: its task's status as the service reports it (uploading, refused,
// queued, running, then succeeded, failed or cancelled), progress, elapsed time, errors
// with Retry, and, once parsed, the result viewer and the downloads.

import { ResultViewer } from "./result-viewer.js";
import { isFinished } from "./transport.js";

const STAGE_NAMES = {
  queued: "Waiting", decoding: "Reading the photo", preprocessing: "Preparing",
  inference: "Finding people and parts", postprocessing: "Building the masks",
  rendering: "Drawing the results", done: "Done",
};
// The one list of codes the page knows: failures where sending the same photo again can
// succeed (a full queue, a service starting or draining, a run over the time limit). The
// service says when to retry (Retry-After) but not whether a failure is worth retrying;
// offering Retry for a photo it cannot read would only fail again.
const RETRYABLE = new Set(["queue_full", "not_ready", "timeout"]);

export class TaskCard {
  // service: main.js's ServiceDescription (model, models, chosen, labelsOf, described)
  constructor(file, { client, service }) {
    this.file = file;
    this.client = client;
    this.service = service;
    this.model = service.chosen;  // a retry runs on the same model; null: the service's default
    this.name = file.name || "pasted image";
    this.unwatch = () => {};
    this.el = document.querySelector("#task-template").content.firstElementChild.cloneNode(true);
    this.part(".name").textContent = this.name;
    this.part(".remove").addEventListener("click", () => this.remove());
    this.part(".retry").addEventListener("click", () => this.submit());
  }

  part(selector) {
    return this.el.querySelector(selector);
  }

  async submit() {
    clearTimeout(this.retryTimer);
    this.unwatch();
    this.part(".error").hidden = true;
    this.part(".result").hidden = true;
    this.setStatus("uploading", "Uploading…");
    this.setProgress(0);
    this.startClock();
    const { task, error, retryAfter } = await this.client.submitPhoto(this.file, this.service.model?.max_upload_bytes, this.model);
    if (error) {
      this.fail("refused", error, retryAfter);
      return;
    }
    this.update(task);
    if (!isFinished(task)) {
      this.unwatch = this.client.watchTask(task.id, {
        onTask: (changed) => this.update(changed),
        onLost: (lost) => this.fail("failed", lost),
      });
    }
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
    if (task.error) this.showError(task.error);
    if (isFinished(task)) {
      this.stopClock();
      if (task.status === "succeeded") this.showResult(task);
    }
  }

  // status: "refused" (the upload was not accepted) or "failed"
  fail(status, error, retryAfter) {
    this.stopClock();
    this.setStatus(status, status === "refused" ? "Refused" : "Failed");
    this.setProgress(1);
    this.showError(error, retryAfter);
  }

  setStatus(status, text) {
    this.el.dataset.status = status;  // style.css colours the card by it
    this.part(".status").textContent = text;
  }

  setProgress(fraction) {
    const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
    this.part(".bar").style.width = `${pct}%`;
    this.part(".progress").setAttribute("aria-valuenow", String(pct));
  }

  // the service's own words, with its code for anyone reporting a problem
  showError(error, retryAfter) {
    const box = this.part(".error");
    box.hidden = false;
    box.querySelector(".message").textContent = `${error.message} (${error.code})`;
    const retry = box.querySelector(".retry");
    retry.hidden = !RETRYABLE.has(error.code);
    if (!retry.hidden && retryAfter) {
      retry.textContent = `Retry (in ${retryAfter}s)`;
      this.retryTimer = setTimeout(() => this.submit(), retryAfter * 1000);
    } else {
      retry.textContent = "Retry";
    }
  }

  startClock() {
    this.stopClock();
    const started = performance.now();
    const tick = () => {
      const seconds = (performance.now() - started) / 1000;
      this.part(".detail").textContent = `${seconds.toFixed(1)} s`;
    };
    tick();
    this.clock = setInterval(tick, 100);
  }

  stopClock() {
    clearInterval(this.clock);
  }

  remove() {
    this.unwatch();
    this.stopClock();
    clearTimeout(this.retryTimer);
    if (this.task && !isFinished(this.task)) this.client.cancel(this.task.id);
    this.el.remove();
  }

  async showResult(task) {
    const result = task.result;
    await this.service.described;
    await ResultViewer.open(this.part(".result"), {
      id: task.id, name: this.file.name || "photo", file: this.file, result,
      labelsPng: await this.client.blob(task.links.labels), classes: this.service.labelsOf(result.model.id),
    });
    this.fillDownloads(task);
    this.part(".result").hidden = false;
    this.part(".detail").textContent +=
      ` · ${result.parts.length} parts` + (result.persons.length ? `, ${result.persons.length} people` : "") +
      (this.service.models.length > 1 ? ` · ${result.model.id}` : "");  // which of the choice ran it
  }

  // one link per output the service lists (/v1/model) and this task has
  fillDownloads(task) {
    const stem = (this.file.name || "photo").replace(/\.[^.]*$/, "");
    const links = (this.service.model?.outputs || []).filter((o) => task.links[o.name]).map((output) => {
      const a = document.createElement("a");
      a.className = `dl-${output.name}`;
      a.href = task.links[output.name];
      a.download = `${stem}.${output.file_name}`;
      a.title = output.title;
      a.textContent = `${output.name} ${output.media_type.split("/").pop().toUpperCase()}`;
      return a;
    });
    const downloads = this.part(".downloads");
    downloads.replaceChildren("Download:", ...links);
    downloads.hidden = !links.length;
  }
}
